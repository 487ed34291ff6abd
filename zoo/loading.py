"""Loading what the store holds: ``load``, ``load_backbone``, ``evaluate``, and the one name-or-path resolver.

A *name* is a registry name and always means the store's entry (``$ZOO_HOME/<name>``); a folder in
the working directory that happens to be called like an entry never shadows it. A *path* must look
like one: ``./name``, ``../x``, ``~/x``, an absolute path, a ``pathlib.Path``, or ``path=<folder>``.

Weights come only from safetensors files whose sha256 matches the one recorded at build time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import zoo.hub as hub
import zoo.store as store
from zoo.backbones import ViTBackbone, backbone_normalisation
from zoo.data import Preprocess, Split, load_split
from zoo.inference import EVAL_BATCH_SIZE, Prediction, logits_to_probs, make_prediction, predict_logits, to_batch
from zoo.metrics import compute_metrics
from zoo.models import EnsembleClassifier, LinearClassifier, create_student, embed
from zoo.registry import ZooEntry, get_entry
from zoo.timm_models import pretrained_cfg, set_pretrained_cfg, timm_arch


class NotBuiltError(FileNotFoundError):
    """A registered entry whose weights are not in the store yet."""


class ZooModel(nn.Module):
    """A zoo model in eval mode: ``forward`` takes preprocessed input; ``predict`` takes images.

    It answers the model contract of :mod:`zoo.models` (``forward_features``, ``forward_head``,
    ``embed``) for CNN students and ViT probes alike.

    Attributes:
        entry: the :class:`ZooEntry` it was built from (preprocessing, labels, task, lineage).
        net: the underlying classifier (timm student or :class:`zoo.models.LinearClassifier`).
        info: ``config.json`` of the built entry (resolved recipe config, hashes), if any.
    """

    def __init__(self, net: nn.Module, entry: ZooEntry, info: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.entry = entry
        self.info = info or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=pre_logits)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (B, C, S, S) -> the pooled embedding (B, E) the classifier reads."""
        return embed(self.net, x)

    @torch.no_grad()
    def predict(self, images, batch_size: int = EVAL_BATCH_SIZE) -> Prediction:
        """Classify images.

        Args:
            images: a PIL image, a list of them, uint8 numpy arrays (H,W), (H,W,C), (N,H,W) or
                (N,H,W,C) (0-255; float arrays in [0, 1] also work), or torch tensors (C,H,W) or
                (N,C,H,W) in uint8 or float [0, 1]. Images are resized to the entry's input size
                and normalised with its mean/std; grey images are replicated for RGB models.
                PIL images are converted to the entry's mode (L or RGB).
            batch_size: images per forward pass.

        Returns:
            A :class:`Prediction` with ``probs`` (N x C numpy) and ``labels`` (N label names).
        """
        groups = to_batch(images, self.entry.in_chans)
        logits = torch.cat([predict_logits(self.net, g, self.entry.preprocess, batch_size) for g in groups])
        return make_prediction(logits_to_probs(logits, self.entry.task), self.entry.task, self.entry.labels)


# ----------------------------------------------------------------------------------------- resolving


def looks_like_path(s: str) -> bool:
    """``./x``, ``../x``, ``~/x``, ``/abs`` or anything with a path separator: a folder, not a zoo name."""
    return os.sep in s or s.startswith((".", "~")) or (os.altsep is not None and os.altsep in s)


@dataclass(frozen=True)
class Resolved:
    """Where a name or path points: the folder, and the registry entry when it was a name."""

    dir: Path
    entry: ZooEntry | None
    kind: str  # "entry" (a store entry or a built folder with config.json), "hf" (a transformers model dir)


