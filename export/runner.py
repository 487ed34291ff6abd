#!/usr/bin/env python3
"""Classify images with an exported zoo model. Needs only numpy, Pillow and onnxruntime.

This file is self-contained (no torch, no zoo import): ``zoo export`` copies it into every bundle
beside ``model.onnx`` and ``preprocess.json``. On the edge device::

    python3 -m venv edge                                  # a clean environment, nothing else in it
    edge/bin/pip install numpy pillow onnxruntime
    edge/bin/python runner.py image.png [more.png ...]    # bundle = this file's folder
    edge/bin/python runner.py scan.png --bundle /opt/model --maps maps/

Each image prints one JSON line with the keys of ``zoo predict`` and of the HTTP ``/classify`` answer::

    {"image": "scan.png", "label": "malignant", "labels": ["malignant"],
     "probabilities": {"malignant": 0.91, "normal, benign": 0.09}, "threshold": 0.5}

``labels`` is every label with p > threshold for multi-label tasks, ``[label]`` otherwise; binary tasks
give ``1 - p`` and ``p`` over their two labels; ``threshold`` is ``null`` for softmax tasks.
An image that cannot be read stops the run with one ``runner: error:`` line and status 2.

Image files are read by the zoo's one rule (``zoo/images.py``, repeated here with the same messages
so this file needs nothing else): PNG, JPEG or ``.npy`` sniffed from the bytes; the pixel count
(``--max-pixels``) checked from the header before decoding; 8-bit images only (a 16-bit PNG would
be clipped or cut to 8 bits by Pillow, so it is refused); truncated data refused (including a JPEG
whose header claims more pixels than its data holds, which libjpeg would fill with grey);
``.npy`` without pickle, (H, W) or (H, W, C), uint8 or float in [0, 1].
``--maps DIR`` saves the localization output (``cam`` or ``attention``), when the bundle has one, as
``DIR/<image stem>.npy``. From Python: ``Bundle(folder).predict([...PIL images or arrays...])``.

Preprocessing reproduces ``zoo.data.preprocess`` from ``preprocess.json``: the image is converted to
the model's mode (L or RGB; grey is replicated for RGB models), scaled to [0, 1], resized to the
input size when its size differs, and normalised with the entry's mean/std. Images already at the
model's input size (e.g. MedMNIST's 28 px for 28 px models) give the same input as the zoo, bit for
bit. Resize caveat: other sizes are resized in float with the same triangle filter as torch's
antialiased bilinear (``F.interpolate(..., antialias=True)``, like Pillow's BILINEAR) or with torch's
nearest rule; the input then agrees with the zoo's to one float32 rounding step (~1e-7), not bit for bit.

Bundles exported with ``--uint8-input`` (``preprocess.json``: ``"input_dtype": "uint8"``,
``"preprocessing": "in-graph"``) do all of that inside the graph: the runner converts each image to
the model's mode and feeds its uint8 pixels, (1, H, W, C) channels last, at whatever size it has;
images of different sizes run one size at a time. Float arrays are refused there (the graph takes
8-bit pixels).

The same numpy code, torch-free, serves the HTTP service's ONNX backend (``serving.runtime``, through
``export.edge``): :func:`input_array`, the task rules (:func:`probabilities`, :func:`decide`,
:func:`positives`) and the localization post-processing (:func:`class_map`, :func:`to_input_size`,
:func:`normalise`, :func:`top_box`, :func:`overlay`), each equal to its torch-side original in
``zoo`` (``zoo.data``, ``zoo.tasks``, ``zoo.maps``; tests/export/test_export_runner.py keeps them so).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFile

DEFAULT_MAX_PIXELS = 4096 * 4096


# ----------------------------------------------------------------------------------------- reading images
# The rule of zoo/images.py, with its messages; keep the two in step (tests/export/test_export_runner.py).

FORMS = "PNG, JPEG or a NumPy .npy array"
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


class ImageError(ValueError):
    """An image that is refused; ``status`` as in zoo/images.py (400, 413, 415, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _clean(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "allow_pickle" in text or "pickle.load" in text:
        return "it holds Python objects, which would need pickle (refused)"
    return " ".join(_ADDRESS.sub("", text).split())[:300] or type(e).__name__


def _not_8bit(fmt: str, what: str) -> ImageError:
    return ImageError(415, f"the {fmt.upper()} image is {what}; the models take 8-bit images: convert it to "
                      "8 bits, or give a float .npy array in [0, 1]")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(422, f"the image is empty ({width} x {height} pixels)")
    if width * height > max_pixels:
        raise ImageError(413, f"the image has {width} x {height} = {width * height:,} pixels; at most "
                         f"{max_pixels:,} are taken (resize it first: the model sees only its own input size)")


def _jpeg_data_problem(data: bytes) -> str | None:
    """Why the JPEG's scans are too short for its frame (under a bit per 8 x 8 block), or None."""
    try:
        i, n, frame, scanned = 2, len(data), None, 0
        while i + 4 <= n:
            if data[i] != 0xFF:
                return None
            m = data[i + 1]
            if m == 0xFF:
                i += 1
                continue
            if m == 0xD9:
                break
            if 0xD0 <= m <= 0xD7 or m == 0x01:
                i += 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if m in JPEG_FRAMES and frame is None:
                frame = (m, data[i + 4:i + 2 + length])
            i += 2 + length
            if m == 0xDA and i < n:
                end = JPEG_SCAN_END.search(data, i)
                stop = end.start() if end else n
                scanned += max(0, stop - i)
                i = stop
        if frame is None or frame[0] in JPEG_ARITHMETIC or len(frame[1]) < 6:
            return None
        seg = frame[1]
        height, width, ncomp = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
        comps = [(seg[6 + 3 * k + 1] >> 4, seg[6 + 3 * k + 1] & 15) for k in range(ncomp) if 8 + 3 * k < len(seg)]
        if not comps or height == 0 or any(hs == 0 or vs == 0 for hs, vs in comps):
            return None
        hmax, vmax = max(hs for hs, _ in comps), max(vs for _, vs in comps)
        blocks = sum(math.ceil(math.ceil(width * hs / hmax) / 8) * math.ceil(math.ceil(height * vs / vmax) / 8)
                     for hs, vs in comps)
        if scanned * 8 < blocks:
            return (f"its header says {width} x {height} pixels, but it holds {scanned:,} bytes of image data, "
                    f"less than the {math.ceil(blocks / 8):,} that many pixels need at the least")
    except Exception:
        return None
    return None


def _read_npy(data: bytes, max_pixels: int) -> Image.Image | np.ndarray:
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
    except Exception as e:
        raise ImageError(400, f"the .npy header is corrupt: {_clean(e)}") from None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ImageError(422, f".npy format version {version} is not supported; save it with numpy.save")
    try:
        shape, _, dtype = readers[version](f)
    except Exception as e:  # numpy's header parser raises tokenize, ast and value errors alike
        raise ImageError(400, f"the .npy header is corrupt: {_clean(e)}") from None
    if dtype.hasobject:
        raise ImageError(422, ".npy arrays of Python objects are refused (they would need pickle); "
                         "give uint8 or float values")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise ImageError(422, f"the .npy array has shape {shape}; give one image as (H, W) or (H, W, C) with C 1 "
                         "or 3 (channels last)")
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise ImageError(422, f"the .npy array has dtype {dtype}; give uint8 (0-255) or float values in [0, 1]")
    _check_pixels(shape[1], shape[0], max_pixels)
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ImageError(400, f"the .npy data is corrupt or truncated: {_clean(e)}") from None
    h, w = a.shape[:2]
    if a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a.reshape(h, w) if a.ndim == 3 and a.shape[2] == 1 else a))
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ImageError(422, "the float .npy image holds NaN or infinite values; give values in [0, 1]")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ImageError(422, f"float .npy images must hold values in [0, 1] (unnormalised); got range "
                         f"[{a.min():.3g}, {a.max():.3g}]. Give uint8 0-255 or divide by 255")
    return a


