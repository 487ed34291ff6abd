"""The one writer of entry and run folders, for every recipe.

A recipe writes its weight files into the folder, then :func:`write_config` records them (sha256 of
every weight file, the entry, the resolved config, the lineage) and :func:`write_results` adds the
measured figures and the model card. ``zoo build`` writes into a staged store folder that is swapped
in only when all of it is there; ``zoo train`` / ``zoo pretrain`` into a run folder. Both layouts are
the same and both load with ``zoo.load(path)``::

    <folder>/
        model.safetensors | backbone/   weights (safetensors only)
        config.json                     entry, resolved config, sha256 of every weight file, lineage
        config.yaml                     the resolved config, as YAML
        metrics.json                    what the run measured
        README.md                       the model card (:func:`zoo.card.render_card`)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import torch

import zoo.store as store
from training.config import dump_config
from zoo.card import render_card
from zoo.registry import ZooEntry

FORMAT = 1


def write_config(out: Path, entry: ZooEntry | None, cfg: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """Hash the weight files already in ``out`` and write ``config.json`` and ``config.yaml``; returns the config."""
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


def write_results(out: Path, entry: ZooEntry | None, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """``metrics.json`` and the model card ``README.md`` (a run without an entry gets no card)."""
    store.write_json_atomic(out / "metrics.json", metrics)
    if entry is not None:
        store.write_atomic(out / "README.md", lambda p: p.write_text(render_card(entry, config, metrics, folder=out)))
