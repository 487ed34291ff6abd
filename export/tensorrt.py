"""TensorRT engines built from the ONNX export, with the same parity check and accuracy receipt.

Optional: ``pip install 'medzoo[tensorrt]'`` on Linux with an NVIDIA GPU and driver. Without
TensorRT or a GPU, :func:`to_tensorrt` fails at once with :class:`TensorRTUnavailableError` (nothing
is exported); build the engine on the target from the ONNX bundle instead
(``trtexec --onnx=model.onnx --fp16 --minShapes=input:1x3x224x224 ...``).

Precision, by TensorRT version:

- TensorRT 11 builds strongly typed networks only: precision comes from the ONNX file. FP16 engines
  are built from the FP16 ONNX file (``onnx-fp16``), INT8 engines from an explicitly quantised file
  (Q/DQ nodes, symmetric signed INT8: the only Q/DQ TensorRT takes) calibrated on training images.
- TensorRT 10.x builds from the FP32 file with builder flags (``FP16``; ``INT8`` + ``FP16`` with the
  same Q/DQ file, so no TensorRT calibrator is needed). FP32 engines clear ``TF32`` so parity holds.

Every engine gets one optimisation profile over the dynamic batch axis (min 1, opt, max) with the
entry's fixed channels and input size. The engine runs on the test split through TensorRT's own
runtime (device buffers are torch CUDA tensors), and its receipt sits beside it in ``export.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.errors import ExportArgumentError, ExportError
from export.onnx_export import (
    CALIB_IMAGES,
    DEFAULT_EXPORTER,
    DEFAULT_OPSET,
    FP32_ATOL,
    INPUT,
    MAX_ACC_DROP_PT,
    ExportResult,
    _metrics,
    accuracy,
    build_onnx,
    check_accuracy,
    compare,
    prepare,
    preprocess_spec,
    receipt,
    reference,
    run_batches,
    write_bundle,
)

PRECISIONS = ("fp32", "fp16", "int8")
MIN_TENSORRT = 10


class TensorRTUnavailableError(ExportError):
    """TensorRT or a CUDA GPU is missing on this machine."""


def tensorrt_status() -> tuple[bool, str]:
    """Whether engines can be built here, and why not."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, ("TensorRT is not installed (pip install 'medzoo[tensorrt]' on Linux with an NVIDIA GPU; "
                       "its wheels need CUDA and cannot be installed everywhere)")
    if _major(trt) < MIN_TENSORRT:
        return False, f"TensorRT {trt.__version__} is too old; {MIN_TENSORRT}.x or newer is needed"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def onnx_format_for(precision: str, major: int) -> str:
    """Which ONNX export an engine of ``precision`` is built from, for TensorRT ``major``."""
    if precision == "int8":
        return "onnx-int8"  # explicit Q/DQ in both versions
    if precision == "fp16" and major >= 11:
        return "onnx-fp16"  # strongly typed: the file's types are the engine's types
    return "onnx"


def build_engine(onnx_path: Path, engine_path: Path, precision: str, chw: tuple[int, int, int],
                 batch: tuple[int, int, int] = (1, 8, 64), workspace_gib: int = 4) -> dict[str, Any]:
    """Parse ``onnx_path`` and serialise an engine to ``engine_path``; returns the build settings."""
    import tensorrt as trt

    major = _major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    flags_set = []
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
            flags_set.append("FP16")
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            flags_set.append("INT8")
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, *[(b, *chw) for b in batch])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} could not build a {precision} engine from {onnx_path.name}; "
                          "its log above says why")
    engine_path.write_bytes(bytes(serialized))
    return {"version": trt.__version__, "precision": precision, "strongly_typed": strongly_typed,
            "builder_flags": flags_set, "profile": {"input": name, "min_opt_max_batch": list(batch),
                                                    "shape": ["batch", *chw]},
            "workspace_gib": workspace_gib, "device": torch.cuda.get_device_name()}