def read_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | np.ndarray:
    """An image file (or its bytes), checked and decoded: a Pillow image in an 8-bit mode, or a float32
    array in [0, 1] (a float ``.npy``); anything else raises :class:`ImageError`."""
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    if not data:
        raise ImageError(400, f"the image is empty (0 bytes): expected {FORMS}")
    if data.startswith(b"\x93NUMPY"):
        return _read_npy(data, max_pixels)
    fmt = "png" if data.startswith(b"\x89PNG\r\n\x1a\n") else "jpeg" if data.startswith(b"\xff\xd8\xff") else None
    if fmt is None:
        raise ImageError(415, f"the data is not a supported image: expected {FORMS} (checked from its first bytes, "
                         "not its name or Content-Type)")
    name = fmt.upper()
    if fmt == "png" and data[12:16] == b"IHDR" and len(data) >= 25 and data[24] == 16:
        raise _not_8bit(fmt, "16-bit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[name])
    except Image.DecompressionBombError:
        raise ImageError(413, f"the image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; at most "
                         f"{max_pixels:,} are taken (resize it first: the model sees only its own input size)"
                         ) from None
    except Exception as e:
        raise ImageError(400, f"the {name} data is corrupt or truncated: {_clean(e)}") from None
    _check_pixels(im.width, im.height, max_pixels)
    if im.mode not in EIGHT_BIT_MODES:
        what = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer",
                "F": "32-bit float"}.get(im.mode, f"mode {im.mode}, not 8-bit")
        raise _not_8bit(fmt, what)
    if fmt == "jpeg" and (problem := _jpeg_data_problem(data)):
        raise ImageError(400, f"the JPEG data is truncated: {problem}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # on every load: another library may have turned it on
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Exception as e:
        raise ImageError(400, f"the {name} data is corrupt or truncated: {_clean(e)}") from None
    return im


# ----------------------------------------------------------------------------------------- model input


def _triangle_weights(in_size: int, out_size: int) -> list[tuple[int, np.ndarray]]:
    """Per output index: (first input index, normalised weights), as torch's antialiased bilinear."""
    scale = np.float32(in_size / out_size)
    support = scale if scale >= 1.0 else np.float32(1.0)
    invscale = np.float32(1.0 / scale) if scale >= 1.0 else np.float32(1.0)
    rows = []
    for i in range(out_size):
        center = scale * np.float32(i + 0.5)
        xmin = max(int(center - support + np.float32(0.5)), 0)
        xmax = min(int(center + support + np.float32(0.5)), in_size)
        x = (np.arange(xmin, xmax, dtype=np.float32) - center + np.float32(0.5)) * invscale
        w = np.maximum(np.float32(1.0) - np.abs(x), np.float32(0.0)).astype(np.float32)
        total = w.sum(dtype=np.float32)
        rows.append((xmin, w / total if total != 0 else w))
    return rows


def _resize_axis(x: np.ndarray, size: int, axis: int, mode: str) -> np.ndarray:
    n = x.shape[axis]
    if n == size:
        return x
    x = np.moveaxis(x, axis, -1)
    if mode == "nearest":
        idx = np.minimum(np.floor(np.arange(size, dtype=np.float32) * np.float32(n / size)).astype(np.int64), n - 1)
        y = x[..., idx]
    elif mode == "bilinear":
        y = np.empty((*x.shape[:-1], size), dtype=np.float32)
        for i, (start, w) in enumerate(_triangle_weights(n, size)):
            acc = x[..., start] * w[0]
            for j in range(1, len(w)):
                acc = acc + x[..., start + j] * w[j]
            y[..., i] = acc
    else:
        raise ValueError(f"unknown resize mode {mode!r} in preprocess.json")
    return np.moveaxis(y, -1, axis)


def resize(x: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """(C, H, W) float32 -> (C, size, size); width first, then height (torch's order)."""
    return _resize_axis(_resize_axis(x, size, 2, mode), size, 1, mode)


def image_mode(spec: dict) -> str:
    return spec.get("image_mode") or ("L" if spec["in_chans"] == 1 else "RGB")


def image_pixels(image, spec: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path (read by :func:`read_image`), PIL image, uint8 array (H, W[, C]) or float array in [0, 1]
    -> (H, W, C) uint8, or float32 for float arrays; PIL images are converted to the model's mode."""
    if isinstance(image, (str, Path)):
        try:
            image = read_image(image, max_pixels)
        except ImageError as e:
            raise ImageError(e.status, f"{image}: {e.message}") from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert(image_mode(spec)))
    a = np.asarray(image)
    a = a[:, :, None] if a.ndim == 2 else a
    if a.ndim != 3:
        raise ValueError(f"cannot read an array of shape {a.shape} as an image; give (H, W) or (H, W, C)")
    if np.issubdtype(a.dtype, np.floating):  # already in [0, 1], as zoo.load(...).predict takes it
        a = a.astype(np.float32)
    elif a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got {a.dtype}")
    c, want = a.shape[2], spec["in_chans"]
    if c not in (1, want):
        raise ValueError(f"this model takes {want}-channel images (or greyscale), got {c} channels; convert the "
                         f"images to {'greyscale' if want == 1 else 'RGB'} first")
    return a


def input_array(image, spec: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image as the bundle's graph takes it: normalised float32 (C, S, S), the zoo's preprocessing;
    or, for ``uint8`` bundles (the graph preprocesses), the image's own uint8 pixels (H, W, C)."""
    a = image_pixels(image, spec, max_pixels)
    if spec.get("input_dtype") == "uint8":
        if a.dtype != np.uint8:
            raise ValueError("this bundle takes 8-bit images (exported with --uint8-input): give a uint8 image, "
                             "not a float array")
        return np.ascontiguousarray(a)
    x = np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)
    if a.dtype == np.uint8:
        x = x / np.float32(spec["scale"])
    c = spec["in_chans"]
    if x.shape[0] == 1 and c == 3:
        x = np.repeat(x, 3, axis=0)
    x = resize(x, spec["input_size"], spec["resize"])
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(c, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(c, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------- task rules
# zoo/tasks.py's table: binary models have one logit and scores [1 - p, p]; multi-label one sigmoid per
# label; multi-class and ordinal a softmax. Sigmoid outputs are positive above 0.5.

BINARY, MULTI_LABEL = "binary-class", "multi-label, binary-class"
THRESHOLD = 0.5


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def threshold(task: str) -> float | None:
    """The decision threshold of sigmoid tasks; None for softmax tasks."""
    return THRESHOLD if task in (BINARY, MULTI_LABEL) else None


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """Logits (N, K) -> scores (N, C) in medmnist's layout, float32 (``zoo.tasks.Task.probs``)."""
    z = np.asarray(logits, dtype=np.float32)
    if task == BINARY:
        p = _sigmoid(z[:, :1])
        return np.concatenate([1 - p, p], axis=1)
    if task == MULTI_LABEL:
        return _sigmoid(z)
    return _softmax(z)


def decide(probs: np.ndarray, task: str) -> np.ndarray:
    """One class index per image: ``p > 0.5`` for binary tasks, the argmax otherwise (``Task.decide``)."""
    if task == BINARY:
        return (probs[:, 1] > THRESHOLD).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def positives(probs: np.ndarray, task: str) -> np.ndarray:
    """(N, L) bool: the labels above threshold, for multi-label tasks (``Task.positives``)."""
    if task != MULTI_LABEL:
        raise ValueError(f"{task} tasks have one label per image; use decide()")
    return probs > THRESHOLD


# ----------------------------------------------------------------------------------------- localization maps
# zoo/maps.py's post-processing of the ``cam`` / ``attention`` output, without torch or scipy.

DEFAULT_THRESHOLD = 0.5
DISPLAY_MIN_SIZE = 224
# viridis at 9 evenly spaced points (the palette R's viridis(9) gives); interpolated linearly between.
_VIRIDIS = np.array(
    [[0x44, 0x01, 0x54], [0x47, 0x2D, 0x7B], [0x3B, 0x52, 0x8B], [0x2C, 0x72, 0x8E], [0x21, 0x90, 0x8C],
     [0x27, 0xAD, 0x81], [0x5D, 0xC8, 0x63], [0xAA, 0xDC, 0x32], [0xFD, 0xE7, 0x25]], dtype=np.float64) / 255.0


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
    """The map that explains label ``index``: ``cam`` (K, S, S) gives logit ``index``'s map (binary models
    have one logit, so the negative class's evidence is its negation); ``attention`` is class-agnostic."""
    if kind == "attention":
        return maps
    if task == BINARY:
        return maps[0] if index == 1 else -maps[0]
    return maps[index]


def to_input_size(m: np.ndarray, size: int) -> np.ndarray:
    """A map at the model's input size; patch-grid attention is upsampled bilinearly (Pillow, mode F)."""
    if m.shape == (size, size):
        return m.astype(np.float32)
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.BILINEAR))


def normalise(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map (no evidence anywhere) is all zeros."""
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """The [start, stop) runs of True in a boolean row."""
    d = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def top_box(heat: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> Box:
    """The bounding box of the 4-connected region around the maximum of ``heat`` (in [0, 1]) where it is
    >= ``threshold``: a flood fill over each row's runs of such pixels (runs in adjacent rows touch when
    they share a column)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    heat = np.asarray(heat)
    r0, c0 = np.unravel_index(int(np.argmax(heat)), heat.shape)
    mask = heat >= min(threshold, float(heat[r0, c0]))
    runs = [_runs(row) for row in mask]
    seed = next(k for k, (a, b) in enumerate(runs[r0]) if a <= c0 < b)
    seen, todo = {(int(r0), seed)}, [(int(r0), seed)]
    x0, x1 = runs[r0][seed]
    y0 = y1 = int(r0)
    while todo:
        r, k = todo.pop()
        a, b = runs[r][k]
        x0, x1, y0, y1 = min(x0, a), max(x1, b), min(y0, r), max(y1, r)
        for rr in (r - 1, r + 1):
            if 0 <= rr < len(runs):
                for kk, (a2, b2) in enumerate(runs[rr]):
                    if a2 < b and a < b2 and (rr, kk) not in seen:
                        seen.add((rr, kk))
                        todo.append((rr, kk))
    return Box(x0, y0, x1, y1 + 1)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> viridis RGB (..., 3) floats in [0, 1]; values outside are clipped."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    pos = np.linspace(0.0, 1.0, len(_VIRIDIS))
    return np.stack([np.interp(v, pos, _VIRIDIS[:, ch]) for ch in range(3)], axis=-1)


def _rgb(image) -> np.ndarray:
    """A uint8 (H, W) / (H, W, 1) / (H, W, 3) array or PIL image -> uint8 (H, W, 3)."""
    a = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"overlay takes uint8 images (0-255), got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"overlay takes an image (H, W) or (H, W, 3), got shape {a.shape}")
    return a


def overlay(image, heatmap: np.ndarray, alpha: float = 0.5, min_size: int = DISPLAY_MIN_SIZE,
            size: tuple[int, int] | None = None, box: Box | None = None) -> Image.Image:
    """``zoo.maps.overlay``: the heatmap (min-max scaled, viridis, upsampled bilinearly) alpha-blended over
    the image, as RGB; images with a short side below ``min_size`` are upscaled by an integer factor
    (nearest) first, or resized to ``size`` = (width, height) (bilinear); ``box`` (heatmap pixels) in green."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = _rgb(image)
    if size is not None:
        a = np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))
    else:
        k = max(1, math.ceil(min_size / min(a.shape[0], a.shape[1])))
        a = a.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else a
    img = a.astype(np.float64) / 255.0
    h = np.asarray(heatmap).astype(np.float64)
    if h.ndim != 2 or 0 in h.shape or not np.isfinite(h).all():
        raise ValueError(f"a heatmap is a finite 2-D array (g_h, g_w), got shape {h.shape}")
    lo, hi = h.min(), h.max()
    h_scaled = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    up = np.asarray(Image.fromarray(h_scaled.astype(np.float32), mode="F").resize((img.shape[1], img.shape[0]),
                                                                                Image.Resampling.BILINEAR))
    blend = (1.0 - alpha) * img + alpha * colormap(up)
    out = Image.fromarray(np.round(blend * 255.0).clip(0, 255).astype(np.uint8), mode="RGB")
    if box is not None:
        b = box.scaled(out.width / h.shape[1], out.height / h.shape[0])
        ImageDraw.Draw(out).rectangle([b.x0, b.y0, b.x1 - 1, b.y1 - 1], outline=(0, 255, 0),
                                      width=max(1, out.width // 112))
    return out


# ----------------------------------------------------------------------------------------- the bundle


class Bundle:
    """An exported model folder: ``preprocess.json`` + the ONNX file it names."""

    def __init__(self, folder: str | Path = ".", threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.folder = Path(folder)
        self.max_pixels = max_pixels
        spec_path = self.folder / "preprocess.json"
        if not spec_path.is_file():
            raise FileNotFoundError(f"{spec_path} not found: run the runner inside an export bundle or pass --bundle")
        self.spec = json.loads(spec_path.read_text())
        import onnxruntime as ort  # here, not at the top: the functions above serve without it (export.edge)

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        model = self.folder / self.spec["model_file"]
        if not model.is_file():
            raise FileNotFoundError(f"{model} not found: copy it with preprocess.json from the export folder")
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])

    def image_to_array(self, image) -> np.ndarray:
        """A path (read by :func:`read_image`), PIL image, uint8 array (H, W[, C]) or float array in [0, 1]
        -> what the graph takes for it (:func:`input_array`)."""
        return input_array(image, self.spec, self.max_pixels)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return probabilities(logits, self.spec["task"])

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs for one input array per image, batched by shape (uint8 bundles take any
        image size, one size per batch), in the order given."""
        name = self.spec["input_name"]
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        outs: list[list[np.ndarray | None]] = []
        for idx in groups.values():
            got = self.session.run(None, {name: np.stack([arrays[i] for i in idx])})
            if not outs:
                outs = [[None] * len(arrays) for _ in got]
            for k, o in enumerate(got):
                for j, i in enumerate(idx):
                    outs[k][i] = o[j]
        return [np.stack(o) for o in outs]

    def predict(self, images: list) -> list[dict]:
        """One dict per image: ``label``, ``labels``, ``probabilities`` ({label: p}), ``threshold`` (the keys of
        ``zoo predict``) and any map output (numpy arrays under the output's name)."""
        outs = self.run([self.image_to_array(im) for im in images])
        names = [o.name for o in self.session.get_outputs()]
        task = self.spec["task"]
        probs = probabilities(outs[0], task)
        idx = decide(probs, task)
        labels = self.spec["labels"]
        results = []
        for i, p in enumerate(probs):
            label = labels[int(idx[i])]
            r = {"label": label,
                 "labels": ([labels[j] for j in np.flatnonzero(positives(p[None], task)[0])] if task == MULTI_LABEL
                            else [label]),
                 "probabilities": {n: round(float(v), 6) for n, v in zip(labels, p)}, "threshold": threshold(task)}
            for name, o in zip(names[1:], outs[1:]):
                r[name] = o[i]
            results.append(r)
        return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with an exported zoo model (onnxruntime).")
    ap.add_argument("images", nargs="+", help="image files: PNG, JPEG (8-bit) or .npy")
    ap.add_argument("--bundle", default=str(Path(__file__).resolve().parent),
                    help="folder with preprocess.json and the model (default: this file's folder)")
    ap.add_argument("--maps", metavar="DIR", help="save localization maps as DIR/<image stem>.npy")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"largest image, width x height, checked before decoding (default {DEFAULT_MAX_PIXELS})")
    a = ap.parse_args(argv)
    try:
        bundle = Bundle(a.bundle, a.threads, a.max_pixels)
        results = bundle.predict(a.images)
    except (OSError, ValueError) as e:
        print(f"runner: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for path, r in zip(a.images, results):
        maps = {k: r.pop(k) for k in list(r) if isinstance(r[k], np.ndarray)}
        if a.maps and maps:
            Path(a.maps).mkdir(parents=True, exist_ok=True)
            for k, m in maps.items():
                np.save(Path(a.maps) / f"{Path(path).stem}.npy" if len(maps) == 1 else
                        Path(a.maps) / f"{Path(path).stem}_{k}.npy", m)
        print(json.dumps({"image": path, **r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