def resolve(name_or_path: str | os.PathLike, must_exist: bool = True) -> Resolved:
    """The one resolver of model references (CLI, ``load``, explain, serving, export, teachers).

    ``hf-hub:<org>/<repo>[@<revision>]`` is a published entry, fetched into the store once and
    verified (:func:`zoo.hub.fetch`). A registry name resolves to its store folder (fetched from the
    hub first when its ``weights`` say ``hf-hub:`` and it is not built); anything that looks like a
    path is taken as a folder. Unknown names raise :class:`zoo.registry.UnknownModelError` (with the
    closest names), names not built :class:`NotBuiltError` (with the ``zoo build`` command) when
    ``must_exist``.
    """
    raw = os.fspath(name_or_path)
    if hub.is_hub_ref(raw) and not isinstance(name_or_path, os.PathLike):  # before paths: it holds a '/'
        return Resolved(hub.fetch(raw), None, "entry")  # fetch checks it is a zoo entry
    is_path = isinstance(name_or_path, os.PathLike) or looks_like_path(raw) or raw.startswith("path=")
    if is_path:
        p = Path(raw.removeprefix("path=")).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"model folder {p} not found; give a zoo name (zoo list), a built entry or "
                                    "run folder, or a transformers model directory")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: not a zoo entry, run folder or transformers model "
                                    "directory")
        return Resolved(p, None, "entry" if "entry" in _peek(p / "config.json") else "hf")
    entry = get_entry(raw)
    d = store.entry_dir(entry.name)
    if must_exist and not store.is_built(entry.name):
        if hub.is_hub_ref(entry.weights):
            fetch_from_hub(entry)
        else:
            raise NotBuiltError(f"{entry.name} is in the zoo but not built in {store.zoo_home()}; "
                                f"build it with `zoo build {entry.name}` (set ZOO_HOME to use another store)")
    return Resolved(d, entry, "entry")


def fetch_from_hub(entry: ZooEntry) -> Path:
    """Download a published entry folder (``weights="hf-hub:<repo_id>[@revision]"``) into the store, verified."""
    return hub.fetch_entry(entry)


