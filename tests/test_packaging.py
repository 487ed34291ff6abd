"""The wheel is the product: built from the checkout, installed into a fresh environment, it builds and
evaluates an entry from an unrelated directory (configs ship as package data; weights are 0644)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, REPO, THREADS_ENV


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from this environment's site-packages
    (added as a plain path, so this checkout's editable install is not on it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                        "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("medzoo-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                        "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def _zoo(venv: Path, cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    # HOME elsewhere: `import medmnist` creates ~/.medmnist
    full = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd.parent / "home"), **OFFLINE_ENV, **THREADS_ENV,
            **env}
    return subprocess.run([str(venv / "bin" / "zoo"), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_wheel_builds_and_evaluates_an_entry_from_another_directory(installed, tmp_path, medmnist_root):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"ZOO_HOME": str(tmp_path / "store"), "MEDMNIST_ROOT": str(medmnist_root)}
    code = "import zoo.loading, training.config as c; print(zoo.loading.__file__, c.CONFIG_DIR)"
    r = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=elsewhere, capture_output=True, text=True,
                       env={**OFFLINE_ENV, **env}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    module, config_dir = r.stdout.split()
    assert str(installed) in module and str(REPO) not in module  # the installed package, not this checkout
    assert (Path(config_dir) / "medalmighty" / "cpu-fast.yaml").is_file()

    r = _zoo(installed, elsewhere, env, "build", "baseline-resnet18-breastmnist", "--config",
             "medalmighty/cpu-fast.yaml",
             "train.epochs=1", "train.min_steps=0", "data.download=false", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    entry = tmp_path / "store" / "baseline-resnet18-breastmnist"
    for f in ("model.safetensors", "config.json", "metrics.json", "README.md"):
        assert stat.S_IMODE(os.stat(entry / f).st_mode) == 0o644, f
    r = _zoo(installed, elsewhere, env, "eval", "baseline-resnet18-breastmnist", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["acc"] == json.loads((entry / "metrics.json").read_text())["test"]["acc"]
    assert not any(elsewhere.iterdir())  # nothing written where the command ran
