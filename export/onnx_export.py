"""ONNX export of zoo models (FP32, FP16, INT8), checked against torch and measured on the test split.

Every export runs the same steps:

1. Export ``ZooModel.net`` (adapters merged, optional localization output, see :mod:`export.graph`)
   with torch's ``torch.export``-based exporter (``exporter="dynamo"``, the default: opset 18 and
   up) or its TorchScript exporter (``exporter="legacy"``, ``dynamo=False``: opsets 13-20). Either
   way one self-contained file, weights embedded (ONNX Runtime's quantisation pre-processing needs
   that). Dynamic batch axis; channels and input size fixed from the zoo entry; the graph takes
   normalised input as ``ZooModel.net`` does. The dynamo exporter falls back to the legacy one,
   and the receipt's ``exporter`` says so and why, when it cannot do the export: an opset below
   18, an exporter error, or an INT8 quantisation that fails on its graph.
2. Optimise offline with ONNX Runtime at the *basic* level (constant folding, Conv+BN fusion, ...):
   only standard ONNX ops, so the file stays portable (TensorRT, other runtimes). Hardware-specific
   fusions are applied by ONNX Runtime when a session loads the file.
3. Parity: the FP32 file runs in onnxruntime on the real test split of the entry's dataset and is
   compared with ``predict_logits(model.net, ...)``: max abs logit difference <= ``atol`` (1e-4) and
   the same predicted labels on every image, or the export fails with :class:`ParityError`.
4. ``onnx-fp16``: FP16 weights and compute, FP32 input/output. ``onnx-int8``: static QDQ
   quantisation calibrated on training images for CNNs (dynamic MatMul quantisation for ViTs, where
   static activation ranges do not suit attention); with a CAM output only Conv/MatMul are
   quantised. Either must keep test ACC within ``max_acc_drop`` points of torch (never less than
   one test image), or the export fails.
5. ``uint8_input``: the graph of :class:`export.graph.Uint8Preprocess` (uint8 images (N, H, W, C)
   of any size -> the normalised input; always the dynamo exporter, opset 18+, which writes the
   antialiased Resize) is put in front of the file of step 1-4, which stays as checked. That bundle
   is checked on the test split as uint8 images (``parity``, the same gate as FP32: labels and
   ``atol``), and on test images enlarged to a size that is not a multiple of the input size
   (``parity_resized``: ONNX Runtime's antialiased Resize is not torch's to the bit, so there the
   gate is the labels and ``resize_atol``).
6. The receipt ``export.json`` (parity, test ACC/AUC through onnxruntime next to torch's, exporter,
   file hash, versions), ``preprocess.json`` (the input contract) and the torch-free ``runner.py``
   are written with the model into the output folder, atomically (a failed export leaves the
   previous one in place).

>>> from export import to_onnx
>>> r = to_onnx("baseline-resnet18-breastmnist", "onnx-int8")        # doctest: +SKIP
>>> r.receipt["accuracy"]                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import zoo.store as store
from export.errors import ExportArgumentError, ExportError
from export.formats import FORMATS, ONNX_FORMATS, get_format
from export.graph import ExportGraph, Uint8Preprocess, fixed_position_embeddings, merge_adapters
from zoo.data import Split, preprocess
from zoo.inference import logits_to_probs, make_prediction, predict_logits
from zoo.loading import ZooModel, load, model_split
from zoo.metrics import compute_metrics
from zoo.registry import ZooEntry
from zoo.tasks import get_task

DEFAULT_OPSET = 18  # the lowest the dynamo exporter writes (its torchlib's opset)
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (INT8) needs opset 13
MAX_OPSET = 20  # the highest opset torch's TorchScript exporter (dynamo=False) writes
DYNAMO_MIN_OPSET = 18
UINT8_MIN_OPSET = 18  # Resize's antialias attribute
EXPORTERS = ("dynamo", "legacy")
DEFAULT_EXPORTER = "dynamo"
FP32_ATOL = 1e-4
# uint8 bundles on enlarged images: ONNX Runtime's antialiased Resize weights differ from torch's in
# the last bits (~2e-5 of a [0, 1] pixel), which the network may amplify; labels must still agree.
RESIZE_ATOL = 1e-3
RESIZED_IMAGES = 64
MAX_ACC_DROP_PT = 0.5
CALIB_IMAGES = 256
INPUT = "input"
RUN_BATCH = 128
RUNNER = Path(__file__).with_name("runner.py")


class ParityError(ExportError):
    """The exported model does not reproduce torch (logits, labels or accuracy) within tolerance."""


@dataclasses.dataclass
class ExportResult:
    """What an export produced: the artifact's folder and file, and its receipt (``export.json``)."""

    format: str
    dir: Path
    path: Path
    receipt: dict[str, Any]


