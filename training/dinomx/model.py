"""The DINO-MX student/teacher pair and the strategies applied to it (LoRA, freezing, schedules, groups).

:class:`SSLModel` is the trainable unit (backbone + DINO head + iBOT head [+ distillation
projector]): one ``forward`` per step, so DDP/FSDP/DeepSpeed see a single call. The teacher is a
copy updated by EMA (or, for distillation, a frozen larger backbone with its own heads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from training.dinomx import fused
from training.dinomx.config import HeadConfig
from training.dinomx.heads import DINOHead
from zoo.backbones import ViTBackbone, attention_linear_names, block_index, blocks, patch_embedding


class SSLModel(nn.Module):
    """Backbone + heads. ``forward(globals, locals, masks)`` returns the tensors the losses need.

    Shapes (b images per process, 2 global and n local crops, N patches, K prototypes):
    ``globals`` (2b, C, G, G); ``locals`` (n*b, C, L, L) or None; ``masks`` (2b, N) bool or None.
    Output dict: ``cls`` (2b, D), ``patches`` (2b, N, D) (None when ``need_patches`` is off and
    there are no masks), ``dino_global`` (2b, K), ``dino_local`` (n*b, K) or None, ``ibot`` (M, K)
    for the M masked patches (row-major over ``masks``), and ``proj_cls``/``proj_patches`` for
    feature distillation.

    Attributes set by the task: ``need_patches`` (a loss reads the global crops' patch tokens;
    the local crops' are never read), ``fused`` (run the backbone through
    :func:`training.dinomx.fused.encode`) and ``stream_dtype`` (that forward's residual
    stream in bf16). The DINO head runs once on the global and local CLS
    tokens together.
    """

    def __init__(self, encoder: ViTBackbone, head: HeadConfig, distill_dim: int | None = None):
        super().__init__()
        self.encoder = encoder
        kw = dict(out_dim=head.out_dim, hidden_dim=head.hidden_dim, bottleneck_dim=head.bottleneck_dim,
                  nlayers=head.nlayers, norm_last_layer=head.norm_last_layer)
        d = encoder.hidden_size
        self.dino_head = DINOHead(d, **kw)
        self.ibot_head = DINOHead(d, **kw) if head.ibot_separate_head else None
        self.projector = nn.Linear(d, distill_dim) if distill_dim else None
        self.need_patches = True
        self.fused = False
        self.stream_dtype: torch.dtype | None = None  # fused path only: optim.low_precision_stream

    def encode(self, x: torch.Tensor, masks: torch.Tensor | None = None, patches: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone CLS (B, D) and patch tokens (B, N, D), or None when not ``patches`` (the fused path
        then skips the last block's patch rows)."""
        if self.fused:
            return fused.encode(self.encoder, x, masks, patches, self.stream_dtype)
        cls, p = self.encoder.encode(x, masks)
        return cls, (p if patches else None)

    def heads(self) -> list[DINOHead]:
        return [self.dino_head] + ([self.ibot_head] if self.ibot_head is not None else [])

    def forward(self, globals_: torch.Tensor, locals_: torch.Tensor | None = None,
                masks: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        cls, patches = self.encode(globals_, masks, self.need_patches or masks is not None)
        ibot_head = self.ibot_head or self.dino_head
        out: dict[str, torch.Tensor | None] = {"cls": cls, "patches": patches}
        if locals_ is not None:
            both = self.dino_head(torch.cat([cls, self.encode(locals_, patches=False)[0]]))
            out["dino_global"], out["dino_local"] = both[:cls.shape[0]], both[cls.shape[0]:]
        else:
            out["dino_global"], out["dino_local"] = self.dino_head(cls), None
        out["ibot"] = ibot_head(patches[masks]) if masks is not None else None
        if self.projector is not None:
            out["proj_cls"], out["proj_patches"] = self.projector(cls), self.projector(patches)
        return out


def freeze(encoder: ViTBackbone, first_blocks: int = 0, patch_embed: bool = False) -> None:
    """Freeze the patch embedding and/or the first ``first_blocks`` transformer blocks."""
    layers = blocks(encoder.model)
    if first_blocks > len(layers):
        raise ValueError(f"strategy.freeze.blocks={first_blocks} but the backbone has {len(layers)} blocks")
    for blk in list(layers)[:first_blocks]:
        blk.requires_grad_(False)
    if patch_embed:
        patch_embedding(encoder.model)[2].requires_grad_(False)


def apply_lora(encoder: ViTBackbone, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               targets: list[str] | str = "auto") -> ViTBackbone:
    """Wrap the backbone with peft LoRA adapters on the attention projections; the rest is frozen.

    ``targets="auto"`` finds the projection names by structure (``q_proj``/``k_proj``/``v_proj`` in
    recent transformers, ``query``/``key``/``value`` in older ones), so it works across versions.
    """
    from peft import LoraConfig, get_peft_model  # peft imports its own heavy stack: only when LoRA is asked for

    names = attention_linear_names(encoder.model) if targets == "auto" else list(targets)
    # Only q and v by default, as in the LoRA paper; "qkv" (fused) is taken whole.
    if targets == "auto":
        names = [n for n in names if n in ("q_proj", "v_proj", "query", "value", "qkv")] or names
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    encoder.model = get_peft_model(encoder.model, cfg)
    return encoder


def param_groups(model: SSLModel, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups: layer-wise lr decay (``lr_scale``) and no weight decay on biases, norms, tokens.

    Layer ids: 0 embeddings, i+1 block i, L+1 the final norm and the heads; ``lr_scale =
    layer_decay ** (L + 1 - id)``. The loop sets ``lr = base * lr_scale`` and ``weight_decay`` from
    ``wd_on`` each step. The heads' prototype layers (frozen for the first steps,
    ``optim.freeze_last_layer``) are a group of their own (``last_layer: True``): a runner that
    steps whole flat groups (DeepSpeed ZeRO) can then leave that group's optimizer state, step
    counter included, untouched while it is frozen, so its Adam bias correction starts when it
    starts training, as torch's per-parameter state does under the other runners.
    """
    base = model.encoder.base_model()
    ids = block_index(base)
    n_layers = len(blocks(base))
    by_id = {id(p): ids[n] for n, p in base.named_parameters() if n in ids}
    last = {id(p) for h in model.heads() for p in h.last_layer_parameters()}
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = by_id.get(id(p), n_layers + 1)
        # Biases, norm scales and layer scales are 1-D; tokens and position embeddings are named.
        no_wd = p.ndim <= 1 or "token" in name or "position_embeddings" in name
        key = (layer, not no_wd, id(p) in last)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": layer_decay ** (n_layers + 1 - layer), "wd_on": not no_wd,
                           "layer": layer, "last_layer": id(p) in last}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only; CUDA devices never get here

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
