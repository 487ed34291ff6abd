"""The start-up settings of the HTTP service.

``zoo serve`` passes them to the BentoML worker as bento arguments (``bentoml.use_arguments``), so
``bentoml serve serving.service:ZooService --arg models=NAME`` and a built bento (``args`` in
``bentofile.yaml``) read the same settings.
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from export.formats import FORMATS, SERVABLE, servable_for_precision

MIB = 1 << 20


class ServeConfig(BaseModel):
    """What to serve and how.

    Attributes:
        models: zoo names (or folders of built entries / runs) to serve, chosen at start-up.
        backend: ``onnx`` (ONNX Runtime on the exported ``model.onnx``) or ``torch`` (``zoo.load``).
        format: the export format served (:data:`export.FORMATS`, the ``zoo export --format``
            vocabulary): ``onnx`` (FP32), ``onnx-fp16`` or ``onnx-int8`` (static QDQ calibrated on
            training images); the torch backend serves FP32 only. ``precision`` (``fp32``/``fp16``/
            ``int8``) is the same choice in the old vocabulary, accepted with a deprecation note.
        max_batch_size: most images per adaptive batch (per model).
        max_latency_ms: the latency budget of the adaptive batcher; a request it predicts cannot be
            answered within it is refused with 503 (BentoML's ``max_latency_ms`` semantics).
        max_upload_bytes: largest request body; larger ones get 413 before they are read.
        max_pixels: largest image (width x height), checked from the header before decoding.
        max_pixels_in_flight: most decoded pixels held at once by the uploads being decoded (all
            requests together; default 4 x ``max_pixels``). An upload that finds no room waits up to
            ``max_latency_ms`` for it, then gets 503 with Retry-After: it bounds the worker's memory.
        threads: intra-op threads of each model's runtime; 0 = every CPU core.
        access_log: log one line per request (off by default: at hundreds of requests a second the
            log costs more CPU than a small model; Prometheus metrics count every request anyway).
    """

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1)
    backend: Literal["onnx", "torch"] = "onnx"
    format: str = "onnx"
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_latency_ms: int = Field(10_000, ge=1)
    max_upload_bytes: int = Field(10 * MIB, ge=1)
    max_pixels: int = Field(4096 * 4096, ge=1)
    max_pixels_in_flight: int | None = Field(None, ge=1)
    threads: int = Field(0, ge=0)
    access_log: bool = False

    @model_validator(mode="after")
    def _pixels_in_flight(self):
        if self.max_pixels_in_flight is None:
            self.max_pixels_in_flight = 4 * self.max_pixels
        return self

    @model_validator(mode="before")
    @classmethod
    def _old_precision(cls, data):
        if isinstance(data, dict) and "precision" in data:
            data = dict(data)
            precision = data.pop("precision")
            fmt = servable_for_precision(precision)
            if data.setdefault("format", fmt) != fmt:
                raise ValueError(f"format {data['format']} and precision {precision} disagree; give format only")
            print(f"serving: note: precision={precision} is deprecated; use format={fmt}", file=sys.stderr)
        return data

    @field_validator("format")
    @classmethod
    def _servable(cls, v: str) -> str:
        if v not in SERVABLE:
            raise ValueError(f"format must be one of {', '.join(SERVABLE)} (servable export formats), got {v!r}")
        return v

    @property
    def precision(self) -> str:
        """The arithmetic of the served format (``fp32``, ``fp16``, ``int8``)."""
        return FORMATS[self.format].precision

    @model_validator(mode="after")
    def _torch_is_fp32(self):
        if self.backend == "torch" and self.format != "onnx":
            raise ValueError(f"the torch backend serves fp32 only; use backend onnx for format {self.format}")
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, v):
        # `bentoml serve --arg models=a,b` gives one string
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v
