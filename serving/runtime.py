"""Served models: their artifacts, runtimes, and the zoo's own preprocessing and task semantics.

A served model is a built zoo entry behind one of two runtimes:

- ``onnx`` (default): ONNX Runtime on the export bundle ``<entry>/export/<format>/`` written by
  ``export.to_onnx(name, format, with_localization=True)`` (made on first use, with its parity check
  against torch). ``fmt`` is the export format (:data:`export.FORMATS`): ``onnx``, ``onnx-fp16`` or
  ``onnx-int8`` (the edge artifact: static QDQ, about 4x the FP32 throughput of a 28 px
  ResNet on CPU, with the label agreement its export receipt records). The bundle must match the
  entry it came from (same entry fields, exported after the build, ``model.onnx`` with the sha256
  its receipt records).
- ``torch``: ``zoo.load(name)`` through :class:`zoo.maps.WithLocalization`, the module the ONNX file
  is traced from, so both runtimes give the same two outputs.

A name is a zoo name or entry folder (read from ``$ZOO_HOME``), or a BentoML model tag
``NAME:VERSION`` (:func:`is_model_tag`): a bundle a bento carries (``zoo bento``, :mod:`serving.bento`),
an entry folder in BentoML's model store with the same layout (``config.json``, ``export/<format>/``).

The ONNX path imports no torch (a bento built with ``--onnx-only`` has none): images become model
input with the bundle runner's numpy code (``export.edge.input_array``, equal to ``zoo.inference.to_batch``
+ ``zoo.data.preprocess`` with ``ZooEntry.preprocess``: PIL's conversion to the entry's L/RGB mode,
resize, channel replication, mean/std), and logits become probabilities and labels with its task rules
(``export.edge``, equal to ``zoo.tasks``). The torch backend preprocesses with the zoo's own torch code.
Nothing here restates mean/std or task rules: they are read from the bundle's ``preprocess.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import export
import zoo.store as store
from export import edge
from serving.inputs import DecodedImage, RequestError
from serving.localization import DEFAULT_THRESHOLD, b64, class_map, normalise, overlay_png, to_input_size, top_box
from zoo.registry import ZooEntry

log = logging.getLogger("bentoml.serve.medzoo")  # under BentoML's logger, so the worker's log shows it

MAP_OUTPUTS = ("cam", "attention")  # zoo.maps.MAP_KINDS: the localization outputs of an export
_TAG = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?:[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")


class ServingError(ValueError):
    """A model that cannot be served as asked (bad artifact, duplicate name); the message says what to do."""


# ----------------------------------------------------------------------------------------- artifacts


def is_model_tag(name: str) -> bool:
    """``NAME:VERSION`` in BentoML's tag syntax: a model in BentoML's model store, not a zoo name or folder
    (zoo names hold no ``:``; ``hf-hub:org/repo`` holds a ``/``, which tags cannot)."""
    return bool(_TAG.match(name))


def entry_folder(name: str) -> Path:
    """The folder of a built entry: a BentoML model's folder for a tag, a path when ``name`` looks like one
    (entry or run), else its store folder. Unknown names raise ``UnknownModelError``; whether it is built
    is checked when it is loaded."""
    if is_model_tag(name):
        import bentoml  # the worker has it loaded already; `zoo serve`'s checks need it only for tags

        try:
            return Path(bentoml.models.get(name).path)
        except bentoml.exceptions.NotFound:
            raise ServingError(f"model {name} is not in BentoML's model store ({bentoml_home()}); build the "
                               "bento with `zoo bento`, or import it with `bentoml models import`") from None
    from zoo.loading import resolve  # the zoo store's resolver imports torch: only for zoo names

    return resolve(name, must_exist=False).dir


def bentoml_home() -> str:
    return os.environ.get("BENTOML_HOME", "~/bentoml")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ServingError(f"cannot read {path} ({e})") from None


def same_entry(exported: Any, recorded: Any) -> bool:
    """Whether an export's entry (``export.json``, written by the zoo that exported) is the entry its folder
    records (``config.json``, written by the zoo that built it): every field the build recorded agrees. A
    store built before fields were added (``tag``, ``data_size``, ...) thus stays servable; the export's
    ``created`` after the build's is checked beside this."""
    if not isinstance(exported, dict) or not isinstance(recorded, dict):
        return False
    return all(k in exported and exported[k] == v for k, v in recorded.items())


