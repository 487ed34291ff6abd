"""Frozen teachers: backbone features and teacher logits, computed once per split and cached on disk.

MedAlmighty's teacher is frozen and its training data are not augmented, so its outputs on each
split never change: computing them once makes a distillation epoch cost about a plain epoch.
Cache keys hash the teacher weights (content, not file names), dataset, file size and input
preprocessing; cache files live in ``$ZOO_HOME/.cache/teacher`` and are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from training.loop import FitResult, fit
from training.losses import MedAlmightyLoss
from zoo import store
from zoo.data import Preprocess, Split, fingerprint
from zoo.inference import predict_logits
from zoo.models import HFBackbone, backbone_normalisation, state_dict_sha256
from zoo.registry import registry


@dataclass
class Teacher:
    backbone: HFBackbone
    prep: Preprocess
    source: str
    sha256: str
    head: nn.Linear | None = None  # set when the teacher is a built linear-probe zoo entry


def cache_dir() -> Path:
    return store.zoo_home() / ".cache" / "teacher"


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    store.write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p))


def load_teacher(cfg: dict[str, Any]) -> Teacher:
    """The teacher named by ``teacher.backbone``: a built ``linear-*`` zoo entry (backbone and head),
    a hub id, or a local transformers directory (backbone only; the probe is trained here)."""
    t, d = cfg["teacher"], cfg["data"]
    src = str(t["backbone"])
    if src in registry() and not Path(src).exists() and registry()[src].method == "dinomx":
        # A DINO-MX backbone from the zoo: its own channels and normalisation; the probe is trained here.
        from zoo.api import load_backbone

        backbone, p = load_backbone(src, pooling=t["pooling"])
        prep = Preprocess(int(t["input_size"] or d["input_size"]), backbone.in_chans, p.mean, p.std, d["resize"])
        return Teacher(backbone, prep, src, state_dict_sha256(backbone))
    if (Path(src).expanduser() / "backbone" / "config.json").is_file():
        src = str(Path(src).expanduser() / "backbone")  # a DINO-MX run folder
    if src in registry() and not Path(src).exists():
        from zoo.api import load

        zm = load(src)
        if zm.entry.method != "linear":
            raise ValueError(f"teacher.backbone={src} is a {zm.entry.method} entry; a teacher must be a linear-* entry "
                             "or a transformers backbone (hub id or directory)")
        if zm.entry.dataset != d["dataset"]:
            raise ValueError(f"teacher {src} was trained on {zm.entry.dataset}, not {d['dataset']}")
        net = zm.net
        return Teacher(net.backbone, zm.entry.preprocess, src, state_dict_sha256(net), head=net.head)
    backbone = HFBackbone.from_pretrained(src, pooling=t["pooling"], revision=t["revision"])
    mean, std = backbone_normalisation(src, backbone.in_chans)
    prep = Preprocess(int(t["input_size"] or d["input_size"]), backbone.in_chans, mean, std, d["resize"])
    return Teacher(backbone, prep, src, state_dict_sha256(backbone))


@torch.no_grad()
def features(teacher: Teacher, splits: dict[str, Split], cfg: dict[str, Any], progress: bool = True
             ) -> dict[str, torch.Tensor]:
    """Pooled backbone features (N, D) per split, from the cache when the same teacher saw the same data."""
    d = cfg["data"]
    key = _key(kind="features", backbone=teacher.sha256, dataset=d["dataset"], size=d["size"],
               data=fingerprint(splits), prep=asdict(teacher.prep), pooling=teacher.backbone.pooling)
    path = cache_dir() / f"features-{key}.safetensors"
    if path.is_file():
        cached = load_file(path)
        if all(s in cached and cached[s].shape[0] == len(splits[s]) for s in splits):
            return {s: cached[s] for s in splits}
    bs = int(cfg["teacher"]["batch_size"])
    out = {name: predict_logits(teacher.backbone, split.images, teacher.prep, bs,
                                desc=f"teacher features ({name})" if progress else None)
           for name, split in splits.items()}
    _save_atomic(out, path)
    return out


def train_probe(feats: dict[str, torch.Tensor], splits: dict[str, Split], task: str, num_outputs: int,
                cfg: dict[str, Any], generator: torch.Generator, progress: bool = True) -> tuple[nn.Linear, FitResult]:
    """The teacher's linear head on frozen features, selected on validation AUC."""
    p = dict(cfg["probe"], progress=progress)
    head = nn.Linear(feats["train"].shape[1], num_outputs)
    res = fit(head, (feats["train"], splits["train"].labels), (feats["val"], splits["val"].labels), task=task,
              cfg=p, loss_fn=MedAlmightyLoss(task, alpha=1.0), generator=generator, desc="linear probe")
    return res.model, res


@torch.no_grad()
def teacher_logits(teacher: Teacher, head: nn.Linear, feats: dict[str, torch.Tensor], cfg: dict[str, Any]
                   ) -> dict[str, torch.Tensor]:
    """Teacher logits per split, cached under the hash of head weights and of the features they read
    (which already carry the backbone, data and preprocessing)."""
    d = cfg["data"]
    feat_sha = hashlib.sha256(b"".join(feats[s].contiguous().numpy().tobytes() for s in sorted(feats))).hexdigest()
    key = _key(kind="logits", backbone=teacher.sha256, head=state_dict_sha256(head), dataset=d["dataset"],
               size=d["size"], features=feat_sha, prep=asdict(teacher.prep), pooling=teacher.backbone.pooling)
    path = cache_dir() / f"logits-{key}.safetensors"
    if path.is_file():
        cached = load_file(path)
        if all(s in cached and cached[s].shape[0] == feats[s].shape[0] for s in feats):
            return {s: cached[s] for s in feats}
    head.eval()
    out = {s: head(f).float() for s, f in feats.items()}
    _save_atomic(out, path)
    return out
