"""MedAlmighty Table 3 on our models: parameters and FLOPs per model, file size per export format.

Rows are the models of Table 2: the deployable students (ResNet-18 at 28 px with the small-input stem,
ResNet-50 / SE-ResNet-50 / SK-ResNet-50 at 28 px, the paper's ResNet-50 at 224 px, the ensemble of
three ResNet-18 used as a teacher) and the teachers (DINO-MX ViT-mini/4 + linear at 28 px, the
DINOv2 ViT-S/B/L/14 + linear layouts at 224 px).

- Parameters: counted on the module (``zoo.backbones.count_parameters``).
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one image at the model's input size; it
  counts a multiply-add as 2 FLOPs (so GFLOPs here are about twice the "GMACs" some papers quote).
- File sizes: the zoo's own weights file (safetensors, FP32) and each ONNX export format written by
  ``export.to_onnx`` (FP32, FP16, INT8 with its calibration), for the students. Sizes depend on the
  architecture, not the weights' values, so the rows use random-init weights; the exports still run
  their parity checks against torch on real images of the dataset (INT8 accuracy is not gated, the
  weights being random). Teachers are not exported (they are not deployed), so their size columns
  are empty.

Logits count: the rows use the entry of ``--dataset`` (default BreastMNIST, 2 classes); the head is
a negligible part of every figure.

    python -m benchmarks.medalmighty_table3 [--dataset breastmnist] [--no-export] [--models resnet18-28 ...]

Writes ``benchmarks/results/medalmighty_table3.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.host import host
from zoo import store
from zoo.api import ZooModel
from zoo.backbones import ViTBackbone, count_parameters, create_model
from zoo.models import EnsembleClassifier, LinearClassifier, create_student
from zoo.registry import get_entry

ROOT = Path(__file__).resolve().parents[1]
EXPORT_FORMATS = ("onnx", "onnx-fp16", "onnx-int8")


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: ``entry`` is the registry name pattern (``{ds}`` filled in), ``make`` builds the net."""

    label: str
    role: str  # student / teacher
    entry: str
    size: int
    make: Callable[[int, int], nn.Module]  # (num_outputs, in_chans) -> net
    export: bool


def _student(arch: str, small_stem: bool = True) -> Callable[[int, int], nn.Module]:
    return lambda k, c: create_student(arch, k, c, small_stem=small_stem)


def _ensemble(arch: str, size: int) -> Callable[[int, int], nn.Module]:
    return lambda k, c: EnsembleClassifier([create_student(arch, k, c) for _ in range(size)])


def _vit_linear(config: str, size: int) -> Callable[[int, int], nn.Module]:
    return lambda k, c: LinearClassifier(ViTBackbone(create_model(config, in_chans=c, image_size=size),
                                                     pooling="cls"), k)


CASES: dict[str, Case] = {c.label: c for c in (
    Case("resnet18-28", "student", "baseline-resnet18-{ds}", 28, _student("resnet18"), True),
    Case("resnet50-28", "student", "baseline-resnet50-{ds}", 28, _student("resnet50"), True),
    Case("seresnet50-28", "student", "baseline-seresnet50-{ds}", 28, _student("seresnet50"), True),
    Case("skresnet50-28", "student", "baseline-skresnet50-{ds}", 28, _student("skresnet50"), True),
    Case("resnet50-224", "student", "baseline-resnet50-{ds}", 224, _student("resnet50", small_stem=False), True),
    Case("ensemble-3x-resnet18-28", "teacher", "ensemble-resnet18-{ds}", 28, _ensemble("resnet18", 3), True),
    Case("dinomx-vit-mini-p4-linear-28", "teacher", "linear-dinov2-vits14-{ds}", 28,
         _vit_linear("vit-mini-p4", 28), False),
    Case("dinov2-vits14-linear-224", "teacher", "linear-dinov2-vits14-{ds}", 224,
         _vit_linear("vit-small-p14", 224), False),
    Case("dinov2-vitb14-linear-224", "teacher", "linear-dinov2-vitb14-{ds}", 224,
         _vit_linear("vit-base-p14", 224), False),
    Case("dinov2-vitl14-linear-224", "teacher", "linear-dinov2-vitl14-{ds}", 224,
         _vit_linear("vit-large-p14", 224), False),
)}


