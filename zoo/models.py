"""Students (timm CNNs), teachers (frozen transformers ViT backbones + linear head), one contract.

Every classifier here answers ``forward(x) -> logits``, ``forward_features(x)`` (feature map or
tokens), ``forward_head(features) -> logits`` and ``embed(x) -> (B, D)``, so distillation, probing,
export and localisation treat CNNs and ViTs alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import timm
import torch
import torch.nn as nn

from zoo.registry import IMAGENET_MEAN, IMAGENET_STD, STUDENT_ARCHS, TEST_ARCHS


def _small_input_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """MedMNIST's ResNet (28): a 3x3 stride-1 first conv and no max-pool, so 28 px keeps resolution."""
    old = model.conv1
    model.conv1 = nn.Conv2d(in_chans, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def create_student(arch: str, num_outputs: int, in_chans: int = 3, small_stem: bool = True) -> nn.Module:
    """A timm CNN student with random init (MedAlmighty trains students from scratch).

    Args:
        arch: one of ``resnet18``, ``resnet50``, ``seresnet50``, ``skresnet50``, or ``resnet-test`` (tiny).
        num_outputs: logits (1 for binary tasks, else the number of classes or labels).
        in_chans: input channels (1 for grey MedMNIST sets; no replication needed for students).
        small_stem: replace the 7x7/2 stem and max-pool with a 3x3/1 conv for 28 px input.
    """
    if arch == "resnet-test":
        from timm.models.resnet import BasicBlock, ResNet

        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_outputs, in_chans=in_chans, channels=(8, 16, 32, 64),
                       stem_width=8)
    elif arch in STUDENT_ARCHS:
        model = timm.create_model(arch, pretrained=False, num_classes=num_outputs, in_chans=in_chans)
    else:
        raise ValueError(f"unknown student arch {arch!r}; choose one of {', '.join(STUDENT_ARCHS + TEST_ARCHS)}")
    return _small_input_stem(model, in_chans) if small_stem else model


class HFBackbone(nn.Module):
    """A transformers vision backbone (Dinov2, Dinov2 with registers, DINOv3 ViT, ViT, ...) as features.

    ``forward`` returns pooled features (B, D): the CLS token, the mean of patch tokens (register
    tokens skipped), or both concatenated (``cls+mean``, DINOv2's linear-eval protocol).
    """

    def __init__(self, model: nn.Module, pooling: str = "cls+mean"):
        super().__init__()
        if pooling not in ("cls", "mean", "cls+mean"):
            raise ValueError(f"pooling must be cls, mean or cls+mean, got {pooling!r}")
        self.model = model
        self.pooling = pooling
        cfg = model.config
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.hidden_size = int(cfg.hidden_size)
        self.in_chans = int(getattr(cfg, "num_channels", 3))
        self.embed_dim = self.hidden_size * (2 if pooling == "cls+mean" else 1)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, pooling: str = "cls+mean", revision: str | None = None):
        """Load by hub id (``facebook/dinov2-base``) or local directory (``save_pretrained`` output)."""
        from transformers import AutoModel

        src = str(source)
        local = Path(src).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json: not a transformers model directory")
        try:
            model = AutoModel.from_pretrained(
                str(local) if local.exists() else src, revision=revision, attn_implementation="eager"
            )
        except OSError as e:
            raise OSError(
                f"cannot load teacher backbone {src!r}: {str(e).splitlines()[0]}. Pass a local directory "
                "(teacher.backbone=/path/to/model) when the Hugging Face hub is unreachable."
            ) from None
        return cls(model.eval(), pooling)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> last hidden states (B, 1 + registers + patches, hidden)."""
        return self.model(pixel_values=x).last_hidden_state

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        cls_tok = tokens[:, 0]
        patches = tokens[:, 1 + self.num_register_tokens :]
        if self.pooling == "cls":
            return cls_tok
        if self.pooling == "mean":
            return patches.mean(dim=1)
        return torch.cat([cls_tok, patches.mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))


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
    p = Path(str(source)).expanduser() / "preprocessor_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    elif not Path(str(source)).expanduser().exists():
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(str(source))
            return tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # no processor published: DINOv2/v3 use ImageNet statistics anyway
            pass
    return IMAGENET_MEAN, IMAGENET_STD


class LinearClassifier(nn.Module):
    """Frozen backbone + trainable linear head: the paper's "DINOv2 + linear" teacher."""

    def __init__(self, backbone: HFBackbone, num_outputs: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_outputs)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.pool(tokens))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def state_dict_sha256(module: nn.Module) -> str:
    """A content hash of a module's weights (names, shapes, dtypes, values), independent of files."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
