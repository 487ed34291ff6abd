"""compute_metrics against medmnist's own evaluator functions (sklearn), for every task type."""

from __future__ import annotations

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC

from zoo.metrics import compute_metrics


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
