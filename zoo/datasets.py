"""MedMNIST v2 (2D) metadata without torch: flags, tasks, labels, licences, file names and URLs.

``import medmnist`` imports torchvision and torch (its dataset classes), a few seconds that listing
the zoo (``zoo list``, ``zoo --help``, :func:`zoo.registry.list_models`) must not pay. The metadata
itself, ``medmnist.INFO``, lives in ``medmnist/info.py``, which imports only ``os`` and ``warnings``.
:func:`medmnist_info` finds the installed package without importing it
(``importlib.util.find_spec``) and executes that one file as a module of its own, so the zoo reads
exactly the INFO of the medmnist version installed (``tests/zoo/test_registry.py`` checks that it
equals ``medmnist.INFO``) at the cost of the standard library. Like ``import medmnist``, executing
``info.py`` creates medmnist's default root ``~/.medmnist`` if it is missing.

:mod:`zoo.data` re-exports everything here, next to the torch side (splits, preprocessing).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
HOMEPAGE = "https://medmnist.com/"


@functools.cache
def medmnist_info() -> dict:
    """``medmnist.INFO`` (flag -> metadata), read from ``medmnist/info.py`` without importing medmnist."""
    loaded = sys.modules.get("medmnist.info")
    if loaded is not None:  # medmnist is imported already: nothing to save
        return loaded.INFO
    spec = importlib.util.find_spec("medmnist")  # a top-level name: found, not imported
    if spec is None:
        raise ModuleNotFoundError("medmnist is not installed; pip install medmnist", name="medmnist")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "info.py"
    if not path.is_file():  # another layout than medmnist 3.x: pay for the import
        from medmnist import INFO

        return INFO
    info_spec = importlib.util.spec_from_file_location("_zoo_medmnist_info", path)
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return module.INFO


def datasets_2d() -> list[str]:
    """The 12 MedMNIST v2 2D dataset flags, in medmnist's order."""
    return [k for k in medmnist_info() if not k.endswith("3d")]


@dataclass(frozen=True)
class DatasetInfo:
    """What the zoo needs to know about one MedMNIST dataset."""

    flag: str
    task: str
    n_channels: int
    labels: tuple[str, ...]
    n_samples: dict
    license: str
    description: str

    @property
    def num_outputs(self) -> int:
        """Model outputs: one logit for binary tasks (BCE), one per label or class otherwise."""
        # function-level import: zoo.tasks imports torch (its probability functions), which reading metadata must not
        from zoo.tasks import get_task

        return get_task(self.task).num_outputs(len(self.labels))

    def url(self, size: int = 28) -> str:
        return medmnist_info()[self.flag]["url" if size == 28 else f"url_{size}"]

    def md5(self, size: int = 28) -> str:
        return medmnist_info()[self.flag]["MD5" if size == 28 else f"MD5_{size}"]


def dataset_info(flag: str) -> DatasetInfo:
    info = medmnist_info()
    flags = datasets_2d()
    if flag not in flags:
        close = difflib.get_close_matches(flag, flags, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Known: {', '.join(flags)}."
        raise ValueError(f"unknown MedMNIST 2D dataset {flag!r}.{hint}")
    d = info[flag]
    labels = tuple(d["label"][str(i)] for i in range(len(d["label"])))
    return DatasetInfo(
        flag=flag,
        task=d["task"],
        n_channels=int(d["n_channels"]),
        labels=labels,
        n_samples=dict(d["n_samples"]),
        license=d.get("license", "see medmnist.com"),
        description=d["description"],
    )


def medmnist_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else ``$MEDMNIST_ROOT``, else medmnist's default (~/.medmnist)."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("MEDMNIST_ROOT")
    if env:
        return Path(env).expanduser()
    return Path("~/.medmnist").expanduser()


def npz_path(flag: str, size: int = 28, root: str | os.PathLike | None = None) -> Path:
    if size not in SIZES:
        raise ValueError(f"MedMNIST size must be one of {SIZES}, got {size}")
    return medmnist_root(root) / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
