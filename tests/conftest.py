"""Shared fixtures: an isolated store per test, synthetic MedMNIST files, tiny transformers teachers.

Every test gets a fresh ``ZOO_HOME`` and reads MedMNIST from a session-wide folder of small
synthetic ``.npz`` files written in MedMNIST's exact format (keys, dtypes, shapes) for one real flag
of each task type, so ``medmnist.INFO`` metadata (labels, channels, task) applies unchanged.
Nothing here touches the network: the hub is offline and MedMNIST downloads fail at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread: on a shared 2-core machine, OpenMP spinning against another process makes a
# training step 10-40x slower and run-to-run time erratic; one thread is also reproducible.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# pytest puts tests/ on sys.path for this rootdir conftest, and tests/zoo/ (no __init__.py) would then
# import as a namespace package called `zoo` when the repo root is not on sys.path (`pytest` rather
# than `python -m pytest`): put the repo root first so `import zoo` is always the library.
if sys.path[0] != str(REPO):
    sys.path.insert(0, str(REPO))

# flag -> (task, channels, classes or labels); the flags are real, so medmnist.INFO describes them.
SYNTHETIC = {
    "breastmnist": ("binary-class", 1, 2),
    "dermamnist": ("multi-class", 3, 7),
    "retinamnist": ("ordinal-regression", 3, 5),
    "chestmnist": ("multi-label, binary-class", 1, 14),
}
SPLIT_SIZES = {"train": 96, "val": 48, "test": 48}
TASK_FLAG = {task: flag for flag, (task, _, _) in SYNTHETIC.items()}

# Offline everywhere (hub and transformers); subprocesses get these too.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _labels(rng: np.random.Generator, n: int, task: str, k: int) -> np.ndarray:
    """MedMNIST labels (N, 1) or (N, 14) uint8, with every class (or both values per label) present."""
    if task == "multi-label, binary-class":
        y = (rng.random((n, k)) < 0.35).astype(np.uint8)
        y[0], y[1] = 0, 1  # both values of every label occur, so each per-label AUC is defined
        return y
    y = np.arange(n) % k  # every class occurs in every split
    return rng.permutation(y).astype(np.uint8)[:, None]


def _images(rng: np.random.Generator, y: np.ndarray, task: str, c: int, k: int, size: int = 28) -> np.ndarray:
    """Learnable images: class-dependent brightness, plus one bright block per active label (multi-label)."""
    n = len(y)
    img = rng.normal(0, 12, size=(n, size, size)).astype(np.float32)
    if task == "multi-label, binary-class":
        img += 60
        cell = size // 4
        for j in range(k):
            r, q = divmod(j, 4)
            img[y[:, j] == 1, r * cell : (r + 1) * cell, q * cell : (q + 1) * cell] += 140
    else:
        level = 40 + 170 * y[:, 0] / (k - 1)
        img += level[:, None, None]
        img[:, :, : size // 2] += (y[:, 0] % 2 * 30)[:, None, None]  # a class-parity pattern on the left half
    if c == 3:
        tint = np.array([1.0, 0.8, 0.6], dtype=np.float32)
        img = img[..., None] * tint
    return np.clip(img, 0, 255).astype(np.uint8)


def write_medmnist_npz(path: Path, flag: str, seed: int = 0, size: int = 28, sizes: dict | None = None) -> Path:
    """A MedMNIST-format npz for one of :data:`SYNTHETIC`'s flags."""
    task, c, k = SYNTHETIC[flag]
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (sizes or SPLIT_SIZES).items():
        y = _labels(rng, n, task, k)
        arrays[f"{split}_images"] = _images(rng, y, task, c, k, size)
        arrays[f"{split}_labels"] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="session")
def medmnist_root(tmp_path_factory) -> Path:
    """Session-wide synthetic MedMNIST root: ``<flag>.npz`` for each flag in :data:`SYNTHETIC`."""
    root = tmp_path_factory.mktemp("medmnist")
    for i, flag in enumerate(SYNTHETIC):
        write_medmnist_npz(root / f"{flag}.npz", flag, seed=i)
    return root


