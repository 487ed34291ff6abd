"""Published figures to compare against, read from the CSVs in ``$ANCHORS_DIR`` (never retyped).

Default location: ``../shared/anchors`` beside the checkout (the demo, reports and benchmarks read them).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def anchors_dir() -> Path:
    d = Path(os.environ.get("ANCHORS_DIR", ROOT.parent / "shared" / "anchors"))
    if not d.is_dir():
        raise FileNotFoundError(f"published-figure CSVs not found in {d}; set ANCHORS_DIR to the folder holding them")
    return d


def read(name: str) -> list[dict[str, str]]:
    with open(anchors_dir() / name, newline="") as f:
        return list(csv.DictReader(f))


def medmnist_v2(dataset: str, method: str) -> dict[str, float]:
    """MedMNIST v2 benchmark test figures, e.g. ``medmnist_v2("bloodmnist", "ResNet-18 (28)")`` -> {acc, auc}."""
    rows = [r for r in read("medmnist_v2_benchmark.csv") if r["dataset"] == dataset and r["method"] == method]
    if not rows:
        raise KeyError(f"no MedMNIST v2 figure for {method} on {dataset}")
    return {r["metric"]: float(r["value"]) for r in rows}


def medmnist_plus(dataset: str) -> dict[str, float]:
    """MedMNIST+ ImageNet DINO ViT-B/16 at 28 px: ``{linear_acc, linear_auc, knn_acc}`` (test split)."""
    for r in read("medmnistplus_dino_vitb16_28px.csv"):
        if r["dataset"] == dataset:
            return {"linear_acc": float(r["linear_probe_acc"]), "linear_auc": float(r["linear_probe_auc"]),
                    "knn_acc": float(r["knn11_acc"])}
    raise KeyError(f"no MedMNIST+ figure for {dataset}")
