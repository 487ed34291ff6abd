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
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


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

    def __init__(self, folder: str | Path = ".", threads: int | None = None):
        self.folder = Path(folder)
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
        """A path, PIL image or uint8 array (H, W[, C]) -> normalised float32 (C, S, S)."""
        s = self.spec
        if isinstance(image, (str, Path)):
            with Image.open(image) as im:
                image = im.convert(s["image_mode"])
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert(s["image_mode"]))
        a = np.asarray(image)
        if a.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (0-255), got {a.dtype}")
        a = a[:, :, None] if a.ndim == 2 else a
        x = np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32) / np.float32(s["scale"])
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
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    ap.add_argument("--bundle", default=str(Path(__file__).resolve().parent),
                    help="folder with preprocess.json and the model (default: this file's folder)")
    ap.add_argument("--maps", metavar="DIR", help="save localization maps as DIR/<image stem>.npy")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    a = ap.parse_args(argv)
    try:
        bundle = Bundle(a.bundle, a.threads)
        results = bundle.predict(a.images)
    except (OSError, ValueError) as e:
        print(f"runner: error: {e}", file=sys.stderr)
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
