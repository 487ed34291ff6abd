"""What goes into the exported graph: the zoo net, adapters merged, with optional localization outputs.

The graph takes normalised float input (N, C, S, S), exactly what ``ZooModel.net`` takes;
preprocessing (resize, channel replication, normalisation) stays outside and is described by the
bundle's ``preprocess.json``, unless the bundle is exported with uint8 input: then the graph of
:class:`Uint8Preprocess` (uint8 images of any size -> that input) is put in front of it. Outputs:

- ``logits`` (N, K): always, as ``ZooModel.net(x)``.
- with ``with_localization``, the map of :class:`zoo.maps.WithLocalization` (computed there, once for
  export, serving and ``zoo explain``): ``cam`` (N, K, S, S) for CNN students (before upsampling,
  the spatial mean of ``cam[:, k]`` plus the fc bias is ``logits[:, k]``; the bias is left out, as
  in Zhou et al.), or ``attention`` (N, g, g) for ViT probes (eager attention needed:
  :class:`zoo.backbones.ViTBackbone` loads it so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from export.errors import ExportError
from zoo.backbones import BackboneError
from zoo.backbones import merge_adapters as _merge_adapters
from zoo.maps import WithLocalization, localization_kind


def merge_adapters(net: nn.Module) -> nn.Module:
    """``net`` with its peft adapters merged (:func:`zoo.backbones.merge_adapters`), failures as ExportError."""
    try:
        return _merge_adapters(net)
    except BackboneError as e:
        raise ExportError(str(e)) from None


def localization_output(net: nn.Module) -> str:
    """The name of the localization output this net can export: ``cam`` (CNN) or ``attention`` (ViT)."""
    try:
        return localization_kind(net)
    except ValueError as e:
        raise ExportError(str(e)) from None


class ExportGraph(nn.Module):
    """The module that is traced: ``x -> logits`` or ``x -> (logits, map)`` (:class:`zoo.maps.WithLocalization`)."""

    def __init__(self, net: nn.Module, input_size: int, with_localization: bool = False):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.map_name = localization_output(net) if with_localization else None
        try:
            self.localized = WithLocalization(net, input_size) if with_localization else None
        except ValueError as e:  # attention maps need eager attention
            raise ExportError(str(e)) from None

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + ([self.map_name] if self.map_name else [])

    def forward(self, x: torch.Tensor):
        if self.localized is not None:
            return self.localized(x)
        return self.net(x)


@contextlib.contextmanager
def fixed_position_embeddings(net: nn.Module, input_size: int) -> Iterator[None]:
    """While tracing, ViT embeddings use their position embeddings for the fixed input size as is.

    transformers' DINOv2 embeddings always resample their position embeddings when traced, so the
    graph would hold a (bicubic, for registers models antialiased) resize that the exporter cannot
    write or that changes the numbers. The input size is fixed, so the embeddings for it are computed
    once, eagerly, exactly as the torch model computes them, and stand in for the resize.
    """
    patched = []
    for m in net.modules():
        pe = getattr(m, "position_embeddings", None)
        if not callable(getattr(m, "interpolate_pos_encoding", None)) or not isinstance(pe, torch.Tensor):
            continue
        patch = m.patch_size if hasattr(m, "patch_size") else m.patch_embeddings.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        n = (input_size // patch) ** 2
        with torch.no_grad():
            dummy = torch.zeros(1, 1 + n, pe.shape[-1], dtype=pe.dtype, device=pe.device)
            fixed = m.interpolate_pos_encoding(dummy, input_size, input_size)
        fixed = pe if fixed.shape == pe.shape and torch.equal(fixed, pe) else fixed.detach()
        m.interpolate_pos_encoding = lambda embeddings, height, width, _pe=fixed: _pe
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.interpolate_pos_encoding


class Uint8Preprocess(nn.Module):
    """``zoo.data.preprocess`` as a graph: uint8 images (N, H, W, C) -> the normalised (N, in_chans, S, S) input.

    Channels last, as images are stored (PIL, numpy, camera buffers); H and W may be any size (one
    graph for every image size, one size per batch). The steps are ``preprocess``'s, in its order:
    scale to [0, 1], replicate grey to RGB where the model takes 3 channels (``C`` may then be 1 or
    3: ``cat`` + slice, so no shape branch is traced), resize to S x S with the entry's mode,
    subtract the mean and divide by the std per channel. The resize always runs (it is the identity
    at S x S), since a branch on the input's size cannot be exported:

    - ``nearest``: torch's rule, source index ``floor(i * (H / S))`` in float32, as a gather: the
      same pixels as ``F.interpolate(mode="nearest")`` for every size.
    - ``bilinear``: ``F.interpolate(..., antialias=True)``, which the exporter writes as ONNX
      ``Resize`` (linear, antialias=1, opset 18+). ONNX Runtime computes its weights its own way:
      within ~2e-5 of torch's input (in [0, 1] units) when the size changes, exact at S x S.
    """

    def __init__(self, input_size: int, in_chans: int, mean, std, resize: str):
        super().__init__()
        self.size, self.in_chans, self.resize = input_size, in_chans, resize
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def _nearest(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        scale = torch.full((), n, dtype=torch.float32) / torch.full((), self.size, dtype=torch.float32)
        i = torch.arange(self.size, dtype=torch.float32, device=x.device)
        idx = torch.floor(i * scale).to(torch.int64).clamp(max=n - 1)
        return x.index_select(dim, idx)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if self.in_chans == 3:
            x = torch.cat([x, x, x], dim=1)[:, :3]  # grey (C = 1) replicated; RGB (C = 3) kept as it is
        if self.resize == "nearest":
            x = self._nearest(self._nearest(x, 3), 2)
        else:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std
