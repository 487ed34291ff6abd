"""MedAlmighty's loss against its formula, written out by hand."""

from __future__ import annotations

import pytest
import torch

from training.medalmighty.losses import MedAlmightyLoss, kd_loss, task_loss


def _softmax_reference(s, t, y, alpha, temp):
    ce = -torch.log_softmax(s, 1)[torch.arange(len(y)), y[:, 0]].mean()
    pt = torch.softmax(t / temp, 1)
    kl = (pt * (torch.log(pt) - torch.log_softmax(s / temp, 1))).sum(1).mean()  # batchmean
    return alpha * ce + (1 - alpha) * temp**2 * kl, ce, kl


def _sigmoid_reference(s, t, y, alpha, temp):
    p = torch.sigmoid(s)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    ps, pt = torch.sigmoid(s / temp), torch.sigmoid(t / temp)
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    return alpha * bce + (1 - alpha) * temp**2 * kl.mean(), bce, kl.mean()


@pytest.mark.parametrize("task,k", [("multi-class", 7), ("ordinal-regression", 5)])
@pytest.mark.parametrize("alpha,temp", [(0.2, 2.0), (0.5, 1.0), (0.0, 4.0)])
def test_softmax_tasks_match_formula(task, k, alpha, temp):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, k, generator=g, dtype=torch.float64), torch.randn(16, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (16, 1), generator=g)
    out = MedAlmightyLoss(task, alpha, temp)(s, y, t)
    loss, ce, kl = _softmax_reference(s, t, y, alpha, temp)
    torch.testing.assert_close(out["loss"].double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["task"].double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kd"].double(), kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task,k", [("binary-class", 1), ("multi-label, binary-class", 14)])
@pytest.mark.parametrize("alpha,temp", [(0.2, 2.0), (0.7, 3.0)])
def test_sigmoid_tasks_match_formula(task, k, alpha, temp):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(12, k, generator=g, dtype=torch.float64), torch.randn(12, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (12, k), generator=g)
    out = MedAlmightyLoss(task, alpha, temp)(s, y, t)
    loss, bce, kl = _sigmoid_reference(s, t, y.double(), alpha, temp)
    torch.testing.assert_close(out["loss"].double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["task"].double(), bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kd"].double(), kl, rtol=1e-5, atol=1e-6)


def test_kd_is_mean_over_labels_not_sum():
    # 1 label or the same label repeated 14 times: the same KD value (alpha weighs alike)
    s, t = torch.randn(8, 1), torch.randn(8, 1)
    one = kd_loss(s, t, "binary-class", 2.0)
    many = kd_loss(s.repeat(1, 14), t.repeat(1, 14), "multi-label, binary-class", 2.0)
    torch.testing.assert_close(one, many)


@pytest.mark.parametrize("task,k", [("multi-class", 4), ("binary-class", 1), ("multi-label, binary-class", 3)])
def test_alpha_one_or_no_teacher_is_task_loss(task, k):
    s, t = torch.randn(6, k), torch.randn(6, k)
    y = torch.randint(0, 2 if k <= 3 and task != "multi-class" else k, (6, k if "label" in task else 1))
    want = task_loss(s, y, task)
    for out in (MedAlmightyLoss(task, 1.0)(s, y, t), MedAlmightyLoss(task, 0.3)(s, y, None)):
        torch.testing.assert_close(out["loss"], want)
        assert float(out["kd"]) == 0.0


@pytest.mark.parametrize("task,k", [("multi-class", 5), ("binary-class", 1), ("multi-label, binary-class", 4)])
def test_kd_zero_with_zero_gradient_when_student_equals_teacher(task, k):
    t = torch.randn(8, k)
    s = t.clone().requires_grad_(True)
    lk = kd_loss(s, t, task, 3.0)
    lk.backward()
    assert abs(lk.item()) < 1e-6
    assert s.grad.abs().max() < 1e-6


def test_kd_gradient_pulls_student_towards_teacher():
    t = torch.tensor([[3.0, 0.0, -1.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    kd_loss(s, t, "multi-class", 1.0).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 2]  # gradient descent raises logit 0, lowers logit 2


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="distill.alpha must be in"):
        MedAlmightyLoss("multi-class", alpha=alpha)


@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_invalid_temperature(temp):
    with pytest.raises(ValueError, match="distill.temperature must be > 0"):
        MedAlmightyLoss("multi-class", temperature=temp)


def test_mismatched_teacher_shape():
    loss = MedAlmightyLoss("multi-class", 0.5)
    with pytest.raises(ValueError, match=r"teacher logits \(4, 2\) do not match student logits \(4, 3\)"):
        loss(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), torch.randn(4, 2))


def test_output_keys_and_detached_parts():
    s = torch.randn(4, 3, requires_grad=True)
    out = MedAlmightyLoss("multi-class")(s, torch.tensor([[0], [2], [1], [0]]), torch.randn(4, 3))
    assert sorted(out) == ["kd", "loss", "task"]
    assert out["loss"].requires_grad and not out["task"].requires_grad and not out["kd"].requires_grad
