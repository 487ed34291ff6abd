"""Hugging Face ViT-family backbones for DINO-MX: by hub id, local directory or a named random-init config.

Any transformers ViT-style model works (Dinov2, Dinov2 with registers, DINOv3 ViT, ViT): the code
finds the patch embedding (the first ``Conv2d``), the transformer blocks (the ``ModuleList`` with
``num_hidden_layers`` entries) and the attention projections by structure, not by attribute names,
because those names change between architectures and transformers versions.

:class:`Encoder` is what the losses see: ``forward(x, masks) -> (cls (B, D), patches (B, N, D))``
with register tokens dropped; ``masks`` (B, N) bool reach the model as ``bool_masked_pos`` so the
learned mask token replaces masked patch embeddings inside the backbone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

# Named configs for random init: (model_type, config kwargs). Patch 4 at 28 px gives a 7 x 7 grid.
NAMED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Tests and smoke runs.
    "vit-test": ("dinov2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                patch_size=4, image_size=28)),
    "dinov3-test": ("dinov3_vit", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, patch_size=4, image_size=28, num_register_tokens=2)),
    "vitreg-test": ("dinov2_with_registers", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  mlp_ratio=2, patch_size=4, image_size=28, num_register_tokens=2)),
    "hfvit-test": ("vit", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               patch_size=4, image_size=28)),
    # Small enough to pretrain on 2 CPU cores at 28 px (7 x 7 patches).
    "vit-mini-p4": ("dinov2", dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, mlp_ratio=4,
                                   patch_size=4, image_size=28)),
    "vit-tiny-p4": ("dinov2", dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, mlp_ratio=4,
                                   patch_size=4, image_size=28)),
    # DINOv2's ViT-S/14 and ViT-B/14 layouts (GPU, 224 px).
    "vit-small-p14": ("dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                     patch_size=14, image_size=224)),
    "vit-base-p14": ("dinov2", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                    patch_size=14, image_size=224)),
}


class BackboneError(ValueError):
    """A backbone that cannot be built or adapted as asked; the message says what to do."""


def create_model(source: str, in_chans: int | None = None, channel_init: str = "mean", revision: str | None = None,
                 drop_path: float = 0.0, image_size: int | None = None) -> nn.Module:
    """A transformers ViT backbone (``AutoModel``) with eager attention.

    Args:
        source: a name in :data:`NAMED_CONFIGS` (random init), a local ``save_pretrained`` directory,
            or a hub id (``facebook/dinov2-small``).
        in_chans: input channels wanted; ``None`` keeps the model's. A pretrained patch embedding is
            adapted, never re-randomised (see :func:`adapt_channels`).
        channel_init: ``mean`` or ``repeat``, for :func:`adapt_channels`.
        drop_path: stochastic depth rate (set on the config of named models; kept for loaded ones
            unless given > 0).
        image_size: default resolution recorded in the config of named models.
    """
    from transformers import AutoConfig, AutoModel

    if source in NAMED_CONFIGS:
        model_type, kw = NAMED_CONFIGS[source]
        kw = dict(kw, drop_path_rate=drop_path)
        if in_chans is not None:
            kw["num_channels"] = in_chans
        if image_size is not None:
            kw["image_size"] = image_size
        cfg = AutoConfig.for_model(model_type, **kw)
        if model_type == "vit":
            return AutoModel.from_config(cfg, attn_implementation="eager", add_pooling_layer=False,
                                         use_mask_token=True)
        return AutoModel.from_config(cfg, attn_implementation="eager")
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise BackboneError(f"{local} has no config.json: not a transformers model directory")
    if not local.exists() and "/" not in source:
        raise BackboneError(f"unknown backbone {source!r}: give a named config ({', '.join(NAMED_CONFIGS)}), "
                            "a local save_pretrained directory or a hub id such as facebook/dinov2-small")
    extra: dict[str, Any] = {"drop_path_rate": drop_path} if drop_path > 0 else {}
    try:
        cfg = AutoConfig.from_pretrained(str(local) if local.exists() else source, revision=revision)
        if cfg.model_type == "vit":
            extra.update(add_pooling_layer=False, use_mask_token=True)
        model = AutoModel.from_pretrained(str(local) if local.exists() else source, revision=revision,
                                          attn_implementation="eager", **extra)
    except OSError as e:
        raise BackboneError(f"cannot load backbone {source!r}: {str(e).splitlines()[0]}. Pass a local directory "
                            f"or a named config ({', '.join(NAMED_CONFIGS)}) when the hub is unreachable") from None
    if in_chans is not None and in_chans != int(model.config.num_channels):
        adapt_channels(model, in_chans, channel_init)
    return model


def patch_embedding(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent module, attribute name, conv) of the patch embedding: the first Conv2d in the model."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, mod
    raise BackboneError(f"{type(model).__name__} has no Conv2d patch embedding; not a ViT-family backbone")


@torch.no_grad()
def adapt_channels(model: nn.Module, in_chans: int, init: str = "mean") -> nn.Module:
    """Give ``model`` a patch embedding for ``in_chans`` channels, initialised from the pretrained one.

    ``mean``: every new channel gets the mean of the old channels' filters, scaled by ``old/new`` so
    a grey image replicated or not gives the same activations. ``repeat``: old filters are tiled
    cyclically (channel i takes old channel ``i % old``), scaled by ``old/new``. The config's
    ``num_channels`` is updated so ``save_pretrained``/``from_pretrained`` round-trip.
    """
    parent, attr, conv = patch_embedding(model)
    old = conv.in_channels
    if in_chans == old:
        return model
    if init not in ("mean", "repeat"):
        raise BackboneError(f"model.channel_init must be mean or repeat, got {init!r}")
    w = conv.weight
    if init == "mean":
        new_w = w.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (old / in_chans)
    else:
        new_w = w[:, [i % old for i in range(in_chans)]] * (old / in_chans)
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None).to(w.device, w.dtype)
    new.weight.copy_(new_w)
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    setattr(parent, attr, new)
    if hasattr(parent, "num_channels"):
        parent.num_channels = in_chans
    model.config.num_channels = in_chans
    return model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList with ``num_hidden_layers`` entries."""
    n = int(model.config.num_hidden_layers)
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise BackboneError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def block_index(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id for layer-wise lr decay: 0 embeddings, i+1 block i, L+1 the rest."""
    layers = blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    n = len(layers)
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            out[name] = int(name[len(prefix) + 1:].split(".")[0]) + 1
        elif name.startswith("embeddings") or ".embeddings." in name or name.startswith("rope"):
            out[name] = 0
        else:
            out[name] = n + 1
    return out


ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv")


def attention_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the attention projections present (``q_proj``... or ``query``...), for LoRA targets."""
    found = set()
    for name, mod in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(mod, nn.Linear) and leaf in ATTENTION_PROJ and "attention" in name:
            found.add(leaf)
    if not found:
        raise BackboneError(f"no attention projections ({', '.join(ATTENTION_PROJ)}) in {type(model).__name__}")
    return sorted(found)


class Encoder(nn.Module):
    """A transformers ViT as ``(x, masks) -> (cls (B, D), patches (B, N, D))``, register tokens dropped."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.embed_dim = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        self.in_chans = int(cfg.num_channels)
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.num_layers = int(cfg.num_hidden_layers)
        # ViTModel interpolates position embeddings only when asked; Dinov2 always does, DINOv3 uses RoPE.
        self._kw = {"interpolate_pos_encoding": True} if cfg.model_type == "vit" else {}

    def grid(self, size: int) -> int:
        return size // self.patch_size

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) normalised; masks (B, N) bool or None -> cls (B, D), patches (B, N, D)."""
        out = self.model(pixel_values=x, bool_masked_pos=masks, **self._kw).last_hidden_state
        return out[:, 0], out[:, 1 + self.num_register_tokens:]


def count_parameters(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def save_backbone(model: nn.Module, path: str | os.PathLike, mean: tuple[float, ...], std: tuple[float, ...],
                  image_size: int) -> Path:
    """Save in Hugging Face format (``AutoModel.from_pretrained(path)`` loads it with no project code).

    peft adapters are merged first; a ``preprocessor_config.json`` records mean/std and size so
    ``AutoImageProcessor`` users normalise as training did.
    """
    import json

    from export.graph import merge_adapters

    path = Path(path)
    model = merge_adapters(model)
    if hasattr(model, "get_base_model") and type(model).__module__.startswith("peft"):
        model = model.get_base_model()
    model.config.image_size = image_size
    model.save_pretrained(path, safe_serialization=True)
    proc = {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"height": image_size,
            "width": image_size}, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": False}
    (path / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return path


def num_patches(size: int, patch: int) -> int:
    return (size // patch) ** 2
