"""Multi-crop augmentation on whole batches of tensors, with optional label-guided local crops (DINO-LG).

Images stay uint8 (B, C, H, W) in memory; each step draws crop boxes and photometric parameters
for the *whole* batch from one generator (so processes agree and a resumed run draws the same
numbers), then crops and resizes every image in one ``grid_sample`` call per crop set.

Crop boxes follow RandomResizedCrop: area fraction ``scale`` of the image, log-uniform aspect
ratio in [3/4, 4/3]. Photometric: colour jitter (brightness, contrast, saturation), greyscale,
Gaussian blur, solarisation, with per-crop-set probabilities as in DINO (global 1: blur always,
global 2: rare blur + solarise, locals: blur half the time).

Label-guided crops: where a sample has a region (x0, y0, x1, y1 in pixels), a share
``label_guided`` of its local crops is drawn to contain the whole region (a crop smaller than the
region is enlarged to it); samples without a region (NaN) and the other crops are unchanged.
Every random number is drawn whatever ``label_guided`` is and whether or not regions are given
(the guided placement too, for every crop), so two runs that differ only in ``label_guided`` see
the same global crops, the same photometric draws, and the same local crops wherever a crop is
not guided: their comparison is paired crop by crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo.data import luma


@dataclass(frozen=True)
class CropConfig:
    global_size: int = 28
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_number: int = 6
    local_size: int = 12
    local_scale: tuple[float, float] = (0.1, 0.4)
    flip: float = 0.5
    color_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    grayscale: float = 0.2
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)       # global 1, global 2, locals
    solarize: tuple[float, float, float] = (0.0, 0.2, 0.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)             # at 224 px; scaled to the crop size
    label_guided: float = 0.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_boxes(n: int, height: int, width: int, scale: tuple[float, float], g: torch.Generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """(n, 4) crop boxes (x0, y0, w, h) in pixels, RandomResizedCrop's distribution (clamped to the image)."""
    area = _uniform(n, scale[0], scale[1], g) * height * width
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(1, width)
    h = torch.sqrt(area / r).clamp(1, height)
    x0 = torch.rand(n, generator=g) * (width - w)
    y0 = torch.rand(n, generator=g) * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def guide_boxes(boxes: torch.Tensor, regions: torch.Tensor | None, use: torch.Tensor, height: int, width: int,
                g: torch.Generator) -> torch.Tensor:
    """Move (and if needed enlarge) the crops where ``use`` so that each contains its region.

    Args:
        boxes: (n, 4) crops (x0, y0, w, h); regions: (n, 4) (x0, y0, x1, y1), NaN rows = no region,
            or None (no regions at all: the boxes come back unchanged);
        use: (n,) bool, which crops to guide.

    Always draws the same 2n numbers from ``g`` (the placements of every row), whatever ``use`` and
    ``regions`` are, so the draws after it do not depend on which crops were guided.
    """
    u1, u2 = torch.rand(len(boxes), generator=g), torch.rand(len(boxes), generator=g)  # drawn for all rows
    out = boxes.clone()
    if regions is None:
        return out
    has = use & ~torch.isnan(regions).any(dim=1)
    if not has.any():
        return out
    r = regions[has]
    w = torch.maximum(out[has, 2], r[:, 2] - r[:, 0]).clamp(max=width)
    h = torch.maximum(out[has, 3], r[:, 3] - r[:, 1]).clamp(max=height)
    # x0 in [x1 - w, x0_region] so the crop covers [x0_region, x1_region], and inside the image.
    lo_x, hi_x = (r[:, 2] - w).clamp(min=0), torch.minimum(r[:, 0], width - w)
    lo_y, hi_y = (r[:, 3] - h).clamp(min=0), torch.minimum(r[:, 1], height - h)
    out[has, 0] = lo_x + u1[has] * (hi_x - lo_x).clamp(min=0)
    out[has, 1] = lo_y + u2[has] * (hi_y - lo_y).clamp(min=0)
    out[has, 2], out[has, 3] = w, h
    return out


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop (B, C, H, W) float images to ``boxes`` (x0, y0, w, h) and resize to ``size`` (bilinear),
    mirrored where ``flip``. One batched ``grid_sample``."""
    b, _, h, w = images.shape
    x0, y0, bw, bh = boxes.unbind(1)
    cx = (x0 + bw / 2) * 2 / w - 1
    cy = (y0 + bh / 2) * 2 / h - 1
    sx = bw / w * torch.where(flip, -1.0, 1.0)
    sy = bh / h
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta.to(images.dtype), [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    # The one RGB -> grey rule (ITU-R 601-2 luma, as Pillow's "L"); other channel counts average.
    return luma(x) if x.shape[1] == 3 else x.mean(dim=1, keepdim=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-image Gaussian blur with per-image sigma (pixels); one grouped convolution per axis."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x)[:, None] ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (b*c, 2r+1)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def photometric(x: torch.Tensor, cfg: CropConfig, blur_p: float, solarize_p: float, g: torch.Generator,
                n_all: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """Colour jitter, greyscale, blur and solarise on float [0, 1] images; parameters are drawn for
    the whole batch of ``n_all`` and ``rows`` picks this process's share (default: all of ``x``)."""
    n_all = n_all or x.shape[0]
    rows = rows or slice(0, n_all)

    def draw(lo: float, hi: float) -> torch.Tensor:
        return _uniform(n_all, lo, hi, g)[rows].view(-1, 1, 1, 1).to(x)

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(n_all, generator=g) < p)[rows].view(-1, 1, 1, 1).to(x.device)

    jitter = coin(cfg.color_jitter)
    bright = draw(1 - cfg.brightness, 1 + cfg.brightness)
    contrast = draw(1 - cfg.contrast, 1 + cfg.contrast)
    sat = draw(1 - cfg.saturation, 1 + cfg.saturation)
    y = (x * bright).clamp(0, 1)
    m = _grey(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - m) * contrast + m).clamp(0, 1)
    if x.shape[1] == 3:
        y = ((y - _grey(y)) * sat + _grey(y)).clamp(0, 1)
    x = torch.where(jitter, y, x)
    if x.shape[1] == 3:
        x = torch.where(coin(cfg.grayscale), _grey(x).expand_as(x), x)
    scale = x.shape[-1] / 224
    sigma_all = _uniform(n_all, cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale, g)
    do_blur = coin(blur_p)
    # Kernel radius from the whole batch's sigmas, so every process blurs exactly as one would.
    radius = max(1, int(math.ceil(3 * float(sigma_all.max()))))
    if blur_p > 0 and float(sigma_all.max()) >= 0.2:  # below ~0.2 px a blur does not change a pixel
        x = torch.where(do_blur, _blur(x, sigma_all[rows].clamp(min=1e-3), radius), x)
    x = torch.where(coin(solarize_p) & (x >= 0.5), 1 - x, x)
    return x


