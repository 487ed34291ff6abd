"""DINO-MX losses: DINO CLS loss (centering or Sinkhorn-Knopp), iBOT masked-patch loss, KoLeo, Gram anchoring.

Every loss is written so that, under data parallelism with equal per-process batches, the mean of
the per-process losses equals the loss of one process on the whole batch: batch statistics
(centers, Sinkhorn marginals, KoLeo neighbours) are reduced across processes, per-sample terms
are averaged locally.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _amax(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``x.amax`` (over everything, or over ``dim`` keeping it), -inf where there is nothing to reduce:
    a process may hold no rows (no masked crop in its share of the batch) and must still take part."""
    if x.numel() == 0:
        shape = () if dim is None else tuple(1 if i == dim % x.dim() else n for i, n in enumerate(x.shape))
        return torch.full(shape, float("-inf"), dtype=x.dtype, device=x.device)
    return x.amax() if dim is None else x.amax(dim=dim, keepdim=True)


def _logsumexp_all(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """logsumexp over ``dim`` (None = everything) of the tensor concatenated across processes along ``dim``."""
    m = _amax(x, dim).clone()
    if _distributed():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum() if dim is None else torch.exp(x - m).sum(dim=dim, keepdim=True)
    return m + torch.log(all_reduce_sum(s))


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV/DINOv2): (B, K) scores -> (B, K) rows summing to 1.

    Equipartition over the K prototypes is enforced on the whole (all-process) batch; each row is
    then a distribution. Computed in the log domain, so very confident teachers (large scores, low
    temperatures) neither overflow nor underflow into NaN. A process may pass no rows (B = 0, an
    iBOT batch share without masked patches): it gets (0, K) back after taking part in every
    reduction, so the other processes' targets are those of their rows alone. With no rows on any
    process the result is empty and no reduction beyond the row count is made (on every process alike).
    """
    log_q = (scores.float() / temp).t()  # (K, B)
    k = log_q.shape[0]
    b = all_reduce_sum(torch.tensor(float(log_q.shape[1]), device=log_q.device))
    if float(b) == 0:
        return scores.float().new_zeros(scores.shape)
    log_q = log_q - _logsumexp_all(log_q, None)
    for _ in range(iterations):
        log_q = log_q - _logsumexp_all(log_q, 1) - math.log(k)  # each prototype gets 1/K of the mass
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - torch.log(b)  # each sample 1/B
    return torch.exp(log_q + torch.log(b)).t()


class _TeacherTargets(nn.Module):
    """Teacher targets shared by the DINO and iBOT losses: EMA centering or Sinkhorn-Knopp.

    ``centering``: ``softmax((t - center) / temp)``, then the center moves towards the mean teacher
    logits (reduced over all processes). ``sinkhorn``: :func:`sinkhorn_knopp` on ``t / temp``.
    """

    what = "dino"

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "centering"):
        super().__init__()
        if centering not in ("centering", "sinkhorn"):
            raise ValueError(f"{self.what}.centering must be centering or sinkhorn, got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher: torch.Tensor, temp: float) -> torch.Tensor:
        """(..., K) teacher logits -> (..., K) targets; updates the center when centering."""
        flat = teacher.float().reshape(-1, teacher.shape[-1])
        if self.centering == "sinkhorn":
            out = sinkhorn_knopp(flat, temp)
        else:
            out = F.softmax((flat - self.center) / temp, dim=-1)
            self.update_center(flat)
        return out.reshape(teacher.shape)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        total = all_reduce_sum(teacher.sum(dim=0, keepdim=True))
        n = all_reduce_sum(torch.tensor(float(teacher.shape[0]), device=teacher.device))
        if n > 0:  # a batch without masked patches leaves the iBOT center as it is
            self.center.mul_(self.center_momentum).add_(total / n, alpha=1 - self.center_momentum)


class DINOLoss(_TeacherTargets):
    """DINO's CLS loss: cross-entropy from teacher to student prototype distributions over crop pairs.

    Shapes: ``student`` (S, B, K) logits for S student crops, ``teacher_probs`` (T, B, K) targets for
    T teacher (global) crops. Pairs where teacher and student saw the same crop (index i == j < T)
    are skipped::

        loss = mean_{(i, j), i != j} mean_b  -sum_k p_t[i, b, k] * log_softmax(student[j, b] / student_temp)_k

    Teacher targets: ``softmax((t - center) / teacher_temp)`` with an EMA ``center`` of the teacher's
    mean logits (``centering``), or Sinkhorn-Knopp on ``t / teacher_temp`` (``sinkhorn``).
    """

    def forward(self, student: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        s_crops, t_crops = student.shape[0], teacher_probs.shape[0]
        terms = t_crops * s_crops - min(t_crops, s_crops)
        if terms == 0:
            raise ValueError("DINO loss needs at least two crops (2 global crops, or local crops)")
        logp = F.log_softmax(student.float() / self.student_temp, dim=-1)  # (S, B, K)
        # The double sum over pairs, regrouped per student crop: crop j is scored against the sum of
        # the teacher targets of every crop but itself. One pass over (S, B, K) instead of one per pair
        # (whose indexing backward also wrote a zero (S, B, K) gradient per pair).
        p = teacher_probs.float()
        q = p.sum(0).expand(s_crops, -1, -1)
        n = min(t_crops, s_crops)  # crops both saw: >= 1 here
        q = torch.cat([q[:n] - p[:n], q[n:]])
        return -(q * logp).sum(dim=-1).mean(dim=-1).sum() / terms


class IBOTPatchLoss(_TeacherTargets):
    """iBOT's masked-patch loss: the student, which saw the patch masked, predicts the teacher's view.

    Shapes: ``student`` (M, K) logits of the M masked patches (all images concatenated),
    ``teacher_probs`` (M, K) targets for the same patches (the teacher saw them unmasked),
    ``weights`` (M,) = 1 / (masked patches of that patch's image), ``n_images`` the images in the
    batch (masked or not). Each masked image counts once, whatever its number of masked patches::

        loss = sum_m weights[m] * (-sum_k p_t[m, k] * log_softmax(student[m] / student_temp)_k) / n_images
    """

    what = "ibot"

    def forward(self, student: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor,
                n_images: int) -> torch.Tensor:
        if student.shape[0] == 0:
            return student.sum() * 0.0  # no masked patch in this batch: zero, but keeps the graph
        ce = -(teacher_probs * F.log_softmax(student.float() / self.student_temp, dim=-1)).sum(dim=-1)
        return (ce * weights).sum() / n_images


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser (DINOv2): spreads features over the sphere.

    ``x`` (B, D) -> ``-mean_i log(min_{j != i} ||x̂_i - x̂_j|| + eps)`` with x̂ the L2-normalised
    rows. Under data parallelism, pass ``all_x`` (the rows of every process, gathered with
    gradient) and ``offset`` (where this process's rows start in it): neighbours are then searched
    in the whole batch, as a single process would.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, all_x: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        pool = x if all_x is None else all_x
        if pool.shape[0] < 2:
            raise ValueError(f"KoLeo needs at least 2 samples per batch to find a nearest neighbour, got "
                             f"{pool.shape[0]}; raise optim.batch_size or set koleo.loss_weight=0")
        xn = F.normalize(x.float(), dim=-1, eps=self.eps)
        pn = F.normalize(pool.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            sim = xn @ pn.t()
            rows = torch.arange(x.shape[0], device=x.device)
            sim[rows, rows + offset] = -2.0  # never your own neighbour
            nn_idx = sim.argmax(dim=1)
        dist_ = (xn - pn[nn_idx]).norm(dim=-1)
        return -torch.log(dist_ + self.eps).mean()


class GramLoss(nn.Module):
    """DINOv3's Gram anchoring: keep the student's patch-similarity structure close to an earlier teacher's.

    ``student`` and ``anchor`` (B, N, D) patch features; with rows L2-normalised, G = X Xᵀ (B, N, N)::

        loss = mean_{b, i, j} (G_student[b, i, j] - G_anchor[b, i, j])^2
    """

    def forward(self, student: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        s = F.normalize(student.float(), dim=-1)
        a = F.normalize(anchor.float(), dim=-1)
        return ((s @ s.transpose(1, 2) - a @ a.transpose(1, 2)) ** 2).mean()


class FeatureDistillLoss(nn.Module):
    """Feature distillation from a frozen backbone without DINO-MX heads: cosine distance of the student's
    projected CLS and patch tokens to the teacher's.

    Shapes: ``proj_cls`` (B, D_t) and ``proj_patches`` (B, N, D_t), the student's tokens through its
    projector; ``t_cls`` (B, D_t) and ``t_patches`` (B, M, D_t) the teacher's. When the grids differ
    (another patch size) the student's patches are resampled bilinearly to the teacher's grid::

        loss = (1 - mean_b cos(proj_cls, t_cls)) + (1 - mean_{b, n} cos(proj_patches, t_patches))
    """

    def forward(self, proj_cls: torch.Tensor, proj_patches: torch.Tensor, t_cls: torch.Tensor,
                t_patches: torch.Tensor) -> torch.Tensor:
        cos_cls = 1 - F.cosine_similarity(proj_cls.float(), t_cls.float(), dim=-1).mean()
        sp = _match_grid(proj_patches.float(), t_patches.shape[1])
        cos_patch = 1 - F.cosine_similarity(sp, t_patches.float(), dim=-1).mean()
        return cos_cls + cos_patch


def _match_grid(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, D) patch tokens on a sqrt(N) grid -> (B, n, D) on a sqrt(n) grid (bilinear)."""
    if tokens.shape[1] == n:
        return tokens
    b, m, d = tokens.shape
    g, h = math.isqrt(m), math.isqrt(n)
    grid = tokens.transpose(1, 2).reshape(b, d, g, g)
    return F.interpolate(grid, size=(h, h), mode="bilinear", align_corners=False).reshape(b, d, n).transpose(1, 2)