def bundle_problem(folder: Path, fmt: str = "onnx") -> str | None:
    """Why ``<folder>/export/<fmt>`` cannot be served as the entry's current model, or None when it can."""
    d = folder / "export" / export.get_format(fmt, export.SERVABLE).name
    missing = [f for f in ("model.onnx", "export.json", "preprocess.json") if not (d / f).is_file()]
    if missing:
        return f"{d} lacks {', '.join(missing)}"
    rec, cfg = _read_json(d / "export.json"), _read_json(folder / "config.json")
    if not set(rec.get("outputs", [])) & set(MAP_OUTPUTS):
        return f"{d} was exported without a localization output (--with-localization)"
    if _read_json(d / "preprocess.json").get("input_dtype", "float32") != "float32":
        return f"{d} was exported with uint8 input (--uint8-input); the service feeds normalised float input"
    if not same_entry(rec.get("entry"), cfg.get("entry")) or rec.get("created", "") < cfg.get("created", ""):
        return f"{d} was exported from another build of the entry"
    if store.sha256_file(d / "model.onnx") != rec.get("sha256"):
        return f"{d / 'model.onnx'} does not match the sha256 in its export.json (changed or corrupted)"
    return None


def ensure_onnx(name: str, say: Callable[[str], None] = log.info, fmt: str = "onnx") -> Path:
    """The ONNX bundle of ``name`` in format ``fmt`` with its localization output, exported (and
    parity-checked; INT8 is calibrated on training images) when missing or stale. A BentoML model
    (a bento's) carries its bundle: it is checked, never exported."""
    export.get_format(fmt, export.SERVABLE)
    folder = entry_folder(name)
    problem = bundle_problem(folder, fmt) if (folder / "config.json").is_file() else "not built"
    if problem is None:
        return folder / "export" / fmt
    if is_model_tag(name):
        raise ServingError(f"cannot serve {name}: {problem}; rebuild the bento with `zoo bento ... --format {fmt}`")
    say(f"exporting {name} to {fmt} with its localization output ({problem}); this runs the parity check once")
    return export.to_onnx(name, fmt, with_localization=True).dir


def weights_version(config: dict[str, Any]) -> str:
    """A short digest of the entry's weight files (their sha256s as recorded when it was built)."""
    recorded = sorted(config.get("sha256", {}).items())
    return hashlib.sha256("\n".join(f"{k}:{v}" for k, v in recorded).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------- entries


def input_spec(entry: ZooEntry) -> dict[str, Any]:
    """The ``preprocess.json`` fields that :func:`export.edge.input_array` reads (float input), from the
    entry itself: its preprocessing is fixed by its name, and serving re-declares none of it."""
    return {"in_chans": entry.in_chans, "input_size": entry.input_size, "mean": list(entry.mean),
            "std": list(entry.std), "resize": entry.resize, "scale": 255.0, "input_dtype": "float32",
            "image_mode": "L" if entry.in_chans == 1 else "RGB"}


# ----------------------------------------------------------------------------------------- runtimes


class OnnxRuntime:
    """ONNX Runtime on CPU: ``x`` (N, C, S, S) -> (logits, map or None)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # Spinning intra-op threads would take CPU from the event loop that parses requests meanwhile.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.name = f"onnxruntime {ort.__version__}"

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(None, {self.input: x})
        return out[0], (out[1] if len(out) > 1 else None)


class TorchRuntime:
    """``zoo.load``'s net with its localization map (:class:`zoo.maps.WithLocalization`, the module the
    ONNX file is traced from), so both runtimes give the same two outputs."""

    def __init__(self, net, input_size: int):
        import torch  # the torch backend only: the ONNX path runs without torch

        from zoo.backbones import merge_adapters
        from zoo.maps import WithLocalization

        self.torch = torch
        net = merge_adapters(net).eval()
        try:
            self.graph = WithLocalization(net, input_size).eval()
            self.outputs = ["logits", self.graph.kind]
        except ValueError:  # a net without a localization map serves its logits only
            self.graph = net
            self.outputs = ["logits"]
        self.name = f"torch {torch.__version__.split('+')[0]}"

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self.torch.inference_mode():
            out = self.graph(self.torch.from_numpy(x))
        if isinstance(out, tuple):
            return out[0].float().numpy(), out[1].float().numpy()
        return out.float().numpy(), None


# ----------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Prepared:
    """One image, checked and preprocessed: ``x`` (C, S, S) model input; ``image`` what the model saw, unresized."""

    x: np.ndarray
    image: np.ndarray  # (H, W, C) uint8, or float in [0, 1]
    width: int
    height: int


@dataclass(frozen=True)
class Output:
    """One image's share of a batch: probabilities, decision and the raw localization map."""

    probs: np.ndarray
    label: str
    labels: list[str]
    index: int
    map: np.ndarray | None


