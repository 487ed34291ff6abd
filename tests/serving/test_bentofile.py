"""``bentofile.yaml``: its pins are pyproject's, and ``bentoml build`` packages the service offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml
from conftest import OFFLINE_ENV, REPO


def _bentofile() -> dict:
    return yaml.safe_load((REPO / "bentofile.yaml").read_text())


def test_pins_are_pyprojects():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(_bentofile()["python"]["packages"]) == sorted(deps)


def test_bentoml_build_packages_the_service(tmp_path):
    env = {**os.environ, **OFFLINE_ENV, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).with_name("bentoml")
    r = subprocess.run([str(bentoml), "build", "--output", "tag"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    (bento,) = (tmp_path / "bentoml" / "bentos" / "medzoo").glob("*/bento.yaml")
    info = yaml.safe_load(bento.read_text())
    assert info["service"] == "serving.service:ZooService" and info["args"]["models"]
    routes = {route["route"] for route in info["schema"]["routes"]}
    assert routes == {"/classify", "/localize"}
    src = bento.parent / "src"
    for f in ("serving/service.py", "serving/runtime.py", "zoo/inference.py", "export/graph.py", "pyproject.toml"):
        assert (src / f).is_file(), f
    assert not (src / "tests").exists() and not (src / ".venv").exists()