def flops(net: nn.Module, in_chans: int, size: int) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2)."""
    x = torch.randn(1, in_chans, size, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(x)
    return int(counter.get_total_flops())


def measure(case: Case, dataset: str, work: Path, do_export: bool, max_images: int, calib: int) -> dict:
    entry = dataclasses.replace(get_entry(case.entry.format(ds=dataset)), input_size=case.size)
    torch.manual_seed(0)
    net = case.make(entry.num_outputs, entry.in_chans).eval()
    params = count_parameters(net)["total"]
    row: dict = {"model": case.label, "role": case.role, "entry": entry.name, "input_size": case.size,
                 "in_chans": entry.in_chans, "num_outputs": entry.num_outputs, "params": params,
                 "params_m": round(params / 1e6, 3), "gflops": round(flops(net, entry.in_chans, case.size) / 1e9, 4),
                 "sizes_mb": {}}
    weights = work / f"{case.label}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    row["sizes_mb"]["safetensors"] = round(weights.stat().st_size / 2**20, 3)
    if do_export and case.export:
        model = ZooModel(net, entry, {"config": {"data": {"size": 28, "download": False}}}).eval()
        for fmt in EXPORT_FORMATS:
            t0 = time.perf_counter()
            r = store_export(model, fmt, work / case.label / fmt, max_images, calib)
            row["sizes_mb"][fmt] = round(r.path.stat().st_size / 2**20, 3)
            row.setdefault("parity", {})[fmt] = {"max_abs_logit_diff": r.receipt["parity"]["max_abs_logit_diff"],
                                                 "label_agreement": r.receipt["parity"]["label_agreement"]}
            row.setdefault("export_s", {})[fmt] = round(time.perf_counter() - t0, 1)
    return row


def store_export(model: ZooModel, fmt: str, out: Path, max_images: int, calib: int):
    from export import to_onnx  # onnx/onnxruntime load only when exporting

    # Random weights: the FP16/INT8 accuracy gate means nothing here; the FP32 parity gate still holds.
    return to_onnx(model, fmt, out=out, max_images=max_images, calib_images=calib, max_acc_drop=100.0)


def markdown(res: dict) -> str:
    cols = ["safetensors", *EXPORT_FORMATS]
    lines = [f"Parameters, FLOPs (one image, multiply-add = 2) and file sizes (MB); {res['dataset']} head "
             f"({res['rows'][0]['num_outputs']} outputs). Command: `{res['command']}`.", "",
             "| model | role | input | params (M) | GFLOPs | " + " | ".join(f"{c} MB" for c in cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(cols)]
    for r in res["rows"]:
        sizes = " | ".join(f"{r['sizes_mb'][c]:.2f}" if c in r["sizes_mb"] else "—" for c in cols)
        lines.append(f"| {r['model']} | {r['role']} | {r['in_chans']}x{r['input_size']}x{r['input_size']} | "
                     f"{r['params_m']:.2f} | {r['gflops']:.3f} | {sizes} |")
    lines += ["", "Teachers are not exported (not deployed). ONNX sizes include the graph; INT8 is QDQ with "
              "FP32 input/output."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="breastmnist", help="whose entry (labels, channels) the rows use")
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-export", action="store_true", help="parameters and FLOPs only")
    ap.add_argument("--max-images", type=int, default=64, help="parity images per export")
    ap.add_argument("--calib", type=int, default=64, help="INT8 calibration images per export")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "medalmighty_table3"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    command = "python -m benchmarks.medalmighty_table3" + (f" --dataset {a.dataset}" if a.dataset != "breastmnist"
                                                           else "") + (" --no-export" if a.no_export else "")
    res = {"dataset": a.dataset, "command": command, "rows": [],
           "host": host()}
    with tempfile.TemporaryDirectory(prefix="table3-") as work:
        for label in a.models:
            r = measure(CASES[label], a.dataset, Path(work), not a.no_export, a.max_images, a.calib)
            res["rows"].append(r)
            print(f"{label}: {r['params_m']:.2f} M params, {r['gflops']:.3f} GFLOPs, sizes MB {r['sizes_mb']}",
                  flush=True)
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), res)
    md = markdown(res)
    store.write_atomic(out.with_suffix(".md"), lambda p: p.write_text(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
