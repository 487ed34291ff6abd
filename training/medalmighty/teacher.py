"""Frozen teachers: backbone features and teacher logits, computed once per split and cached on disk.

MedAlmighty's teacher is frozen and its training data are not augmented, so its outputs on each
split never change: computing them once makes a distillation epoch cost about a plain epoch.
Cache keys hash the teacher weights (content, not file names), dataset, file size and input
preprocessing; cache files live in ``$ZOO_HOME/.cache/teacher`` and are written atomically.

A teacher sees the image at its own resolution (``teacher.input_size: null``): a transformers
backbone's processor size (DINOv2's 224), else its config's ``image_size``; a zoo backbone's entry
size. The student keeps its entry's size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import zoo.store as store
from training.loop import FitSettings
from training.medalmighty.config import MedAlmightyConfig
from training.probe import Probe, linear_probe
from zoo.backbones import ViTBackbone, backbone_normalisation
from zoo.data import Preprocess, Split, fingerprint
from zoo.inference import predict_logits
from zoo.loading import backbone_dir, load, load_backbone, resolve
from zoo.models import state_dict_sha256
from zoo.registry import PROBE_METHODS, registry


@dataclass
class Teacher:
    backbone: ViTBackbone
    prep: Preprocess
    source: str
    sha256: str
    head: nn.Linear | None = None  # set when the teacher is a built linear-probe zoo entry
    resolution: str = ""  # where prep.input_size came from, for the card


def cache_dir() -> Path:
    return store.zoo_home() / ".cache" / "teacher"


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    store.write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p))


def own_resolution(source: str | Path, backbone: ViTBackbone) -> tuple[int, str]:
    """The resolution a transformers backbone was made for: its processor's crop (or resize) size,
    else its config's ``image_size``; and a phrase saying which."""
    p = Path(str(source)).expanduser() / "preprocessor_config.json"
    if p.is_file():
        proc = json.loads(p.read_text())
        for key in ("crop_size", "size"):
            v = proc.get(key)
            size = v.get("height") or v.get("shortest_edge") if isinstance(v, dict) else v
            if isinstance(size, int) and size > 0:
                return size, f"the teacher's own resolution ({key} of its preprocessor_config.json)"
    size = int(getattr(backbone.model.config, "image_size", 224) or 224)
    return size, "the teacher's own resolution (image_size of its config.json)"


def _probe_source(src: str) -> str | Path | None:
    """``src`` when it names a built ViT classifier (``linear`` or ``finetune``: backbone and head), else None."""
    reg = registry()
    if src in reg:
        return src if reg[src].method in PROBE_METHODS else None
    p = Path(src.removeprefix("path=")).expanduser()
    if (p / "config.json").is_file() and (p / "backbone").is_dir():
        try:
            method = (store.read_config(p).get("entry") or {}).get("method")
        except store.WeightsCorruptedError:
            return None
        return p if method in PROBE_METHODS else None
    return None


def load_teacher(cfg: MedAlmightyConfig) -> Teacher:
    """The teacher named by ``teacher.backbone``: a built ``linear-*`` or ``finetune-*`` zoo entry (backbone and
    head; or such a run folder),
    a built ``dinomx-*`` entry or DINO-MX run folder, a hub id, or a local transformers directory
    (backbone only; the probe is trained here)."""
    t, d = cfg.teacher, cfg.data
    src = str(t.backbone)
    reg = registry()
    probe = _probe_source(src)
    if probe is not None:  # a ViT with its head: a linear-* probe or a finetune-* entry (or their folders)
        zm = load(probe)
        if zm.entry.dataset != d.dataset:
            raise ValueError(f"teacher {src} was trained on {zm.entry.dataset}, not {d.dataset}")
        net = zm.net
        return Teacher(net.backbone, zm.entry.preprocess, src, state_dict_sha256(net), head=net.head,
                       resolution=f"the {zm.entry.method} entry's input size")
    if src in reg and reg[src].method == "dinomx":
        # A DINO-MX backbone from the zoo: its own channels and normalisation; the probe is trained here.
        backbone, p = load_backbone(src, pooling=t.pooling)
        size, why = (t.input_size, "teacher.input_size") if t.input_size else (p.input_size, "the entry's size")
        return Teacher(backbone, Preprocess(size, backbone.in_chans, p.mean, p.std, d.resize), src,
                       state_dict_sha256(backbone), resolution=why)
    if src in reg:
        raise ValueError(f"teacher.backbone={src} is a {reg[src].method} entry; a teacher must be a linear-*, "
                         "finetune-* or dinomx-* entry, a built classifier, or a transformers backbone (hub id or "
                         "directory)")
    folder = backbone_dir(src)  # a DINO-MX run folder, or a transformers directory; None for a hub id
    where = str(folder) if folder is not None else src
    backbone = ViTBackbone.from_pretrained(where, pooling=t.pooling, revision=t.revision)
    mean, std = backbone_normalisation(where, backbone.in_chans)
    if t.input_size:
        size, why = t.input_size, "teacher.input_size"
    else:
        size, why = own_resolution(where, backbone)
    return Teacher(backbone, Preprocess(size, backbone.in_chans, mean, std, d.resize), src,
                   state_dict_sha256(backbone), resolution=why)


