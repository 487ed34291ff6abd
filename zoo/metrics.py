"""ACC and AUC with MedMNIST's semantics, confusion matrices and per-class figures, through public APIs.

Per task (as ``medmnist.evaluator.getAUC`` / ``getACC``):

- binary-class: AUC of the class-1 score; ACC with ``score > 0.5``.
- multi-class and ordinal-regression: unweighted mean of one-vs-rest AUCs; ACC of the argmax.
- multi-label: mean of per-label AUCs; mean of per-label ACCs with ``score > 0.5``.

AUCs come from ``sklearn.metrics.roc_auc_score``, the function medmnist's evaluator calls, on the
same scores (float64, which holds float32 probabilities exactly), so they agree with medmnist's to
the last bit or ~1e-15. ACCs are ratios of integer counts, exactly ``sklearn.metrics.accuracy_score``.
Decisions (threshold, argmax) come from the task table (:mod:`zoo.tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from zoo.tasks import get_task


def _check(y_true: np.ndarray, y_score: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, L) int64, scores (N, C) float64), checked: one length, finite probabilities."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape[0] != y_score.shape[0]:
        raise ValueError(f"{y_true.shape[0]} labels but {y_score.shape[0]} scores")
    if y_score.ndim == 1:
        y_score = y_score[:, None]
    y_true = y_true.reshape(len(y_true), -1)
    if not get_task(task).sigmoid and y_true.shape[1] != 1:
        raise ValueError(f"{task} labels must be one integer per sample, got shape {y_true.shape}")
    if not np.isfinite(y_score).all():
        raise ValueError("scores contain NaN or infinity; check the model's outputs")
    if y_score.size and (y_score.min() < 0 or y_score.max() > 1):
        raise ValueError("scores must be probabilities in [0, 1]; apply softmax/sigmoid first")
    return y_true.astype(np.int64), y_score


def _auc(score: np.ndarray, target: np.ndarray) -> float:
    """ROC AUC of one binary problem (scikit-learn's, as medmnist)."""
    # function-level import: scikit-learn takes ~0.5 s to import, which loading the zoo does not need
    from sklearn.metrics import roc_auc_score

    if target.min() == target.max():
        raise ValueError("AUC is undefined when only one class is present in the labels")
    return float(roc_auc_score(target, score))


def _acc(decision: np.ndarray, target: np.ndarray) -> float:
    """Share of correct decisions, from integer counts (the float ``accuracy_score`` returns)."""
    return int((decision == target).sum()) / len(target)


def _decisions(y: np.ndarray, s: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets, decisions) as the task decides: (N,) class indices, or (N, L) 0/1 for multi-label tasks."""
    t = get_task(task)
    if t.multilabel:
        return y, t.positives(s[:, : y.shape[1]]).astype(np.int64)
    if t.binary:
        return y[:, 0], (s[:, -1] > t.threshold).astype(np.int64)
    return y[:, 0], s.argmax(axis=1)


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """ACC and AUC of ``y_score`` (N, C) or (N,) against integer labels ``y_true`` (N, L).

    Scores must be probabilities in [0, 1] (as ``Prediction.probs``).

    >>> compute_metrics(np.array([[0], [1]]), np.array([[0.8, 0.2], [0.3, 0.7]]), "binary-class")
    {'acc': 1.0, 'auc': 1.0}
    """
    t = get_task(task)
    y, s = _check(y_true, y_score, task)
    target, decision = _decisions(y, s, task)
    if t.binary:
        return {"acc": _acc(decision, target), "auc": _auc(s[:, -1], target)}
    if t.multilabel:
        # Summed label by label, then divided, in medmnist's order, so the float result is the same.
        acc = auc = 0.0
        for i in range(y.shape[1]):
            acc += _acc(decision[:, i], y[:, i])
            auc += _auc(s[:, i], y[:, i])
        return {"acc": acc / y.shape[1], "auc": auc / y.shape[1]}
    auc = 0.0  # multi-class and ordinal: one class per image, one-vs-rest AUCs
    for i in range(s.shape[1]):
        auc += _auc(s[:, i], (target == i).astype(np.int64))
    return {"acc": _acc(decision, target), "auc": auc / s.shape[1]}


def confusion(y_true: np.ndarray, y_score: np.ndarray, task: str) -> np.ndarray:
    """The confusion matrix of the task's decisions (rows: true class, columns: predicted; int64 counts).

    - binary-class: (2, 2), ``[[tn, fp], [fn, tp]]`` with ``score > 0.5`` positive.
    - multi-class, ordinal-regression: (C, C) of the argmax, C the number of score columns.
    - multi-label: (L, 2, 2), one ``[[tn, fp], [fn, tp]]`` per label (scikit-learn's
      ``multilabel_confusion_matrix`` layout).

    >>> confusion(np.array([[0], [1], [1]]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]), "binary-class")
    array([[1, 0],
           [1, 1]])
    """
    t = get_task(task)
    y, s = _check(y_true, y_score, task)
    target, decision = _decisions(y, s, task)
    if t.multilabel:
        out = np.zeros((y.shape[1], 2, 2), dtype=np.int64)
        for i in range(y.shape[1]):
            np.add.at(out[i], (target[:, i], decision[:, i]), 1)
        return out
    k = 2 if t.binary else s.shape[1]
    if target.size and (target.min() < 0 or target.max() >= k):
        raise ValueError(f"labels must be class indices 0..{k - 1} for {k} score columns, got {target.min()}.."
                         f"{target.max()}")
    out = np.zeros((k, k), dtype=np.int64)
    np.add.at(out, (target, decision), 1)
    return out


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def per_class(y_true: np.ndarray, y_score: np.ndarray, task: str,
              labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per class (per label for multi-label tasks): its support and how well it is recognised.

    Each row holds ``index`` (and ``label`` when ``labels`` names them), ``n`` (images of that class,
    or with that label), ``recall`` (the share of them decided as it), ``precision`` (the share of the
    images decided as it that are), ``acc`` and ``auc``:

    - ``acc``: for multi-label tasks the label's own binary accuracy (their mean is the task's ACC);
      for one-label tasks the per-class accuracy, which is the recall.
    - ``auc``: one-vs-rest ROC AUC of the class's score column; for multi-class and multi-label tasks
      the mean over classes is the task's AUC. Binary tasks give the same AUC for both classes.

    A figure that is undefined (no image of the class, none decided as it, only one class in the
    labels) is ``None``.
    """
    t = get_task(task)
    cm = confusion(y_true, y_score, task)
    y, s = _check(y_true, y_score, task)
    rows = []
    for i in range(len(cm)):
        if t.multilabel:
            (tn, fp), (fn, tp) = cm[i]
            target, score = y[:, i], s[:, i]
        else:
            tp, fn, fp = int(cm[i, i]), int(cm[i].sum() - cm[i, i]), int(cm[:, i].sum() - cm[i, i])
            tn = int(cm.sum()) - tp - fn - fp
            target = (y[:, 0] == i).astype(np.int64)
            # binary: class 0 ranks by -p (exact), not by 1 - p, which rounds distinct small p together
            score = s[:, i] if not t.binary else (s[:, -1] if i == 1 else -s[:, -1])
        recall = _ratio(int(tp), int(tp + fn))
        auc = _auc(score, target) if 0 < target.sum() < len(target) else None
        row = {"index": i, "n": int(tp + fn), "recall": recall, "precision": _ratio(int(tp), int(tp + fp)),
               "acc": _ratio(int(tp + tn), int(tp + tn + fp + fn)) if t.multilabel else recall, "auc": auc}
        if labels is not None:
            row = {"label": labels[i], **row}
        rows.append(row)
    return rows
