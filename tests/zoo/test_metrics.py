"""compute_metrics against medmnist's own evaluator functions, confusion and per_class against scikit-learn,
for every task type."""

from __future__ import annotations

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

from zoo.metrics import compute_metrics, confusion, per_class


def _binary(rng, n):
    y = rng.integers(0, 2, size=(n, 1))
    p = np.round(rng.random(n), 1)  # coarse scores: many ties, and exact 0.5s
    p[:5] = 0.5
    return y, np.stack([1 - p, p], axis=1)


def _softmax_like(rng, n, k):
    y = rng.integers(0, k, size=(n, 1))
    y[:k, 0] = np.arange(k)  # every class present
    s = np.round(rng.random((n, k)), 1)
    s[:3] = 0.5  # rows with all-equal scores: argmax ties resolve to the first class in both
    return y, s / s.sum(axis=1, keepdims=True)


def _multilabel(rng, n, k):
    y = rng.integers(0, 2, size=(n, k))
    y[0], y[1] = 0, 1
    s = np.round(rng.random((n, k)), 1)
    s[:, 0] = 0.5  # a label scored exactly at the threshold: `> 0.5` makes all of them negative
    return y, s


CASES = {
    "binary-class": lambda rng: _binary(rng, 200),
    "multi-class": lambda rng: _softmax_like(rng, 300, 7),
    "ordinal-regression": lambda rng: _softmax_like(rng, 150, 5),
    "multi-label, binary-class": lambda rng: _multilabel(rng, 120, 14),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task", list(CASES))
def test_matches_medmnist_evaluator(task, seed):
    y, s = CASES[task](np.random.default_rng(seed))
    got = compute_metrics(y, s, task)
    assert got["acc"] == getACC(y, s, task)
    assert abs(got["auc"] - getAUC(y, s, task)) <= 1e-12
    assert set(got) == {"acc", "auc"}


@pytest.mark.parametrize("task", list(CASES))
def test_float32_scores_match_medmnist(task):
    # Prediction.probs are float32; the metric must read them exactly as medmnist does.
    y, s = CASES[task](np.random.default_rng(5))
    s = (s + np.random.default_rng(6).normal(0, 1e-3, s.shape)).clip(0, 1).astype(np.float32)
    got = compute_metrics(y, s, task)
    assert got["acc"] == getACC(y, s, task)
    assert abs(got["auc"] - getAUC(y, s, task)) <= 1e-12


def test_binary_accepts_one_score_column_and_flat_labels():
    y, s = _binary(np.random.default_rng(3), 64)
    two = compute_metrics(y, s, "binary-class")
    assert compute_metrics(y[:, 0], s[:, 1], "binary-class") == two
    assert two["acc"] == getACC(y, s[:, 1], "binary-class")


def test_threshold_is_strictly_greater_than_half():
    y = np.array([[1], [0]])
    s = np.array([[0.5, 0.5], [0.5, 0.5]])  # 0.5 is predicted negative, as medmnist's `> 0.5`
    assert compute_metrics(y, s, "binary-class")["acc"] == 0.5
    s = np.array([[0.4, 0.6], [0.5, 0.5]])
    assert compute_metrics(y, s, "binary-class") == {"acc": 1.0, "auc": 1.0}


def test_docstring_example():
    out = compute_metrics(np.array([[0], [1]]), np.array([[0.8, 0.2], [0.3, 0.7]]), "binary-class")
    assert out == {"acc": 1.0, "auc": 1.0}


@pytest.mark.parametrize("bad", [-0.01, 1.01])
def test_scores_outside_unit_interval_raise(bad):
    y, s = _binary(np.random.default_rng(0), 20)
    s[3, 1] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_metrics(y, s, "binary-class")


def test_logits_are_rejected_for_multiclass():
    y, _ = _softmax_like(np.random.default_rng(0), 30, 3)
    with pytest.raises(ValueError, match="softmax"):
        compute_metrics(y, np.random.default_rng(1).normal(0, 3, (30, 3)), "multi-class")


def test_nan_scores_raise():
    y = np.array([[0], [1], [0], [1]])
    s = np.array([[0.5, 0.5], [np.nan, np.nan], [0.8, 0.2], [0.1, 0.9]])
    with pytest.raises(ValueError):
        compute_metrics(y, s, "binary-class")


def test_length_mismatch_raises():
    y, s = _binary(np.random.default_rng(0), 20)
    with pytest.raises(ValueError, match="20 labels but 19 scores"):
        compute_metrics(y, s[:19], "binary-class")


def test_unknown_task_raises():
    y, s = _binary(np.random.default_rng(0), 20)
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        compute_metrics(y, s, "regression")


def test_multiclass_labels_must_be_one_column():
    with pytest.raises(ValueError, match="one integer per sample"):
        compute_metrics(np.zeros((4, 2), int), np.full((4, 2), 0.5), "multi-class")


def test_auc_undefined_with_one_class():
    with pytest.raises(ValueError, match="only one class"):
        compute_metrics(np.zeros((4, 1), int), np.full((4, 2), 0.5), "binary-class")


def test_metrics_use_no_private_torchmetrics_function():
    import zoo.metrics

    src = open(zoo.metrics.__file__).read()
    assert "torchmetrics" not in src and "_binary_clf_curve" not in src


def _sk_decisions(y, s, task):
    """The decisions as medmnist's evaluator makes them (threshold 0.5, argmax), written out independently."""
    if task == "multi-label, binary-class":
        return y, (s > 0.5).astype(int)
    if task == "binary-class":
        return y[:, 0], (s[:, -1] > 0.5).astype(int)
    return y[:, 0], s.argmax(axis=1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("task", list(CASES))
def test_confusion_matches_sklearn(task, seed):
    y, s = CASES[task](np.random.default_rng(seed))
    cm = confusion(y, s, task)
    target, pred = _sk_decisions(y, s, task)
    assert cm.dtype == np.int64
    if task == "multi-label, binary-class":
        assert cm.shape == (14, 2, 2)
        np.testing.assert_array_equal(cm, multilabel_confusion_matrix(target, pred))
    else:
        k = s.shape[1]
        assert cm.shape == (k, k)
        np.testing.assert_array_equal(cm, confusion_matrix(target, pred, labels=list(range(k))))
    assert cm.sum() == y.size  # every image (every image-label pair) counted once


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("task", list(CASES))
def test_per_class_matches_sklearn(task, seed):
    y, s = CASES[task](np.random.default_rng(seed))
    names = [f"c{i}" for i in range(s.shape[1])]
    rows = per_class(y, s, task, labels=names)
    target, pred = _sk_decisions(y, s, task)
    k = s.shape[1]
    assert [r["index"] for r in rows] == list(range(k)) and [r["label"] for r in rows] == names
    recall = recall_score(target, pred, average=None, labels=None if task.startswith("multi-label") else range(k))
    precision = precision_score(target, pred, average=None, zero_division=np.nan,
                                labels=None if task.startswith("multi-label") else range(k))
    for i, r in enumerate(rows):
        assert r["recall"] == recall[i]
        assert r["precision"] == precision[i] or (r["precision"] is None and np.isnan(precision[i]))
        if task == "multi-label, binary-class":
            assert r["n"] == int(y[:, i].sum())
            assert r["acc"] == accuracy_score(y[:, i], pred[:, i])
            assert r["auc"] == roc_auc_score(y[:, i], s[:, i])
        else:
            assert r["n"] == int((y[:, 0] == i).sum())
            assert r["acc"] == r["recall"]  # a class's accuracy: the share of its images decided as it
            col = s[:, -1] if task == "binary-class" else s[:, i]
            want = roc_auc_score(target == i, col if task != "binary-class" or i == 1 else -col)
            assert abs(r["auc"] - want) <= 1e-15
            assert abs(r["auc"] - roc_auc_score(target == i, s[:, i])) <= 1e-12
    m = compute_metrics(y, s, task)
    if task == "binary-class":
        assert abs(rows[0]["auc"] - m["auc"]) <= 1e-12 and rows[1]["auc"] == m["auc"]
        assert (rows[0]["n"] * rows[0]["recall"] + rows[1]["n"] * rows[1]["recall"]) / len(y) == pytest.approx(m["acc"])
    else:  # the task's figures are the means of the per-class ones (summed in the same order)
        assert sum(r["auc"] for r in rows) / k == m["auc"]
    if task == "multi-label, binary-class":
        assert sum(r["acc"] for r in rows) / k == m["acc"]


def test_per_class_undefined_figures_are_none():
    y = np.array([[0], [0], [1], [1]])
    s = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    rows = per_class(y, s, "multi-class")
    assert rows[2] == {"index": 2, "n": 0, "recall": None, "precision": None, "acc": None, "auc": None}
    assert rows[0]["recall"] == 0.5 and rows[0]["precision"] == 1.0 and rows[1]["precision"] == 2 / 3


def test_confusion_binary_with_one_score_column_and_threshold_rule():
    y = np.array([0, 1, 1, 0])
    p = np.array([0.5, 0.51, 0.2, 0.9])  # 0.5 is negative, as medmnist's `> 0.5`
    np.testing.assert_array_equal(confusion(y, p, "binary-class"), [[1, 1], [1, 1]])
    np.testing.assert_array_equal(confusion(y, np.stack([1 - p, p], 1), "binary-class"), [[1, 1], [1, 1]])


def test_confusion_refuses_labels_outside_the_score_columns():
    with pytest.raises(ValueError, match="class indices 0..1"):
        confusion(np.array([[0], [2]]), np.full((2, 2), 0.5), "multi-class")
