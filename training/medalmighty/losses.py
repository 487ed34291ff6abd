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


def per_sample_task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """(N,) the task loss of each sample (BCE averaged over labels for sigmoid tasks, CE otherwise)."""
    if get_task(task).sigmoid:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").mean(dim=1)
    return F.cross_entropy(logits, targets[:, 0], reduction="none")


def per_sample_kd(student: torch.Tensor, teacher: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """(N,) ``KL(p_teacher^t || p_student^t)`` of each sample (the reduction of :func:`kd_loss` per sample)."""
    s = student.float() / temperature
    t = teacher.float() / temperature
    if get_task(task).sigmoid:
        log_ps1, log_ps0 = F.logsigmoid(s), F.logsigmoid(-s)
        log_pt1, log_pt0 = F.logsigmoid(t), F.logsigmoid(-t)
        return (log_pt1.exp() * (log_pt1 - log_ps1) + log_pt0.exp() * (log_pt0 - log_ps0)).mean(dim=1)
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="none", log_target=True).sum(dim=1)


def confidence_weights(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """CA-MKD's per-sample teacher weights: (K, N, C) logits of K teachers -> (K, N) weights.

    ``w_k = (1 - softmax_k(L_k)) / (K - 1)`` with ``L_k`` teacher k's task loss on the sample's label,
    so the teachers that are right about a sample weigh most on it; each sample's weights sum to 1.
    """
    k = logits.shape[0]
    if k < 2:
        raise ValueError(f"CA-MKD needs at least 2 teachers, got {k}")
    losses = torch.stack([per_sample_task_loss(lg, targets, task) for lg in logits])  # (K, N)
    return (1.0 - F.softmax(losses, dim=0)) / (k - 1)


class CAMKDLoss(nn.Module):
    """Confidence-aware multi-teacher distillation (Zhang, Chen and Wang, ICASSP 2022), on MedAlmighty's terms.

    ``a * L_task + (1 - a) * t^2 * KD + beta * FEAT`` with, for K teachers and a batch of N:

    - ``KD = sum_{k, n} w_k(n) * KL(p_k^t(n) || p_s^t(n)) / (N K)``, ``w`` the :func:`confidence_weights`
      of the teachers' logits;
    - ``FEAT = sum_{k, n} v_k(n) * mean_d (P_k f_s(n) - f_k(n))^2 / (N K)``: the student's pooled
      features ``f_s`` through a linear projector per teacher ``P_k``, against the teacher's features
      ``f_k``; ``v`` are the confidence weights of the teachers' own linear classifiers applied to the
      projected student features (how well each teacher can read the student's features).

    The projectors train with the student. The student's pooled features are taken from the input of
    its classifier (``capture``), so the student runs one forward pass as usual.

    Shapes: student logits (N, C); targets (N, L); ``teacher`` a dict with ``logits`` (K, N, C) and
    ``features`` a list of K tensors (N, D_k).
    """

    def __init__(self, task: str, heads: list[nn.Linear], student_dim: int, alpha: float = 0.2,
                 temperature: float = 2.0, beta: float = 50.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {temperature}")
        if len(heads) < 2:
            raise ValueError(f"CA-MKD needs at least 2 teachers with linear classifiers, got {len(heads)}")
        self.task, self.alpha, self.temperature, self.beta = task, float(alpha), float(temperature), float(beta)
        self.projectors = nn.ModuleList(nn.Linear(student_dim, h.in_features) for h in heads)
        self.heads = nn.ModuleList(heads).requires_grad_(False)
        self._features: torch.Tensor | None = None

    def capture(self, classifier: nn.Module) -> None:
        """Read the student's pooled features from the input of its ``classifier`` on every forward."""

        def hook(module, inputs, output):
            self._features = inputs[0]

        classifier.register_forward_hook(hook)

    def forward(self, student: torch.Tensor, targets: torch.Tensor, teacher: dict | None = None
                ) -> dict[str, torch.Tensor]:
        lt = task_loss(student, targets, self.task)
        if teacher is None:
            return {"loss": lt, "task": lt.detach(), "kd": torch.zeros((), device=lt.device)}
        t_logits, t_feats = teacher["logits"], teacher["features"]
        k, n = t_logits.shape[:2]
        w = confidence_weights(t_logits, targets, self.task)  # (K, N)
        kd = torch.stack([per_sample_kd(student, t_logits[i], self.task, self.temperature) for i in range(k)])
        kd = (w * kd).sum() / (n * k)
        loss = self.alpha * lt + (1 - self.alpha) * self.temperature ** 2 * kd
        out = {"task": lt.detach(), "kd": kd.detach()}
        if self.beta > 0:
            if self._features is None:
                raise RuntimeError("CAMKDLoss.capture(student classifier) was not called")
            f_s = self._features.float()
            proj = [p(f_s) for p in self.projectors]
            v = confidence_weights(torch.stack([h(z) for h, z in zip(self.heads, proj)]).detach(), targets, self.task)
            mse = torch.stack([((z - f.float()) ** 2).mean(dim=1) for z, f in zip(proj, t_feats)])  # (K, N)
            feat = (v * mse).sum() / (n * k)
            loss = loss + self.beta * feat
            out["feat"] = feat.detach()
        out["loss"] = loss
        return out