class EngineRunner:
    """Run a serialised engine on numpy batches (I/O buffers are torch CUDA tensors)."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load {engine_path}; engines are tied to the TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtype = {n: torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in names}

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        stream = torch.cuda.current_stream()
        xt = torch.from_numpy(x).to("cuda", self._dtype[INPUT]).contiguous()
        self.context.set_input_shape(INPUT, tuple(xt.shape))
        self.context.set_tensor_address(INPUT, xt.data_ptr())
        outs = []
        for n in self.outputs:
            t = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype[n], device="cuda")
            self.context.set_tensor_address(n, t.data_ptr())
            outs.append(t)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [o.float().cpu().numpy() for o in outs]


def to_tensorrt(model_or_name, out=None, precision: str = "fp16", opset: int = DEFAULT_OPSET,
                with_localization: bool = False, *, exporter: str = DEFAULT_EXPORTER, split: str = "test",
                max_images: int | None = None, root=None,
                batch: tuple[int, int, int] = (1, 8, 64), workspace_gib: int = 4, atol: float = FP32_ATOL,
                max_acc_drop: float = MAX_ACC_DROP_PT, calib_images: int = CALIB_IMAGES) -> ExportResult:
    """Build a TensorRT engine of a zoo model: ``model.engine`` + its source ``model.onnx`` + receipt.

    The ONNX source passes the FP32 parity gate first (as :func:`export.to_onnx`); the engine must
    then keep test ACC within ``max_acc_drop`` points of torch. Default out:
    ``<ZOO_HOME>/<name>/export/tensorrt/``.
    """
    if precision not in PRECISIONS:
        raise ExportArgumentError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    ok, why = tensorrt_status()
    if not ok:
        raise TensorRTUnavailableError(f"cannot build a TensorRT engine here: {why}. Export ONNX instead "
                                       "(--format onnx, onnx-fp16 or onnx-int8) and build the engine on the target")
    import tensorrt as trt

    job = prepare(model_or_name, "tensorrt", out, opset, with_localization, exporter)
    ref = reference(job, split, max_images, root)
    torch_metrics = _metrics(ref.outputs["logits"], ref.labels, job.entry.task)
    e = job.entry
    src_fmt = onnx_format_for(precision, _major(trt))
    with tempfile.TemporaryDirectory(prefix="zoo-trt-") as work:
        src, fp32 = build_onnx(job, src_fmt, Path(work), ref, atol, calib_images, "static", root, for_tensorrt=True)
        engine = Path(work) / "model.engine"
        info = build_engine(src, engine, precision, (e.in_chans, e.input_size, e.input_size), batch, workspace_gib)
        out_ = run_batches(EngineRunner(engine), ref, job, batch=batch[2])
        parity = compare(out_, ref, job)
        acc = accuracy(torch_metrics, _metrics(out_["logits"], ref.labels, e.task), f"tensorrt {trt.__version__}",
                       fp32=fp32["metrics"])
        extra = {"quantization": fp32["quantization"]} if "quantization" in fp32 else {}
        rec = receipt(job, "tensorrt", engine, ref, parity, acc, gates={"fp32_atol": atol, "max_acc_drop_pt":
                                                                        max_acc_drop},
                      parity_fp32=fp32["parity"], tensorrt=info, onnx_source=src_fmt, exporter=fp32["exporter"],
                      **extra)
        rec["file"] = "model.engine"
        check_accuracy(acc, len(ref.images), max_acc_drop, f"the TensorRT {precision} engine of {e.name}")
        spec = {**preprocess_spec(job, "tensorrt", "model.onnx"), "engine_file": "model.engine"}
        out_dir = write_bundle(job, "tensorrt", {"model.engine": engine, "model.onnx": src}, rec, spec)
    return ExportResult(format="tensorrt", dir=out_dir, path=out_dir / "model.engine", receipt=rec)
