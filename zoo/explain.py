"""Interpretability maps: ViT attention (per head, head-averaged, rollout), PCA images, CNN CAMs.

ViT maps come from a :class:`zoo.models.HFBackbone` (eager attention, so transformers returns the
attention probabilities). Tokens are ordered CLS, registers, patches, as in DINOv2 with registers and
DINOv3; register tokens are skipped in every map, so each map lies on the g_h x g_w patch grid.

Shapes (B images, h heads, T = 1 + registers + g_h * g_w tokens):

- :func:`cls_attention` -> (B, h, g_h, g_w); its mean over heads is the head-averaged map.
- :func:`attention_rollout` -> (B, g_h, g_w).
- :func:`pca_image` -> (B, g_h, g_w, n) in [0, 1].
- :func:`cam` (CNN students) -> (B, S, S) at the input resolution.

:func:`overlay` draws a map over the image (numpy colormap, no matplotlib); :func:`peak` and
:func:`pointing_hit` give the pointing-game numbers; :func:`explain` writes all of it for one image.

>>> bb, prep = zoo.api.load_backbone("linear-dinov2-vits14-pathmnist")     # doctest: +SKIP
>>> x = zoo.data.preprocess(images, prep)          # uint8 (B, C, H, W)   # doctest: +SKIP
>>> head_mean = cls_attention(bb, x).mean(dim=1)   # (B, g_h, g_w)        # doctest: +SKIP
>>> pointing_hit(head_mean[0], box, image_size=(H, W))                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from zoo import store
from zoo.models import HFBackbone

# viridis at 9 evenly spaced points (the palette R's viridis(9) gives); interpolated linearly between.
_VIRIDIS = np.array(
    [[0x44, 0x01, 0x54], [0x47, 0x2D, 0x7B], [0x3B, 0x52, 0x8B], [0x2C, 0x72, 0x8E], [0x21, 0x90, 0x8C],
     [0x27, 0xAD, 0x81], [0x5D, 0xC8, 0x63], [0xAA, 0xDC, 0x32], [0xFD, 0xE7, 0x25]], dtype=np.float64) / 255.0
HEAD_FUSIONS = ("mean", "max", "min")
DISPLAY_MIN_SIZE = 224


# ------------------------------------------------------------------------------------------ ViT maps


def _unwrap(backbone: HFBackbone | nn.Module) -> tuple[nn.Module, int]:
    """(transformers model, number of register tokens) of an HFBackbone or a bare transformers model."""
    if isinstance(backbone, HFBackbone):
        return backbone.model, backbone.num_register_tokens
    cfg = getattr(backbone, "config", None)
    if cfg is None:
        raise ValueError(f"expected a zoo.models.HFBackbone or a transformers ViT model, got {type(backbone).__name__}")
    return backbone, int(getattr(cfg, "num_register_tokens", 0) or 0)


def _grid(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    patch = getattr(model.config, "patch_size", None)
    if patch is None:
        raise ValueError(f"{type(model).__name__} has no patch_size: attention maps need a ViT backbone")
    ph, pw = (patch[0], patch[1]) if isinstance(patch, (tuple, list)) else (patch, patch)
    return x.shape[-2] // ph, x.shape[-1] // pw


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Attention dropout in train mode would make the maps random; the caller's mode is restored after.
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def _forward(backbone: HFBackbone | nn.Module, x: torch.Tensor, attentions: bool = True):
    """One forward pass: (output with ``attentions`` and ``last_hidden_state``, registers, grid)."""
    model, registers = _unwrap(backbone)
    if x.ndim != 4:
        raise ValueError(f"expected normalised images (B, C, H, W), got shape {tuple(x.shape)}")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if attentions and impl != "eager":
        raise ValueError(f"attention maps need eager attention, the backbone uses {impl!r}; load it with "
                         "attn_implementation='eager' (zoo.models.HFBackbone does) or call "
                         "model.set_attn_implementation('eager')")
    grid = _grid(model, x)
    with _eval_mode(model):
        out = model(pixel_values=x, output_attentions=attentions)
    tokens = out.last_hidden_state.shape[1]
    if tokens != 1 + registers + grid[0] * grid[1]:
        raise ValueError(f"{type(model).__name__} gives {tokens} tokens for a {grid[0]}x{grid[1]} patch grid with "
                         f"{registers} register tokens; expected CLS, registers, then one token per patch")
    if attentions and not out.attentions:
        raise ValueError(f"{type(model).__name__} returned no attentions; it needs eager attention")
    return out, registers, grid


def _check_layer(layer: int, n_layers: int) -> int:
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} does not exist: the backbone has {n_layers} layers "
                         f"(use 0..{n_layers - 1}, or -1 for the last)")
    return layer % n_layers


def _cls_rows(attn: torch.Tensor, registers: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, T, T) -> CLS row over patch tokens (B, h, g_h, g_w)."""
    return attn[:, :, 0, 1 + registers :].reshape(attn.shape[0], attn.shape[1], *grid)


