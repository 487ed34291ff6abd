"""The JSON bodies the service answers with; BentoML writes them into the OpenAPI document."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ClassifyResponse(BaseModel):
    """``POST /classify``: one image's prediction, with the zoo's task semantics (``zoo.inference``)."""

    model: str = Field(description="zoo name of the entry that answered")
    version: str = Field(description="digest of the entry's weight files (sha256 over their recorded hashes, 12 hex)")
    built: str = Field(description="when the entry was built (ISO 8601)")
    backend: str = Field(description="onnxruntime or torch, with its version")
    task: str = Field(description="binary-class, multi-class, multi-label, binary-class or ordinal-regression")
    label: str = Field(description="the predicted label (multi-label: the most probable one)")
    labels: list[str] = Field(description="multi-label: every label with probability > threshold; otherwise [label]")
    probabilities: dict[str, float] = Field(description="per label; binary tasks give [1 - p, p] over both labels")
    threshold: float | None = Field(description="decision threshold of sigmoid tasks (binary, multi-label)")


class Box(BaseModel):
    """Pixel box: x0, y0 inclusive; x1, y1 exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int


class LocalizeResponse(ClassifyResponse):
    """``POST /localize``: the prediction plus where the model looked, without a detection head."""

    map_kind: str = Field(description="cam (class-activation map, CNN students) or attention (CLS attention, ViTs)")
    target: str = Field(description="the label the map explains (CAM), or 'cls' for class-agnostic attention")
    heatmap: list[list[float]] = Field(description="the map at the model's input size (rows of columns), "
                                                   "min-max normalised to [0, 1]")
    heatmap_range: list[float] = Field(description="[min, max] of the map before normalisation")
    box_threshold: float = Field(description="the box covers the region around the maximum where heatmap >= this")
    box: Box = Field(description="top region in the uploaded image's pixels")
    box_input: Box = Field(description="top region in the model input's pixels (the heatmap's grid)")
    overlay_png: str = Field(description="base64 PNG: the heatmap over the image with the box drawn")
    overlay_size: list[int] = Field(description="[width, height] of the overlay")


class ErrorResponse(BaseModel):
    """Every refusal: a 4xx (or 503) with a message that says what to send instead."""

    error: str
