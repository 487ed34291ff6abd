"""ACC and AUC with MedMNIST's semantics, computed with torchmetrics.

Per task (as ``medmnist.evaluator.getAUC`` / ``getACC``):

- binary-class: AUC of the class-1 score; ACC with ``score > 0.5``.
- multi-class and ordinal-regression: unweighted mean of one-vs-rest AUCs; ACC of the argmax.
- multi-label: mean of per-label AUCs; mean of per-label ACCs with ``score > 0.5``.

Scores are taken in float64 so results agree with scikit-learn (which medmnist uses) to ~1e-15.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_stat_scores
from torchmetrics.functional.classification.precision_recall_curve import _binary_clf_curve

from zoo.tasks import get_task


def _check(y_true: np.ndarray, y_score: np.ndarray, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape[0] != y_score.shape[0]:
        raise ValueError(f"{y_true.shape[0]} labels but {y_score.shape[0]} scores")
    if y_score.ndim == 1:
        y_score = y_score[:, None]
    y_true = y_true.reshape(len(y_true), -1)
    if not get_task(task).sigmoid and y_true.shape[1] != 1:
        raise ValueError(f"{task} labels must be one integer per sample, got shape {y_true.shape}")
    return torch.from_numpy(y_true.astype(np.int64)), torch.from_numpy(y_score)


def _auc(score: torch.Tensor, target: torch.Tensor) -> float:
    """ROC AUC of one binary problem, from torchmetrics' ROC counts, in float64.

    torchmetrics' public AUROC returns float32; float64 counts make the area agree with
    scikit-learn's (and so medmnist's) to ~1e-15 instead of ~1e-8.
    """
    if target.min() == target.max():
        raise ValueError("AUC is undefined when only one class is present in the labels")
    weights = torch.ones_like(score, dtype=torch.float64)
    fps, tps, _ = _binary_clf_curve(score, target, sample_weights=weights)
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fps / fps[-1]])
    tpr = torch.cat([zero, tps / tps[-1]])
    return float(torch.trapezoid(tpr, fpr))


def _acc(score: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy of ``score > 0.5`` from torchmetrics' integer counts (exact, unlike its float32 ratio)."""
    # binary_stat_scores thresholds with `>=`; nudge so a score of exactly 0.5 is negative, as medmnist's `>`.
    tp, fp, tn, fn, _ = binary_stat_scores(torch.where(score > 0.5, 1.0, 0.0), target).tolist()
    return (tp + tn) / (tp + fp + tn + fn)


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """ACC and AUC of ``y_score`` (N, C) or (N,) against integer labels ``y_true`` (N, L).

    Scores must be probabilities in [0, 1] (as ``Prediction.probs``).

    >>> compute_metrics(np.array([[0], [1]]), np.array([[0.8, 0.2], [0.3, 0.7]]), "binary-class")
    {'acc': 1.0, 'auc': 1.0}
    """
    t = get_task(task)
    y, s = _check(y_true, y_score, task)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or infinity; check the model's outputs")
    if float(s.min()) < 0 or float(s.max()) > 1:
        raise ValueError("scores must be probabilities in [0, 1]; apply softmax/sigmoid first")
    if t.binary:
        return {"acc": _acc(s[:, -1], y[:, 0]), "auc": _auc(s[:, -1], y[:, 0])}
    if t.multilabel:
        # Summed label by label, then divided, in medmnist's order, so the float result is the same.
        acc = auc = 0.0
        for i in range(y.shape[1]):
            acc += _acc(s[:, i], y[:, i])
            auc += _auc(s[:, i], y[:, i])
        return {"acc": acc / y.shape[1], "auc": auc / y.shape[1]}
    target = y[:, 0]  # multi-class and ordinal: one class per image
    correct = int((s.argmax(dim=1) == target).sum())
    auc = 0.0
    for i in range(s.shape[1]):
        auc += _auc(s[:, i], (target == i).long())
    return {"acc": correct / len(target), "auc": auc / s.shape[1]}
