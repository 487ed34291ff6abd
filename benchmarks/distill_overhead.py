"""What distillation costs per epoch: MedAlmighty student epoch time / plain student epoch time.

The teacher is frozen and the data are not augmented, so its logits are computed once per split
and cached (training/medalmighty/teacher.py); a distillation epoch then costs a plain epoch plus a KL term.
Both runs use the same recipe, seed and data; they alternate (plain, distil, plain, distil) so
load from other processes hits both alike, and the median epoch time of each is compared.

    python -m benchmarks.distill_overhead --teacher /path/to/hf_backbone_dir
    python -m benchmarks.distill_overhead            # a random tiny Dinov2 teacher (timing only)

Writes ``benchmarks/results/distill_overhead.json``. Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from training.entries import train_config
from zoo import store

ROOT = Path(__file__).resolve().parents[1]


def tiny_teacher(path: Path) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=28, patch_size=7)
    Dinov2Model(cfg).save_pretrained(path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="hub id or local transformers backbone directory")
    ap.add_argument("--dataset", default="breastmnist")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each kind")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_overhead.json"))
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        teacher = a.teacher or tiny_teacher(Path(tmp) / "tiny-dinov2")
        common = [f"data.dataset={a.dataset}", f"model.arch={a.arch}", f"train.epochs={a.epochs}",
                  f"teacher.backbone={teacher}", f"output_dir={tmp}/runs", "train.progress=false", *a.overrides]
        # Warm the teacher caches (features + probe + logits) outside the timed epochs.
        t0 = time.perf_counter()
        train_config("medalmighty/default.yaml", [*common, "method=medalmighty", "train.epochs=1"], progress=False)
        cache_s = time.perf_counter() - t0
        epochs: dict[str, list[float]] = {"baseline": [], "medalmighty": []}
        for _ in range(a.repeats):
            for method in ("baseline", "medalmighty"):
                d = train_config("medalmighty/default.yaml", [*common, f"method={method}"], progress=False)
                hist = json.loads((d / "metrics.json").read_text())["history"]
                epochs[method] += [h["epoch_train_s"] for h in hist]
                print(f"{method:12s} epochs (s): {[round(h['epoch_train_s'], 2) for h in hist]}", flush=True)

    plain, distil = statistics.median(epochs["baseline"]), statistics.median(epochs["medalmighty"])
    ratio = distil / plain
    result = {"dataset": a.dataset, "arch": a.arch, "teacher": a.teacher or "random tiny Dinov2 (timing only)",
              "epochs_per_run": a.epochs, "repeats": a.repeats, "median_plain_epoch_s": round(plain, 4),
              "median_distill_epoch_s": round(distil, 4), "ratio": round(ratio, 4), "target": 1.15,
              "first_run_with_teacher_cache_fill_s": round(cache_s, 2), "epoch_times_s": epochs,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    store.write_json_atomic(Path(a.out), result)
    print(f"distillation epoch / plain epoch = {ratio:.3f} (median {distil:.2f} s vs {plain:.2f} s; target <= 1.15)")


if __name__ == "__main__":
    main()