# ----------------------------------------------------------------------------------------- checks


def check_format(fmt: str, allowed: tuple[str, ...] | None = None) -> str:
    return get_format(fmt, allowed).name


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportArgumentError(f"cannot export opset {opset}: the exporter writes ONNX opsets "
                                  f"{MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET}); pass --opset in that range")
    return opset


def check_exporter(exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise ExportArgumentError(f"unknown exporter {exporter!r}; choose {' or '.join(EXPORTERS)} (dynamo: "
                                  "torch.export, the default; legacy: the TorchScript exporter)")
    return exporter


# ----------------------------------------------------------------------------------------- the job


@dataclasses.dataclass
class Job:
    """One export: the model, the traced graph, where its data and its output folder are."""

    model: ZooModel
    graph: ExportGraph
    out: Path
    opset: int
    exporter: str = DEFAULT_EXPORTER  # the one asked for; the receipt says which ran
    uint8_input: bool = False

    @property
    def entry(self) -> ZooEntry:
        return self.model.entry

    def split(self, name: str, root=None) -> Split:
        """A split of the entry's dataset, read with the entry's own data settings (as ``zoo.evaluate``)."""
        return model_split(self.model, name, root)


def prepare(model_or_name, fmt: str, out=None, opset: int = DEFAULT_OPSET, with_localization: bool = False,
            exporter: str = DEFAULT_EXPORTER, uint8_input: bool = False) -> Job:
    """Check the arguments, load the model (a zoo name, a built folder, or a ``ZooModel``) and pick ``out``."""
    check_format(fmt)
    check_opset(opset)
    check_exporter(exporter)
    if uint8_input and opset < UINT8_MIN_OPSET:
        raise ExportArgumentError(f"uint8 input needs opset {UINT8_MIN_OPSET} or later (the antialiased Resize "
                                  f"that matches the zoo's resize); got --opset {opset}")
    if isinstance(model_or_name, ZooModel):
        model, home = model_or_name, None
        if store.is_built(model.entry.name):
            home = store.entry_dir(model.entry.name)
    elif isinstance(model_or_name, torch.nn.Module):
        raise ExportError("export takes a zoo name, a built entry folder or a ZooModel (zoo.load): the entry "
                          "supplies input size, channels, normalisation and labels")
    else:
        model = load(model_or_name)
        p = Path(str(model_or_name)).expanduser()
        home = p if (p / "config.json").is_file() else store.entry_dir(model.entry.name)
    if out is None:
        if home is None:
            raise ExportError(f"{model.entry.name} is not a built store entry; pass out=DIR (--out) for its export")
        out = home / "export" / default_out_name(fmt, uint8_input)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportArgumentError(f"--out {out} is a file; an export is a folder (model, receipt, runner): give a "
                                  "new or empty folder, or an earlier export's folder to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").is_file():
        raise ExportError(f"{out} exists and holds files that are not an export; exporting replaces the whole "
                          "folder, so give an empty or new folder")
    net = merge_adapters(model.net).eval()
    graph = ExportGraph(net, model.entry.input_size, with_localization).eval()
    return Job(model=model, graph=graph, out=out, opset=opset, exporter=exporter, uint8_input=uint8_input)


# ----------------------------------------------------------------------------------------- torch side


@dataclasses.dataclass
class Reference:
    """Torch's outputs on the evaluation images, and the images' labels."""

    images: torch.Tensor  # uint8 (N, C, H, W), as stored
    labels: np.ndarray
    outputs: dict[str, np.ndarray]
    split: str


@torch.no_grad()
def reference(job: Job, split: str = "test", max_images: int | None = None, root=None) -> Reference:
    """Torch logits (``predict_logits`` on ``ZooModel.net``) and maps on the real split of the entry's dataset."""
    if max_images is not None and max_images < 1:
        raise ExportArgumentError(f"max_images must be at least 1, got {max_images}")
    data = job.split(split, root)
    images, labels = data.images, data.labels.numpy()
    if max_images is not None and max_images < len(images):
        idx = torch.linspace(0, len(images) - 1, max_images).round().long()  # spread over the split
        images, labels = images[idx], labels[idx.numpy()]
    return Reference(images=images, labels=labels, outputs=torch_outputs(job, images), split=split)


@torch.no_grad()
def torch_outputs(job: Job, images: torch.Tensor) -> dict[str, np.ndarray]:
    """``predict_logits`` (and the localization map) for uint8 (N, C, H, W) images of any size."""
    prep = job.entry.preprocess
    outputs = {"logits": predict_logits(job.graph.net, images, prep).numpy()}
    if job.graph.map_name:
        device = next(job.graph.parameters()).device
        maps = [job.graph(preprocess(images[i : i + RUN_BATCH], prep).to(device))[1].float().cpu()
                for i in range(0, len(images), RUN_BATCH)]
        outputs[job.graph.map_name] = torch.cat(maps).numpy()
    return outputs


def enlarged_size(s: int) -> tuple[int, int]:
    """(H, W) that the test images are enlarged to for ``parity_resized``: not square, no multiple of ``s``."""
    return s * 5 // 2 + 1, s * 8 // 5 + 1


def enlarged_reference(job: Job, ref: Reference, n: int = RESIZED_IMAGES) -> Reference:
    """The first ``n`` reference images enlarged (pixel replication, so still uint8) to :func:`enlarged_size`
    of the input size, with torch's outputs on them: what the model sees then goes through a real resize."""
    images = ref.images[:n]
    h, w = enlarged_size(job.entry.input_size)
    rows = (torch.arange(h) * images.shape[2]) // h
    cols = (torch.arange(w) * images.shape[3]) // w
    big = images[:, :, rows][:, :, :, cols].contiguous()
    return Reference(images=big, labels=ref.labels[:n], outputs=torch_outputs(job, big), split=ref.split)


def model_input(images: torch.Tensor, job: Job, raw: bool = False) -> np.ndarray:
    """What a graph takes for uint8 (N, C, H, W) images: normalised (N, C, S, S) float32, or with ``raw``
    the images themselves, channels last (the input of ``uint8_input`` bundles)."""
    if raw:
        return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
    return preprocess(images, job.entry.preprocess).numpy()


# ----------------------------------------------------------------------------------------- ONNX files


def _first_line(ex: BaseException) -> str:
    return next((ln.strip() for ln in str(ex).splitlines() if ln.strip()), type(ex).__name__)[:300]


def _dynamo_export(module: torch.nn.Module, args: tuple, path: Path, input_dims: dict[int, Any],
                   output_names: list[str], opset: int) -> None:
    """``torch.onnx.export(..., dynamo=True)``: ``torch.export`` with the dims of ``input_dims`` dynamic,
    weights embedded in the one file (``external_data=False``)."""
    import logging

    dims = {axis: (torch.export.Dim(name, min=1, max=3) if name == "channels" else torch.export.Dim(name, min=1))
            for axis, name in input_dims.items()}
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=[INPUT], output_names=output_names,
                          dynamic_shapes=(dims,), opset_version=opset, external_data=False, verbose=False,
                          optimize=True)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def file_opset(path: Path) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def export_fp32(job: Job, path: Path, exporter: str | None = None) -> Path:
    """Export ``job.graph`` into a self-contained ONNX file (weights embedded) with ``exporter``
    (``dynamo``: ``torch.export``; ``legacy``: the TorchScript tracer)."""
    exporter = exporter or job.exporter
    e = job.entry
    device = next(job.graph.parameters()).device
    dummy = torch.randn(2, e.in_chans, e.input_size, e.input_size, device=device)
    names = job.graph.output_names
    with warnings.catch_warnings(), fixed_position_embeddings(job.graph, e.input_size):
        warnings.simplefilter("ignore")  # tracer warnings about Python ints in transformers' code
        try:
            if exporter == "dynamo":
                _dynamo_export(job.graph, (dummy,), path, {0: "batch"}, names, job.opset)
            else:
                axes = {n: {0: "batch"} for n in [INPUT, *names]}
                torch.onnx.export(job.graph, (dummy,), str(path), dynamo=False, input_names=[INPUT],
                                  output_names=names, dynamic_axes=axes, opset_version=job.opset,
                                  do_constant_folding=True)
        except Exception as ex:  # the exporter's own errors (unsupported op at this opset, ...)
            raise ExportError(f"torch.onnx.export ({exporter}) failed for {e.name} at opset {job.opset}: "
                              f"{_first_line(ex)}") from ex
    got = file_opset(path)
    if got != job.opset:  # the dynamo exporter keeps its own opset when it cannot convert to the one asked for
        raise ExportError(f"torch.onnx.export ({exporter}) wrote opset {got} for {e.name}, not the {job.opset} "
                          f"asked for; pass --opset {got}")
    return path