class ServedModel:
    """A loaded zoo entry with its runtime, preprocessing and task semantics."""

    def __init__(self, entry: ZooEntry, runtime: OnnxRuntime | TorchRuntime, config: dict[str, Any],
                 backend: str, fmt: str = "onnx"):
        self.entry = entry
        self.runtime = runtime
        self.backend = backend
        self.format = fmt
        self.precision = export.FORMATS[fmt].precision
        self.version = weights_version(config)
        self.built = str(config.get("created", ""))
        self.map_kind = next((o for o in runtime.outputs[1:] if o in MAP_OUTPUTS), None)
        self._spec = input_spec(entry)

    @property
    def name(self) -> str:
        return self.entry.name

    def describe(self) -> dict[str, Any]:
        """What ``GET /models`` lists for this model."""
        e = self.entry
        return {"name": e.name, "version": self.version, "built": self.built, "backend": self.runtime.name,
                "format": self.format, "precision": self.precision, "task": e.task, "labels": list(e.labels),
                "in_chans": e.in_chans, "input_size": e.input_size,
                "image_mode": "L" if e.in_chans == 1 else "RGB", "mean": list(e.mean),
                "std": list(e.std), "resize": e.resize, "localization": self.map_kind,
                "method": e.method, "arch": e.arch, "dataset": e.dataset, "teacher": e.teacher, "license": e.license}

    # --- per request (before batching)

    def prepare(self, decoded: DecodedImage) -> Prepared:
        """Decoded upload -> normalised model input, as ``ZooModel.predict`` builds it."""
        try:
            pixels = edge.image_pixels(decoded.image, self._spec)
            x = self._torch_input(pixels) if self.backend == "torch" else edge.input_array(pixels, self._spec)
        except ValueError as e:  # e.g. a float RGB array for a grey model
            raise RequestError(422, str(e).removeprefix("predict: ")) from None
        return Prepared(x=np.ascontiguousarray(x, dtype=np.float32), image=pixels, width=decoded.width,
                        height=decoded.height)

    def _torch_input(self, pixels: np.ndarray) -> np.ndarray:
        """The zoo's own torch preprocessing (``to_batch`` + ``preprocess``), for the torch backend."""
        from zoo.data import preprocess  # the torch backend only
        from zoo.inference import to_batch

        (t,) = to_batch([pixels], self.entry.in_chans)
        return preprocess(t, self.entry.preprocess)[0].numpy()

    # --- per batch (in the batcher's thread)

    def infer(self, x: np.ndarray) -> list[Output]:
        """A batch (N, C, S, S) -> one :class:`Output` per image."""
        logits, maps = self.runtime(x)
        e = self.entry
        probs = edge.probabilities(logits, e.task)
        idx = edge.decide(probs, e.task)
        labels = [e.labels[i] for i in idx]
        if e.task == edge.MULTI_LABEL:  # every label above the threshold
            sets = [[e.labels[j] for j in np.flatnonzero(row)] for row in edge.positives(probs, e.task)]
        else:
            sets = [[lab] for lab in labels]
        return [Output(probs=probs[i], label=labels[i], labels=sets[i], index=int(idx[i]),
                       map=None if maps is None else maps[i]) for i in range(len(probs))]

    # --- per response

    def classification(self, out: Output) -> dict[str, Any]:
        e = self.entry
        return {"model": e.name, "version": self.version, "built": self.built, "backend": self.runtime.name,
                "task": e.task, "label": out.label, "labels": out.labels,
                "probabilities": {lab: round(float(p), 6) for lab, p in zip(e.labels, out.probs)},
                "threshold": edge.threshold(e.task)}

    def target_index(self, label: str | None, out: Output) -> int:
        """The label whose map to show: the one asked for, else the prediction."""
        if label is None:
            return out.index
        if label not in self.entry.labels:
            raise RequestError(422, f"label {label!r} is not one of {self.name}'s labels: "
                               f"{', '.join(self.entry.labels)}")
        return self.entry.labels.index(label)

    def localization(self, prep: Prepared, out: Output, label: str | None = None,
                     threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
        """Heatmap (input size, [0, 1]), its top region as a box, and the PNG overlay."""
        if out.map is None or self.map_kind is None:
            raise RequestError(422, f"{self.name} has no localization output on the {self.backend} backend")
        idx = self.target_index(label, out)
        raw = to_input_size(class_map(out.map, self.map_kind, self.entry.task, idx), self.entry.input_size)
        heat = normalise(raw)
        box_in = top_box(heat, threshold)
        s = self.entry.input_size
        png, size = overlay_png(_as_pil(prep.image), heat, box_in)
        return {**self.classification(out), "map_kind": self.map_kind,
                "target": "cls" if self.map_kind == "attention" else self.entry.labels[idx],
                "heatmap": np.round(heat, 6).tolist(), "heatmap_range": [float(raw.min()), float(raw.max())],
                "box_threshold": threshold, "box": vars(box_in.scaled(prep.width / s, prep.height / s)),
                "box_input": vars(box_in), "overlay_png": b64(png), "overlay_size": list(size)}

    def warm_up(self, max_batch_size: int) -> None:
        """Run every power-of-two batch size up to the largest, so no request pays for first-run allocations."""
        e = self.entry
        n = 1
        while True:
            self.runtime(np.zeros((n, e.in_chans, e.input_size, e.input_size), dtype=np.float32))
            if n >= max_batch_size:
                break
            n = min(2 * n, max_batch_size)


def _as_pil(a: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 or float in [0, 1] -> the PIL image the overlay is drawn on."""
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def default_threads() -> int:
    """Runtime threads by default: every core.

    ONNX Runtime's threads do not spin here (``allow_spinning`` 0), so they give the core back to the
    event loop between batches. Measured with 32 clients on 2 cores (28 px ResNet-18, uvicorn with
    httptools and uvloop): two threads served 1.7x the requests per second of one in FP32 and 1.4x
    in INT8.
    """
    return max(1, os.cpu_count() or 1)


def load_model(name: str, backend: str, threads: int = 0, fmt: str = "onnx") -> ServedModel:
    """Load one model for serving; ``threads`` 0 = :func:`default_threads`; ``fmt`` the export format served."""
    threads = threads or default_threads()
    export.get_format(fmt, export.SERVABLE)
    if backend == "torch":
        if fmt != "onnx":
            raise ServingError(f"the torch backend serves fp32 only; use --backend onnx for {fmt}")
        import torch  # the torch backend only

        from zoo.loading import load

        torch.set_num_threads(threads)
        model = load(str(entry_folder(name)) if is_model_tag(name) else name)
        return ServedModel(model.entry, TorchRuntime(model.net, model.entry.input_size),
                           model.info, "torch")
    if backend != "onnx":
        raise ServingError(f"unknown backend {backend!r}; choose onnx or torch")
    folder = entry_folder(name)
    if not (folder / "config.json").is_file():
        if is_model_tag(name):
            raise ServingError(f"{name} ({folder}) holds no config.json: not a zoo bundle saved by `zoo bento`")
        from zoo.loading import NotBuiltError  # zoo names only (the zoo store)

        raise NotBuiltError(f"{name} is not built in {store.zoo_home()}; build it with `zoo build {name}`")
    problem = bundle_problem(folder, fmt)
    if problem:
        if is_model_tag(name):
            raise ServingError(f"cannot serve {name}: {problem}; rebuild the bento with `zoo bento`")
        raise ServingError(f"cannot serve {name}: {problem}; start it with `zoo serve {name} --format {fmt}`, which "
                           "exports it")
    d = folder / "export" / fmt
    rec, spec = _read_json(d / "export.json"), _read_json(d / "preprocess.json")
    cfg = _read_json(folder / "config.json")
    _check_spec(rec["entry"], spec, d)
    try:
        # The receipt records the whole entry the bundle was made from; mean/std per channel, as checked above
        # (entries of older zoos gave one value for every channel).
        entry = ZooEntry.from_dict({**rec["entry"], "mean": spec["mean"], "std": spec["std"]})
    except (TypeError, ValueError) as e:
        raise ServingError(f"cannot serve {name}: its export receipt's entry is not readable ({e}); re-export it "
                           f"with `zoo export {name} --format {fmt}`") from None
    return ServedModel(entry, OnnxRuntime(d / spec["model_file"], threads), cfg, "onnx", fmt)


def _check_spec(entry: dict[str, Any], spec: dict[str, Any], d: Path) -> None:
    """``preprocess.json`` must describe the entry's own preprocessing (it is written from it): the receipt's
    entry fields, with mean/std given once for every channel expanded as ``zoo.data.per_channel`` does."""
    c = entry.get("in_chans")

    def per_channel(v):
        v = [float(x) for x in v or []]
        return v * c if len(v) == 1 and isinstance(c, int) else v

    want = {"in_chans": c, "input_size": entry.get("input_size"), "mean": per_channel(entry.get("mean")),
            "std": per_channel(entry.get("std")), "resize": entry.get("resize", "bilinear"),
            "task": entry.get("task"), "labels": list(entry.get("labels") or [])}
    diff = sorted(k for k, v in want.items() if spec.get(k) != v)
    if diff:
        raise ServingError(f"{d / 'preprocess.json'} disagrees with the entry on {', '.join(diff)}; re-export it")
