"""The DINO projection head (DINO / iBOT / DINOv2 / DINOv3 all use this shape)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """``(B, in_dim) -> (B, out_dim)`` prototype scores.

    An MLP (``nlayers`` linear layers, GELU between, ``hidden_dim`` wide) down to ``bottleneck_dim``,
    L2-normalised, then a bias-free linear layer onto ``out_dim`` prototypes with weight
    normalisation. With ``norm_last_layer`` the weight-norm gain is fixed at 1, so every prototype
    has unit norm and the scores are cosine similarities (DINO's stabiliser for small batches).
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 128,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head.nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.bottleneck(x))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, bottleneck_dim)``: the L2-normalised bottleneck (the collapse monitor reads it)."""
        return F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6)

    def prototypes(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised bottleneck ``(B, bottleneck_dim) -> (B, out_dim)`` prototype scores."""
        return self.last_layer(z)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Prototype weights, frozen during the first steps (``optim.freeze_last_layer_epochs``)."""
        return list(self.last_layer.parameters())
