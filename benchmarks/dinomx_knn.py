"""How good are DINO-MX features? kNN (k=11, cosine) and linear-probe ACC/AUC from frozen CLS features,
for a pretrained zoo backbone and the same architecture at random init, next to MedMNIST+'s
ImageNet DINO ViT-B/16 at 28 px.

    python -m benchmarks.dinomx_knn                                   # dinomx-vit-mini-p4-bloodmnist
    python -m benchmarks.dinomx_knn --entry dinomx-vit-mini-p4-breastmnist --build

The entry must be built (``zoo build NAME --config dinomx/cpu.yaml``; ``--build`` does it). Both
backbones are evaluated by the same code (:func:`training.dinomx.evaluate.evaluate_backbone`), on
the entry's own preprocessing. Target: pretrained kNN ACC >= random init + 10 pt.
Writes ``benchmarks/results/dinomx_knn.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from training.dinomx.config import parse
from training.dinomx.evaluate import evaluate_backbone
from zoo import anchors, store
from zoo.api import load_backbone, read_config
from zoo.backbones import ViTBackbone, create_model
from zoo.registry import get_entry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_PT = 10.0


def medmnist_plus(dataset: str) -> dict[str, float] | None:
    try:
        return anchors.medmnist_plus(dataset)
    except KeyError:
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", default="dinomx-vit-mini-p4-bloodmnist")
    ap.add_argument("--build", action="store_true", help="build the entry first (dinomx/cpu.yaml) if it is not built")
    ap.add_argument("--datasets", nargs="*", help="evaluation datasets (default: the entry's)")
    ap.add_argument("--out", default=str(RESULTS / "dinomx_knn"), help="results path without extension")
    a = ap.parse_args(argv)

    entry = get_entry(a.entry)
    if not store.is_built(entry.name):
        if not a.build:
            sys.exit(f"{entry.name} is not built in {store.zoo_home()}; run `zoo build {entry.name} --config "
                     "dinomx/cpu.yaml` or pass --build")
        from zoo.api import build

        build(entry.name, config_files=["dinomx/cpu.yaml"])
    d = store.entry_dir(entry.name)
    info = read_config(d)
    cfg = info["config"]
    metrics = json.loads((d / "metrics.json").read_text())
    flags = a.datasets or [entry.dataset]

    pretrained, prep = load_backbone(entry.name, pooling="cls")
    torch.manual_seed(int(cfg["seed"]))  # the initialisation the pretraining run started from
    model = create_model(entry.arch, prep.in_chans, image_size=prep.input_size)
    random_init = ViTBackbone(model.eval(), pooling="cls")

    rows = []
    for name, bb in (("DINO-MX pretrained", pretrained), ("random init", random_init)):
        t0 = time.perf_counter()
        ev = evaluate_backbone(bb, parse(cfg), prep, datasets=flags)
        for flag in flags:
            k, lin = ev["knn"][flag], ev["linear"].get(flag, {})
            rows.append({"dataset": flag, "model": name, "knn_val_acc": k["val"]["acc"],
                         "knn_test_acc": k["test"]["acc"], "knn_test_auc": k["test"]["auc"],
                         "linear_test_acc": lin.get("test", {}).get("acc"),
                         "linear_test_auc": lin.get("test", {}).get("auc"),
                         "eval_s": round(time.perf_counter() - t0, 1)})
    summary = []
    for flag in flags:
        pre = next(r for r in rows if r["dataset"] == flag and r["model"] == "DINO-MX pretrained")
        rnd = next(r for r in rows if r["dataset"] == flag and r["model"] == "random init")
        gain = 100 * (pre["knn_test_acc"] - rnd["knn_test_acc"])
        summary.append({"dataset": flag, "knn_gain_pt": round(gain, 2), "target_pt": TARGET_PT,
                        "meets_target": gain >= TARGET_PT, "medmnist_plus_vitb16_dino": medmnist_plus(flag)})
    rep = metrics.get("report", {})
    result = {
        "entry": entry.name, "arch": entry.arch, "pretrain": {
            "datasets": info["lineage"]["datasets"], "steps": rep.get("steps"),
            "train_seconds": rep.get("train_seconds"), "images_per_s": rep.get("images_per_s"),
            "device": rep.get("device"), "preset": cfg["method"], "batch_size": cfg["optim"]["batch_size"],
            "backbone_params": rep.get("parameters", {}).get("backbone_total")},
        "eval": {"k": int(cfg["eval"]["knn_k"]), "temperature": float(cfg["eval"]["knn_temperature"]),
                 "features": "CLS, frozen", "linear_epochs": int(cfg["eval"]["linear_epochs"])},
        "rows": rows, "summary": summary,
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads(), "nproc": os.cpu_count()},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store.write_json_atomic(out.with_suffix(".json"), result)
    md = render(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return result


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def render(r: dict) -> str:
    p = r["pretrain"]
    lines = [f"DINO-MX `{r['arch']}` ({p['backbone_params']:,} parameters), {p['preset']} preset, pretrained on "
             f"{', '.join(p['datasets'])} for {p['steps']} steps (batch {p['batch_size']}, {p['train_seconds']:.0f} s "
             f"at {p['images_per_s']} images/s on {p['device']}). Frozen CLS features; kNN k={r['eval']['k']} "
             f"(cosine, weighted); linear probe {r['eval']['linear_epochs']} epochs. Test split.", "",
             "| dataset | backbone | kNN ACC | kNN AUC | linear ACC | linear AUC |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['dataset']} | {x['model']} | {_f(x['knn_test_acc'])} | {_f(x['knn_test_auc'])} | "
                     f"{_f(x['linear_test_acc'])} | {_f(x['linear_test_auc'])} |")
    for s in r["summary"]:
        ref = s["medmnist_plus_vitb16_dino"]
        if ref:
            lines.append(f"| {s['dataset']} | MedMNIST+ ImageNet DINO ViT-B/16 (28 px, published) | "
                         f"{_f(ref['knn_acc'])} | — | {_f(ref['linear_acc'])} | {_f(ref['linear_auc'])} |")
    lines.append("")
    for s in r["summary"]:
        lines.append(f"{s['dataset']}: pretraining adds **{s['knn_gain_pt']:+.1f} pt** kNN ACC over random init "
                     f"(target ≥ +{s['target_pt']:.0f} pt: {'met' if s['meets_target'] else 'NOT met'}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
