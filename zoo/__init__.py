"""medzoo: MedMNIST model zoo: MedAlmighty students, ViT teachers, and the models users load.

>>> import zoo
>>> zoo.list_models("breastmnist")[:2]   # doctest: +SKIP
>>> model = zoo.load("baseline-resnet18-breastmnist")          # doctest: +SKIP
>>> model.predict(images).labels                               # doctest: +SKIP

The package root imports nothing: ``import zoo.data`` (as the training, export and serving layers do)
must not pull in the facade above them, and ``zoo --help`` must not pay for torch. The names below
are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "NotBuiltError": "zoo.loading", "ZooModel": "zoo.loading", "load": "zoo.loading", "evaluate": "zoo.loading",
    "load_backbone": "zoo.loading", "timm_kwargs": "zoo.loading", "register_timm_models": "zoo.timm_models",
    "ZooEntry": "zoo.registry", "get_entry": "zoo.registry", "list_models": "zoo.registry",
    "Prediction": "zoo.inference",
    "build": "zoo.api",
}
_SUBMODULES = ("anchors", "api", "backbones", "card", "cli", "data", "datasets", "demo", "explain", "hub", "images",
               "inference", "loading", "maps", "metrics", "models", "registry", "store", "tasks",
               "timm_models")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
