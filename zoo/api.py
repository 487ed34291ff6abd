"""The zoo's Python API: ``list_models``, ``load``, ``evaluate``, ``build``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from zoo import store
from zoo.data import Preprocess, Split, load_split
from zoo.inference import EVAL_BATCH_SIZE, Prediction, logits_to_probs, make_prediction, predict_logits, to_batch
from zoo.metrics import compute_metrics
from zoo.models import HFBackbone, LinearClassifier, backbone_normalisation, create_student
from zoo.registry import ZooEntry, get_entry


class NotBuiltError(FileNotFoundError):
    """A registered entry whose weights are not in the store yet."""


class ZooModel(nn.Module):
    """A zoo model in eval mode: ``forward`` takes preprocessed input; ``predict`` takes images.

    Attributes:
        entry: the :class:`ZooEntry` it was built from (preprocessing, labels, task, lineage).
        net: the underlying classifier (timm student or :class:`LinearClassifier`).
        info: ``config.json`` of the built entry (resolved recipe config, hashes), if any.
    """

    def __init__(self, net: nn.Module, entry: ZooEntry, info: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.entry = entry
        self.info = info or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

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


def list_models(pattern: str | None = None) -> list[str]:
    """Registered zoo names, sorted; ``pattern`` is a glob (``baseline-*``) or a substring."""
    from zoo.registry import list_models as _list

    return _list(pattern)


def _resolve_dir(name_or_path: str | os.PathLike) -> tuple[Path, ZooEntry | None]:
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p, None
    entry = get_entry(str(name_or_path))
    d = store.entry_dir(entry.name)
    if not store.is_built(entry.name):
        if entry.weights and entry.weights.startswith("hf-hub:"):
            fetch_from_hub(entry)
        else:
            raise NotBuiltError(
                f"{entry.name} is in the zoo but not built in {store.zoo_home()}; "
                f"build it with `zoo build {entry.name}` (set ZOO_HOME to use another store)"
            )
    return d, entry


def fetch_from_hub(entry: ZooEntry) -> Path:
    """Download a published entry folder (``weights="hf-hub:<repo_id>[@revision]"``) into the store."""
    from huggingface_hub import snapshot_download

    spec = entry.weights.removeprefix("hf-hub:")
    repo_id, _, revision = spec.partition("@")
    target = store.entry_dir(entry.name)
    with store.staged_dir(target) as tmp:
        snapshot_download(repo_id=repo_id, revision=revision or None, local_dir=str(tmp))
        if not (tmp / "config.json").is_file():
            raise FileNotFoundError(f"hub repo {repo_id} holds no zoo config.json: not a zoo entry")
    return target


def read_config(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise store.WeightsCorruptedError(
            f"cannot read {d / 'config.json'} ({e}); delete {d} and rebuild the entry"
        ) from None


def build_net(entry: ZooEntry, cfg: dict[str, Any], d: Path | None = None) -> nn.Module:
    """The architecture of a built entry; loads its weights from ``d`` when given (strictly)."""
    if entry.is_student:
        net = create_student(entry.arch, entry.num_outputs, entry.in_chans, cfg["model"]["small_stem"])
        if d is not None:
            net.load_state_dict(load_file(d / "model.safetensors"), strict=True)
        return net
    if entry.method == "dinomx":
        raise ValueError(f"{entry.name} is a pretrained backbone, not a classifier: load it with "
                         f"zoo.load_backbone({entry.name!r}), or use it as a MedAlmighty teacher "
                         f"(teacher.backbone={entry.name})")
    if d is None:
        raise ValueError("a linear-probe entry is built from its saved backbone folder")
    backbone = HFBackbone.from_pretrained(d / "backbone", pooling=cfg["teacher"]["pooling"])
    net = LinearClassifier(backbone, entry.num_outputs)
    net.head.load_state_dict(load_file(d / "model.safetensors"), strict=True)
    return net


def load(name: str | os.PathLike, device: str | torch.device = "cpu") -> ZooModel:
    """Load a built zoo model (by name, or the folder of a built entry or ``zoo train`` run).

    Weights come only from safetensors files whose sha256 matches the one recorded at build time.

    >>> model = zoo.load("baseline-resnet18-breastmnist")      # doctest: +SKIP
    >>> model.predict(images).labels                           # doctest: +SKIP
    """
    d, _ = _resolve_dir(name)
    info = read_config(d)
    store.verify(d, info["sha256"])
    entry = ZooEntry.from_dict(info["entry"])
    net = build_net(entry, info["config"], d)
    model = ZooModel(net, entry, info).to(device)
    return model.eval()


def load_backbone(name_or_path: str | os.PathLike, pooling: str = "cls") -> tuple[HFBackbone, Preprocess]:
    """The ViT backbone of a zoo entry and the preprocessing it expects.

    Accepts a built ``dinomx-*`` (pretrained backbone) or ``linear-*`` (probe) entry by name or
    folder, or a transformers model directory (``save_pretrained`` output; its
    ``preprocessor_config.json`` gives mean/std, ImageNet's otherwise, input size from its config).
    The backbone loads with eager attention so attention maps are available.
    """
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and "entry" not in _peek(p / "config.json"):
        bb = HFBackbone.from_pretrained(p, pooling=pooling)
        mean, std = backbone_normalisation(p, bb.in_chans)
        size = int(getattr(bb.model.config, "image_size", 224) or 224)
        return bb, Preprocess(size, bb.in_chans, tuple(mean), tuple(std), "bilinear")
    d, _ = _resolve_dir(name_or_path)
    info = read_config(d)
    store.verify(d, info["sha256"])
    entry = ZooEntry.from_dict(info["entry"])
    if not (d / "backbone" / "config.json").is_file():
        raise ValueError(f"{entry.name} is a {entry.method} entry with no ViT backbone; give a dinomx-*, linear-* "
                         "entry or a transformers model directory")
    return HFBackbone.from_pretrained(d / "backbone", pooling=pooling), entry.preprocess


def _peek(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def model_split(model: ZooModel, split: str, root=None) -> Split:
    """A split of the model's dataset, read with the data settings it was built with."""
    d = model.info.get("config", {}).get("data", {})
    return load_split(model.entry.dataset, split, size=d.get("size", 28), root=root or d.get("root"),
                      download=d.get("download", True))


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


def build(name: str, overrides: list[str] | tuple[str, ...] = (), progress: bool = True,
          config_files: list[str] | tuple[str, ...] = ()) -> Path:
    """Train a registered entry with its recipe into the store and return its folder.

    Args:
        overrides: ``key=value`` config overrides (``train.epochs=3``).
        config_files: override files applied on the recipe first (``medalmighty/cpu-fast.yaml``).
    """
    entry = get_entry(name)
    if entry.method == "dinomx":
        from training.dinomx.run import build_entry as build_backbone

        return build_backbone(entry, list(overrides), progress=progress, config_files=list(config_files))
    from training.build import build_entry

    return build_entry(entry, list(overrides), progress=progress, config_files=list(config_files))
