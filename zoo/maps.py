"""Maps of where a model looks, computed in one place: ViT attention, rollout and PCA; CNN class activation.

Used by ``zoo explain``, the export graph (a second ONNX output) and the HTTP service's ``/localize``,
so all three show the same map for the same image.

ViT maps come from a :class:`zoo.backbones.ViTBackbone` (eager attention, so transformers returns
the attention probabilities). Tokens are ordered CLS, registers, patches, as in DINOv2 with registers
and DINOv3; register tokens are skipped in every map, so each map lies on the g_h x g_w patch grid.

Shapes (B images, h heads, T = 1 + registers + g_h * g_w tokens, K logits):

- :func:`cls_attention` -> (B, h, g_h, g_w); its mean over heads is the head-averaged map.
- :func:`attention_rollout` -> (B, g_h, g_w).
- :func:`pca_image` -> (B, g_h, g_w, n) in [0, 1].
- :class:`WithLocalization` -> (logits (B, K), map): ``cam`` (B, K, S, S) for CNN students (Zhou et
  al., CVPR 2016: the classifier weights applied to the last feature map at every position,
  upsampled bilinearly to the input size, bias left out) or ``attention`` (B, g, g) for ViT probes
  (the last layer's CLS -> patch attention averaged over heads).
- :func:`cam` -> (B, S, S), one class's CAM; :func:`class_map` picks a class from a ``cam`` output.

:func:`overlay` draws a map over the image (viridis, no matplotlib); :func:`top_box` boxes its top
region; :func:`peak` and :func:`pointing_hit` give the pointing-game numbers.

>>> bb, prep = zoo.load_backbone("linear-dinov2-vits14-pathmnist")       # doctest: +SKIP
>>> x = zoo.data.preprocess(images, prep)          # uint8 (B, C, H, W)   # doctest: +SKIP
>>> head_mean = cls_attention(bb, x).mean(dim=1)   # (B, g_h, g_w)        # doctest: +SKIP
>>> pointing_hit(head_mean[0], box, image_size=(H, W))                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage

from zoo.backbones import ViTBackbone
from zoo.errors import UsageError
from zoo.models import LinearClassifier
from zoo.tasks import get_task

# viridis at 9 evenly spaced points (the palette R's viridis(9) gives); interpolated linearly between.
_VIRIDIS = np.array(
    [[0x44, 0x01, 0x54], [0x47, 0x2D, 0x7B], [0x3B, 0x52, 0x8B], [0x2C, 0x72, 0x8E], [0x21, 0x90, 0x8C],
     [0x27, 0xAD, 0x81], [0x5D, 0xC8, 0x63], [0xAA, 0xDC, 0x32], [0xFD, 0xE7, 0x25]], dtype=np.float64) / 255.0
HEAD_FUSIONS = ("mean", "max", "min")
DISPLAY_MIN_SIZE = 224


# ------------------------------------------------------------------------------------------ ViT maps


def _unwrap(backbone: ViTBackbone | nn.Module) -> tuple[nn.Module, int]:
    """(transformers model, number of register tokens) of an ViTBackbone or a bare transformers model."""
    if isinstance(backbone, ViTBackbone):
        return backbone.model, backbone.num_register_tokens
    cfg = getattr(backbone, "config", None)
    if cfg is None:
        raise ValueError("expected a zoo.backbones.ViTBackbone or a transformers ViT model, got "
                         f"{type(backbone).__name__}")
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
def _forward(backbone: ViTBackbone | nn.Module, x: torch.Tensor, attentions: bool = True):
    """One forward pass: (output with ``attentions`` and ``last_hidden_state``, registers, grid)."""
    model, registers = _unwrap(backbone)
    if x.ndim != 4:
        raise ValueError(f"expected normalised images (B, C, H, W), got shape {tuple(x.shape)}")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if attentions and impl != "eager":
        raise ValueError(f"attention maps need eager attention, the backbone uses {impl!r}; load it with "
                         "attn_implementation='eager' (zoo.backbones.ViTBackbone does) or call "
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
        raise UsageError(f"layer {layer} does not exist: the backbone has {n_layers} layers "
                         f"(use 0..{n_layers - 1}, or -1 for the last)")
    return layer % n_layers


def _cls_rows(attn: torch.Tensor, registers: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, T, T) -> CLS row over patch tokens (B, h, g_h, g_w)."""
    return attn[:, :, 0, 1 + registers :].reshape(attn.shape[0], attn.shape[1], *grid)


