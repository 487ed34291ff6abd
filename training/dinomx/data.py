"""DINO-MX's training images: the pooled training splits of ``data.datasets``, with optional label boxes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.config import ConfigError
from training.dinomx.config import DinoMXConfig
from zoo.data import dataset_info, load_split, to_channels


@dataclass
class PretrainData:
    """Training images (N, C, H, W) uint8, with optional regions (N, 4) x0,y0,x1,y1 (NaN = none)."""

    images: torch.Tensor
    regions: torch.Tensor | None = None
    names: tuple[str, ...] = ()


def data_channels(cfg: DinoMXConfig) -> int:
    """``model.in_chans``, or the data's channels: grey sets pooled with RGB sets are replicated to RGB."""
    if cfg.model.in_chans != "auto":
        return int(cfg.model.in_chans)
    return max(dataset_info(f).n_channels for f in cfg.data.datasets)


def load_data(cfg: DinoMXConfig, in_chans: int) -> PretrainData:
    """The pooled training splits of ``data.datasets`` in ``in_chans`` channels (:func:`zoo.data.to_channels`)."""
    d = cfg.data
    parts = []
    for flag in d.datasets:
        s = load_split(flag, "train", size=d.size, root=d.root, download=d.download)
        try:
            parts.append(to_channels(s.images, in_chans))
        except ValueError:
            raise ConfigError(f"{flag} has {s.images.shape[1]} channels; the backbone takes {in_chans}. "
                              "Set model.in_chans to match") from None
    sizes = {p.shape[-1] for p in parts}
    if len(sizes) > 1:
        raise ConfigError(f"data.datasets have different image sizes {sorted(sizes)}; pool datasets of one size")
    images = torch.cat(parts)
    regions = None
    if d.regions:
        arr = np.load(d.regions)
        if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] != images.shape[0]:
            raise ConfigError(f"data.regions {d.regions} must hold an ({images.shape[0]}, 4) array of boxes "
                              f"x0,y0,x1,y1 (NaN rows for none), got {arr.shape}")
        regions = torch.from_numpy(arr.astype(np.float32))
    if d.max_images > 0:
        images = images[: d.max_images]
        regions = regions[: d.max_images] if regions is not None else None
    return PretrainData(images, regions, tuple(d.datasets))