def export_uint8_preprocess(job: Job, path: Path) -> Path:
    """The graph of :class:`export.graph.Uint8Preprocess` for the entry: uint8 (N, H, W, C) -> ``pixels``."""
    e = job.entry
    p = e.preprocess
    pre = Uint8Preprocess(p.input_size, p.in_chans, p.mean, p.std, p.resize).eval()
    dummy = torch.randint(0, 256, (2, p.input_size + 3, p.input_size + 5, p.in_chans), dtype=torch.uint8)
    dims = {0: "batch", 1: "height", 2: "width", **({3: "channels"} if p.in_chans == 3 else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _dynamo_export(pre, (dummy,), path, dims, ["pixels"], job.opset)
        except Exception as ex:
            raise ExportError(f"exporting the uint8 preprocessing of {e.name} at opset {job.opset} failed: "
                              f"{_first_line(ex)}") from ex
    return path


def with_uint8_input(pre: Path, model: Path, dst: Path) -> Path:
    """``pre`` (uint8 images -> ``pixels``) in front of ``model`` (``input`` -> outputs), as one file.

    The model's graph is left as it was checked (FP32, FP16 or INT8); the preprocessing stays FP32.
    """
    import onnx
    from onnx import compose

    p, m = onnx.load(str(pre)), onnx.load(str(model))
    p.ir_version = m.ir_version = max(p.ir_version, m.ir_version)
    have = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    for o in p.opset_import:
        if have.get(o.domain or "ai.onnx", o.version) != o.version:
            raise ExportError(f"the preprocessing graph has opset {o.version} for {o.domain or 'ai.onnx'}, the "
                              f"model {have[o.domain or 'ai.onnx']}")
    p = compose.add_prefix(p, "pre/")
    merged = compose.merge_models(p, m, io_map=[("pre/pixels", INPUT)], producer_name=m.producer_name,
                                  producer_version=m.producer_version)
    g = merged.graph
    (inp,) = g.input
    old = inp.name
    inp.name = INPUT
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = INPUT
    onnx.save(merged, str(dst))
    return dst


def session(path: Path, optimized_to: Path | None = None, level: str = "all"):
    """An onnxruntime CPU session (threads as torch's); ``optimized_to`` saves the optimised graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def optimize(src: Path, dst: Path) -> Path:
    """ONNX Runtime's basic, hardware-independent graph optimisations, saved as a standard ONNX file."""
    session(src, optimized_to=dst, level="basic")
    return dst


def to_fp16(src: Path, dst: Path) -> Path:
    """FP16 weights and arithmetic; inputs and outputs stay FP32 (the same runner and preprocessing)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values clamped to fp16 range" for tiny weights
        m = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _toposort(m.graph)  # the converter appends the input Casts last; the ONNX spec wants producers first
    onnx.save(m, str(dst))
    return dst


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs (stable)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"the FP16 graph has a cycle or a missing input at node {rest[0].name!r}")
        pending = rest
    nodes = [type(n)() for n in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


def calibration_images(job: Job, n: int, root=None) -> torch.Tensor:
    """``n`` training images, a fixed random sample (seed 0), for INT8 activation ranges."""
    train = job.split("train", root).images
    g = torch.Generator().manual_seed(0)
    return train[torch.randperm(len(train), generator=g)[: min(n, len(train))]]


def int8_mode(job: Job, mode: str = "auto") -> str:
    if mode not in ("auto", "static", "dynamic"):
        raise ExportArgumentError(f"INT8 mode must be auto, static or dynamic, got {mode!r}")
    if mode == "auto":
        return "static" if job.entry.is_student else "dynamic"
    return mode


def quantize_int8(src: Path, dst: Path, job: Job, calib: torch.Tensor | None, mode: str,
                  for_tensorrt: bool = False) -> dict[str, Any]:
    """INT8 QDQ (static, calibrated) or MatMul-dynamic quantisation of the FP32 file ``src``.

    ``for_tensorrt``: symmetric signed INT8 activations and weights (TensorRT takes only those
    Q/DQ nodes) on Conv/MatMul/Gemm inputs. Returns the settings, for the receipt.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name("pre_" + dst.name)
    quant_pre_process(str(src), str(pre))
    if mode == "dynamic":
        if for_tensorrt:
            raise ExportError("TensorRT cannot run dynamically quantised graphs; INT8 engines use static Q/DQ")
        quantize_dynamic(str(pre), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
        return {"mode": "dynamic", "op_types": ["MatMul"], "weights": "int8 per-tensor"}
    if calib is None or not len(calib):
        raise ExportError("static INT8 quantisation needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(model_input(calib[i : i + 32], job) for i in range(0, len(calib), 32))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {INPUT: x}

    if job.graph.map_name == "cam":
        # The fc weight feeds both the classifier (Gemm) and the CAM (Einsum): quantising the Gemm
        # would rewrite a shared initializer, so only convolutions and matmuls are quantised.
        ops = ["Conv", "MatMul"]
    elif for_tensorrt:
        ops = ["Conv", "MatMul", "Gemm"]
    else:
        ops = None  # every op ONNX Runtime quantises: Q/DQ pairs fold into integer kernels end to end
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if for_tensorrt else {}
    act = QuantType.QInt8 if for_tensorrt else QuantType.QUInt8
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=act, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    return {"mode": "static", "format": "QDQ", "calibration": {"split": "train", "images": len(calib), "seed": 0,
                                                                "method": "minmax"},
            "activations": "int8 symmetric" if for_tensorrt else "uint8 asymmetric", "weights": "int8 per-channel",
            "op_types": ops or "all supported"}


def check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as ex:
        raise ExportError(f"{path.name} fails onnx.checker: {str(ex).splitlines()[0]}") from ex


# ----------------------------------------------------------------------------------------- measuring


def run_batches(run: Callable[[np.ndarray], list[np.ndarray]], ref: Reference, job: Job,
                batch: int = RUN_BATCH, raw: bool = False) -> dict[str, np.ndarray]:
    """Outputs of an exported model (``run``: input -> outputs) on the reference images, in batches;
    ``raw``: the model takes the uint8 images themselves (``uint8_input`` bundles)."""
    names = job.graph.output_names
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(ref.images), batch):
        for n, o in zip(names, run(model_input(ref.images[i : i + batch], job, raw))):
            parts[n].append(np.asarray(o, dtype=np.float32))
    return {n: np.concatenate(v) for n, v in parts.items()}


def onnx_runner(path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
    sess = session(path)
    return lambda x: sess.run(None, {INPUT: x})


def _metrics(logits: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float | None]:
    """Test ACC/AUC with medmnist's semantics; AUC is None when a subset lacks a class (``max_images``)."""
    probs = logits_to_probs(torch.from_numpy(logits), task).numpy()
    try:
        return compute_metrics(labels, probs, task)
    except ValueError as ex:
        if "only one class" not in str(ex):
            raise
    y = labels.reshape(len(labels), -1)
    t = get_task(task)
    if t.sigmoid:
        acc = float(((probs[:, -y.shape[1]:] > t.threshold) == (y == 1)).mean())
    else:
        acc = float((probs.argmax(1) == y[:, 0]).mean())
    return {"acc": acc, "auc": None}


def _decisions(logits: np.ndarray, job: Job) -> list[tuple]:
    e = job.entry
    pred = make_prediction(logits_to_probs(torch.from_numpy(logits), e.task), e.task, e.labels)
    return [tuple(s) for s in pred.label_sets]


def compare(outputs: dict[str, np.ndarray], ref: Reference, job: Job) -> dict[str, Any]:
    """Max abs differences per output and the share of images with the same predicted label(s)."""
    got, want = outputs["logits"], ref.outputs["logits"]
    same = [a == b for a, b in zip(_decisions(got, job), _decisions(want, job))]
    r = {"n": len(same), "max_abs_logit_diff": float(np.abs(got - want).max()),
         "label_agreement": float(np.mean(same)), "labels_differ": int(len(same) - sum(same))}
    if job.graph.map_name:
        n = job.graph.map_name
        r[f"max_abs_{n}_diff"] = float(np.abs(outputs[n] - ref.outputs[n]).max())
    return r


def measure(run, ref: Reference, job: Job, raw: bool = False) -> tuple[dict[str, Any], dict[str, float]]:
    out = run_batches(run, ref, job, raw=raw)
    return compare(out, ref, job), _metrics(out["logits"], ref.labels, job.entry.task)


def check_fp32(parity: dict[str, Any], atol: float, what: str) -> None:
    if parity["max_abs_logit_diff"] > atol or parity["labels_differ"]:
        raise ParityError(
            f"{what} does not reproduce torch on {parity['n']} test images: max |logit diff| "
            f"{parity['max_abs_logit_diff']:.3g} (allowed {atol:g}), {parity['labels_differ']} label(s) differ")


def check_resized(parity: dict[str, Any], atol: float, what: str) -> None:
    if parity["max_abs_logit_diff"] > atol or parity["labels_differ"]:
        h, w = parity["size"]
        raise ParityError(
            f"{what} does not reproduce torch on {parity['n']} test images enlarged to {h} x {w} (resized in the "
            f"graph): max |logit diff| {parity['max_abs_logit_diff']:.3g} (allowed {atol:g}), "
            f"{parity['labels_differ']} label(s) differ")


def check_accuracy(acc: dict[str, Any], n: int, max_drop_pt: float, what: str) -> None:
    allowed = max(max_drop_pt, 100.0 / n)  # one test image is the finest step the figure can move
    if acc["acc_drop_pt"] > allowed + 1e-9:
        raise ParityError(
            f"{what} loses {acc['acc_drop_pt']:.2f} pt test ACC against torch ({acc['torch']['acc']:.4f} -> "
            f"{acc['exported']['acc']:.4f}; allowed {allowed:.2f} pt); export FP32 or raise the tolerance")


def accuracy(torch_m: dict[str, float], got: dict[str, float], runtime: str, fp32: dict | None = None) -> dict:
    a = {"torch": torch_m, "exported": got, "runtime": runtime,
         "acc_drop_pt": round((torch_m["acc"] - got["acc"]) * 100, 6),
         "auc_drop_pt": None if torch_m["auc"] is None else round((torch_m["auc"] - got["auc"]) * 100, 6)}
    if fp32 is not None:
        a["onnx_fp32"] = fp32
    return a


# ----------------------------------------------------------------------------------------- bundle


def preprocess_spec(job: Job, fmt: str, model_file: str) -> dict[str, Any]:
    """What a runner needs to turn an image into the graph's input and its outputs into labels."""
    e = job.entry
    spec = {
        "name": e.name, "format": fmt, "model_file": model_file, "input_name": INPUT, "input_dtype": "float32",
        "input_layout": "NCHW", "input_shape": ["batch", e.in_chans, e.input_size, e.input_size],
        "preprocessing": "runner", "input_size": e.input_size,
        "in_chans": e.in_chans, "image_mode": "L" if e.in_chans == 1 else "RGB", "scale": 255.0,
        "mean": list(e.preprocess.mean), "std": list(e.preprocess.std), "resize": e.resize,
        "task": e.task, "labels": list(e.labels), "outputs": job.graph.output_names,
    }
    if job.uint8_input:  # the graph does what the runner does otherwise (scale, grey -> RGB, resize, mean/std)
        spec.update(input_dtype="uint8", input_layout="NHWC",
                    input_shape=["batch", "height", "width", "channels" if e.in_chans == 3 else 1],
                    input_channels=[1, 3] if e.in_chans == 3 else [1], preprocessing="in-graph")
    return spec


def receipt(job: Job, fmt: str, path: Path, ref: Reference, parity: dict, acc: dict, **extra) -> dict[str, Any]:
    import onnx
    import onnxruntime

    rec = {
        "format": fmt, "model": job.entry.name, "file": path.name, "sha256": store.sha256_file(path),
        "bytes": path.stat().st_size, "opset": job.opset, "input": preprocess_spec(job, fmt, path.name)["input_shape"],
        "input_dtype": "uint8" if job.uint8_input else "float32",
        "outputs": job.graph.output_names, "dataset": job.entry.dataset, "split": ref.split, "parity": parity,
        "accuracy": acc, **extra, "entry": job.entry.to_dict(),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return json.loads(json.dumps(rec))  # plain JSON types: the dict equals what export.json holds


def write_bundle(job: Job, fmt: str, files: dict[str, Path], rec: dict, spec: dict) -> Path:
    """Move the artifacts into ``job.out`` with ``export.json``, ``preprocess.json`` and ``runner.py``."""
    with store.staged_dir(job.out) as tmp:
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
            os.chmod(tmp / name, 0o644)
        shutil.copyfile(RUNNER, tmp / "runner.py")
        os.chmod(tmp / "runner.py", 0o644)
        store.write_json_atomic(tmp / "preprocess.json", spec)
        store.write_json_atomic(tmp / "export.json", rec)
    return job.out


# ----------------------------------------------------------------------------------------- to_onnx


def _checked_fp32(job: Job, work: Path, ref: Reference, atol: float, exporter: str):
    """Export with ``exporter``, optimise, check: the raw file, the FP32 file and its parity and metrics."""
    raw = export_fp32(job, work / f"raw-{exporter}.onnx", exporter)
    fp32 = optimize(raw, work / f"fp32-{exporter}.onnx")
    check_model(fp32)
    parity, metrics = measure(onnx_runner(fp32), ref, job)
    check_fp32(parity, atol, f"the FP32 ONNX export of {job.entry.name} ({exporter} exporter)")
    return raw, fp32, parity, metrics


def build_onnx(job: Job, fmt: str, work: Path, ref: Reference, atol: float = FP32_ATOL,
               calib_images: int = CALIB_IMAGES, int8: str = "auto", root=None,
               for_tensorrt: bool = False) -> tuple[Path, dict[str, Any]]:
    """The ONNX file of ``fmt`` in ``work``, after the FP32 parity gate; returns it and the FP32 figures.

    ``info["exporter"]`` records the exporter asked for, the one used and why they differ (a fallback
    from dynamo to legacy: an opset below 18, a failed dynamo export, or INT8 quantisation failing
    on the dynamo graph). A parity failure is never a reason to fall back: it is raised.
    """
    used, why = job.exporter, None
    if used == "dynamo" and job.opset < DYNAMO_MIN_OPSET:
        used, why = "legacy", (f"opset {job.opset} asked for; the dynamo exporter writes opset {DYNAMO_MIN_OPSET} "
                               "and later")
    try:
        raw, fp32, parity, metrics = _checked_fp32(job, work, ref, atol, used)
    except ParityError:
        raise
    except ExportError as ex:
        if used != "dynamo":
            raise
        used, why = "legacy", str(ex)
        raw, fp32, parity, metrics = _checked_fp32(job, work, ref, atol, used)
    info: dict[str, Any] = {"parity": parity, "metrics": metrics}
    precision = FORMATS[fmt].precision
    if precision == "fp32":
        path = fp32
    elif precision == "fp16":
        path = to_fp16(fp32, work / "fp16.onnx")
    else:
        mode = int8_mode(job, int8)
        calib = calibration_images(job, calib_images, root) if mode == "static" else None
        path = work / "int8.onnx"
        try:
            info["quantization"] = quantize_int8(raw, path, job, calib, mode, for_tensorrt)
        except ExportError:
            raise
        except Exception as ex:  # ONNX Runtime's shape inference or quantiser on this graph
            if used != "dynamo":
                raise ExportError(f"INT8 quantisation of {job.entry.name} failed: {type(ex).__name__}: "
                                  f"{_first_line(ex)}") from ex
            used, why = "legacy", (f"INT8 quantisation failed on the dynamo graph ({type(ex).__name__}: "
                                   f"{_first_line(ex)})")
            raw, fp32, parity, metrics = _checked_fp32(job, work, ref, atol, used)
            info.update(parity=parity, metrics=metrics)
            info["quantization"] = quantize_int8(raw, path, job, calib, mode, for_tensorrt)
    info["exporter"] = {"requested": job.exporter, "used": used, "fallback": why}
    return path, info


def default_out_name(fmt: str, uint8_input: bool = False) -> str:
    """The bundle's folder under ``<entry>/export/``: the format, ``-uint8`` for uint8-input bundles (so the
    float bundle that ``zoo serve`` reads stays where it is)."""
    return f"{fmt}-uint8" if uint8_input else fmt


def to_onnx(model_or_name, format: str = "onnx", out=None, opset: int = DEFAULT_OPSET,
            with_localization: bool = False, *, exporter: str = DEFAULT_EXPORTER, uint8_input: bool = False,
            split: str = "test", max_images: int | None = None, root=None, atol: float = FP32_ATOL,
            resize_atol: float = RESIZE_ATOL, max_acc_drop: float = MAX_ACC_DROP_PT,
            calib_images: int = CALIB_IMAGES, int8: str = "auto") -> ExportResult:
    """Export a zoo model to ONNX with a parity check and an accuracy receipt.

    Args:
        model_or_name: a zoo name (built), the folder of a built entry or run, or a ``ZooModel``.
        format: ``onnx`` (FP32), ``onnx-fp16`` or ``onnx-int8``.
        out: output folder; default ``<ZOO_HOME>/<name>/export/<format>/`` (or ``<folder>/export/<format>``;
            ``<format>-uint8`` with ``uint8_input``). It is replaced as a whole, atomically.
        opset: ONNX opset, 13-20 (the dynamo exporter writes 18 and later; below 18 the legacy one runs).
        with_localization: add ``cam`` (CNN) or ``attention`` (ViT) as a second output.
        exporter: ``dynamo`` (``torch.onnx.export(..., dynamo=True)``, default) or ``legacy``
            (TorchScript, ``dynamo=False``); the receipt's ``exporter`` says which ran and why.
        uint8_input: the graph takes uint8 images (N, H, W, C) of any size and does the resize, grey ->
            RGB and mean/std itself (:class:`export.graph.Uint8Preprocess`); opset 18 or later.
        split, max_images, root: the evaluation images (default: the whole test split).
        atol: FP32 gate on max abs logit difference. ``resize_atol``: the same on enlarged images
            (uint8 bundles). ``max_acc_drop``: FP16/INT8 gate, ACC points.
        calib_images: training images for static INT8 calibration. ``int8``: auto, static or dynamic.

    Returns:
        An :class:`ExportResult`; ``receipt`` is what ``export.json`` holds.

    Raises:
        ExportError: bad format/opset/model; ParityError: the export does not reproduce torch.
    """
    check_format(format, ONNX_FORMATS)
    job = prepare(model_or_name, format, out, opset, with_localization, exporter, uint8_input)
    ref = reference(job, split, max_images, root)
    torch_metrics = _metrics(ref.outputs["logits"], ref.labels, job.entry.task)
    name = job.entry.name
    with tempfile.TemporaryDirectory(prefix="zoo-export-") as work:
        path, fp32 = build_onnx(job, format, Path(work), ref, atol, calib_images, int8, root)
        if uint8_input:
            pre = export_uint8_preprocess(job, Path(work) / "uint8-preprocess.onnx")
            path = with_uint8_input(pre, path, Path(work) / "bundle.onnx")
        check_model(path)
        extra: dict[str, Any] = {"exporter": fp32["exporter"], "uint8_input": uint8_input}
        gate: dict[str, float] = {"fp32_atol": atol}
        if format == "onnx" and not uint8_input:
            parity, acc = fp32["parity"], accuracy(torch_metrics, fp32["metrics"], "onnxruntime")
        else:
            parity, got = measure(onnx_runner(path), ref, job, raw=uint8_input)
            extra["parity_fp32"] = fp32["parity"]
            if format == "onnx":
                check_fp32(parity, atol, f"the uint8-input ONNX export of {name}")
                acc = accuracy(torch_metrics, got, "onnxruntime")
            else:
                acc = accuracy(torch_metrics, got, "onnxruntime", fp32=fp32["metrics"])
                gate["max_acc_drop_pt"] = max_acc_drop
        if uint8_input:
            big = enlarged_reference(job, ref)
            extra["parity_resized"] = {**compare(run_batches(onnx_runner(path), big, job, raw=True), big, job),
                                       "size": list(big.images.shape[2:])}
            gate["resize_atol"] = resize_atol
            if format == "onnx":
                check_resized(extra["parity_resized"], resize_atol, f"the uint8-input ONNX export of {name}")
        if "quantization" in fp32:
            extra["quantization"] = fp32["quantization"]
        rec = receipt(job, format, path, ref, parity, acc, gates=gate, optimization="onnxruntime basic (offline)",
                      **extra)
        rec["file"] = "model.onnx"
        if format != "onnx":
            check_accuracy(acc, len(ref.images), max_acc_drop, f"the {format} export of {name}")
        out_dir = write_bundle(job, format, {"model.onnx": path}, rec, preprocess_spec(job, format, "model.onnx"))
    return ExportResult(format=format, dir=out_dir, path=out_dir / "model.onnx", receipt=rec)