def cls_attention(backbone: ViTBackbone | nn.Module, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """CLS -> patch attention of one layer, per head.

    Args:
        backbone: a :class:`zoo.backbones.ViTBackbone` (or a bare transformers ViT) with eager attention.
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


def attention_rollout(backbone: ViTBackbone | nn.Module, x: torch.Tensor, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020) from the CLS token to the patches.

    Each layer's attention (B, h, T, T) has its heads fused (``mean``, ``max`` or ``min``); with
    ``discard_ratio`` > 0 that fraction of the smallest fused weights of each image is set to zero
    (never CLS -> CLS), as in the widely used implementation (Gildenblat); the identity is added for
    the residual path and rows are renormalised to sum to 1. The layers' matrices are multiplied,
    last layer on the left, and the CLS row over the patch tokens is returned. Registers take part in
    the flow like any token but are left out of the map.

    Args:
        backbone: an :class:`~zoo.backbones.ViTBackbone` with eager attention.
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


@dataclass(frozen=True)
class ViTMaps:
    """Every ViT map of one forward pass: ``maps`` holds ``attention`` (B, h, g_h, g_w) of ``layer``,
    ``attention_mean`` (B, g_h, g_w), ``rollout`` (B, g_h, g_w) and ``pca`` (B, g_h, g_w, 3)."""

    maps: dict[str, torch.Tensor]
    grid: tuple[int, int]
    layer: int
    registers: int


def vit_maps(backbone: ViTBackbone | nn.Module, x: torch.Tensor, layer: int = -1) -> ViTMaps:
    """CLS attention (per head and mean), rollout and PCA colours from a single forward pass."""
    out, registers, grid = _forward(backbone, x)
    layer_i = _check_layer(layer, len(out.attentions))
    heads = _cls_rows(out.attentions[layer_i], registers, grid)
    maps = {"attention": heads, "attention_mean": heads.mean(dim=1),
            "rollout": _rollout(out.attentions, registers, grid, "mean", 0.0),
            "pca": _pca(out.last_hidden_state, registers, grid, 3)}
    return ViTMaps(maps, grid, layer_i, registers)


def pca_image(backbone: ViTBackbone | nn.Module, x: torch.Tensor, n: int = 3) -> torch.Tensor:
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


def cam_and_class(zoo_model: nn.Module, x: torch.Tensor, class_index: int | None = None
                  ) -> tuple[torch.Tensor, list[int]]:
    """(B, S, S) CAMs of the chosen classes, and those classes (see :func:`cam`)."""
    net, task = zoo_model.net, get_task(zoo_model.entry.task)
    if localization_kind(net) != "cam":
        raise ValueError(f"{zoo_model.entry.name} is a ViT probe: use cls_attention or attention_rollout, not cam")
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected normalised square images (B, C, S, S), got shape {tuple(x.shape)}")
    with torch.no_grad(), _eval_mode(net):
        logits, maps = WithLocalization(net, x.shape[-1])(x)  # (B, K), (B, K, S, S)
    k = logits.shape[1]
    if task.binary:
        if class_index not in (None, 0, 1):
            raise ValueError(f"class_index must be 0 or 1 for a binary model, got {class_index}")
        classes = [int(z > 0) for z in logits[:, 0]] if class_index is None else [class_index] * len(x)
    else:
        if class_index is not None and not 0 <= class_index < k:
            raise ValueError(f"class_index must be in 0..{k - 1}, got {class_index}")
        classes = logits.argmax(dim=1).tolist() if class_index is None else [class_index] * len(x)
    return torch.stack([class_map(maps[i], "cam", task.name, c) for i, c in enumerate(classes)]), classes


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
        (bilinear) to the input size, without the bias (:class:`WithLocalization`).
    """
    return cam_and_class(zoo_model, x, class_index)[0]


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


def upscale(a: np.ndarray, min_size: int) -> np.ndarray:
    # Nearest-neighbour by an integer factor: a 28 px scan stays crisp, each pixel a clean block.
    k = display_scale(a.shape[0], a.shape[1], min_size)
    return a.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else a


def overlay(image, heatmap, alpha: float = 0.5, min_size: int = DISPLAY_MIN_SIZE,
            size: tuple[int, int] | None = None, box: Box | None = None) -> Image.Image:
    """A heatmap drawn over an image, as an RGB PIL image: the one overlay of explain and serving.

    Args:
        image: uint8 (H, W) or (H, W, 3) array, or a PIL image.
        heatmap: (g_h, g_w) map over the whole image (array or tensor), any range.
        alpha: the heatmap's weight in the blend (0: the image only, 1: the heatmap only).
        min_size: without ``size``, images with a shorter side below this are upscaled (nearest,
            integer factor) first, so 28 px MedMNIST images become legible (28 -> 224).
        size: (width, height) of the overlay instead: the image is resized to it (bilinear).
        box: a region in the heatmap's pixels (x0, y0 inclusive; x1, y1 exclusive), drawn in green.

    Returns:
        RGB image: the heatmap is upsampled (bilinear) to it, min-max scaled to [0, 1] (a constant map
        becomes 0), coloured with viridis and alpha-blended on the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = _image_array(image)
    if size is not None:
        a = np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))
    img = (upscale(a, min_size) if size is None else a).astype(np.float64) / 255.0
    h = _as_map(heatmap)
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


def rgb_image(rgb, size: tuple[int, int]) -> Image.Image:
    """A (g_h, g_w, 3) array in [0, 1] (e.g. :func:`pca_image`) as an RGB image of ``size`` = (H, W), nearest."""
    a = rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected (g_h, g_w, 3) colours, got shape {a.shape}")
    img = Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), mode="RGB")
    return img.resize((size[1], size[0]), Image.Resampling.NEAREST)


# ------------------------------------------------------------------------------------------ localization

MAP_KINDS = ("cam", "attention")
DEFAULT_THRESHOLD = 0.5


def localization_kind(net: nn.Module) -> str:
    """The localization map a classifier gives: ``cam`` (CNN student) or ``attention`` (ViT probe)."""
    if isinstance(net, LinearClassifier):
        return "attention"
    fc = net.get_classifier() if hasattr(net, "get_classifier") else None
    if hasattr(net, "forward_features") and isinstance(fc, nn.Linear):
        return "cam"
    raise ValueError(f"no localization map for a {type(net).__name__}: CAMs need a CNN with "
                     "forward_features and a linear classifier, attention maps a LinearClassifier ViT")


class WithLocalization(nn.Module):
    """``x -> (logits, map)``: a classifier's logits and its localization map in one forward pass.

    Traceable (the export graph traces it), so ONNX, the torch backend and ``zoo explain`` compute the
    map with the same code. ``map`` is ``cam`` (N, K, S, S) or ``attention`` (N, g, g); see the module doc.
    """

    def __init__(self, net: nn.Module, input_size: int):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.kind = localization_kind(net)
        if self.kind == "attention":
            model = net.backbone.model
            impl = getattr(model.config, "_attn_implementation", "eager")
            if impl != "eager":
                raise ValueError(f"attention maps need eager attention, the backbone uses {impl!r}; "
                                 "load it with attn_implementation='eager'")
            self.grid = net.backbone.grid(input_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "cam":
            feats = self.net.forward_features(x)  # (N, F, h, w)
            logits = self.net.forward_head(feats)
            maps = torch.einsum("kf,nfhw->nkhw", self.net.get_classifier().weight, feats)
            maps = F.interpolate(maps, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
            return logits, maps
        bb = self.net.backbone
        out = bb.model(pixel_values=x, output_attentions=True, **bb._kw)
        logits = self.net.head(bb.pool(out.last_hidden_state))
        attn = out.attentions[-1]  # (N, heads, T, T), tokens: CLS, registers, patches
        cls_to_patches = attn[:, :, 0, 1 + bb.num_register_tokens:].mean(dim=1)
        return logits, cls_to_patches.reshape(-1, self.grid, self.grid)


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
    if get_task(task).binary:
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


