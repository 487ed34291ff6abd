"""Export for edge devices: ONNX (FP32, FP16, INT8) with parity and accuracy receipts, TensorRT engines,
and a torch-free runner.

::

    zoo export baseline-resnet18-breastmnist --format onnx-int8 [--out DIR] [--opset 17] [--with-localization]
    zoo export linear-dinov2-vits14-breastmnist --format tensorrt --precision fp16

>>> import export
>>> r = export.to_onnx("baseline-resnet18-breastmnist", "onnx-int8")   # doctest: +SKIP
>>> r.receipt["accuracy"]["exported"], r.receipt["accuracy"]["torch"]  # doctest: +SKIP

Each export writes one folder (default ``<ZOO_HOME>/<name>/export/<format>/``; rebuilding the entry
removes it with the old weights), atomically:

- ``model.onnx``: input ``input`` (batch, C, S, S), normalised float32 as ``ZooModel.net`` takes it;
  output ``logits`` (batch, K), plus ``cam`` or ``attention`` with ``with_localization``.
- ``export.json``: the receipt: parity with torch on the test split (max abs logit difference,
  label agreement), test ACC/AUC through onnxruntime next to torch's, quantisation settings,
  sha256, versions.
- ``preprocess.json``: input size, channels, mean/std, resize mode, label names, task.
- ``runner.py``: classifies image files with numpy, Pillow and onnxruntime only.
- ``model.engine`` (``tensorrt`` only): the TensorRT engine; ``model.onnx`` is then its source.

Modules: :mod:`export.graph` (what is traced: adapters merged, localization outputs),
:mod:`export.onnx_export` (export, optimisation, FP16/INT8, parity, receipts),
:mod:`export.tensorrt` (engines), :mod:`export.runner` (the edge runner, self-contained).
"""

from __future__ import annotations

from export.graph import ExportError, merge_adapters
from export.onnx_export import DEFAULT_OPSET, FORMATS, ExportResult, ParityError, to_onnx
from export.tensorrt import TensorRTUnavailableError, tensorrt_status, to_tensorrt

__all__ = ["DEFAULT_OPSET", "FORMATS", "ExportError", "ExportResult", "ParityError", "TensorRTUnavailableError",
           "export", "merge_adapters", "tensorrt_status", "to_onnx", "to_tensorrt"]


def export(model_or_name, format: str = "onnx", out=None, **kw) -> ExportResult:
    """``to_onnx`` for ``onnx``/``onnx-fp16``/``onnx-int8``, ``to_tensorrt`` for ``tensorrt``."""
    from export.onnx_export import check_format

    check_format(format)
    if format == "tensorrt":
        return to_tensorrt(model_or_name, out=out, **kw)
    return to_onnx(model_or_name, format, out=out, **kw)
