"""A fused training forward for Dinov2-family backbones: the same weights and math, fewer and larger kernels.

The transformers forward (``zoo.backbones.ViTBackbone.encode``) runs eager attention (explain and
export need its attention maps) with three projections per block. Training needs neither, so
:func:`encode` runs each block as:

- one matmul for the query, key and value projections (their weights concatenated);
- ``F.scaled_dot_product_attention`` (one fused kernel, forward and backward) on CUDA; on the CPU
  the explicit matmul / softmax / matmul, which is faster there at these sequence lengths
  (:func:`attention`);
- when no loss reads the patch tokens (``patches=False``: the DINO CLS loss with KoLeo, no iBOT,
  Gram or feature distillation), the last block computes only what the CLS token needs: keys and
  values of every token, but the query, attention output, layer scale and MLP of the CLS row alone.

With ``dtype`` (the autocast dtype, when ``optim.low_precision_stream`` asks for it) the residual
stream itself is kept in that dtype: the embeddings' output is cast once, and the layer scales are
applied in it, so layer norms, residual adds, layer scales and stochastic depth run in bf16 instead
of going back to float32 between matmuls (under autocast, a float32 layer-scale parameter promotes
every block's output to float32, and each next matmul casts it back). This is how DINOv2 computes
its blocks (FSDP mixed precision with ``param_dtype=bf16``); master weights, gradients and the
optimizer stay float32, and the softmax of attention still accumulates in float32.

Everything else is the model's own modules, called as the transformers forward calls them
(embeddings with the mask token and interpolated positions, layer norms, layer scales, the MLP or
SwiGLU, stochastic depth with the same random draws in the same order, the final norm), so the
result equals ``ViTBackbone.encode`` up to floating-point rounding (a test holds them together,
gradients included). :func:`supported` says when the path applies: a Dinov2 or Dinov2-with-registers
model whose projections are plain ``nn.Linear`` (not LoRA-wrapped) and whose parameters are whole on
this process (not FSDP / ZeRO-3 shards, which gather parameters in module hooks this path bypasses).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.backbones import ViTBackbone, is_peft

MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def supported(backbone: ViTBackbone) -> bool:
    """Whether :func:`encode` can run this backbone (see the module doc); the caller also rules out sharding."""
    model = backbone.model
    if is_peft(model) or getattr(model.config, "model_type", None) not in MODEL_TYPES:
        return False
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "embeddings") or not hasattr(model, "layernorm"):
        return False
    need = ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2")
    for layer in layers:
        if not all(hasattr(layer, n) for n in need):
            return False
        if not all(isinstance(getattr(getattr(layer, n), "lambda1", None), nn.Parameter)
                   for n in ("layer_scale1", "layer_scale2")):
            return False
        a = layer.attention
        if not all(type(getattr(a, n, None)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return False
    return True


def _linear(x: torch.Tensor, mods: tuple[nn.Linear, ...]) -> torch.Tensor:
    """``cat([m(x) for m in mods], -1)`` as one matmul."""
    w = torch.cat([m.weight for m in mods])
    if all(m.bias is None for m in mods):
        return F.linear(x, w)
    return F.linear(x, w, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                                     for m in mods]))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scale: float) -> torch.Tensor:
    """Softmax attention ``(B, h, Tq, d), (B, h, T, d) x 2 -> (B, h, Tq, d)``.

    ``F.scaled_dot_product_attention`` on CUDA (flash / memory-efficient kernels) and wherever dropout
    is drawn; on the CPU without dropout, matmul / softmax / matmul: for the short sequences of 28 px
    crops (10-50 tokens) the CPU's fused kernel costs more than it saves, 4-10x the explicit form in
    bf16 (forward + backward, measured at 1 thread) and about equal in fp32.
    """
    if q.device.type == "cuda" or dropout > 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    # The CPU softmax kernel accumulates bf16 / fp16 inputs in float32 and rounds once, as a float32
    # softmax cast back would, without a float32 copy of the (B, h, T, T) weights and of their gradient.
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def _scale(layer_scale: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``layer_scale(x)`` with the result in ``dtype``, the residual stream's.

    A float32 stream is ``layer_scale(x)`` itself (a bf16 ``x`` from an autocast matmul is promoted by the
    float32 parameter in the same kernel); a bf16 stream applies the parameter in bf16.
    """
    lam = layer_scale.lambda1
    return x * lam if lam.dtype == dtype else x.to(dtype) * lam.to(dtype)


def block(layer: nn.Module, h: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
    """One transformer block on tokens ``h`` (B, T, D); with ``cls_only`` returns the CLS row alone (B, 1, D).

    The output has ``h``'s dtype (float32, or bf16 for a low-precision residual stream).
    """
    a = layer.attention
    b, t, d = h.shape
    heads = a.num_attention_heads
    hd = a.head_dim
    y = layer.norm1(h)
    if cls_only:
        q = a.q_proj(y[:, :1]).view(b, 1, heads, hd).transpose(1, 2)
        k, v = _linear(y, (a.k_proj, a.v_proj)).view(b, t, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        residual = h[:, :1]
    else:
        q, k, v = _linear(y, (a.q_proj, a.k_proj, a.v_proj)).view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        residual = h
    p = a.attention_dropout if a.training else 0.0
    o = attention(q, k, v, p, a.scaling)
    o = a.o_proj(o.transpose(1, 2).reshape(b, -1, heads * hd))
    h = layer.drop_path(_scale(layer.layer_scale1, o, h.dtype)) + residual
    return layer.drop_path(_scale(layer.layer_scale2, layer.mlp(layer.norm2(h)), h.dtype)) + h


def encode(backbone: ViTBackbone, x: torch.Tensor, masks: torch.Tensor | None = None, patches: bool = True,
           dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ViTBackbone.encode`` through fused blocks: cls (B, D) and patches (B, N, D), or None when not ``patches``.

    ``dtype``: keep the residual stream in this dtype (see the module doc); None keeps the model's.
    """
    model = backbone.model
    h = model.embeddings(x, bool_masked_pos=masks)
    if dtype is not None:
        h = h.to(dtype)
    layers = model.encoder.layer
    for i, layer in enumerate(layers):
        h = block(layer, h, cls_only=not patches and i == len(layers) - 1)
    h = model.layernorm(h)
    return h[:, 0], (h[:, 1 + backbone.num_register_tokens:] if patches else None)
