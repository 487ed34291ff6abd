"""``zoo explain``: the interpretability maps of a zoo model for one image, written as PNG overlays.

The maps themselves are computed in :mod:`zoo.maps` (attention per head, head-averaged, rollout and
PCA for ViTs; class-activation maps for CNN students), the same code the export graph and the HTTP
service use; this module loads the model, preprocesses the image with the entry's own settings and
writes the files.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from zoo.data import preprocess
from zoo.images import ImageError, read_image
from zoo.inference import to_batch
from zoo.loading import _peek, load, load_backbone, read_config, resolve
from zoo.maps import DISPLAY_MIN_SIZE, cam_and_class, display_scale, overlay, peak, rgb_image, upscale, vit_maps
from zoo.registry import ZooEntry
from zoo.store import write_atomic, write_json_atomic


def _load(name_or_path: str | os.PathLike):
    """("vit", ViTBackbone, Preprocess) or ("cnn", ZooModel, Preprocess) for a zoo name or folder."""
    r = resolve(name_or_path)
    if r.kind == "hf":
        if "patch_size" not in _peek(r.dir / "config.json"):
            cfg = _peek(r.dir / "config.json")
            raise ValueError(f"{r.dir} holds a {cfg.get('model_type', 'transformers')} model with no patch grid; "
                             "explain needs a ViT (DINOv2, DINOv3, ViT) directory or a zoo entry")
        bb, prep = load_backbone(r.dir)
        return "vit", bb, prep
    entry = ZooEntry.from_dict(read_config(r.dir)["entry"])
    if entry.is_student:
        model = load(r.dir)
        return "cnn", model, entry.preprocess
    bb, prep = load_backbone(r.dir)  # raises ValueError for an entry without a ViT backbone
    return "vit", bb, prep


def _open_image(image) -> tuple[Any, str]:
    """A path is read with the one image rule (:func:`zoo.images.read_image`) before any model loads,
    so bad files fail fast.

    Returns the image in a form :func:`zoo.inference.to_batch` takes, and its description for explain.json.
    """
    if not isinstance(image, (str, os.PathLike)):
        return image, f"<{type(image).__name__}>"
    p = Path(image).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found; give a PNG or JPEG file or a .npy array")
    try:
        return read_image(p), str(p)
    except ImageError as e:
        raise ValueError(f"cannot read {p} as an image: {e.message}; give a PNG or JPEG file or a .npy array"
                         ) from None


def _to_batch(image, in_chans: int) -> torch.Tensor:
    """One image in any accepted form -> (1, C, H, W) uint8 or float [0, 1] tensor."""
    groups = to_batch(image, in_chans)
    if len(groups) != 1 or groups[0].shape[0] != 1:
        n = sum(g.shape[0] for g in groups)
        raise ValueError(f"explain takes one image, got {n}; give an (H, W) or (H, W, C) array")
    return groups[0]


def _display(batch: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) uint8 or float [0, 1] -> uint8 (H, W) or (H, W, 3) for drawing."""
    t = batch[0]
    if t.dtype != torch.uint8:
        t = (t.float() * 255).round().clamp(0, 255).to(torch.uint8)
    a = t.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()  # np.savez given a path would append ".npz" to the temporary name
    np.savez(buf, **arrays)
    return buf.getvalue()


def _save_png(img: Image.Image, path: Path) -> Path:
    write_atomic(path, lambda p: img.save(p, format="PNG"))
    return path


def explain(name_or_path: str | os.PathLike, image, out_dir: str | os.PathLike, layer: int = -1) -> dict[str, Path]:
    """Write the interpretability maps of a zoo model for one image into ``out_dir``.

    Args:
        name_or_path: a built ``dinomx-*`` / ``linear-*`` entry (name or folder) or a transformers
            model directory (ViT maps), or a built CNN student entry or run folder (CAM).
        image: a PNG/JPEG or ``.npy`` path, a PIL image, or a uint8 (H, W) / (H, W, C) array (float
            arrays in [0, 1] too). It is preprocessed with the entry's own :class:`~zoo.data.Preprocess`.
        out_dir: created if needed; files of an earlier run with the same names are replaced.
        layer: the layer of the CLS attention maps (ViTs; rollout always uses every layer). CNNs ignore it.

    Writes (ViTs): ``input.png``, ``attention_head{i}.png`` per head, ``attention_mean.png``,
    ``rollout.png``, ``pca.png``; (CNNs) ``input.png``, ``cam.png`` (predicted class); then ``maps.npz``
    (the raw maps: ``attention`` (h, g, g), ``attention_mean``, ``rollout`` (g, g), ``pca`` (g, g, 3);
    or ``cam`` (S, S)) and, last, ``explain.json`` (model, image, grid, peaks in input-image pixels
    as [row, col], files). Every file is written to a temporary name and renamed, and ``explain.json``
    is removed first and written last, so its presence means the set is complete.
    PNGs share one size: the input upscaled (nearest) to a short side of at least 224 px.

    Returns:
        {map name: path} for every file written; ``"summary"`` is ``explain.json``.
    """
    image, image_desc = _open_image(image)
    kind, model, prep = _load(name_or_path)
    batch = _to_batch(image, prep.in_chans)
    x = preprocess(batch, prep)
    shown = _display(batch)
    height, width = shown.shape[:2]
    scale = display_scale(height, width)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").unlink(missing_ok=True)

    summary: dict[str, Any] = {"model": str(name_or_path), "kind": kind, "image": image_desc,
                               "image_size": [height, width], "input_size": prep.input_size,
                               "display_size": [height * scale, width * scale]}
    heatmaps: dict[str, np.ndarray] = {}
    arrays: dict[str, np.ndarray] = {}
    if kind == "vit":
        vm = vit_maps(model, x, layer)
        arrays = {k: v[0].float().numpy() for k, v in vm.maps.items()}
        heatmaps = {f"attention_head{i}": h for i, h in enumerate(arrays["attention"])}
        heatmaps |= {"attention_mean": arrays["attention_mean"], "rollout": arrays["rollout"]}
        summary |= {"grid": list(vm.grid), "layer": vm.layer, "heads": len(arrays["attention"]),
                    "register_tokens": vm.registers, "backbone": type(model.model).__name__}
    else:
        maps, classes = cam_and_class(model, x, None)
        arrays["cam"] = heatmaps["cam"] = maps[0].float().numpy()
        summary |= {"grid": list(arrays["cam"].shape), "class_index": classes[0],
                    "label": model.entry.labels[classes[0]]}

    big = upscale(shown, DISPLAY_MIN_SIZE)
    files: dict[str, Path] = {"input": _save_png(Image.fromarray(big), out / "input.png")}
    for key, h in heatmaps.items():
        files[key] = _save_png(overlay(shown, h), out / f"{key}.png")
    if "pca" in arrays:
        files["pca"] = _save_png(rgb_image(arrays["pca"], big.shape[:2]), out / "pca.png")
    files["maps"] = out / "maps.npz"
    write_atomic(files["maps"], lambda p: p.write_bytes(_npz_bytes(arrays)))
    # Full floats: the pointing benchmark compares these with box edges exactly.
    summary["peaks"] = {key: list(peak(h, (height, width))) for key, h in heatmaps.items()}
    summary["files"] = {key: p.name for key, p in files.items()}
    files["summary"] = out / "explain.json"
    summary["files"]["summary"] = "explain.json"
    write_json_atomic(files["summary"], summary)
    return files


def read_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``explain.json`` of an :func:`explain` output folder."""
    return json.loads((Path(out_dir) / "explain.json").read_text())
