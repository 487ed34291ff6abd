"""Logits to medmnist-layout probabilities, and probabilities to label names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.inference import logits_to_probs, make_prediction, to_batch


def test_binary_probs_are_one_minus_p_and_p():
    logits = torch.tensor([[0.0], [2.0], [-1.0]])
    p = torch.sigmoid(logits)
    torch.testing.assert_close(logits_to_probs(logits, "binary-class"), torch.cat([1 - p, p], 1))


def test_multilabel_probs_are_independent_sigmoids():
    logits = torch.randn(4, 14)
    torch.testing.assert_close(logits_to_probs(logits, "multi-label, binary-class"), torch.sigmoid(logits))


@pytest.mark.parametrize("task", ["multi-class", "ordinal-regression"])
def test_softmax_tasks(task):
    logits = torch.randn(5, 4, dtype=torch.float64)
    out = logits_to_probs(logits, task)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(logits.float(), 1))


def test_binary_label_threshold_is_strict():
    probs = torch.tensor([[0.5, 0.5], [0.4, 0.6], [0.9, 0.1]])
    pred = make_prediction(probs, "binary-class", ("malignant", "benign"))
    assert pred.labels == ["malignant", "benign", "malignant"]
    assert pred.indices.tolist() == [0, 1, 0]


def test_multilabel_sets_and_top_label():
    probs = torch.tensor([[0.9, 0.6, 0.5], [0.1, 0.2, 0.3]])
    pred = make_prediction(probs, "multi-label, binary-class", ("a", "b", "c"))
    assert pred.label_sets == [["a", "b"], []]  # 0.5 is not above the threshold; an empty set is allowed
    assert pred.labels == ["a", "c"]


def test_multiclass_argmax():
    pred = make_prediction(torch.tensor([[0.2, 0.5, 0.3]]), "multi-class", ("x", "y", "z"))
    assert (pred.labels, pred.label_sets, pred.indices.tolist()) == (["y"], [["y"]], [1])
    assert isinstance(pred.probs, np.ndarray) and pred.probs.dtype == np.float32


def test_to_batch_groups_runs_of_equal_shape_in_order():
    a, b = np.zeros((28, 28), np.uint8), np.zeros((32, 32), np.uint8)
    groups = to_batch([a, a, b, a], in_chans=1)
    assert [tuple(g.shape) for g in groups] == [(2, 1, 28, 28), (1, 1, 32, 32), (1, 1, 28, 28)]
    groups = to_batch([a, a.astype(np.float32) / 255], in_chans=1)  # uint8 and float are not mixed
    assert [g.dtype for g in groups] == [torch.uint8, torch.float32]
