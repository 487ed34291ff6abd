"""Baseline ResNet-18 at 28 px on the local MedMNIST sets, next to MedMNIST v2's ResNet-18 (28).

Builds ``baseline-resnet18-<flag>`` with a CPU schedule (``--config``, default
``medalmighty/cpu-fast.yaml``), logging test figures every epoch (reporting only; the checkpoint is
still chosen on validation AUC) so the report can give time-to-accuracy: the training time after
which test ACC first came within 1 pt of the published figure.

    python -m benchmarks.baseline_resnet18_28                       # the four local sets
    python -m benchmarks.baseline_resnet18_28 --datasets breastmnist train.epochs=5

Writes ``benchmarks/results/baseline_resnet18_28.{json,md}``; rows of datasets not re-run are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from benchmarks.report import baseline_table
from zoo import store
from zoo.anchors import medmnist_v2
from zoo.api import build

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["breastmnist", "pneumoniamnist", "bloodmnist", "organamnist"]
REF = "ResNet-18 (28)"


def time_to_within(history: list[dict], ref_acc: float, pts: float = 1.0) -> tuple[float | None, int | None]:
    for h in history:
        if "test_acc" in h and h["test_acc"] >= ref_acc - pts / 100:
            return h["elapsed_s"], h["epoch"]
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=LOCAL, metavar="FLAG")
    ap.add_argument("--config", default="medalmighty/cpu-fast.yaml")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "baseline_resnet18_28"))
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every build")
    a = ap.parse_args()
    # `--datasets a b key=value` : argparse hands the overrides to --datasets; they are overrides.
    a.overrides = [x for x in a.datasets if "=" in x] + a.overrides
    a.datasets = [x for x in a.datasets if "=" not in x]

    rows = []
    for flag in a.datasets:
        name = f"baseline-resnet18-{flag}"
        d = build(name, ["train.log_test_every_epoch=true", *a.overrides], progress=False, config_files=[a.config])
        m = json.loads((d / "metrics.json").read_text())
        ref = medmnist_v2(flag, REF)
        tta, tta_epoch = time_to_within(m["history"], ref["acc"])
        row = {"dataset": flag, "config": a.config, "overrides": a.overrides,
               "test_acc": m["test"]["acc"], "test_auc": m["test"]["auc"], "ref_acc": ref["acc"], "ref_auc": ref["auc"],
               "delta_acc_pt": round(100 * (m["test"]["acc"] - ref["acc"]), 2),
               "delta_auc_pt": round(100 * (m["test"]["auc"] - ref["auc"]), 2),
               "best_epoch": m["best_epoch"], "epochs": m["epochs"], "train_time_s": m["train_time_s"],
               "wall_time_s": m["wall_time_s"], "time_to_within_1pt_s": tta, "epoch_within_1pt": tta_epoch,
               "history": [{k: h[k] for k in ("epoch", "elapsed_s", "val_acc", "val_auc", "test_acc", "test_auc")}
                           for h in m["history"]]}
        rows.append(row)
        print(f"{flag:15s} test acc {row['test_acc']:.4f} (ref {ref['acc']:.3f}, {row['delta_acc_pt']:+.2f} pt)  "
              f"auc {row['test_auc']:.4f} (ref {ref['auc']:.3f})  train {row['train_time_s']:.0f} s  "
              f"within 1 pt after {tta if tta is not None else 'never'} s", flush=True)

    env = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(),
           "zoo_home": str(store.zoo_home()), "medmnist_root": os.environ.get("MEDMNIST_ROOT", "")}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows of datasets not re-run this time are kept, so one dataset can be redone alone.
    prev = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"rows": []}
    old = prev["rows"]
    for r in old:  # files from before rows carried their recipe kept it in `env`
        r.setdefault("config", prev.get("env", {}).get("config"))
        r.setdefault("overrides", prev.get("env", {}).get("overrides", []))
    done = {r["dataset"] for r in rows}
    order = {f: i for i, f in enumerate(LOCAL)}
    rows = sorted([r for r in old if r["dataset"] not in done] + rows, key=lambda r: order.get(r["dataset"], 99))
    store.write_json_atomic(out.with_suffix(".json"), {"reference": f"MedMNIST v2 {REF}", "env": env, "rows": rows})
    out.with_suffix(".md").write_text("\n".join([f"# Baseline ResNet-18 at 28 px vs MedMNIST v2 {REF}", "",
                                                  *baseline_table(out.with_suffix(".json"))]) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
