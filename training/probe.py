"""The one linear probe: a linear head on frozen features, trained with the supervised loop.

MedAlmighty's teachers ("DINOv2 + linear") and DINO-MX's frozen-feature evaluation both use it; they
differ only in settings (the teacher's ``probe`` section; the evaluation's fixed protocol with
standardised features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from training.loop import FitResult, FitSettings, fit
from training.medalmighty.losses import MedAlmightyLoss
from zoo.tasks import get_task


@dataclass
class Probe:
    """A trained probe: ``head(standardise(features))`` are its logits."""

    head: nn.Linear
    fit: FitResult
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def standardise(self, f: torch.Tensor) -> torch.Tensor:
        return f if self.mean is None else (f - self.mean) / self.std

    @torch.no_grad()
    def logits(self, f: torch.Tensor) -> torch.Tensor:
        self.head.eval()
        return self.head(self.standardise(f)).float()


def linear_probe(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], task: str, n_labels: int,
                 settings: FitSettings, generator: torch.Generator, standardise: bool = False,
                 desc: str = "linear probe") -> Probe:
    """A linear head on ``feats["train"]``, selected on ``feats["val"]`` AUC (never test).

    ``standardise``: features are centred and scaled with the training split's statistics first, so
    one lr suits any backbone width and feature scale.
    """
    mean = std = None
    if standardise:
        mean, std = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    z = {s: f if mean is None else (f - mean) / std for s, f in feats.items() if s in ("train", "val")}
    head = nn.Linear(feats["train"].shape[1], get_task(task).num_outputs(n_labels))
    res = fit(head, (z["train"], labels["train"]), (z["val"], labels["val"]), task=task, settings=settings,
              loss_fn=MedAlmightyLoss(task, alpha=1.0), generator=generator, desc=desc)
    return Probe(res.model, res, mean, std)