def cls_attention(backbone: HFBackbone | nn.Module, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """CLS -> patch attention of one layer, per head.

    Args:
        backbone: a :class:`zoo.models.HFBackbone` (or a bare transformers ViT) with eager attention.
        x: normalised images (B, C, H, W), as :func:`zoo.data.preprocess` returns them.
        layer: which transformer layer (0-based; negative counts from the last).

    Returns:
        (B, heads, g_h, g_w) with g_h = H // patch, g_w = W // patch: the softmax attention weights of
        the CLS query on each patch token. Register tokens are skipped and the weights are not
        renormalised, so each head's map sums to 1 minus its attention on CLS and the registers.
        The head-averaged map is ``cls_attention(...).mean(dim=1)``.
    """
    out, registers, grid = _forward(backbone, x)
    return _cls_rows(out.attentions[_check_layer(layer, len(out.attentions))], registers, grid)


def _rollout(attentions: Sequence[torch.Tensor], registers: int, grid: tuple[int, int], head_fusion: str,
             discard_ratio: float) -> torch.Tensor:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    b, _, t, _ = attentions[0].shape
    eye = torch.eye(t, dtype=torch.float64)
    result = eye.expand(b, t, t)
    for attn in attentions:
        a = attn.double()
        fused = a.mean(dim=1) if head_fusion == "mean" else a.amax(dim=1) if head_fusion == "max" else a.amin(dim=1)
        k = int(t * t * discard_ratio)
        if k:
            flat = fused.reshape(b, -1).clone()
            cls_to_cls = flat[:, 0].clone()
            flat.scatter_(1, flat.topk(k, dim=-1, largest=False).indices, 0.0)
            # CLS -> CLS (flat index 0) is never dropped, as in the reference implementation (Gildenblat).
            flat[:, 0] = cls_to_cls
            fused = flat.reshape(b, t, t)
        # The residual connection carries each token on: half attention, half identity, rows summing to 1.
        a_hat = fused + eye
        a_hat = a_hat / a_hat.sum(dim=-1, keepdim=True)
        result = a_hat @ result
    return result[:, 0, 1 + registers :].reshape(b, *grid).to(attentions[0].dtype)


def attention_rollout(backbone: HFBackbone | nn.Module, x: torch.Tensor, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020) from the CLS token to the patches.

    Each layer's attention (B, h, T, T) has its heads fused (``mean``, ``max`` or ``min``); with
    ``discard_ratio`` > 0 that fraction of the smallest fused weights of each image is set to zero
    (never CLS -> CLS), as in the widely used implementation (Gildenblat); the identity is added for
    the residual path and rows are renormalised to sum to 1. The layers' matrices are multiplied,
    last layer on the left, and the CLS row over the patch tokens is returned. Registers take part in
    the flow like any token but are left out of the map.

    Args:
        backbone: an :class:`~zoo.models.HFBackbone` with eager attention.
        x: normalised images (B, C, H, W).

    Returns:
        (B, g_h, g_w), unnormalised (the values are the CLS token's share of flow from each patch).
    """
    out, registers, grid = _forward(backbone, x)
    return _rollout(out.attentions, registers, grid, head_fusion, discard_ratio)


def _pca(tokens: torch.Tensor, registers: int, grid: tuple[int, int], n: int) -> torch.Tensor:
    b = tokens.shape[0]
    feats = tokens[:, 1 + registers :].double().reshape(-1, tokens.shape[-1])  # (B * g_h * g_w, D)
    if not 1 <= n <= min(feats.shape):
        raise ValueError(f"n must be between 1 and {min(feats.shape)} (patch tokens x feature dim), got {n}")
    centred = feats - feats.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:n]
    # A component's sign is arbitrary; fix it (largest loading positive, as sklearn does) so colours are stable.
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    proj = centred @ (comps * signs).T  # (B * g_h * g_w, n)
    lo, hi = proj.amin(dim=0), proj.amax(dim=0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant component maps to 0, not NaN
    return ((proj - lo) / span).reshape(b, *grid, n).to(tokens.dtype)


def pca_image(backbone: HFBackbone | nn.Module, x: torch.Tensor, n: int = 3) -> torch.Tensor:
    """The first ``n`` principal components of the last layer's patch tokens, as colours (DINOv2-style).

    The PCA is fitted jointly on the patch tokens of all images in the batch (registers and CLS left
    out), so a colour means the same feature direction in every image of one call; each component is
    then min-max scaled to [0, 1] over the whole batch. Component signs are fixed (largest loading
    positive). Unlike DINOv2's figures there is no background thresholding on the first component:
    on medical images the first component is not reliably foreground.

    Returns:
        (B, g_h, g_w, n) in [0, 1]; with n = 3, an RGB image per input.
    """
    out, registers, grid = _forward(backbone, x, attentions=False)
    return _pca(out.last_hidden_state, registers, grid, n)


# ------------------------------------------------------------------------------------------ CNN maps


def _cam_and_class(zoo_model: nn.Module, x: torch.Tensor, class_index: int | None) -> tuple[torch.Tensor, list[int]]:
    from export.graph import ExportGraph, localization_output

    net, task = zoo_model.net, zoo_model.entry.task
    if localization_output(net) != "cam":
        raise ValueError(f"{zoo_model.entry.name} is a ViT probe: use cls_attention or attention_rollout, not cam")
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected normalised square images (B, C, S, S), got shape {tuple(x.shape)}")
    with torch.no_grad(), _eval_mode(net):
        logits, maps = ExportGraph(net, x.shape[-1], with_localization=True)(x)  # (B, K), (B, K, S, S)
    k = logits.shape[1]
    if task == "binary-class":
        # One BCE logit z: class 1 has evidence z, class 0 has -z, so its map is the negated CAM.
        if class_index not in (None, 0, 1):
            raise ValueError(f"class_index must be 0 or 1 for a binary model, got {class_index}")
        classes = [int(z > 0) for z in logits[:, 0]] if class_index is None else [class_index] * len(x)
        sign = torch.tensor([1.0 if c == 1 else -1.0 for c in classes], dtype=maps.dtype)
        return maps[:, 0] * sign.view(-1, 1, 1), classes
    if class_index is not None and not 0 <= class_index < k:
        raise ValueError(f"class_index must be in 0..{k - 1}, got {class_index}")
    classes = logits.argmax(dim=1).tolist() if class_index is None else [class_index] * len(x)
    return maps[torch.arange(len(x)), torch.tensor(classes)], classes


def cam(zoo_model: nn.Module, x: torch.Tensor, class_index: int | None = None) -> torch.Tensor:
    """Class-activation map (Zhou et al., CVPR 2016) of a CNN student, from ``export.graph.ExportGraph``.

    Args:
        zoo_model: a :class:`zoo.api.ZooModel` whose net is a timm CNN (``zoo.load`` of a student entry).
        x: normalised images (B, C, S, S).
        class_index: the class to explain; ``None`` takes each image's predicted class (argmax of the
            logits; for multi-label models the most confident label). Binary models have one logit z:
            class 1's map is the CAM of z, class 0's is its negation (the evidence for -z).

    Returns:
        (B, S, S): the classifier weights of that class applied to the last feature map, upsampled
        (bilinear) to the input size, without the bias.
    """
    return _cam_and_class(zoo_model, x, class_index)[0]


# ------------------------------------------------------------------------------------------ pointing


def _as_map(heatmap) -> np.ndarray:
    h = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if h.ndim != 2 or 0 in h.shape:
        raise ValueError(f"a heatmap is a 2-D array (g_h, g_w), got shape {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("the heatmap has NaN or infinite values")
    return h.astype(np.float64)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def peak(heatmap, image_size: int | Sequence[int] | None = None) -> tuple[float, float]:
    """Where a heatmap is highest, as (row, col) in input-pixel coordinates.

    Coordinates are continuous: pixel (i, j) covers [i, i + 1) x [j, j + 1). The heatmap's cells tile
    the image, so cell (r, c) of a (g_h, g_w) map covers rows [r H / g_h, (r + 1) H / g_h); the peak
    is the centre of the argmax cell: ((r + 0.5) H / g_h, (c + 0.5) W / g_w). Ties go to the first
    cell in row-major order.

    Args:
        heatmap: (g_h, g_w) array or tensor.
        image_size: the image's size, an int or (H, W); ``None`` means the map is at image resolution
            (one cell per pixel, so the peak is the argmax pixel's centre, r + 0.5, c + 0.5).
    """
    h = _as_map(heatmap)
    r, c = np.unravel_index(int(np.argmax(h)), h.shape)
    height, width = h.shape if image_size is None else _hw(image_size)
    return (r + 0.5) * height / h.shape[0], (c + 0.5) * width / h.shape[1]


def pointing_hit(heatmap, box: Sequence[float], image_size: int | Sequence[int]) -> bool:
    """The pointing game (Zhang et al., 2016, no tolerance): does the heatmap's :func:`peak` fall in ``box``?

    Args:
        heatmap: (g_h, g_w) map over the whole image.
        box: (x0, y0, x1, y1) in pixels, half-open like array slicing: it holds the pixels
            ``image[y0:y1, x0:x1]``, i.e. the points x0 <= x < x1, y0 <= y < y1. Adjacent boxes
            therefore never both contain a peak on their shared edge.
        image_size: the image's size, an int or (H, W), the frame ``box`` is given in.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {tuple(box)}")
    row, col = peak(heatmap, image_size)
    return x0 <= col < x1 and y0 <= row < y1


# ------------------------------------------------------------------------------------------ images


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> viridis RGB (..., 3) floats in [0, 1]; values outside are clipped."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    pos = np.linspace(0.0, 1.0, len(_VIRIDIS))
    return np.stack([np.interp(v, pos, _VIRIDIS[:, ch]) for ch in range(3)], axis=-1)


def _image_array(image) -> np.ndarray:
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


def display_scale(height: int, width: int, min_size: int = DISPLAY_MIN_SIZE) -> int:
    """The integer upscale factor that makes the image's short side at least ``min_size`` (1 if it is)."""
    return max(1, math.ceil(min_size / min(height, width)))


def _upscale(a: np.ndarray, min_size: int) -> np.ndarray:
    # Nearest-neighbour by an integer factor: a 28 px scan stays crisp, each pixel a clean block.
    k = display_scale(a.shape[0], a.shape[1], min_size)
    return a.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else a


def overlay(image, heatmap, alpha: float = 0.5, min_size: int = DISPLAY_MIN_SIZE) -> Image.Image:
    """A heatmap drawn over an image, as an RGB PIL image.

    Args:
        image: uint8 (H, W) or (H, W, 3) array, or a PIL image.
        heatmap: (g_h, g_w) map over the whole image (array or tensor), any range.
        alpha: the heatmap's weight in the blend (0: the image only, 1: the heatmap only).
        min_size: images with a shorter side below this are upscaled (nearest, integer factor) first,
            so 28 px MedMNIST images become legible (28 -> 224).

    Returns:
        RGB image of the upscaled size: the heatmap is upsampled (bilinear) to it, min-max scaled to
        [0, 1] (a constant map becomes 0), coloured with viridis and alpha-blended on the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _upscale(_image_array(image), min_size).astype(np.float64) / 255.0
    h = _as_map(heatmap)
    lo, hi = h.min(), h.max()
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    up = np.asarray(Image.fromarray(h.astype(np.float32), mode="F").resize((img.shape[1], img.shape[0]),
                                                                         Image.Resampling.BILINEAR))
    blend = (1.0 - alpha) * img + alpha * colormap(up)
    return Image.fromarray(np.round(blend * 255.0).clip(0, 255).astype(np.uint8), mode="RGB")


def rgb_image(rgb, size: tuple[int, int]) -> Image.Image:
    """A (g_h, g_w, 3) array in [0, 1] (e.g. :func:`pca_image`) as an RGB image of ``size`` = (H, W), nearest."""
    a = rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected (g_h, g_w, 3) colours, got shape {a.shape}")
    img = Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), mode="RGB")
    return img.resize((size[1], size[0]), Image.Resampling.NEAREST)


# ------------------------------------------------------------------------------------------ explain


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.startswith((".", "~")) or (os.altsep is not None and os.altsep in s)


def _load(name_or_path: str | os.PathLike):
    """("vit", HFBackbone, Preprocess) or ("cnn", ZooModel, Preprocess) for a zoo name or folder."""
    from zoo.api import _peek, _resolve_dir, load, load_backbone, read_config
    from zoo.registry import ZooEntry

    p = Path(str(name_or_path)).expanduser()
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)) or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"model folder {p} not found; give a zoo name (zoo list), a built entry or "
                                    "run folder, or a transformers model directory")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: not a zoo entry, run folder or transformers model "
                                    "directory")
        cfg = _peek(p / "config.json")
        if "entry" not in cfg:
            if "patch_size" not in cfg:
                raise ValueError(f"{p} holds a {cfg.get('model_type', 'transformers')} model with no patch grid; "
                                 "explain needs a ViT (DINOv2, DINOv3, ViT) directory or a zoo entry")
            bb, prep = load_backbone(p)
            return "vit", bb, prep
    d, _ = _resolve_dir(name_or_path)
    entry = ZooEntry.from_dict(read_config(d)["entry"])
    if entry.is_student:
        model = load(d)
        return "cnn", model, entry.preprocess
    bb, prep = load_backbone(d)  # raises ValueError for an entry without a ViT backbone
    return "vit", bb, prep


def _open_image(image) -> tuple[Any, str]:
    """A path is read (PNG/JPEG via PIL, ``.npy`` via numpy) before any model loads, so bad files fail fast.

    Returns the image in a form :func:`zoo.inference.to_batch` takes, and its description for explain.json.
    """
    if not isinstance(image, (str, os.PathLike)):
        return image, f"<{type(image).__name__}>"
    p = Path(image).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found; give a PNG or JPEG file or a .npy array")
    if p.suffix.lower() == ".npy":
        try:
            return np.load(p, allow_pickle=False), str(p)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {p} as a numpy array ({e}); save the image with np.save") from None
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy(), str(p)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {p} as an image ({e}); give a PNG or JPEG file or a .npy array") from None


def _to_batch(image, in_chans: int) -> torch.Tensor:
    """One image in any accepted form -> (1, C, H, W) uint8 or float [0, 1] tensor."""
    from zoo.inference import to_batch

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
    store.write_atomic(path, lambda p: img.save(p, format="PNG"))
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
    from zoo.data import preprocess
    from zoo.store import write_json_atomic

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
        res, registers, grid = _forward(model, x)
        layer_i = _check_layer(layer, len(res.attentions))
        heads = _cls_rows(res.attentions[layer_i], registers, grid)[0].float().numpy()
        arrays["attention"] = heads
        arrays["attention_mean"] = heads.mean(axis=0)
        arrays["rollout"] = _rollout(res.attentions, registers, grid, "mean", 0.0)[0].float().numpy()
        arrays["pca"] = _pca(res.last_hidden_state, registers, grid, 3)[0].float().numpy()
        heatmaps = {f"attention_head{i}": h for i, h in enumerate(heads)}
        heatmaps |= {"attention_mean": arrays["attention_mean"], "rollout": arrays["rollout"]}
        summary |= {"grid": list(grid), "layer": layer_i, "heads": len(heads), "register_tokens": registers,
                    "backbone": type(model.model).__name__}
    else:
        maps, classes = _cam_and_class(model, x, None)
        arrays["cam"] = heatmaps["cam"] = maps[0].float().numpy()
        summary |= {"grid": list(arrays["cam"].shape), "class_index": classes[0],
                    "label": model.entry.labels[classes[0]]}

    big = _upscale(shown, DISPLAY_MIN_SIZE)
    files: dict[str, Path] = {"input": _save_png(Image.fromarray(big), out / "input.png")}
    for key, h in heatmaps.items():
        files[key] = _save_png(overlay(shown, h), out / f"{key}.png")
    if "pca" in arrays:
        files["pca"] = _save_png(rgb_image(arrays["pca"], big.shape[:2]), out / "pca.png")
    files["maps"] = out / "maps.npz"
    store.write_atomic(files["maps"], lambda p: p.write_bytes(_npz_bytes(arrays)))
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