@dataclass
class Crops:
    globals: torch.Tensor            # (2 * b, C, G, G), crop-major: [crop 1 of every image, crop 2 ...]
    locals: torch.Tensor | None      # (n_local * b, C, L, L), crop-major
    global_boxes: torch.Tensor       # (2, b, 4) boxes (x0, y0, w, h) in source pixels
    local_boxes: torch.Tensor        # (n_local, b, 4)


class MultiCrop:
    """DINO multi-crop on uint8 batches: 2 global crops and ``local_number`` local crops per image."""

    def __init__(self, cfg: CropConfig):
        if cfg.local_number < 0:
            raise ValueError(f"crops.local_number must be >= 0, got {cfg.local_number}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(cfg, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"crops.{name} must be [min, max] with 0 < min <= max <= 1, got {[lo, hi]}")
        if not 0 <= cfg.label_guided <= 1:
            raise ValueError(f"crops.label_guided must be a share within [0, 1], got {cfg.label_guided}")
        self.cfg = cfg

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # cfg.mean / cfg.std hold one value per channel (a zoo.data.Preprocess made them)
        mean = torch.tensor(self.cfg.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.cfg.std).view(1, -1, 1, 1)
        return (x - mean.to(x)) / std.to(x)

    def __call__(self, images: torch.Tensor, g: torch.Generator, offset: int = 0, global_batch: int | None = None,
                 regions: torch.Tensor | None = None) -> Crops:
        """Crop ``images`` (b, C, H, W) uint8, rows ``offset:offset+b`` of a batch of ``global_batch``.

        ``regions`` (b, 4) optional label boxes (x0, y0, x1, y1), NaN where a sample has none.
        """
        cfg = self.cfg
        b, _, h, w = images.shape
        n = global_batch or b
        rows = slice(offset, offset + b)
        x = images.float() / 255.0
        g_boxes, g_out = [], []
        for k in range(2):
            boxes = sample_boxes(n, h, w, cfg.global_scale, g)[rows]
            flip = (torch.rand(n, generator=g) < cfg.flip)[rows]
            c = crop_resize(x, boxes, cfg.global_size, flip)
            g_out.append(self._normalise(photometric(c, cfg, cfg.blur[k], cfg.solarize[k], g, n, rows)))
            g_boxes.append(boxes)
        l_boxes, l_out = [], []
        for _ in range(cfg.local_number):
            boxes = sample_boxes(n, h, w, cfg.local_scale, g)
            # Drawn (coin and placement) whatever label_guided is: runs that differ only in the share stay paired.
            use = torch.rand(n, generator=g) < cfg.label_guided
            full = None
            if regions is not None:
                full = torch.full((n, 4), float("nan"))
                full[rows] = regions.float()
            boxes = guide_boxes(boxes, full, use, h, w, g)[rows]
            flip = (torch.rand(n, generator=g) < cfg.flip)[rows]
            c = crop_resize(x, boxes, cfg.local_size, flip)
            l_out.append(self._normalise(photometric(c, cfg, cfg.blur[2], cfg.solarize[2], g, n, rows)))
            l_boxes.append(boxes)
        return Crops(
            globals=torch.cat(g_out),
            locals=torch.cat(l_out) if l_out else None,
            global_boxes=torch.stack(g_boxes),
            local_boxes=torch.stack(l_boxes) if l_boxes else torch.zeros(0, b, 4),
        )
