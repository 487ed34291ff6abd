"""The collapse monitor of every DINO-MX run: is the objective alive, or has it settled on a trivial answer?

DINO-style objectives have two trivial solutions (DINO, sec. 5.3): every image mapped to the same
*uniform* distribution over the K prototypes, or to one *dominant* prototype. Centering pushes
towards the first, sharpening towards the second; in between, the teacher's targets carry
information and the student learns to predict them. At a random init with a short budget the
uniform answer is the easy one: the student's DINO loss then sits at ln K (the cross-entropy
between two uniform distributions) and nothing is learnt, while the run looks as if it trained.

Each step, :func:`step_figures` measures (without gradients, on tensors the step already has):

- ``teacher_entropy``: mean entropy (nats) of the teacher's DINO targets; ln K = uniform.
- ``student_entropy``: mean entropy of the student's predictions on the global crops.
- ``eff_prototypes``: exp of the entropy of the batch-mean target, the number of prototypes in
  use (1 = one dominant prototype; K = all used alike, which Sinkhorn-Knopp enforces by design).
- ``bottleneck_cos``, ``cls_cos``: mean cosine between different images of the head's L2-normalised
  bottleneck and of the backbone's CLS features (of the model the run saves); near 1, every image
  gives the same features.

:class:`CollapseMonitor` reads the logged rows: after the warm-ups (lr and teacher temperature, and
at least a fifth of the run) it warns once when :func:`reasons` holds on ``PERSIST`` rows in a row,
and :meth:`CollapseMonitor.summary` is the ``collapse`` section of ``metrics.json``: the final
figures, the DINO loss against ln K, the verdict and what to change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from training.dinomx.losses import all_reduce_sum

MONITOR_KEYS = ("teacher_entropy", "student_entropy", "eff_prototypes", "bottleneck_cos", "cls_cos")
# A DINO loss within this share of ln K: the student predicts (almost) nothing about the targets.
UNIFORM_SHARE = 0.05
# Mean cross-image cosine of the features above this: the images are no longer told apart.
FEATURE_COS = 0.98
# Fewer prototypes in use than this (with a batch that could use many): one dominant prototype.
DOMINANT_PROTOTYPES = 1.5
PERSIST = 3  # logged rows in a row before the warning (one noisy row is not a collapse)

ADVICE = {
    "uniform": ("lower the learning rate (optim.lr_scaling=linear scales optim.lr by batch/256 as DINO does; "
                "or a smaller optim.lr), sharpen the teacher (dino.teacher_temp=0.04, "
                "dino.warmup_teacher_temp_epochs=0), use fewer prototypes for small data (head.out_dim=256), "
                "lengthen the warm-up (optim.warmup=0.2), or start from a warm-up checkpoint "
                "(model.backbone=<an earlier run>/backbone)"),
    "features": ("lower the learning rate (optim.lr_scaling=linear, or a smaller optim.lr), keep or raise KoLeo "
                 "(koleo.loss_weight=0.1), lengthen the warm-up (optim.warmup=0.2), or raise "
                 "optim.momentum_teacher so the teacher follows the student more slowly"),
    "dominant": ("soften the teacher (raise dino.teacher_temp towards 0.07, or lengthen "
                 "dino.warmup_teacher_temp_epochs), or use Sinkhorn-Knopp targets (dino.centering=sinkhorn), "
                 "which spread each batch over the prototypes"),
}
WHAT = {
    "uniform": "the DINO loss sits near ln K: the student predicts nothing about the teacher's targets, which "
               "have gone (near) uniform",
    "features": "the features collapsed: different images give nearly the same CLS / head bottleneck",
    "dominant": "one prototype takes (nearly) every image: the teacher's targets are the same one-hot answer",
}


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Row entropies (nats) of (N, K) distributions."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


def _cross_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine between different rows of (n, d) features: (|sum x̂|^2 - n) / (n (n - 1))."""
    n = x.shape[0]
    if n < 2:
        return x.new_zeros((), dtype=torch.float32)
    xn = F.normalize(x.float(), dim=-1)
    s = xn.sum(dim=0)
    return ((s @ s) - n) / (n * (n - 1))


@torch.no_grad()
def step_figures(t_probs: torch.Tensor | None, student_logits: torch.Tensor | None, student_temp: float,
                 bottleneck: torch.Tensor | None, cls: torch.Tensor | None, crops: int = 2
                 ) -> dict[str, torch.Tensor]:
    """The monitor's figures of one step (scalar tensors; this process's rows, see the module doc).

    Shapes: ``t_probs`` (..., K) teacher targets; ``student_logits`` (..., K) the student's global-crop
    scores (divided by ``student_temp`` before the softmax); ``bottleneck`` (crops * b, d) and ``cls``
    (crops * b, D) crop-major, so cosines are taken between images of the same crop. ``eff_prototypes``
    uses the batch-mean target over every process (one all-reduce); the others are averages over
    this process's rows, which the loop's log row averages over processes.
    """
    out: dict[str, torch.Tensor] = {}
    if t_probs is not None:
        p = t_probs.float().reshape(-1, t_probs.shape[-1])
        out["teacher_entropy"] = _entropy(p).mean()
        total = all_reduce_sum(torch.cat([p.sum(dim=0), p.new_tensor([float(p.shape[0])])]))
        mean = total[:-1] / total[-1].clamp_min(1)
        out["eff_prototypes"] = torch.exp(_entropy(mean[None])[0])
    if student_logits is not None:
        s = student_logits.float().reshape(-1, student_logits.shape[-1])
        out["student_entropy"] = _entropy(F.softmax(s / student_temp, dim=-1)).mean()
    for key, feats in (("bottleneck_cos", bottleneck), ("cls_cos", cls)):
        if feats is not None:
            f = feats.reshape(crops, -1, feats.shape[-1])
            out[key] = torch.stack([_cross_cosine(f[i]) for i in range(crops)]).mean()
    return out


