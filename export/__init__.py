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

import importlib
from typing import Any

from export.errors import ExportArgumentError, ExportError
from export.formats import FORMATS, SERVABLE, Format, get_format, servable_for_precision

# The package's interface; the modules behind it import torch and onnxruntime, so they load on first
# use (the command-line parsers read the formats table without them).
_LAZY = {"DEFAULT_OPSET": "export.onnx_export", "ExportResult": "export.onnx_export",
         "ParityError": "export.onnx_export", "to_onnx": "export.onnx_export", "merge_adapters": "export.graph",
         "TensorRTUnavailableError": "export.tensorrt", "tensorrt_status": "export.tensorrt",
         "to_tensorrt": "export.tensorrt"}

__all__ = ["DEFAULT_OPSET", "FORMATS", "SERVABLE", "ExportArgumentError", "ExportError", "ExportResult", "Format",
           "ParityError", "TensorRTUnavailableError", "export", "get_format", "merge_adapters",
           "servable_for_precision", "tensorrt_status", "to_onnx", "to_tensorrt"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")


def export(model_or_name, format: str = "onnx", out=None, **kw):
    """``to_onnx`` for the ONNX formats, ``to_tensorrt`` for ``tensorrt`` (see :data:`FORMATS`)."""
    if get_format(format).runtime == "tensorrt":
        return __getattr__("to_tensorrt")(model_or_name, out=out, **kw)
    return __getattr__("to_onnx")(model_or_name, format, out=out, **kw)
