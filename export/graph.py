"""What goes into the exported graph: the zoo net, adapters merged, with optional localization outputs.

The graph takes normalised float input (N, C, S, S), exactly what ``ZooModel.net`` takes;
preprocessing (resize, channel replication, normalisation) stays outside and is described by the
bundle's ``preprocess.json``. Outputs:

- ``logits`` (N, K): always, as ``ZooModel.net(x)``.
- ``cam`` (N, K, S, S), CNN students with ``with_localization``: class-activation maps (Zhou et al.,
  CVPR 2016), the classifier weights applied to the last feature map at every position, upsampled
  (bilinear) to the input size. Before upsampling, the spatial mean of ``cam[:, k]`` plus the fc bias
  is ``logits[:, k]``; the bias is left out, as in the paper.
- ``attention`` (N, g, g), ViT probes with ``with_localization``: the last layer's CLS -> patch
  attention averaged over heads (register tokens skipped), on the g x g patch grid. Needs the
  backbone's eager attention (``zoo.models.HFBackbone`` loads it so).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.models import LinearClassifier


class ExportError(ValueError):
    """An export that cannot be done as asked (bad format, opset, model); the message says what to do.

    A ``ValueError`` so the ``zoo`` command reports it as a one-line error with status 2.
    """


def _is_peft(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "peft"


def merge_adapters(net: nn.Module) -> nn.Module:
    """``net`` with every peft adapter merged into its base weights (``merge_and_unload``).

    The net itself, or any submodule (e.g. a ViT probe's ``backbone.model``), may be a peft model.
    A copy is merged, so the caller's model keeps its adapters. Nets without peft come back as they are.
    """
    if not any(_is_peft(m) for m in net.modules()):
        return net
    net = copy.deepcopy(net)

    def merge(m: nn.Module) -> nn.Module:
        if _is_peft(m) and hasattr(m, "merge_and_unload"):
            return m.merge_and_unload()
        for name, child in list(m.named_children()):
            merged = merge(child)
            if merged is not child:
                setattr(m, name, merged)
        return m

    net = merge(net)
    left = sorted({type(m).__name__ for m in net.modules() if _is_peft(m)})
    if left:
        raise ExportError(f"adapter layers remain after merge_and_unload ({', '.join(left)}); "
                          "merge the adapters into the base model before exporting")
    return net


def localization_output(net: nn.Module) -> str:
    """The name of the localization output this net can export: ``cam`` (CNN) or ``attention`` (ViT)."""
    if isinstance(net, LinearClassifier):
        return "attention"
    fc = net.get_classifier() if hasattr(net, "get_classifier") else None
    if hasattr(net, "forward_features") and isinstance(fc, nn.Linear):
        return "cam"
    raise ExportError(f"no localization output for a {type(net).__name__}: CAMs need a CNN with "
                      "forward_features and a linear classifier, attention maps a LinearClassifier ViT")


class ExportGraph(nn.Module):
    """The module that is traced: ``x -> logits`` or ``x -> (logits, map)``."""

    def __init__(self, net: nn.Module, input_size: int, with_localization: bool = False):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.map_name = localization_output(net) if with_localization else None
        if self.map_name == "attention":
            model = net.backbone.model
            impl = getattr(model.config, "_attn_implementation", "eager")
            if impl != "eager":
                raise ExportError(f"attention maps need eager attention, the backbone uses {impl!r}; "
                                  "load it with attn_implementation='eager'")
            patch = model.config.patch_size
            self.grid = input_size // (patch[0] if isinstance(patch, (tuple, list)) else patch)

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + ([self.map_name] if self.map_name else [])

    def forward(self, x: torch.Tensor):
        if self.map_name == "cam":
            return self._cnn_with_cam(x)
        if self.map_name == "attention":
            return self._vit_with_attention(x)
        return self.net(x)

    def _cnn_with_cam(self, x: torch.Tensor):
        feats = self.net.forward_features(x)  # (N, F, h, w)
        logits = self.net.forward_head(feats)
        cam = torch.einsum("kf,nfhw->nkhw", self.net.get_classifier().weight, feats)
        cam = F.interpolate(cam, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return logits, cam

    def _vit_with_attention(self, x: torch.Tensor):
        bb = self.net.backbone
        out = bb.model(pixel_values=x, output_attentions=True)
        logits = self.net.head(bb.pool(out.last_hidden_state))
        attn = out.attentions[-1]  # (N, heads, T, T), tokens: CLS, registers, patches
        cls_to_patches = attn[:, :, 0, 1 + bb.num_register_tokens :].mean(dim=1)
        return logits, cls_to_patches.reshape(-1, self.grid, self.grid)


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