def _peek(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_config(d: Path) -> dict[str, Any]:
    """The checked ``config.json`` of a built entry or run folder (:func:`zoo.store.read_config`)."""
    return store.read_config(d)


# ----------------------------------------------------------------------------------------- loading


def build_net(entry: ZooEntry, cfg: dict[str, Any], d: Path | None = None) -> nn.Module:
    """The architecture of a built entry; loads its weights from ``d`` when given (strictly)."""
    if entry.is_student:
        small_stem = cfg.get("model", {}).get("small_stem", entry.small_stem)
        if entry.method == "ensemble":
            size = len(cfg.get("ensemble", {}).get("members") or []) or cfg.get("ensemble", {}).get("size", 3)
            net = EnsembleClassifier([create_student(entry.arch, entry.num_outputs, entry.in_chans, small_stem)
                                      for _ in range(size)])
        else:
            net = create_student(entry.arch, entry.num_outputs, entry.in_chans, small_stem)
        if d is not None:
            net.load_state_dict(_load_weights(d / "model.safetensors"), strict=True)
        return set_pretrained_cfg(net, entry)  # timm's data helpers then read the entry's preprocessing
    if entry.method == "dinomx":
        raise ValueError(f"{entry.name} is a pretrained backbone, not a classifier: load it with "
                         f"zoo.load_backbone({entry.name!r}), or use it as a MedAlmighty teacher "
                         f"(the variant medalmighty-resnet18-{entry.dataset}.dinomx-28)")
    if d is None:
        raise ValueError("a linear-probe entry is built from its saved backbone folder")
    store.check_safetensors(d / "backbone" / "model.safetensors")  # transformers reads it: check it first
    backbone = ViTBackbone.from_pretrained(d / "backbone", pooling=cfg["teacher"]["pooling"])
    net = LinearClassifier(backbone, entry.num_outputs)
    net.head.load_state_dict(_load_weights(d / "model.safetensors"), strict=True)
    return net


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    return store.load_weights(path)  # one-line errors for a truncated or foreign file


def load(name: str | os.PathLike, device: str | torch.device = "cpu") -> ZooModel:
    """Load a built zoo model (by name, or the folder of a built entry or ``zoo train`` run).

    Weights come only from safetensors files whose sha256 matches the one recorded at build time.

    >>> model = zoo.load("baseline-resnet18-breastmnist")      # doctest: +SKIP
    >>> model.predict(images).labels                           # doctest: +SKIP
    """
    r = resolve(name)
    if r.kind != "entry":
        raise ValueError(f"{r.dir} is a transformers model directory, not a zoo entry: load it with "
                         "zoo.load_backbone")
    info, entry = store.verified_entry(r.dir)
    try:
        net = build_net(entry, info.get("config", {}), r.dir)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped tensors
        raise store.WeightsCorruptedError(f"{r.dir}: the weights do not fit {entry.arch} "
                                          f"({str(e).splitlines()[0]}); rebuild with `zoo build {entry.name}`"
                                          ) from None
    model = ZooModel(net, entry, info).to(device)
    return model.eval()


def load_backbone(name_or_path: str | os.PathLike, pooling: str = "cls") -> tuple[ViTBackbone, Preprocess]:
    """The ViT backbone of a zoo entry and the preprocessing it expects.

    Accepts a built ``dinomx-*`` (pretrained backbone) or ``linear-*`` (probe) entry by name or
    folder, or a transformers model directory (``save_pretrained`` output; its
    ``preprocessor_config.json`` gives mean/std, ImageNet's otherwise, input size from its config).
    The backbone loads with eager attention so attention maps are available.
    """
    r = resolve(name_or_path)
    if r.kind == "hf":
        bb = ViTBackbone.from_pretrained(r.dir, pooling=pooling)
        mean, std = backbone_normalisation(r.dir, bb.in_chans)
        size = int(getattr(bb.model.config, "image_size", 224) or 224)
        return bb, Preprocess(size, bb.in_chans, tuple(mean), tuple(std), "bilinear")
    _, entry = store.verified_entry(r.dir)
    if not (r.dir / "backbone" / "config.json").is_file():
        raise ValueError(f"{entry.name} is a {entry.method} entry with no ViT backbone; give a dinomx-*, linear-* "
                         "entry or a transformers model directory")
    return ViTBackbone.from_pretrained(r.dir / "backbone", pooling=pooling), entry.preprocess


def timm_kwargs(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """``timm.create_model(**timm_kwargs(name))``: a built student entry's weights loaded by timm alone.

    The weights file is checked against its recorded sha256 first; its ``pretrained_cfg`` is the entry's
    (:func:`zoo.timm_models.pretrained_cfg`). Small-stem students need ``zoo.register_timm_models()`` first.
    """
    r = resolve(name_or_path)
    if r.kind != "entry":
        raise ValueError(f"{r.dir} is a transformers model directory, not a zoo student entry")
    _, entry = store.verified_entry(r.dir)
    arch = timm_arch(entry)
    if arch is None or entry.method == "ensemble":
        raise ValueError(f"{entry.name} is not a single timm student ({entry.method}, {entry.arch}); load it with "
                         "zoo.load")
    # timm sets architecture and tag from the model name it is given
    overlay = {k: v for k, v in pretrained_cfg(entry).items() if k not in ("architecture", "tag")}
    overlay["file"] = str(r.dir / "model.safetensors")
    return {"model_name": arch, "pretrained": True, "pretrained_cfg_overlay": overlay,
            "num_classes": entry.num_outputs, "in_chans": entry.in_chans}


def backbone_dir(name_or_path: str | os.PathLike) -> Path | None:
    """The ``backbone/`` folder of a DINO-MX output (run or entry folder, by name or path), a
    transformers model directory itself, or None for a hub id (``facebook/dinov2-small``).

    ``hf-hub:<org>/<repo>`` is a published zoo entry (fetched once), not a transformers hub id."""
    raw = os.fspath(name_or_path)
    if not (isinstance(name_or_path, os.PathLike) or raw.startswith(("path=", ".", "/", "~"))
            or hub.is_hub_ref(raw)):
        try:
            get_entry(raw)
        except KeyError:  # not a zoo name: a folder given without ./, or a hub id (org/name)
            if not Path(raw).expanduser().exists():
                return None
            name_or_path = Path(raw)
    r = resolve(name_or_path)
    if (r.dir / "backbone" / "config.json").is_file():
        return r.dir / "backbone"
    return r.dir if r.kind == "hf" else None


# ----------------------------------------------------------------------------------------- evaluating


def model_split(model: ZooModel, split: str, root=None) -> Split:
    """A split of the model's dataset, read with the data settings it was built with."""
    d = model.info.get("config", {}).get("data", {})
    return load_split(model.entry.dataset, split, size=d.get("size", model.entry.data_size),
                      root=root or d.get("root"), download=d.get("download", True))


def evaluate(model: ZooModel | str, split: str = "test", root=None) -> dict[str, Any]:
    """ACC/AUC of a zoo model on a MedMNIST split, through ``predict`` (medmnist's semantics).

    Returns a dict with ``acc``, ``auc``, ``n``, ``split``, ``dataset`` and the ``probs`` array.
    """
    if not isinstance(model, ZooModel):
        model = load(model)
    e = model.entry
    data = model_split(model, split, root)
    t0 = time.perf_counter()
    pred = model.predict(data.images)
    m = compute_metrics(data.labels.numpy(), pred.probs, e.task)
    return {**m, "n": len(pred), "split": split, "dataset": e.dataset, "model": e.name,
            "seconds": round(time.perf_counter() - t0, 3), "probs": pred.probs}