def _no_download(flag, size, path):
    raise ConnectionError(f"tests do not download ({flag}, {size} px)")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, medmnist_root):
    """A fresh store per test, the synthetic data root, and no network (a missing file fails at once)."""
    from zoo import data

    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo_home"))
    monkeypatch.setenv("MEDMNIST_ROOT", str(medmnist_root))
    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(data, "_download", _no_download)


@pytest.fixture(scope="session")
def session_env(tmp_path_factory, medmnist_root):
    """For session fixtures that build: a store of their own and the synthetic data (no autouse there)."""
    store = tmp_path_factory.mktemp("session_zoo_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_HOME", str(store))
        mp.setenv("MEDMNIST_ROOT", str(medmnist_root))
        for k, v in OFFLINE_ENV.items():
            mp.setenv(k, v)
        yield store


TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
                patch_size=7)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A random 2-layer, 32-dim DINOv2 saved with ``save_pretrained`` (no preprocessor config)."""
    from transformers import Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_VIT)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_registers_teacher_dir(tmp_path_factory) -> Path:
    """The same tiny ViT with 2 register tokens (tokens: CLS, registers, patches)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    d = tmp_path_factory.mktemp("tiny_dinov2_reg")
    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_VIT, num_register_tokens=2)).save_pretrained(d)
    return d


# Tiny student runs: resnet-test, 2 epochs, no progress bars, nothing downloaded.
TINY_TRAIN = ["model.arch=resnet-test", "train.epochs=2", "train.batch_size=32", "train.progress=false",
              "data.download=false"]


def tiny_overrides(method: str, flag: str, out: Path | None = None, *extra: str) -> list[str]:
    ov = [f"method={method}", f"data.dataset={flag}", *TINY_TRAIN, *extra]
    if out is not None:
        ov.append(f"output_dir={out}")
    return ov


@pytest.fixture(scope="session")
def tiny_runs(session_env, tmp_path_factory) -> dict[str, Path]:
    """One ``zoo train`` run folder per task type (baseline resnet-test, 2 epochs), built once."""
    from training.entries import train_config

    out = tmp_path_factory.mktemp("runs")
    return {task: train_config("medalmighty/default.yaml", tiny_overrides("baseline", flag, out), progress=False)
            for task, flag in TASK_FLAG.items()}


@pytest.fixture(scope="session")
def built_resnet18_breast(session_env) -> Path:
    """The registered entry ``baseline-resnet18-breastmnist`` built for 1 epoch on the synthetic data."""
    from zoo.api import build

    return build("baseline-resnet18-breastmnist", ["train.epochs=1", "train.progress=false", "data.download=false"],
                 progress=False)


@pytest.fixture(scope="session")
def built_linear_breast(session_env, tiny_teacher_dir) -> Path:
    """``linear-dinov2-vits14-breastmnist`` built on the tiny DINOv2 (a few probe epochs)."""
    from zoo.api import build

    return build("linear-dinov2-vits14-breastmnist",
                 [f"teacher.backbone={tiny_teacher_dir}", "probe.epochs=5", "data.download=false"], progress=False)


def install(entry_folder: Path, name: str | None = None) -> Path:
    """Copy a built entry folder into the current test's store (so it loads by name there)."""
    from zoo import store

    dst = store.entry_dir(name or entry_folder.name)
    shutil.copytree(entry_folder, dst)
    return dst


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m zoo.cli ARGS`` in a subprocess with ``env`` (ZOO_HOME, MEDMNIST_ROOT) added.

    Subprocesses are not covered by the autouse no-download patch: pass ``data.download=false`` to
    any command that could miss a file.
    """
    full_env = {**os.environ, **OFFLINE_ENV, **THREADS_ENV, **(env or {})}
    cmd = [sys.executable, "-m", "zoo.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)

