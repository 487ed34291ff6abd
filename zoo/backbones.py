"""Hugging Face ViT-family backbones, one module for every user: teachers, DINO-MX, probes, explain, export.

Any transformers ViT-style model works (Dinov2, Dinov2 with registers, DINOv3 ViT, ViT), by hub id,
local ``save_pretrained`` directory, or a named random-init config (:data:`NAMED_CONFIGS`). The code
finds the patch embedding (the first ``Conv2d``), the transformer blocks (the ``ModuleList`` with
``num_hidden_layers`` entries) and the attention projections by structure, not by attribute names,
because those names change between architectures and transformers versions.

:class:`ViTBackbone` is the one wrapper. Tokens are ordered CLS, registers, patches::

    forward_features(x, masks=None) -> tokens (B, 1 + R + N, D)    (last hidden state)
    split(tokens)                   -> cls (B, D), patches (B, N, D)   (registers dropped)
    pool(tokens)                    -> (B, embed_dim)   CLS, mean patch, or both (``pooling``)
    forward(x)                      -> pool(forward_features(x))   the embedding
    encode(x, masks=None)           -> split(forward_features(x, masks))   what DINO-MX's losses see

``masks`` (B, N) bool reach the model as ``bool_masked_pos``, so the learned mask token replaces
masked patch embeddings inside the backbone (iBOT).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from zoo.data import LUMA_WEIGHTS, Preprocess
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD

POOLINGS = ("cls", "mean", "cls+mean")

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
    # DINOv2's ViT-S/14, ViT-B/14 and ViT-L/14 layouts (GPU, 224 px).
    "vit-small-p14": ("dinov2", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                     patch_size=14, image_size=224)),
    "vit-base-p14": ("dinov2", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                    patch_size=14, image_size=224)),
    "vit-large-p14": ("dinov2", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                                     patch_size=14, image_size=224)),
}


class BackboneError(ValueError):
    """A backbone that cannot be built or adapted as asked; the message says what to do."""


class BackboneNotFoundError(BackboneError, FileNotFoundError):
    """A local backbone folder that is missing or holds no ``config.json``."""


# ----------------------------------------------------------------------------------------- building


def _local(source: str) -> Path:
    return Path(source).expanduser()


def create_model(source: str, in_chans: int | None = None, channel_init: str = "mean", revision: str | None = None,
                 drop_path: float = 0.0, image_size: int | None = None, what: str = "backbone") -> nn.Module:
    """A transformers ViT backbone (``AutoModel``) with eager attention (attention maps need it).

    Args:
        source: a name in :data:`NAMED_CONFIGS` (random init), a local ``save_pretrained`` directory,
            or a hub id (``facebook/dinov2-small``).
        in_chans: input channels wanted; ``None`` keeps the model's. A pretrained patch embedding is
            adapted, never re-randomised (see :func:`adapt_channels`).
        channel_init: ``mean`` or ``repeat``, for :func:`adapt_channels`.
        drop_path: stochastic depth rate (set on the config of named models; kept for loaded ones
            unless given > 0).
        image_size: default resolution recorded in the config of named models.
        what: how errors name the backbone (``teacher backbone``, ...).
    """
    from transformers import AutoConfig, AutoModel  # transformers takes seconds to import: only when a ViT is built

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
    local = _local(source)
    if local.exists() and not (local / "config.json").is_file():
        raise BackboneNotFoundError(f"{local} has no config.json: not a transformers model directory")
    if not local.exists() and "/" not in source:
        raise BackboneError(f"unknown {what} {source!r}: give a named config ({', '.join(NAMED_CONFIGS)}), "
                            "a local save_pretrained directory or a hub id such as facebook/dinov2-small")
    extra: dict[str, Any] = {"drop_path_rate": drop_path} if drop_path > 0 else {}
    ref = str(local) if local.exists() else source
    try:
        cfg = AutoConfig.from_pretrained(ref, revision=revision)
        if cfg.model_type == "vit":
            extra.update(add_pooling_layer=False, use_mask_token=True)
        model = AutoModel.from_pretrained(ref, revision=revision, attn_implementation="eager", **extra)
    except OSError as e:
        key = "teacher.backbone" if "teacher" in what else "model.backbone"
        raise BackboneNotFoundError(
            f"cannot load {what} {source!r}: {str(e).splitlines()[0]}. Pass a local directory ({key}=/path/to/model) "
            f"or a named config ({', '.join(NAMED_CONFIGS)}) when the Hugging Face hub is unreachable") from None
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


# ----------------------------------------------------------------------------------------- adapters


def is_peft(module: nn.Module) -> bool:
    """A module from peft (a ``PeftModel`` or one of its LoRA layers)."""
    return type(module).__module__.split(".")[0] == "peft"


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if is_peft(model) and hasattr(model, "get_base_model") else model


def merge_adapters(net: nn.Module) -> nn.Module:
    """``net`` with every peft adapter merged into its base weights (``merge_and_unload``).

    The net itself, or any submodule (e.g. a ViT probe's ``backbone.model``), may be a peft model.
    A copy is merged, so the caller's model keeps its adapters. Nets without peft come back as they are.
    """
    if not any(is_peft(m) for m in net.modules()):
        return net
    net = copy.deepcopy(net)

    def merge(m: nn.Module) -> nn.Module:
        if is_peft(m) and hasattr(m, "merge_and_unload"):
            return m.merge_and_unload()
        for name, child in list(m.named_children()):
            merged = merge(child)
            if merged is not child:
                setattr(m, name, merged)
        return m

    net = merge(net)
    left = sorted({type(m).__name__ for m in net.modules() if is_peft(m)})
    if left:
        raise BackboneError(f"adapter layers remain after merge_and_unload ({', '.join(left)}); "
                            "merge the adapters into the base model before exporting")
    return net


# ----------------------------------------------------------------------------------------- the wrapper


class ViTBackbone(nn.Module):
    """A transformers ViT as the zoo sees it (see the module doc for the methods and shapes).

    Attributes:
        model: the transformers model (possibly wrapped by peft while LoRA trains).
        pooling: ``cls``, ``mean`` (patch tokens, registers skipped) or ``cls+mean`` (DINOv2's
            linear-eval features); ``embed_dim`` is the pooled width.
        hidden_size, patch_size, in_chans, num_register_tokens, num_layers: from the model's config.
    """

    def __init__(self, model: nn.Module, pooling: str = "cls+mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be cls, mean or cls+mean, got {pooling!r}")
        self.model = model
        self.pooling = pooling
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        patch = cfg.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.in_chans = int(getattr(cfg, "num_channels", 3))
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.num_layers = int(cfg.num_hidden_layers)
        # ViTModel interpolates position embeddings only when asked; Dinov2 always does, DINOv3 uses RoPE.
        self._kw = {"interpolate_pos_encoding": True} if cfg.model_type == "vit" else {}

    @property
    def embed_dim(self) -> int:
        return self.hidden_size * (2 if self.pooling == "cls+mean" else 1)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, pooling: str = "cls+mean", revision: str | None = None,
                        in_chans: int | None = None, channel_init: str = "mean", what: str = "teacher backbone"
                        ) -> ViTBackbone:
        """Load by hub id (``facebook/dinov2-base``), local directory (``save_pretrained`` output) or
        named config, in eval mode."""
        if pooling not in POOLINGS:  # before loading anything
            raise ValueError(f"pooling must be cls, mean or cls+mean, got {pooling!r}")
        model = create_model(str(source), in_chans, channel_init, revision, what=what)
        return cls(model.eval(), pooling)

    def grid(self, size: int) -> int:
        """Patches per side at input ``size``."""
        return size // self.patch_size

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) normalised [, masks (B, N) bool] -> last hidden states (B, 1 + registers + N, hidden)."""
        if masks is None:
            return self.model(pixel_values=x, **self._kw).last_hidden_state
        return self.model(pixel_values=x, bool_masked_pos=masks, **self._kw).last_hidden_state

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> (CLS (B, hidden), patch tokens (B, N, hidden)); register tokens dropped."""
        return tokens[:, 0], tokens[:, 1 + self.num_register_tokens:]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        cls_tok, patches = self.split(tokens)
        if self.pooling == "cls":
            return cls_tok
        if self.pooling == "mean":
            return patches.mean(dim=1)
        return torch.cat([cls_tok, patches.mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def encode(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) normalised; masks (B, N) bool or None -> cls (B, hidden), patches (B, N, hidden)."""
        return self.split(self.forward_features(x, masks))

    def base_model(self) -> nn.Module:
        """The transformers model, under any peft wrapper."""
        return unwrap_peft(self.model)

    def save_pretrained(self, path: str | os.PathLike, mean: tuple[float, ...], std: tuple[float, ...],
                        image_size: int) -> Path:
        """Save in Hugging Face format (``AutoModel.from_pretrained(path)`` loads it with no project code).

        peft adapters are merged first; a ``preprocessor_config.json`` records mean/std and size so
        ``AutoImageProcessor`` users normalise as training did.
        """
        return save_backbone(self.model, path, mean, std, image_size)


def save_backbone(model: nn.Module, path: str | os.PathLike, mean: tuple[float, ...], std: tuple[float, ...],
                  image_size: int, resize: str = "bilinear") -> Path:
    """A transformers model (or a peft wrapper of one) saved as :meth:`ViTBackbone.save_pretrained` says.

    The ``preprocessor_config.json`` keeps the model's channel count (:meth:`zoo.data.Preprocess.hf_processor_config`).
    """
    path = Path(path)
    model = unwrap_peft(merge_adapters(model))
    model.config.image_size = image_size
    model.save_pretrained(path, safe_serialization=True)
    prep = Preprocess(image_size, int(model.config.num_channels), tuple(mean), tuple(std), resize)
    write_preprocessor_config(path, prep)
    return path


def write_preprocessor_config(folder: str | os.PathLike, prep: Preprocess) -> Path:
    """``<folder>/preprocessor_config.json`` for ``prep`` (``AutoImageProcessor.from_pretrained(folder)`` reads it)."""
    p = Path(folder) / "preprocessor_config.json"
    p.write_text(json.dumps(prep.hf_processor_config(), indent=2) + "\n")
    return p


@torch.no_grad()
def fold_grey_patch_embedding(model: nn.Module) -> nn.Module:
    """A 3-channel copy of a 1-channel ViT that computes exactly what the grey model computes on the luma.

    transformers' pipelines convert every image to RGB before the image processor runs, so a 1-channel
    model cannot be served by ``pipeline(...)`` as it is. The copy's patch filter for channel c is the grey
    filter times the luma weight of c (:data:`zoo.data.LUMA_WEIGHTS`, summing to 1); with one mean/std for
    all channels, a grey image replicated to RGB gives the grey model's output exactly, and an RGB image
    that of its (unrounded) luma, which is the zoo's RGB -> grey rule (:func:`zoo.data.to_channels`).
    """
    if int(model.config.num_channels) != 1:
        raise BackboneError(f"fold_grey_patch_embedding takes a 1-channel model, got {model.config.num_channels}")
    model = copy.deepcopy(unwrap_peft(merge_adapters(model)))
    adapt_channels(model, 3, "repeat")  # the shape and config; the weights are set below
    _, _, conv = patch_embedding(model)
    w = torch.tensor(LUMA_WEIGHTS, dtype=conv.weight.dtype, device=conv.weight.device).view(1, 3, 1, 1)
    conv.weight.copy_(conv.weight[:, :1] * 3 * w)  # "repeat" scaled the grey filter by 1/3
    return model


def backbone_normalisation(source: str | os.PathLike, in_chans: int | None = None
                           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's own image mean/std (its ``preprocessor_config.json``), ImageNet's otherwise.

    With ``in_chans=1`` and RGB statistics (ImageNet's, or a processor written for RGB), the
    channel means are averaged: a grey image is the mean of its RGB channels.
    """
    mean, std = _normalisation(source)
    if in_chans == 1 and len(mean) == 3:
        return (sum(mean) / 3,), (sum(std) / 3,)
    return mean, std


def _normalisation(source: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    local = _local(str(source))
    p = local / "preprocessor_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    elif not local.exists() and str(source) not in NAMED_CONFIGS:
        try:
            from transformers import AutoImageProcessor  # only for hub ids, which the hub describes

            proc = AutoImageProcessor.from_pretrained(str(source))
            return tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # no processor published: DINOv2/v3 use ImageNet statistics anyway
            pass
    return IMAGENET_MEAN, IMAGENET_STD


def num_patches(size: int, patch: int) -> int:
    return (size // patch) ** 2


def count_parameters(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
