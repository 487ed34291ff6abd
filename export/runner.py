#!/usr/bin/env python3
"""Classify images with an exported zoo model. Needs only numpy, Pillow and onnxruntime.

This file is self-contained (no torch, no zoo import): ``zoo export`` copies it into every bundle
beside ``model.onnx`` and ``preprocess.json``. On the edge device::

    python3 -m venv edge                                  # a clean environment, nothing else in it
    edge/bin/pip install numpy pillow onnxruntime
    edge/bin/python runner.py image.png [more.png ...]    # bundle = this file's folder
    edge/bin/python runner.py scan.png --bundle /opt/model --maps maps/

Each image prints one JSON line, as ``zoo predict`` does: ``{"image", "label", "probs"}`` (plus
``"labels"``, every label with p > 0.5, for multi-label tasks). Binary tasks give ``[1 - p, p]``.
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
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageFile

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


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Bundle:
    """An exported model folder: ``preprocess.json`` + the ONNX file it names."""

    def __init__(self, folder: str | Path = ".", threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.folder = Path(folder)
        self.max_pixels = max_pixels
        spec_path = self.folder / "preprocess.json"
        if not spec_path.is_file():
            raise FileNotFoundError(f"{spec_path} not found: run the runner inside an export bundle or pass --bundle")
        self.spec = json.loads(spec_path.read_text())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        model = self.folder / self.spec["model_file"]
        if not model.is_file():
            raise FileNotFoundError(f"{model} not found: copy it with preprocess.json from the export folder")
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        s = self.spec
        c = s["in_chans"]
        self.mean = np.asarray(s["mean"], dtype=np.float32).reshape(c, 1, 1)
        self.std = np.asarray(s["std"], dtype=np.float32).reshape(c, 1, 1)

    def image_to_array(self, image) -> np.ndarray:
        """A path (read by :func:`read_image`), PIL image, uint8 array (H, W[, C]) or float array in [0, 1]
        -> normalised float32 (C, S, S)."""
        s = self.spec
        if isinstance(image, (str, Path)):
            try:
                image = read_image(image, self.max_pixels)
            except ImageError as e:
                raise ImageError(e.status, f"{image}: {e.message}") from None
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert(s["image_mode"]))
        a = np.asarray(image)
        a = a[:, :, None] if a.ndim == 2 else a
        if np.issubdtype(a.dtype, np.floating):  # already in [0, 1], as zoo.load(...).predict takes it
            x = np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)
        elif a.dtype == np.uint8:
            x = np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32) / np.float32(s["scale"])
        else:
            raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got {a.dtype}")
        if x.shape[0] == 1 and s["in_chans"] == 3:
            x = np.repeat(x, 3, axis=0)
        if x.shape[0] != s["in_chans"]:
            raise ValueError(f"the model takes {s['in_chans']}-channel images, got {x.shape[0]} channels")
        x = resize(x, s["input_size"], s["resize"])
        return (x - self.mean) / self.std

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        task = self.spec["task"]
        if task == "binary-class":
            p = _sigmoid(logits[:, :1])
            return np.concatenate([1 - p, p], axis=1)
        if task == "multi-label, binary-class":
            return _sigmoid(logits)
        return _softmax(logits)

    def predict(self, images: list) -> list[dict]:
        """One dict per image: ``label``, ``probs`` (list), ``labels`` (multi-label) and any map output."""
        x = np.stack([self.image_to_array(im) for im in images])
        outs = self.session.run(None, {self.spec["input_name"]: x})
        names = [o.name for o in self.session.get_outputs()]
        probs = self.probabilities(outs[0].astype(np.float32))
        labels, task = self.spec["labels"], self.spec["task"]
        results = []
        for i, p in enumerate(probs):
            idx = int(p[1] > 0.5) if task == "binary-class" else int(p.argmax())
            r = {"label": labels[idx], "probs": [round(float(v), 6) for v in p]}
            if task == "multi-label, binary-class":
                r["labels"] = [labels[j] for j in np.flatnonzero(p > 0.5)]
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
