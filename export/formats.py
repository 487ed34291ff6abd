"""The export formats, as one table: what ``zoo export --format``, ``export.export`` and ``zoo serve --format`` accept.

Adding a format is a row here (and, for a new kind of ONNX conversion, its converter in
:data:`export.onnx_export.CONVERTERS`) plus its test; the CLI's choices and help, the serving
options and the receipts read the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.errors import ExportArgumentError


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        name: the name on the command line and in ``<entry>/export/<name>/``.
        precision: ``fp32``, ``fp16`` or ``int8`` arithmetic in the artifact.
        runtime: what runs it: ``onnxruntime`` or ``tensorrt``.
        file: the artifact in the bundle folder.
        servable: ``zoo serve`` can run it (ONNX Runtime on CPU).
        summary: one line for ``--help``.
    """

    name: str
    precision: str
    runtime: str
    file: str
    servable: bool
    summary: str


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "fp32", "onnxruntime", "model.onnx", True, "FP32 ONNX, parity-checked against torch"),
    Format("onnx-fp16", "fp16", "onnxruntime", "model.onnx", True, "FP16 weights and arithmetic, FP32 input/output"),
    Format("onnx-int8", "int8", "onnxruntime", "model.onnx", True,
           "INT8 QDQ, calibrated on training images (dynamic for ViTs); several times faster on CPU"),
    Format("tensorrt", "fp16", "tensorrt", "model.engine", False, "a TensorRT engine (NVIDIA GPU, TensorRT installed)"),
)}
ONNX_FORMATS = tuple(n for n, f in FORMATS.items() if f.runtime == "onnxruntime")
SERVABLE = tuple(n for n, f in FORMATS.items() if f.servable)


def get_format(name: str, allowed: tuple[str, ...] | None = None) -> Format:
    """The :class:`Format` called ``name``; unknown (or not ``allowed``) names list the choices."""
    choices = allowed or tuple(FORMATS)
    if name not in choices:
        raise ExportArgumentError(f"unknown export format {name!r}; choose one of {', '.join(choices)}")
    return FORMATS[name]


def servable_for_precision(precision: str) -> str:
    """The servable format of a precision (``int8`` -> ``onnx-int8``): the old ``--precision`` vocabulary."""
    for name in SERVABLE:
        if FORMATS[name].precision == precision:
            return name
    raise ExportArgumentError(f"no servable export format has precision {precision!r}; choose --format from "
                              f"{', '.join(SERVABLE)}")
