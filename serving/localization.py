"""What ``/localize`` answers: the model's map (:mod:`zoo.maps`) at the upload's scale, as a box and an overlay.

The maps come from the served graph's second output (:class:`zoo.maps.WithLocalization`, the module
the ONNX file is traced from): class-activation maps for CNN students and the last layer's CLS ->
patch attention for ViT probes. No detection head is involved: the box is the bounding box of the
connected region around the map's maximum where the min-max-normalised map is at least ``threshold``
(:func:`zoo.maps.top_box`). Only the overlay's size policy and encoding are the service's own.

The post-processing functions are the torch-free copies in ``export.edge`` (the bundle runner, tested
equal to :mod:`zoo.maps`'s), so a bento without torch answers ``/localize`` as ``zoo serve`` does.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from export import edge

DEFAULT_THRESHOLD, Box, class_map, normalise = edge.DEFAULT_THRESHOLD, edge.Box, edge.class_map, edge.normalise
overlay, to_input_size, top_box = edge.overlay, edge.to_input_size, edge.top_box

__all__ = ["DEFAULT_THRESHOLD", "Box", "b64", "class_map", "normalise", "overlay_png", "overlay_size",
           "to_input_size", "top_box"]

OVERLAY_MIN_SIDE = 224  # MedMNIST's 28 px images are upscaled so the overlay is legible
OVERLAY_MAX_SIDE = 512  # large uploads are scaled down: the map has the model's resolution anyway
OVERLAY_ALPHA = 0.45


def overlay_size(width: int, height: int) -> tuple[int, int]:
    """The original image's size, scaled so that its long side is within [224, 512] pixels."""
    long = max(width, height)
    scale = max(OVERLAY_MIN_SIDE / long, 1.0) if long < OVERLAY_MIN_SIDE else min(OVERLAY_MAX_SIDE / long, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay_png(image: Image.Image, heat: np.ndarray, box: Box) -> tuple[bytes, tuple[int, int]]:
    """``heat`` (S x S, [0, 1]) over ``image`` (:func:`zoo.maps.overlay`), ``box`` (input pixels) drawn on it.

    Returns the PNG bytes and the overlay's (width, height).
    """
    size = overlay_size(image.width, image.height)
    out = overlay(image, heat, alpha=OVERLAY_ALPHA, size=size, box=box)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), size


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
