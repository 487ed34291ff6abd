"""MedAlmighty's distillation loss (Front. Artif. Intell. 2025, eq. 3)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.tasks import get_task


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy for multi-class and ordinal tasks, BCE-with-logits for binary and multi-label.

    Args:
        logits: (N, K) with K = 1 for binary tasks, else the number of classes or labels.
        targets: (N, L) integer labels as MedMNIST stores them (L = 1 except multi-label).
    """
    if get_task(task).sigmoid:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets[:, 0])


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """``KL(p_teacher^t || p_student^t)`` at temperature ``t`` (without the ``t^2`` factor).

    Softmax tasks: KL between class distributions, summed over classes, averaged over the batch.
    Sigmoid tasks (binary, multi-label): each logit is its own Bernoulli distribution; the KL is
    taken per label and averaged over labels and batch, the same reduction as the BCE task loss,
    so ``alpha`` weighs the two terms alike for 1 or 14 labels.
    """
    s = student.float() / temperature
    t = teacher.float() / temperature
    if get_task(task).sigmoid:
        log_ps1, log_ps0 = F.logsigmoid(s), F.logsigmoid(-s)
        log_pt1, log_pt0 = F.logsigmoid(t), F.logsigmoid(-t)
        kl = log_pt1.exp() * (log_pt1 - log_ps1) + log_pt0.exp() * (log_pt0 - log_ps0)
        return kl.mean()
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)


class MedAlmightyLoss(nn.Module):
    """``a * L_task + (1 - a) * t^2 * KL(p_teacher^t || p_student^t)``.

    ``a = 1`` (or no teacher logits) is plain supervised training: the student baseline.

    Shapes: student and teacher logits (N, K); targets (N, L) int64.

    >>> loss = MedAlmightyLoss("multi-class", alpha=0.2, temperature=2.0)
    >>> out = loss(torch.randn(4, 3), torch.tensor([[0], [2], [1], [0]]), torch.randn(4, 3))
    >>> sorted(out)
    ['kd', 'loss', 'task']
    """

    def __init__(self, task: str, alpha: float = 0.2, temperature: float = 2.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:  # also rejects NaN
            raise ValueError(f"distill.temperature must be > 0, got {temperature}")
        self.task, self.alpha, self.temperature = task, float(alpha), float(temperature)

    def forward(
        self, student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        lt = task_loss(student, targets, self.task)
        if teacher is None or self.alpha == 1.0:
            return {"loss": lt, "task": lt.detach(), "kd": torch.zeros((), device=lt.device)}
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} do not match student logits {tuple(student.shape)}"
            )
        lk = kd_loss(student, teacher, self.task, self.temperature)
        loss = self.alpha * lt + (1 - self.alpha) * self.temperature**2 * lk
        return {"loss": loss, "task": lt.detach(), "kd": lk.detach()}
