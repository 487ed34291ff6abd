"""What goes into the exported graph: the zoo net, adapters merged, with optional localization outputs.

The graph takes normalised float input (N, C, S, S), exactly what ``ZooModel.net`` takes;
preprocessing (resize, channel replication, normalisation) stays outside and is described by the
bundle's ``preprocess.json``. Outputs:

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
