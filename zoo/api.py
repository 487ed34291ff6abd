"""The zoo's user API, the facade over the layers: ``list_models``, ``load``, ``evaluate``, ``build``.

Loading and evaluating built entries is the core's (:mod:`zoo.loading`); building one runs a
training recipe (:mod:`training.entries`), which is why this module sits above the training layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from training.entries import build_entry
from zoo.loading import (
    NotBuiltError,
    Resolved,
    ZooModel,
    evaluate,
    load,
    load_backbone,
    model_split,
    read_config,
    resolve,
)
from zoo.registry import ZooEntry, get_entry, list_models

__all__ = ["NotBuiltError", "Resolved", "ZooEntry", "ZooModel", "build", "evaluate", "get_entry", "list_models",
           "load", "load_backbone", "model_split", "read_config", "resolve"]


def build(name: str, overrides: Sequence[str] = (), progress: bool = True, config_files: Sequence[str] = ()) -> Path:
    """Train a registered entry with its recipe into the store and return its folder.

    Args:
        overrides: ``key=value`` config overrides (``train.epochs=3``); one that contradicts the
            entry's preprocessing or teacher is refused with the name of the variant to build.
        config_files: override files applied on the recipe first (``medalmighty/cpu-fast.yaml``).
    """
    return build_entry(get_entry(name), list(overrides), progress=progress, config_files=list(config_files))
