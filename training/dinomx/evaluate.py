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

from zoo.data import Preprocess, dataset_info, load_split
from zoo.inference import logits_to_probs, predict_logits
from zoo.metrics import compute_metrics
from zoo.models import HFBackbone


@torch.no_grad()
def cls_features(backbone: HFBackbone, images: torch.Tensor, prep: Preprocess, batch_size: int = 256,
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
    multilabel = task == "multi-label, binary-class"
    if multilabel:
        targets = train_y.float()  # (N, L)
    else:
        n_cls = 2 if task == "binary-class" else num_classes
        targets = F.one_hot(train_y.view(-1).long(), n_cls).float()
    out = []
    for i in range(0, q.shape[0], chunk):
        sim, idx = (q[i:i + chunk] @ tr.t()).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = (w.unsqueeze(-1) * targets[idx]).sum(dim=1)
        out.append((votes / w.sum(dim=1, keepdim=True)).clamp(0, 1))  # float rounding can pass 1
    return torch.cat(out).numpy()


def linear_probe(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], task: str, num_outputs: int,
                 epochs: int, seed: int = 0, progress: bool = False) -> dict[str, dict[str, float]]:
    """A linear head on frozen features (Adam, cosine schedule), selected on validation AUC."""
    from training.loop import fit, seed_everything
    from training.losses import MedAlmightyLoss

    gen = seed_everything(seed)
    head = torch.nn.Linear(feats["train"].shape[1], num_outputs)
    cfg = {"epochs": epochs, "batch_size": 256, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
           "schedule": "cosine", "warmup_epochs": 0, "progress": progress, "eval_batch_size": 4096}
    # Standardised features: the probe's lr then suits any backbone width and feature scale.
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    z = {s: (f - mu) / sd for s, f in feats.items()}
    res = fit(head, (z["train"], labels["train"]), (z["val"], labels["val"]), task=task, cfg=cfg,
              loss_fn=MedAlmightyLoss(task, alpha=1.0), generator=gen, desc="linear probe")
    with torch.no_grad():
        return {s: compute_metrics(labels[s].numpy(), logits_to_probs(res.model(z[s]), task).numpy(), task)
                for s in ("val", "test")}


def evaluate_backbone(backbone_dir: str | Path | HFBackbone, cfg: dict[str, Any], prep: dict[str, Any] | Preprocess,
                      progress: bool = False, datasets: list[str] | None = None) -> dict[str, Any]:
    """kNN (and linear-probe) ACC/AUC on val and test of each evaluation dataset.

    Returns ``{"knn": {flag: {"val": {acc, auc}, "test": {...}}}, "linear": {...}, "eval": settings}``.
    """
    e, d = cfg["eval"], cfg["data"]
    flags = datasets or e["datasets"] or d["datasets"]
    flags = [flags] if isinstance(flags, str) else list(flags)
    bb = backbone_dir if isinstance(backbone_dir, HFBackbone) else HFBackbone.from_pretrained(backbone_dir, "cls")
    bb.pooling = "cls"
    bb.eval()
    p = prep if isinstance(prep, Preprocess) else Preprocess(int(prep["input_size"]), int(prep["in_chans"]),
                                                              tuple(prep["mean"]), tuple(prep["std"]), "bilinear")
    out: dict[str, Any] = {"knn": {}, "linear": {}, "eval": {"k": int(e["knn_k"]), "temperature":
                                                              float(e["knn_temperature"]), "features": "cls"}}
    for flag in flags:
        info = dataset_info(flag)
        splits = {s: load_split(flag, s, size=int(d["size"]), root=d["root"], download=d["download"])
                  for s in ("train", "val", "test")}
        if int(e["max_train"]) > 0:
            tr = splits["train"]
            splits["train"] = type(tr)(tr.images[: int(e["max_train"])], tr.labels[: int(e["max_train"])])
        feats = {s: cls_features(bb, sp.images, p, desc=f"features {flag}/{s}" if progress else None)
                 for s, sp in splits.items()}
        labels = {s: sp.labels for s, sp in splits.items()}
        out["knn"][flag] = {
            s: compute_metrics(labels[s].numpy(), knn_scores(feats["train"], labels["train"], feats[s], info.task,
                                                            len(info.labels), int(e["knn_k"]),
                                                            float(e["knn_temperature"])), info.task)
            for s in ("val", "test")}
        if e["linear"]:
            out["linear"][flag] = linear_probe(feats, labels, info.task, info.num_outputs, int(e["linear_epochs"]),
                                               int(cfg["seed"]), progress)
    return out
