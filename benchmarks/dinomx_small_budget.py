"""Is a small DINO-MX budget alive? The shipped presets against DINO's defaults, on datasets they were not tuned on.

Each run is ``zoo pretrain dinomx/<preset>.yaml data.datasets=[FLAG]`` (a random-init ViT-mini/4 at
28 px, no labels) and reads back what the run itself wrote to ``metrics.json``: the collapse
monitor's verdict (:mod:`training.dinomx.monitor`: the DINO loss against ln K, teacher and student
entropy, prototypes in use, feature cosines), the first warning step, and the kNN accuracy of the
frozen features next to the dataset's majority-class rate. Two settings per dataset:

- ``preset``: the shipped preset as it is (``dinomx/demo.yaml``: 64 prototypes of a 32-d bottleneck,
  a teacher at 0.02, crops that overlap more, DINO's lr rule; tuned on BreastMNIST, checked on
  PneumoniaMNIST, so the default datasets here are others);
- ``dino-defaults``: the same budget with DINO's head, teacher temperatures and crop scales
  (4096 prototypes of 128-d, teacher 0.04 -> 0.07, globals 40-100%, locals 10-40%), which is how the
  preset's runs used to end at ln K;
- ``bf16-stream`` (on request, ``--settings preset bf16-stream``): the preset in bf16 with
  ``optim.low_precision_stream=true``, the faster step of ``benchmarks/dinomx_vs_lightly.py``:
  whether it trains as the preset does.

    python -m benchmarks.dinomx_small_budget                                   # organamnist, demo preset
    python -m benchmarks.dinomx_small_budget --datasets bloodmnist --preset cpu

Runs live in ``--work`` (default ``runs/dinomx_small_budget``) and resume where a stopped one left
off; a finished run is read back, not retrained. Writes ``benchmarks/results/dinomx_small_budget.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.host import host
from zoo import store

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dinomx_small_budget"

# The head, teacher temperatures and crop scales of dinomx/default.yaml (DINO's and DINOv2's), on the preset's budget.
DINO_DEFAULTS = ["head.out_dim=4096", "head.bottleneck_dim=128", "dino.teacher_temp=0.07",
                 "dino.warmup_teacher_temp=0.04", "crops.global_scale=[0.4,1.0]", "crops.local_scale=[0.1,0.4]"]
# The preset with its blocks' residual stream in bf16 (training/dinomx/fused.py): does the faster step train alike?
BF16_STREAM = ["optim.amp=bf16", "optim.low_precision_stream=true"]
SETTINGS = {"preset": [], "dino-defaults": DINO_DEFAULTS, "bf16-stream": BF16_STREAM}


def majority_rate(flag: str) -> float:
    """The test split's majority-class share (the accuracy of always answering the commonest class)."""
    import numpy as np

    from zoo.data import load_split

    labels = load_split(flag, "test").labels.numpy()
    if labels.shape[1] > 1:  # multi-label: the mean over labels of the commoner value's share
        return float(np.maximum(labels.mean(0), 1 - labels.mean(0)).mean())
    _, counts = np.unique(labels[:, 0], return_counts=True)
    return float(counts.max() / counts.sum())


def run_one(preset: str, setting: str, flag: str, work: Path, extra: list[str]) -> dict[str, Any]:
    """One pretraining run (resumed or read back when it already ran) and its row."""
    from training.dinomx.recipe import pretrain_config

    name = f"{preset}-{setting}-{flag}"
    overrides = [f"data.datasets=[{flag}]", f"output_dir={work}", f"run_name={name}", "log.progress=false",
                 *SETTINGS[setting], *extra]
    metrics_file = work / name / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
    else:
        _, m = pretrain_config(f"dinomx/{preset}.yaml", overrides, progress=False)
    c = m["collapse"]
    knn = m.get("knn", {}).get(flag, {})
    return {
        "dataset": flag, "preset": f"dinomx/{preset}.yaml", "setting": setting, "overrides": overrides,
        "steps": m["report"]["steps"], "train_seconds": m["report"].get("train_seconds"),
        "ln_k": c["ln_k"], "dino_final": c["final"].get("dino"), "dino_below_ln_k": c.get("dino_below_ln_k"),
        "dino_below_ln_k_share": c.get("dino_below_ln_k_share"), "collapsed": c["collapsed"],
        "reasons": c["reasons"], "first_warning_step": c["first_warning_step"], "verdict": c["verdict"],
        "final": c["final"], "knn_test_acc": (knn.get("test") or {}).get("acc"),
        "knn_test_auc": (knn.get("test") or {}).get("auc"), "majority_rate": round(majority_rate(flag), 4),
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [f"DINO-MX from a random init on a small budget ({r['host']['cpu_count']} CPU cores, "
             f"{r['host']['torch_threads']} torch threads; other jobs shared the machine). The figures are the "
             "run's own collapse monitor, averaged over the last tenth of the run; kNN (k = 11, cosine) on the "
             "frozen CLS features of the test split.", "",
             "| dataset | setting | steps | DINO loss | ln K | below ln K | teacher entropy | prototypes in use "
             "| CLS cosine | verdict | warned at step | kNN test ACC | majority class |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any, fmt: str = ".3f") -> str:
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    for x in r["rows"]:
        fin = x["final"]
        below = (f"{x['dino_below_ln_k']:.2f} ({100 * x['dino_below_ln_k_share']:.0f}%)"
                 if x["dino_below_ln_k"] is not None else "–")
        lines.append(f"| {x['dataset']} | {x['setting']} (`{x['preset']}`) | {x['steps']} | {f(x['dino_final'])} | "
                     f"{x['ln_k']:.3f} | {below} | {f(fin.get('teacher_entropy'))} | "
                     f"{f(fin.get('eff_prototypes'), '.1f')} | {f(fin.get('cls_cos'))} | "
                     f"{'collapsed' if x['collapsed'] else 'alive'} | {x['first_warning_step'] or '–'} | "
                     f"{f(x['knn_test_acc'])} | {x['majority_rate']:.3f} |")
    lines += ["", "`dino-defaults`: the same budget with " + ", ".join(f"`{o}`" for o in DINO_DEFAULTS) + "."]
    if any(x["setting"] == "bf16-stream" for x in r["rows"]):
        lines += ["", "`bf16-stream`: the preset with " + ", ".join(f"`{o}`" for o in BF16_STREAM)
                  + " (the blocks' residual stream in bf16; `train_seconds` "
                  + ", ".join(f"{x['setting']} {x['train_seconds']:.0f} s" for x in r["rows"] if x["train_seconds"])
                  + ", on a shared machine)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["organamnist"], help="MedMNIST flags (not the tuning sets)")
    ap.add_argument("--preset", default="demo", help="dinomx/<preset>.yaml")
    ap.add_argument("--settings", nargs="+", default=["preset", "dino-defaults"], choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "runs" / "dinomx_small_budget"))
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.json and .md are written)")
    ap.add_argument("overrides", nargs="*", help="DINO-MX config key=value for every run")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    for flag in a.datasets:
        for setting in a.settings:
            row = run_one(a.preset, setting, flag, Path(a.work), a.overrides)
            rows.append(row)
            print(f"{flag} {setting}: {row['verdict']}; kNN test acc {row['knn_test_acc']} "
                  f"(majority {row['majority_rate']:.3f})", flush=True)
    r = {"rows": rows, "host": host("transformers")}
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), r)
    store.write_atomic(out.with_suffix(".md"), lambda p: p.write_text(markdown(r)))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return r


if __name__ == "__main__":
    main()