def reasons(row: dict[str, Any], ln_k: float) -> list[str]:
    """Which collapse(s) one logged row shows: ``uniform``, ``features``, ``dominant`` (see :data:`WHAT`)."""
    out = []
    dino = row.get("dino")
    if dino is not None and math.isfinite(dino) and dino >= ln_k * (1 - UNIFORM_SHARE):
        out.append("uniform")
    if max(row.get("bottleneck_cos", 0.0), row.get("cls_cos", 0.0)) >= FEATURE_COS:
        out.append("features")
    if "eff_prototypes" in row and row["eff_prototypes"] < DOMINANT_PROTOTYPES:
        out.append("dominant")
    return out


def message(found: list[str], row: dict[str, Any], ln_k: float) -> str:
    """The one warning a user sees: what happened, the figures, and what to change."""
    figs = ", ".join(f"{k} {row[k]:.3f}" for k in ("dino", *MONITOR_KEYS) if k in row)
    what = "; ".join(WHAT[r] for r in found)
    todo = " Or: ".join(ADVICE[r] for r in found)
    return (f"warning: DINO-MX collapse at step {row.get('step')}: {what} (ln K = {ln_k:.3f}; {figs}). "
            f"The run goes on, but its features are unlikely to be useful. To fix: {todo}.")


class CollapseMonitor:
    """Reads a run's logged rows; warns once, and sums the run up for ``metrics.json`` (see the module doc).

    Args:
        out_dim: K, the prototypes (``ln K`` is the loss of a head that predicts nothing).
        burn_in: steps before which nothing is judged (the warm-ups).
        total: the run's steps (the final verdict reads the rows of its last tenth).
    """

    def __init__(self, out_dim: int, burn_in: int, total: int):
        self.ln_k = math.log(out_dim)
        self.burn_in = burn_in
        self.total = total
        self.streak = 0
        self.warned_at: int | None = None
        self.warned_reasons: list[str] = []

    def observe(self, row: dict[str, Any]) -> str | None:
        """A logged row; returns the warning the first time a collapse has persisted, else None."""
        if row.get("step", 0) < self.burn_in:
            return None
        found = reasons(row, self.ln_k)
        self.streak = self.streak + 1 if found else 0
        if found and self.warned_at is None and self.streak >= PERSIST:
            self.warned_at, self.warned_reasons = int(row["step"]), found
            return message(found, row, self.ln_k)
        return None

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``collapse`` section of ``metrics.json``: final figures (mean of the rows in the last tenth of
        the run, at least the last row), the DINO loss against ln K, the verdict and the advice."""
        tail_from = self.total - max(1, self.total // 10)
        tail = [h for h in history if h.get("step", 0) > tail_from] or history[-1:]
        final: dict[str, float] = {}
        for k in ("dino", *MONITOR_KEYS):
            vals = [h[k] for h in tail if k in h and math.isfinite(h[k])]
            if vals:
                final[k] = round(sum(vals) / len(vals), 4)
        found = reasons(final, self.ln_k) if final else []
        out: dict[str, Any] = {
            "collapsed": bool(found), "reasons": found, "ln_k": round(self.ln_k, 4), "final": final,
            "rows_averaged": len(tail), "first_warning_step": self.warned_at,
            "warned_reasons": self.warned_reasons,
            "thresholds": {"uniform_share_of_ln_k": UNIFORM_SHARE, "feature_cos": FEATURE_COS,
                           "dominant_prototypes": DOMINANT_PROTOTYPES, "persist_rows": PERSIST,
                           "burn_in_steps": self.burn_in},
        }
        if "dino" in final:
            below = self.ln_k - final["dino"]
            out["dino_below_ln_k"] = round(below, 4)
            out["dino_below_ln_k_share"] = round(below / self.ln_k, 4)
        out["verdict"] = ("collapsed: " + "; ".join(WHAT[r] for r in found)) if found else (
            f"alive: the DINO loss ends {out['dino_below_ln_k']:.2f} nats "
            f"({100 * out['dino_below_ln_k_share']:.0f}%) below ln K" if "dino_below_ln_k" in out else "alive")
        out["advice"] = " Or: ".join(ADVICE[r] for r in found) if found else None
        return out


def burn_in_steps(total: int, lr_warmup: int, temp_warmup: int) -> int:
    """Steps before the monitor judges: the lr and teacher-temperature warm-ups, and at least a fifth of the run."""
    return max(lr_warmup, temp_warmup, total // 5, 1)
