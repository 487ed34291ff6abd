"""Per-step schedules, precomputed as arrays (DINOv2's ``CosineScheduler`` style): the loop indexes them.

One cosine for every recipe: the DINO-MX lr, weight decay and teacher momentum, and the supervised
recipes' lr multiplier (:func:`lr_factors`).
"""

from __future__ import annotations

import math

import numpy as np


def cosine(base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0,
           warmup_reaches_base: bool = False) -> np.ndarray:
    """Per-step values: a linear warm-up over ``warmup`` steps, then a cosine from ``base`` to ``final``.

    The warm-up rises from ``start_warmup`` and reaches ``base`` on the first cosine step (DINO's
    ``cosine_scheduler``); with ``warmup_reaches_base`` it is ``base * (i + 1) / warmup`` instead, so
    its last step is already at ``base`` (the supervised recipes' warm-up).
    """
    warmup = min(warmup, total)
    if not warmup:
        w = np.zeros(0)
    elif warmup_reaches_base:
        w = base * (np.arange(1, warmup + 1) / warmup)
    else:
        w = np.linspace(start_warmup, base, warmup, endpoint=False)
    t = np.arange(total - warmup)
    c = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, len(t))))
    return np.concatenate([w, c])


def teacher_temperature(final: float, start: float, warmup: int, total: int) -> np.ndarray:
    """Linear warm-up of the teacher temperature from ``start`` to ``final``, then constant."""
    warmup = min(warmup, total)
    return np.concatenate([np.linspace(start, final, warmup), np.full(total - warmup, final)])


def lr_factors(schedule: str, epochs: int, steps_per_epoch: int, milestones=(0.5, 0.75), gamma: float = 0.1,
               warmup_epochs: float = 0.0) -> np.ndarray:
    """Per-step lr multipliers of the supervised recipes: ``multistep`` (x``gamma`` at each milestone,
    a fraction of the epochs), ``cosine`` (with linear warm-up) or ``constant``."""
    total = max(1, epochs * steps_per_epoch)
    if schedule == "multistep":
        # Half-up rounding: 5 epochs with milestone 0.5 drop after epoch 3 (Python's round() would say 2).
        marks = [math.floor(m * epochs + 0.5) * steps_per_epoch for m in milestones]
        return np.array([gamma ** sum(step >= m for m in marks) for step in range(total)], dtype=np.float64)
    if schedule == "cosine":
        return cosine(1.0, 0.0, total, int(warmup_epochs * steps_per_epoch), warmup_reaches_base=True)
    if schedule == "constant":
        return np.ones(total)
    raise ValueError(f"schedule must be multistep, cosine or constant, got {schedule!r}")