@torch.no_grad()
def features(teacher: Teacher, splits: dict[str, Split], cfg: MedAlmightyConfig, progress: bool = True
             ) -> dict[str, torch.Tensor]:
    """Pooled backbone features (N, D) per split, from the cache when the same teacher saw the same data."""
    d = cfg.data
    key = _key(kind="features", backbone=teacher.sha256, dataset=d.dataset, size=d.size,
               data=fingerprint(splits), prep=asdict(teacher.prep), pooling=teacher.backbone.pooling)
    path = cache_dir() / f"features-{key}.safetensors"
    if path.is_file():
        cached = load_file(path)
        if all(s in cached and cached[s].shape[0] == len(splits[s]) for s in splits):
            return {s: cached[s] for s in splits}
    bs = cfg.teacher.batch_size
    out = {name: predict_logits(teacher.backbone, split.images, teacher.prep, bs,
                                desc=f"teacher features ({name})" if progress else None)
           for name, split in splits.items()}
    _save_atomic(out, path)
    return out


def probe_settings(cfg: MedAlmightyConfig, progress: bool) -> FitSettings:
    """The teacher's linear head is trained with the ``probe`` section (no augmentation, no amp)."""
    p = cfg.probe
    return FitSettings(epochs=p.epochs, batch_size=p.batch_size, optimizer=p.optimizer, lr=p.lr,
                       weight_decay=p.weight_decay, schedule=p.schedule, progress=progress)


def train_probe(feats: dict[str, torch.Tensor], splits: dict[str, Split], task: str, n_labels: int,
                cfg: MedAlmightyConfig, generator: torch.Generator, progress: bool = True) -> Probe:
    """The teacher's linear head on frozen features, selected on validation AUC."""
    labels = {s: sp.labels for s, sp in splits.items()}
    return linear_probe(feats, labels, task, n_labels, probe_settings(cfg, progress), generator)


@torch.no_grad()
def teacher_logits(teacher: Teacher, head: nn.Linear, feats: dict[str, torch.Tensor], cfg: MedAlmightyConfig
                   ) -> dict[str, torch.Tensor]:
    """Teacher logits per split, cached under the hash of head weights and of the features they read
    (which already carry the backbone, data and preprocessing)."""
    d = cfg.data
    feat_sha = hashlib.sha256(b"".join(feats[s].contiguous().numpy().tobytes() for s in sorted(feats))).hexdigest()
    key = _key(kind="logits", backbone=teacher.sha256, head=state_dict_sha256(head), dataset=d.dataset,
               size=d.size, features=feat_sha, prep=asdict(teacher.prep), pooling=teacher.backbone.pooling)
    path = cache_dir() / f"logits-{key}.safetensors"
    if path.is_file():
        cached = load_file(path)
        if all(s in cached and cached[s].shape[0] == feats[s].shape[0] for s in feats):
            return {s: cached[s] for s in feats}
    head.eval()
    out = {s: head(f).float() for s, f in feats.items()}
    _save_atomic(out, path)
    return out


# ----------------------------------------------------------------------------------------- teachers' outputs

CLASSIFIER_METHODS = ("baseline", "medalmighty", "ensemble", "camkd")  # built entries that are classifiers


@dataclass
class TeacherOutputs:
    """What a frozen teacher gives on every split, computed once and cached.

    Attributes:
        source: how the teacher was named (zoo name, folder or hub id).
        sha256: content hash of its weights.
        logits: split -> (N, K) logits.
        features: split -> (N, D) the features its linear classifier reads (CA-MKD's feature term), or None.
        head: that linear classifier (D -> K), or None.
        vit: the ViT teacher (backbone, preprocessing) when the teacher is one, else None.
        probe: the linear probe trained here on a ViT's features, else None.
        lineage: what the card and config.json record about it.
    """

    source: str
    sha256: str
    logits: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor] | None
    head: nn.Linear | None
    vit: Teacher | None = None
    probe: Probe | None = None
    lineage: dict[str, Any] | None = None


