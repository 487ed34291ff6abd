"""Batch-1 CPU latency of exported students next to torch eager, and INT8 test accuracy next to FP32.

Latency: each case is exported with ``export.to_onnx`` (FP32 and INT8, with their parity checks),
then torch eager (``ZooModel.net`` in eval mode under ``inference_mode``), onnxruntime FP32 and
onnxruntime INT8 run one image at a time, interleaved round by round on the same threads, so
background load hits all three alike. Latency does not depend on the weights, so the latency cases
use random-init students (INT8 calibration and the parity check still run on real images of the
case's dataset, resized as the entry says).

Accuracy: built zoo entries (``--accuracy NAME ...``, default: every built ``baseline-resnet18-*``)
are exported to INT8 and their receipts give test ACC/AUC through onnxruntime next to torch's and
the FP32 ONNX file's, on the whole test split.

    python -m benchmarks.export_latency                          # ResNet-50 @ 224 px, ResNet-18 @ 28 px
    python -m benchmarks.export_latency --threads 2 --runs 300 --accuracy baseline-resnet18-bloodmnist

Writes ``benchmarks/results/export_latency.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.host import host
from export import to_onnx
from export.onnx_export import session
from zoo import store
from zoo.api import ZooModel
from zoo.models import create_student
from zoo.registry import get_entry, list_models

ROOT = Path(__file__).resolve().parents[1]

# name -> (arch, registry entry giving dataset/labels, input size, small stem); targets from the issue.
CASES = {
    "resnet50-224": ("resnet50", "baseline-resnet50-bloodmnist", 224, False),
    "resnet18-28": ("resnet18", "baseline-resnet18-bloodmnist", 28, True),
}
TARGET = {"resnet50-224": 3.0, "resnet18-28": 2.0}


def student(case: str) -> ZooModel:
    arch, name, size, small_stem = CASES[case]
    e = dataclasses.replace(get_entry(name), input_size=size)
    torch.manual_seed(0)
    net = create_student(arch, e.num_outputs, e.in_chans, small_stem=small_stem)
    return ZooModel(net, e, {"config": {"data": {"size": 28, "download": False}}}).eval()


def time_all(fns: dict, runs: int, rounds: int = 10, warmup: int = 5) -> dict[str, float]:
    """Median ms per call of each function, measured in interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def latency(case: str, threads: int, runs: int, work: Path, max_images: int, calib: int) -> dict:
    model = student(case)
    e = model.entry
    t0 = time.perf_counter()
    kw = {"max_images": max_images, "calib_images": calib, "max_acc_drop": 100.0}  # random weights: no ACC gate
    fp32 = to_onnx(model, "onnx", out=work / case / "fp32", **kw)
    int8 = to_onnx(model, "onnx-int8", out=work / case / "int8", **kw)
    export_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    x = torch.randn(1, e.in_chans, e.input_size, e.input_size)
    feed = {"input": x.numpy()}
    s32, s8 = session(fp32.path), session(int8.path)
    net = model.net

    def eager():
        with torch.inference_mode():
            net(x)

    ms = time_all({"torch_eager": eager, "ort_fp32": lambda: s32.run(None, feed),
                   "ort_int8": lambda: s8.run(None, feed)}, runs)
    return {"case": case, "arch": CASES[case][0], "input": [1, e.in_chans, e.input_size, e.input_size],
            "threads": threads, "runs": runs, "ms": {k: round(v, 3) for k, v in ms.items()},
            "speedup_int8_vs_torch": round(ms["torch_eager"] / ms["ort_int8"], 2),
            "speedup_fp32_vs_torch": round(ms["torch_eager"] / ms["ort_fp32"], 2),
            "speedup_int8_vs_fp32": round(ms["ort_fp32"] / ms["ort_int8"], 2),
            "target_int8_vs_torch": TARGET[case],
            "parity_fp32_max_abs_logit_diff": fp32.receipt["parity"]["max_abs_logit_diff"],
            "int8_label_agreement_vs_torch": int8.receipt["parity"]["label_agreement"],
            "model_mb": {"fp32": round(fp32.path.stat().st_size / 2**20, 2),
                         "int8": round(int8.path.stat().st_size / 2**20, 2)},
            "export_s": round(export_s, 1)}


