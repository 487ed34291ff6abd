"""The one writer of entry and run folders, for every recipe.

A recipe writes its weight files into the folder, then :func:`write_config` records them (sha256 of
every weight file, the entry, the resolved config, the lineage) and :func:`write_results` adds the
measured figures and the model card. ``zoo build`` writes into a staged store folder that is swapped
in only when all of it is there; ``zoo train`` / ``zoo pretrain`` into a run folder. Both layouts are
the same and both load with ``zoo.load(path)``::

    <folder>/
        model.safetensors | backbone/   weights (safetensors only)
        preprocessor_config.json        the entry's preprocessing for transformers (:func:`write_native`)
        hf/                             ViT entries: a transformers folder ``pipeline(...)`` runs (:func:`write_native`)
        config.json                     entry, resolved config, sha256 of every weight file, lineage
        config.yaml                     the resolved config, as YAML
        metrics.json                    what the run measured
        README.md                       the model card (:func:`zoo.card.render_card`)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import zoo.store as store
from training.config import dump_config
from zoo.backbones import create_model, fold_grey_patch_embedding, write_preprocessor_config
from zoo.card import render_card
from zoo.data import Preprocess
from zoo.models import LinearClassifier, to_hf_classifier
from zoo.registry import PROBE_METHODS, ZooEntry

FORMAT = 1
HF_DIR = "hf"  # a transformers model folder inside an entry: pipeline(task, model=<entry>/hf)


def write_config(out: Path, entry: ZooEntry | None, cfg: dict[str, Any], lineage: dict[str, Any],
                 net: nn.Module | None = None) -> dict[str, Any]:
    """Write the native files (:func:`write_native`; ``net`` is a probe's classifier), hash the weight files in
    ``out`` and write ``config.json`` and ``config.yaml``; returns the config."""
    if entry is not None:
        write_native(out, entry, net)  # first: its weight files are hashed and verified like the others
    weights = store.weight_files(out)
    if not weights:
        raise RuntimeError(f"no weight files were written into {out}")
    for p in weights:  # weights are shared like the rest of the entry (a cache other users may read)
        os.chmod(p, 0o644)
    config = {"format": FORMAT, "entry": entry.to_dict() if entry is not None else None, "config": cfg,
              "sha256": {str(p.relative_to(out)): store.sha256_file(p) for p in weights}, "lineage": lineage,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    store.write_json_atomic(out / "config.json", config)
    store.write_atomic(out / "config.yaml", lambda p: p.write_text(dump_config(cfg)))
    return config


def write_native(out: Path, entry: ZooEntry, net: nn.Module | None = None) -> list[str]:
    """The files that let timm and transformers users run the entry without this package; returns them.

    * ``preprocessor_config.json`` for every entry: its preprocessing (:meth:`zoo.data.Preprocess.hf_processor_config`).
    * ``hf/`` for a linear or fine-tuned probe (``net``, a :class:`LinearClassifier` on Dinov2): the
      ``Dinov2ForImageClassification`` of the same logits (:func:`zoo.models.to_hf_classifier`), labels named.
    * ``hf/`` for a DINO-MX backbone: the backbone for ``pipeline("image-feature-extraction")``, a 1-channel one
      folded into 3 channels (pipelines feed RGB; ``backbone/`` keeps the 1-channel original).

    Other ViTs (DINOv3, ViT) and heads on other poolings have no transformers classifier: no ``hf/``, and a note.
    """
    written = [write_preprocessor_config(out, entry.preprocess)]
    hf_dir = out / HF_DIR
    if entry.method in PROBE_METHODS and isinstance(net, LinearClassifier):
        try:
            model = to_hf_classifier(net, entry.labels, entry.task)
        except ValueError as e:
            print(f"note: {entry.name} has no {HF_DIR}/ folder: {e}", file=sys.stderr)
            return [str(p.relative_to(out)) for p in written]
    elif entry.method == "dinomx" and (out / "backbone" / "config.json").is_file():
        model = create_model(str(out / "backbone"))
        if int(model.config.num_channels) == 1:
            model = fold_grey_patch_embedding(model)
    else:
        return [str(p.relative_to(out)) for p in written]
    model.save_pretrained(hf_dir, safe_serialization=True)
    c = int(model.config.num_channels)  # 3 when folded: Preprocess repeats a grey mean/std per channel
    p = entry.preprocess
    written += [hf_dir / "config.json", hf_dir / "model.safetensors",
                write_preprocessor_config(hf_dir, Preprocess(p.input_size, c, p.mean, p.std, p.resize))]
    return [str(p.relative_to(out)) for p in written]


def write_results(out: Path, entry: ZooEntry | None, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """``metrics.json`` and the model card ``README.md`` (a run without an entry gets no card)."""
    store.write_json_atomic(out / "metrics.json", metrics)
    if entry is not None:
        store.write_atomic(out / "README.md", lambda p: p.write_text(render_card(entry, config, metrics, folder=out)))
