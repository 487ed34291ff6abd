"""Heatmaps from the model's localization output, the top region as a box, and a PNG overlay.

The maps come from the exported graph (:mod:`export.graph`): class-activation maps for CNN students
(``cam``, one map per logit at the input size) and the last layer's CLS -> patch attention for ViT
probes (``attention``, on the patch grid). No detection head is involved: the box is the bounding box
of the connected region around the map's maximum, where the min-max-normalised map is at least
``threshold`` (Zhou et al., CVPR 2016, box the largest CAM region above a fraction of its maximum).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from scipy import ndimage

DEFAULT_THRESHOLD = 0.5
OVERLAY_MIN_SIDE = 224  # MedMNIST's 28 px images are upscaled so the overlay is legible
OVERLAY_MAX_SIDE = 512  # large uploads are scaled down: the map has the model's resolution anyway
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class Box:
    """A box in pixels: ``x0, y0`` inclusive, ``x1, y1`` exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    def scaled(self, sx: float, sy: float) -> Box:
        """The same box in an image ``sx`` times as wide and ``sy`` times as high (rounded outwards)."""
        return Box(int(np.floor(self.x0 * sx)), int(np.floor(self.y0 * sy)),
                   int(np.ceil(self.x1 * sx)), int(np.ceil(self.y1 * sy)))


def class_map(maps: np.ndarray, kind: str, task: str, index: int) -> np.ndarray:
    """The map that explains label ``index``.

    ``cam`` (K, S, S): the map of logit ``index``; binary models have one logit for the positive
    class, so the negative class's evidence is its negation. ``attention`` (g, g) is class-agnostic.
    """
    if kind == "attention":
        return maps
    if task == "binary-class":
        return maps[0] if index == 1 else -maps[0]
    return maps[index]


def to_input_size(m: np.ndarray, size: int) -> np.ndarray:
    """A map at the model's input size; patch-grid attention is upsampled bilinearly."""
    if m.shape == (size, size):
        return m.astype(np.float32)
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.BILINEAR))  # mode F


def normalise(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map (no evidence anywhere) is all zeros."""
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def top_box(heat: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> Box:
    """The bounding box of the region around the maximum of ``heat`` (in [0, 1]) where it is >= ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    regions, _ = ndimage.label(heat >= min(threshold, float(heat[peak])))  # 4-connected
    ys, xs = ndimage.find_objects(regions)[regions[peak] - 1]
    return Box(xs.start, ys.start, xs.stop, ys.stop)


def overlay_size(width: int, height: int) -> tuple[int, int]:
    """The original image's size, scaled so that its long side is within [224, 512] pixels."""
    long = max(width, height)
    scale = max(OVERLAY_MIN_SIDE / long, 1.0) if long < OVERLAY_MIN_SIDE else min(OVERLAY_MAX_SIDE / long, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay_png(image: Image.Image, heat: np.ndarray, box: Box) -> tuple[bytes, tuple[int, int]]:
    """``heat`` (S x S, [0, 1]) coloured blue-yellow-red over ``image``, ``box`` (input pixels) drawn on it.

    Returns the PNG bytes and the overlay's (width, height).
    """
    size = overlay_size(image.width, image.height)
    base = image.convert("RGB").resize(size, Image.BILINEAR)
    heat8 = Image.fromarray(np.clip(np.rint(heat * 255), 0, 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    coloured = ImageOps.colorize(heat8, black=(0, 0, 255), mid=(255, 255, 0), white=(255, 0, 0))
    out = Image.blend(base, coloured, OVERLAY_ALPHA)
    s = heat.shape[1]
    b = box.scaled(size[0] / s, size[1] / heat.shape[0])
    ImageDraw.Draw(out).rectangle([b.x0, b.y0, b.x1 - 1, b.y1 - 1], outline=(0, 255, 0), width=max(1, size[0] // 112))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), size


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
