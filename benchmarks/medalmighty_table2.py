"""MedAlmighty's Table 2 on our data: students, teachers and distilled students over seeds, resumable.

Every cell of the table is one *run*: a zoo entry built with its recipe and a seed into a store of its
own (``<store>/seed<k>/<name>``). Each finished run writes one small JSON file into
``benchmarks/results/medalmighty/runs/`` (val/test ACC and AUC, the recipe, the teacher's figures,
the test predictions packed for paired statistics, the commit of the code); a run whose file exists
is never run again, so a stopped session loses at most the run in progress::

    python benchmarks/medalmighty_table2.py run --methods plain --datasets breastmnist --seeds 0 1 2
    python benchmarks/medalmighty_table2.py report        # results/medalmighty_table2.{json,md}

The methods are rows of :data:`METHODS`; each names a zoo entry and the override files it is built with.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Result files of the runs; another folder can be named (a second checkout writing into this one).
RUNS = Path(os.environ.get("MEDALMIGHTY_RUNS", RESULTS / "medalmighty" / "runs"))
LOCAL = ["breastmnist", "pneumoniamnist", "bloodmnist", "organamnist"]
CPU_RECIPE = "medalmighty/cpu-fast.yaml"


@dataclass(frozen=True)
class Method:
    """One row of the table: how its zoo entry is named and built."""

    key: str
    label: str
    name: str                       # zoo name, with {arch} and {flag}
    config_files: tuple[str, ...] = (CPU_RECIPE,)
    overrides: tuple[str, ...] = ()
    note: str = ""


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("plain", "ResNet-18 alone (paper recipe, no augmentation)", "baseline-{arch}-{flag}",
           note="the student trained on the labels alone: MedAlmighty's baseline (alpha = 1)"),
)}


def run_id(method: str, arch: str, flag: str, seed: int) -> str:
    return f"{method}-{arch}-{flag}-seed{seed}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pack_predictions(probs: np.ndarray, task: str) -> str:
    """Test predictions, compressed: class indices (single-label) or 0/1 per label (multi-label)."""
    t = get_task(task)
    if t.multilabel:
        arr = np.packbits(t.positives(probs).astype(np.uint8), axis=1)
    else:
        arr = t.decide(probs).astype(np.uint8)
    return base64.b64encode(zlib.compress(arr.tobytes(), 9)).decode()


def unpack_predictions(s: str, n: int) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), dtype=np.uint8)[:n]


def run_one(method: Method, arch: str, flag: str, seed: int, store_root: Path, quiet: bool = True) -> Path:
    """Build one cell into ``<store_root>/seed<k>`` and write its result file; returns the file."""
    from zoo.api import build, evaluate, load

    out = RUNS / f"{run_id(method.key, arch, flag, seed)}.json"
    if out.is_file():
        return out
    os.environ["ZOO_HOME"] = str(store_root / f"seed{seed}")
    name = method.name.format(arch=arch, flag=flag)
    t0 = time.perf_counter()
    d = build(name, [*method.overrides, f"seed={seed}"], progress=not quiet, config_files=list(method.config_files))
    metrics = json.loads((d / "metrics.json").read_text())
    config = json.loads((d / "config.json").read_text())
    test = evaluate(load(d), "test")
    row = {
        "run": out.stem, "method": method.key, "arch": arch, "dataset": flag, "seed": seed, "entry": name,
        "config_files": list(method.config_files), "overrides": list(method.overrides),
        "val": metrics["val"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
        "epochs": metrics["epochs"], "train_time_s": metrics["train_time_s"],
        "wall_time_s": round(time.perf_counter() - t0, 1), "teacher": metrics.get("teacher"),
        "lineage": config.get("lineage"), "task": config["entry"]["task"], "n_test": int(test["n"]),
        "test_pred": pack_predictions(test["probs"], config["entry"]["task"]),
        "commit": _commit(), "torch_threads": _threads(), "machine": platform.machine(),
    }
    from zoo.store import write_json_atomic

    write_json_atomic(out, row)
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cmd_run(a) -> None:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    store_root = Path(a.store).expanduser().resolve()
    for flag in a.datasets:
        for key in a.methods:
            for seed in a.seeds:
                rid = run_id(key, a.arch, flag, seed)
                if (RUNS / f"{rid}.json").is_file():
                    print(f"{rid}: done before", flush=True)
                    continue
                t0 = time.perf_counter()
                p = run_one(METHODS[key], a.arch, flag, seed, store_root, quiet=not a.progress)
                r = json.loads(p.read_text())
                print(f"{rid}: test acc {r['test']['acc']:.4f} auc {r['test']['auc']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing cells (resumable)")
    r.add_argument("--methods", nargs="+", default=["plain"], choices=sorted(METHODS))
    r.add_argument("--datasets", nargs="+", default=LOCAL)
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--arch", default="resnet18")
    r.add_argument("--store", default=os.environ.get("BENCH_STORE", "~/.cache/medzoo-bench"),
                   help="where the runs' zoo entries are built (one store per seed)")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    r.add_argument("--progress", action="store_true")
    r.set_defaults(fn=cmd_run)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
