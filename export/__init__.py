"""Export for edge devices: ONNX (FP32, FP16, INT8) with parity and accuracy receipts, TensorRT engines,
and a torch-free runner.

::

    zoo export baseline-resnet18-breastmnist --format onnx-int8 [--out DIR] [--opset 18] [--with-localization]
        [--exporter dynamo|legacy] [--uint8-input]
    zoo export linear-dinov2-vits14-breastmnist --format tensorrt --precision fp16

>>> import export
>>> r = export.to_onnx("baseline-resnet18-breastmnist", "onnx-int8")   # doctest: +SKIP
>>> r.receipt["accuracy"]["exported"], r.receipt["accuracy"]["torch"]  # doctest: +SKIP

Each export writes one folder (default ``<ZOO_HOME>/<name>/export/<format>/``; rebuilding the entry
removes it with the old weights), atomically:

- ``model.onnx``: input ``input`` (batch, C, S, S), normalised float32 as ``ZooModel.net`` takes it;
  output ``logits`` (batch, K), plus ``cam`` or ``attention`` with ``with_localization``. With
  ``uint8_input`` (folder ``<format>-uint8``) the input is uint8 images (batch, height, width, C),
  channels last, any size, and the graph does the zoo's preprocessing (resize, grey -> RGB, mean/std).
  Exported by ``torch.onnx.export(..., dynamo=True)`` (``exporter="dynamo"``, opset 18+) or the
  TorchScript exporter (``exporter="legacy"``); the receipt's ``exporter`` says which ran and why.
- ``export.json``: the receipt: parity with torch on the test split (max abs logit difference,
  label agreement), test ACC/AUC through onnxruntime next to torch's, quantisation settings,
  sha256, versions.
- ``preprocess.json``: the input contract (dtype, layout, shape, whether the graph preprocesses), input
  size, channels, mean/std, resize mode, label names, task.
- ``runner.py``: classifies image files with numpy, Pillow and onnxruntime only.
- ``model.engine`` (``tensorrt`` only): the TensorRT engine; ``model.onnx`` is then its source.

Modules: :mod:`export.graph` (what is traced: adapters merged, localization outputs, uint8
preprocessing), :mod:`export.onnx_export` (export, optimisation, FP16/INT8, parity, receipts),
:mod:`export.tensorrt` (engines), :mod:`export.runner` (the edge runner, self-contained). The runner is
also the torch-free runtime of a bundle for the rest of the project: ``export.edge`` (numpy, Pillow
and onnxruntime only) is that module, for the HTTP service's ONNX backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from export.errors import ExportArgumentError, ExportError
from export.formats import FORMATS, SERVABLE, Format, get_format, servable_for_precision

# The package's interface; the modules behind it import torch and onnxruntime, so they load on first
# use (the command-line parsers read the formats table without them).
_LAZY = {"DEFAULT_OPSET": "export.onnx_export", "EXPORTERS": "export.onnx_export",
         "ExportResult": "export.onnx_export", "ParityError": "export.onnx_export", "to_onnx": "export.onnx_export",
         "merge_adapters": "export.graph", "TensorRTUnavailableError": "export.tensorrt",
         "tensorrt_status": "export.tensorrt", "to_tensorrt": "export.tensorrt"}
# ``export.edge``: the torch-free bundle runtime (export/runner.py, the file each bundle carries): image
# input, task rules and localization post-processing with numpy, Pillow and onnxruntime only.
_MODULES = {"edge": "export.runner"}

__all__ = ["DEFAULT_OPSET", "EXPORTERS", "FORMATS", "SERVABLE", "ExportArgumentError", "ExportError", "ExportResult",
           "Format", "ParityError", "TensorRTUnavailableError", "edge", "export", "get_format", "merge_adapters",
           "servable_for_precision", "tensorrt_status", "to_onnx", "to_tensorrt"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'export' has no attribute {name!r}")


def export(model_or_name, format: str = "onnx", out=None, **kw):
    """``to_onnx`` for the ONNX formats, ``to_tensorrt`` for ``tensorrt`` (see :data:`FORMATS`).

    Keywords go to the function: ``exporter="dynamo"|"legacy"`` to either, ``uint8_input=True`` (ONNX only).
    """
    if get_format(format).runtime == "tensorrt":
        if kw.pop("uint8_input", False):
            raise ExportArgumentError("--uint8-input applies to the ONNX formats; a TensorRT engine takes the "
                                      "normalised float input")
        return __getattr__("to_tensorrt")(model_or_name, out=out, **kw)
    return __getattr__("to_onnx")(model_or_name, format, out=out, **kw)