def accuracy(name: str, work: Path) -> dict:
    r = to_onnx(name, "onnx-int8", out=work / name, max_acc_drop=100.0)  # report, do not gate
    a = r.receipt["accuracy"]
    return {"model": name, "n": r.receipt["parity"]["n"], "torch": a["torch"], "onnx_fp32": a["onnx_fp32"],
            "onnx_int8": a["exported"], "acc_drop_pt_vs_torch": a["acc_drop_pt"],
            "acc_drop_pt_vs_fp32": round((a["onnx_fp32"]["acc"] - a["exported"]["acc"]) * 100, 4),
            "label_agreement": r.receipt["parity"]["label_agreement"], "quantization": r.receipt["quantization"]}


def markdown(res: dict) -> str:
    lines = ["| case | input | threads | torch eager ms | ORT FP32 ms | ORT INT8 ms | INT8 vs torch | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["latency"]:
        m = r["ms"]
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['input']))} | {r['threads']} | {m['torch_eager']:.2f} | "
                     f"{m['ort_fp32']:.2f} | {m['ort_int8']:.2f} | {r['speedup_int8_vs_torch']:.2f}x | "
                     f">= {r['target_int8_vs_torch']:.0f}x |")
    if res["accuracy"]:
        lines += ["", "| model | test n | torch ACC | ONNX FP32 ACC | ONNX INT8 ACC | INT8 - FP32 (pt) | INT8 AUC |",
                  "|---|---|---|---|---|---|---|"]
        for a in res["accuracy"]:
            lines.append(f"| {a['model']} | {a['n']} | {a['torch']['acc']:.4f} | {a['onnx_fp32']['acc']:.4f} | "
                         f"{a['onnx_int8']['acc']:.4f} | {0.0 - a['acc_drop_pt_vs_fp32'] + 0.0:+.2f} | "
                         f"{a['onnx_int8']['auc']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime alike")
    ap.add_argument("--runs", type=int, default=100, help="timed batch-1 calls per runtime")
    ap.add_argument("--max-images", type=int, default=128, help="parity images per latency case")
    ap.add_argument("--calib", type=int, default=128, help="INT8 calibration images per latency case")
    ap.add_argument("--accuracy", nargs="*", default=None, metavar="NAME",
                    help="built entries for the INT8 accuracy table (default: built baseline-resnet18-*)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_latency"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    names = a.accuracy if a.accuracy is not None else [n for n in list_models("baseline-resnet18-*")
                                                        if store.is_built(n)]
    res = {"latency": [], "accuracy": [], "host": host("onnxruntime")}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as work:
        for case in a.cases:
            r = latency(case, a.threads, a.runs, Path(work), a.max_images, a.calib)
            res["latency"].append(r)
            print(f"{case}: torch {r['ms']['torch_eager']:.2f} ms, ORT FP32 {r['ms']['ort_fp32']:.2f} ms, "
                  f"ORT INT8 {r['ms']['ort_int8']:.2f} ms -> INT8 {r['speedup_int8_vs_torch']:.2f}x faster than "
                  f"torch eager (target >= {r['target_int8_vs_torch']:.0f}x), FP32 {r['speedup_fp32_vs_torch']:.2f}x",
                  flush=True)
        for name in names:
            r = accuracy(name, Path(work))
            res["accuracy"].append(r)
            print(f"{name}: test ACC torch {r['torch']['acc']:.4f}, ONNX FP32 {r['onnx_fp32']['acc']:.4f}, INT8 "
                  f"{r['onnx_int8']['acc']:.4f} ({0.0 - r['acc_drop_pt_vs_fp32'] + 0.0:+.2f} pt vs FP32) "
                  f"on {r['n']} images",
                  flush=True)
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), res)
    out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
