"""Representation quality of a frozen backbone: weighted kNN (cosine) and a linear probe on CLS features.

kNN follows DINO's protocol: L2-normalised CLS features, the k most similar training images vote
with weight ``exp(sim / T)``; the class scores are the normalised votes (for multi-label tasks, the
weighted mean of the neighbours' label vectors). ACC and AUC use medmnist's semantics
(:func:`zoo.metrics.compute_metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.dinomx.config import DinoMXConfig
from training.loop import FitSettings, seed_everything
from training.probe import linear_probe
from zoo.backbones import ViTBackbone
from zoo.data import Preprocess, dataset_info, load_split
from zoo.inference import logits_to_probs, predict_logits
from zoo.metrics import compute_metrics
from zoo.tasks import get_task


@torch.no_grad()
def cls_features(backbone: ViTBackbone, images: torch.Tensor, prep: Preprocess, batch_size: int = 256,
                 desc: str | None = None) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, D) CLS features (float32)."""
    return predict_logits(backbone, images, prep, batch_size, desc=desc).float()


@torch.no_grad()
def knn_scores(train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, task: str, num_classes: int,
               k: int = 11, temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Class scores (N_query, C) in medmnist's layout (binary: [p0, p1]; multi-label: per-label scores)."""
    tr = F.normalize(train_f.float(), dim=1)
    q = F.normalize(query_f.float(), dim=1)
    k = min(k, tr.shape[0])
    t = get_task(task)
    if t.multilabel:
        targets = train_y.float()  # (N, L)
    else:
        targets = F.one_hot(train_y.view(-1).long(), t.num_scores(num_classes)).float()
    out = []
    for i in range(0, q.shape[0], chunk):
        sim, idx = (q[i:i + chunk] @ tr.t()).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = (w.unsqueeze(-1) * targets[idx]).sum(dim=1)
        out.append((votes / w.sum(dim=1, keepdim=True)).clamp(0, 1))  # float rounding can pass 1
    return torch.cat(out).numpy()


# DINO-MX's frozen-feature protocol: Adam 1e-3 with cosine decay on standardised features.
def probe_settings(epochs: int, progress: bool = False) -> FitSettings:
    return FitSettings(epochs=epochs, batch_size=256, optimizer="adam", lr=1e-3, schedule="cosine",
                       progress=progress, eval_batch_size=4096)


def linear_eval(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], task: str, n_labels: int,
                epochs: int, seed: int = 0, progress: bool = False) -> dict[str, dict[str, float]]:
    """Val/test ACC and AUC of the linear probe (:func:`training.probe.linear_probe`) on frozen features."""
    gen = seed_everything(seed)
    probe = linear_probe(feats, labels, task, n_labels, probe_settings(epochs, progress), gen, standardise=True)
    return {s: compute_metrics(labels[s].numpy(), logits_to_probs(probe.logits(feats[s]), task).numpy(), task)
            for s in ("val", "test")}


def evaluate_backbone(backbone_dir: str | Path | ViTBackbone, cfg: DinoMXConfig, prep: dict[str, Any] | Preprocess,
                      progress: bool = False, datasets: list[str] | None = None) -> dict[str, Any]:
    """kNN (and linear-probe) ACC/AUC on val and test of each evaluation dataset.

    Returns ``{"knn": {flag: {"val": {acc, auc}, "test": {...}}}, "linear": {...}, "eval": settings}``.
    """
    e, d = cfg.eval, cfg.data
    flags = list(datasets or e.datasets or d.datasets)
    bb = backbone_dir if isinstance(backbone_dir, ViTBackbone) else ViTBackbone.from_pretrained(backbone_dir, "cls")
    bb.pooling = "cls"
    bb.eval()
    p = prep if isinstance(prep, Preprocess) else Preprocess(int(prep["input_size"]), int(prep["in_chans"]),
                                                              tuple(prep["mean"]), tuple(prep["std"]), "bilinear")
    out: dict[str, Any] = {"knn": {}, "linear": {}, "eval": {"k": e.knn_k, "temperature": e.knn_temperature,
                                                              "features": "cls"}}
    for flag in flags:
        info = dataset_info(flag)
        splits = {s: load_split(flag, s, size=d.size, root=d.root, download=d.download)
                  for s in ("train", "val", "test")}
        if e.max_train > 0:
            tr = splits["train"]
            splits["train"] = type(tr)(tr.images[: e.max_train], tr.labels[: e.max_train])
        feats = {s: cls_features(bb, sp.images, p, desc=f"features {flag}/{s}" if progress else None)
                 for s, sp in splits.items()}
        labels = {s: sp.labels for s, sp in splits.items()}
        out["knn"][flag] = {
            s: compute_metrics(labels[s].numpy(), knn_scores(feats["train"], labels["train"], feats[s], info.task,
                                                            len(info.labels), e.knn_k, e.knn_temperature),
                                     info.task)
            for s in ("val", "test")}
        if e.linear:
            out["linear"][flag] = linear_eval(feats, labels, info.task, len(info.labels), e.linear_epochs, cfg.seed,
                                              progress)
    return out