def _classifier_source(src: str) -> Path | None:
    """The folder of a built classifier entry or run (student, ensemble), when ``src`` names one."""
    reg = registry()
    if src in reg:
        if reg[src].method not in CLASSIFIER_METHODS:
            return None
        return resolve(src).dir
    p = Path(src.removeprefix("path=")).expanduser()
    if (p / "config.json").is_file():
        try:
            entry = store.read_config(p)["entry"]
        except store.WeightsCorruptedError:
            return None
        if entry.get("method") in CLASSIFIER_METHODS:
            return p
    return None


@torch.no_grad()
def classifier_outputs(folder: Path, src: str, splits: dict[str, Split], cfg: MedAlmightyConfig,
                       progress: bool = True) -> TeacherOutputs:
    """Logits (and pooled features with the classifier, for single networks) of a built classifier entry on
    every split, cached under the hash of its weights and of the images."""
    zm = load(folder)
    sha = state_dict_sha256(zm.net)
    prep = zm.entry.preprocess
    key = _key(kind="classifier", net=sha, dataset=cfg.data.dataset, size=cfg.data.size, data=fingerprint(splits),
               prep=asdict(prep))
    path = cache_dir() / f"classifier-{key}.safetensors"
    single = hasattr(zm.net, "get_classifier") and isinstance(zm.net.get_classifier(), nn.Linear)
    cached = load_file(path) if path.is_file() else {}
    if not all(f"logits.{s}" in cached for s in splits):
        bs = cfg.teacher.batch_size
        cached = {}
        for name, split in splits.items():
            if single:
                feats = predict_logits(_Embed(zm.net), split.images, prep, bs,
                                       desc=f"teacher ({name})" if progress else None)
                cached[f"features.{name}"] = feats
                cached[f"logits.{name}"] = zm.net.get_classifier()(feats).float()
            else:
                cached[f"logits.{name}"] = predict_logits(zm.net, split.images, prep, bs,
                                                          desc=f"teacher ({name})" if progress else None)
        _save_atomic(cached, path)
    logits = {s: cached[f"logits.{s}"] for s in splits}
    feats = {s: cached[f"features.{s}"] for s in splits} if single else None
    head = zm.net.get_classifier() if single else None
    if head is not None:
        head = nn.Linear(head.in_features, head.out_features).requires_grad_(False)
        head.load_state_dict(zm.net.get_classifier().state_dict())
    lineage = {"teacher_backbone": src, "teacher_sha256": sha, "teacher_kind": zm.entry.method,
               "teacher_input_size": prep.input_size, "teacher_resolution": "the classifier entry's input size"}
    return TeacherOutputs(src, sha, logits, feats, head, lineage=lineage)


class _Embed(nn.Module):
    """A classifier's pooled features (what its linear classifier reads)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def teacher_outputs(src: str, cfg: MedAlmightyConfig, splits: dict[str, Split], task: str, n_labels: int,
                    generator: torch.Generator, progress: bool = True) -> TeacherOutputs:
    """The outputs of the teacher ``src``: a built classifier (student, ensemble) as it is, or a ViT
    backbone (zoo entry, folder or hub id) with its linear probe (trained here when it has none)."""
    folder = _classifier_source(src)
    if folder is not None:
        return classifier_outputs(folder, src, splits, cfg, progress)
    vit = load_teacher(replace(cfg, teacher=replace(cfg.teacher, backbone=src)))
    feats = features(vit, splits, cfg, progress)
    probe = None
    if vit.head is not None:
        head = vit.head
    else:
        probe = train_probe(feats, splits, task, n_labels, cfg, generator, progress)
        head = probe.head
    logits = teacher_logits(vit, head, feats, cfg)
    lineage = {"teacher_backbone": vit.source, "teacher_sha256": vit.sha256,
               "teacher_input_size": vit.prep.input_size, "teacher_resolution": vit.resolution,
               "pooling": vit.backbone.pooling}
    return TeacherOutputs(src, vit.sha256, logits, feats, head, vit=vit, probe=probe, lineage=lineage)
