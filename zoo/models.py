"""Classifiers: students (timm CNNs) and linear probes (frozen ViT + linear head), under one contract.

Both answer timm's methods, so distillation, probing, export and localization treat CNNs and ViTs
alike::

    forward(x)                              -> logits (B, K)
    forward_features(x)                     -> feature map (B, F, h, w) (CNN) or tokens (B, T, D) (ViT)
    forward_head(features, pre_logits=False) -> logits; with pre_logits=True the pooled embedding (B, E)
    embed(x) = forward_head(forward_features(x), pre_logits=True)

:func:`embed` gives the embedding of either kind; :class:`zoo.loading.ZooModel` exposes the same
methods on what ``zoo.load`` returns. The localization map of either kind is computed in one
place, :mod:`zoo.maps`.
"""

from __future__ import annotations

import copy
import hashlib

import timm
import torch
import torch.nn as nn

from zoo.backbones import ViTBackbone
from zoo.registry import STUDENT_ARCHS, TEST_ARCHS


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


class LinearClassifier(nn.Module):
    """Frozen ViT backbone + trainable linear head: the paper's "DINOv2 + linear" teacher."""

    def __init__(self, backbone: ViTBackbone, num_outputs: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_outputs)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.pool(tokens)
        return pooled if pre_logits else self.head(pooled)

    def get_classifier(self) -> nn.Linear:
        return self.head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# transformers' classifiers that read concat(CLS, mean of patch tokens), as LinearClassifier with cls+mean pooling
HF_CLASSIFIERS = {"dinov2": "Dinov2ForImageClassification",
                  "dinov2_with_registers": "Dinov2WithRegistersForImageClassification"}


@torch.no_grad()
def to_hf_classifier(net: LinearClassifier, labels: tuple[str, ...], task: str) -> nn.Module:
    """``net`` as the transformers classifier that computes the same logits, for ``pipeline("image-classification")``.

    A binary task's one logit z becomes two, ``[0, z]``, so transformers' softmax equals the zoo's sigmoid(z);
    multi-label tasks are marked ``multi_label_classification`` (sigmoid per label). A 1-channel backbone is
    folded into 3 channels (:func:`zoo.backbones.fold_grey_patch_embedding`), since pipelines feed RGB.

    Raises:
        ValueError: the backbone has no transformers classifier of this head's pooling (only Dinov2, with or
            without registers, with ``cls+mean`` pooling have one).
    """
    import transformers  # takes seconds to import: only when a folder is written

    from zoo.backbones import fold_grey_patch_embedding, merge_adapters, unwrap_peft
    from zoo.tasks import get_task

    model = unwrap_peft(merge_adapters(net.backbone.model))  # LoRA merged, as for every export
    kind = HF_CLASSIFIERS.get(model.config.model_type)
    if kind is None or net.backbone.pooling != "cls+mean":
        raise ValueError(f"no transformers classifier reads {net.backbone.pooling} features of a "
                         f"{model.config.model_type} backbone (only cls+mean of {', '.join(HF_CLASSIFIERS)})")
    if int(model.config.num_channels) == 1:
        model = fold_grey_patch_embedding(model)
    t = get_task(task)
    w, b = net.head.weight.detach(), net.head.bias.detach()
    if t.binary:  # [0, z]: softmax over two classes is sigmoid(z)
        w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
    cfg = copy.deepcopy(model.config)
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {name: i for i, name in enumerate(labels)}
    cfg.problem_type = "multi_label_classification" if t.multilabel else "single_label_classification"
    hf = getattr(transformers, kind)(cfg).eval()
    hf.base_model.load_state_dict(model.state_dict(), strict=True)
    hf.classifier.weight.copy_(w)
    hf.classifier.bias.copy_(b)
    return hf


class EnsembleClassifier(nn.Module):
    """Several classifiers of one task whose logits are averaged: ``forward(x) -> mean_k member_k(x)``.

    Used as a teacher (an ensemble of supervised students distils into one student of their size) and
    servable as a model in its own right. ``embed`` is the members' embeddings concatenated.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m.forward_features(x) for m in self.members]

    def forward_head(self, features: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return torch.cat([m.forward_head(f, pre_logits=True) for m, f in zip(self.members, features)], dim=-1)
        return torch.stack([m.forward_head(f) for m, f in zip(self.members, features)]).mean(dim=0)


def embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled embedding (B, E) of a student or probe: its features before the classifier."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


def state_dict_sha256(module: nn.Module) -> str:
    """A content hash of a module's weights (names, shapes, dtypes, values), independent of files."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
