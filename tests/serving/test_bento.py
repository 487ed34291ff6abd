"""``zoo bento`` (:mod:`serving.bento`): bentos that carry their models, served with no zoo store, no
MedMNIST files and, for ``--onnx-only`` bentos, no torch; ``bentoml build`` with the models named."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml
from conftest import OFFLINE_ENV, REPO, THREADS_ENV, install
from PIL import Image
from serve_helpers import png

from serving import bento
from serving.local import free_port
from zoo.api import load
from zoo.data import load_split

NAME = "baseline-resnet18-breastmnist"
BENTOML = str(Path(sys.executable).with_name("bentoml"))
NO_TORCH = ("torch", "torchvision", "timm", "transformers")
# Imported first by every Python process that has it on PYTHONPATH (site.py): importing a blocked
# package fails as if it were not installed, and each attempt is logged.
BLOCKER = f"""
import os, sys
BLOCKED = {set(NO_TORCH)!r}

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(os.environ["BLOCKED_LOG"], "a") as f:
                f.write(f"{{os.getpid()}} {{name}}\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _Block())
"""


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, **THREADS_ENV, "BENTOML_DO_NOT_TRACK": "true", **extra}
    return {k: v for k, v in env.items() if v is not None}


def _run(cmd: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def built(built_resnet18_breast, medmnist_root, tmp_path_factory):
    """An onnx-only bento ``medzoo:test`` of the tiny built entry, built by ``python -m serving.bento`` into a
    BentoML home of its own (the zoo store and the MedMNIST files are needed only here, to export)."""
    root = tmp_path_factory.mktemp("bento")
    home = root / "zoo_home"
    shutil.copytree(built_resnet18_breast, home / NAME)
    env = _env(ZOO_HOME=str(home), MEDMNIST_ROOT=str(medmnist_root), BENTOML_HOME=str(root / "bentoml"))
    r = _run([sys.executable, "-m", "serving.bento", NAME, "--tag", "medzoo:test"], env)
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("built bento medzoo:test with baseline-resnet18-breastmnist:onnx-"), summary
    assert "onnx-only" in summary and "bentoml containerize medzoo:test" in summary
    rec = json.loads((home / NAME / "export" / "onnx" / "export.json").read_text())
    tag = f"{NAME}:onnx-{rec['sha256'][:12]}"
    return SimpleNamespace(root=root, home=home, env=env, tag=tag, receipt=rec, bentoml=root / "bentoml",
                           bento=root / "bentoml" / "bentos" / "medzoo" / "test")


def test_the_bento_carries_its_model_and_no_torch(built):
    info = yaml.safe_load((built.bento / "bento.yaml").read_text())
    assert [m["tag"] for m in info["models"]] == [built.tag]
    assert info["args"] == {"models": [built.tag], "backend": "onnx", "format": "onnx"}
    assert info["labels"]["onnx_only"] == "true" and info["service"] == "serving.service:ZooService"
    reqs = (built.bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    names = {bento._dist(r) for r in reqs if r.strip() and not r.startswith("#")}
    assert not names & set(NO_TORCH) and {"onnxruntime", "numpy", "pillow", "bentoml"} <= names
    assert not (built.bento / "src" / "training").exists() and (built.bento / "src" / "serving" / "bento.py").is_file()
    model = built.bentoml / "models" / NAME / built.tag.split(":")[1]
    assert {p.name for p in (model / "export" / "onnx").iterdir()} == set(bento.BUNDLE_FILES)
    assert (model / "config.json").is_file() and (model / "README.md").is_file()
    assert not list(model.rglob("*.safetensors"))  # onnx-only: no weights
    assert json.loads((model / "export" / "onnx" / "export.json").read_text())["sha256"] == built.receipt["sha256"]


@contextlib.contextmanager
def _bentoml_serve(tag: str, env: dict[str, str], cwd: Path, log: Path):
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([BENTOML, "serve", tag, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"bentoml serve exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready after 240 s:\n{log.read_text()[-4000:]}"
            try:
                listing = httpx.get(f"{url}/models", timeout=5).json()
            except (httpx.HTTPError, json.JSONDecodeError):
                listing = {"status": "starting"}
            assert listing["status"] != "failed", listing
            if listing["status"] == "ready":
                break
            time.sleep(0.5)
        yield url, listing
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_bento_serves_without_zoo_home_medmnist_or_torch(built, tmp_path):
    """The bento exported to one archive and imported into an empty BentoML home, served from an empty
    ZOO_HOME with MEDMNIST_ROOT unset and torch (and timm, transformers, torchvision) unimportable."""
    archive = tmp_path / "medzoo.bento"
    _run([BENTOML, "export", "medzoo:test", str(archive)], built.env)
    fresh = tmp_path / "bentoml"
    blocker, blocked = tmp_path / "block", tmp_path / "blocked.log"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    empty = tmp_path / "empty_zoo_home"
    empty.mkdir()
    env = _env(BENTOML_HOME=str(fresh), ZOO_HOME=str(empty), MEDMNIST_ROOT=None, PYTHONPATH=str(blocker),
               BLOCKED_LOG=str(blocked))
    _run([BENTOML, "import", str(archive)], env, cwd=tmp_path)
    assert (fresh / "models" / NAME).is_dir()  # the archive brought the model with it
    r = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "blocked by the test" in r.stderr  # the blocker works in child processes
    blocked.unlink()

    model = load(built.home / NAME)
    images = load_split("breastmnist", "test").images[:6, 0].numpy()
    rng = np.random.default_rng(0)
    uploads = [*images, rng.integers(0, 256, (90, 70), dtype=np.uint8)]  # one the service resizes
    want = model.predict([Image.fromarray(a) for a in uploads])
    with _bentoml_serve("medzoo:test", env, tmp_path, tmp_path / "serve.log") as (url, listing):
        (m,) = listing["models"]
        assert m["name"] == NAME and m["format"] == "onnx" and m["localization"] == "cam"
        assert listing["backend"] == "onnx"
        for i, a in enumerate(uploads):
            r = httpx.post(f"{url}/classify", content=png(a), timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == NAME and body["label"] == want.labels[i]
            np.testing.assert_allclose(list(body["probabilities"].values()), want.probs[i], atol=1e-4)
        loc = httpx.post(f"{url}/localize", content=png(images[0]), timeout=60)
        assert loc.status_code == 200 and loc.json()["map_kind"] == "cam" and loc.json()["overlay_size"] == [224, 224]
    assert not blocked.exists() or blocked.read_text() == ""  # nothing even tried to import torch
    assert not any(empty.iterdir())  # nothing was exported or written into the zoo store


def test_bentoml_build_with_the_models_named(built, tmp_path):
    """``--models-only`` saves (here: finds) the models; ``bentoml build --arg models=TAG`` with bentofile.yaml
    then packs them, because the service declares tag-form names as its models."""
    r = _run([sys.executable, "-m", "serving.bento", NAME, "--models-only"], built.env)
    assert f"bentoml build --arg models={built.tag} --arg format=onnx" in r.stdout
    _run([BENTOML, "build", "--output", "tag", "--version", "named", "--arg", f"models={built.tag}"], built.env)
    info = yaml.safe_load((built.bentoml / "bentos" / "medzoo" / "named" / "bento.yaml").read_text())
    assert built.tag in {m["tag"] for s in info["services"] for m in s["models"]}
    assert info["args"]["models"] == built.tag


def test_with_torch_models_carry_the_weights_for_the_torch_backend(built, tmp_path):
    r = _run([sys.executable, "-m", "serving.bento", NAME, "--with-torch", "--models-only"], built.env)
    tag = f"{built.tag}-torch"
    assert f"models={tag}" in r.stdout
    weights = list((built.bentoml / "models" / NAME / tag.split(":")[1]).rglob("*.safetensors"))
    assert [p.name for p in weights] == ["model.safetensors"]
    a = load_split("breastmnist", "test").images[0, 0].numpy()
    np.save(tmp_path / "a.npy", a)
    code = (f"import json, numpy as np; from PIL import Image; from serving.runtime import load_model; "
            f"from serving.inputs import DecodedImage; m = load_model({tag!r}, 'torch', 1); "
            f"out = m.infer(m.prepare(DecodedImage('png', Image.fromarray(np.load({str(tmp_path / 'a.npy')!r})), "
            f"28, 28)).x[None])[0]; print(json.dumps([m.backend, out.label, out.probs.tolist()]))")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run([sys.executable, "-c", code], {**built.env, "ZOO_HOME": str(empty), "MEDMNIST_ROOT": str(empty)})
    backend, label, probs = json.loads(r.stdout.strip().splitlines()[-1])
    want = load(built.home / NAME).predict(Image.fromarray(a))
    assert backend == "torch" and label == want.labels[0]
    np.testing.assert_allclose(probs, want.probs[0], atol=1e-5)


def test_requirements_with_and_without_torch():
    import tomllib

    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert bento.requirements(onnx_only=False) == pins
    slim = bento.requirements(onnx_only=True)
    assert set(slim) <= set(pins) and {bento._dist(r) for r in slim} == set(bento.ONNX_ONLY_PACKAGES)
    assert not {bento._dist(r) for r in slim} & set(bento.TORCH_PACKAGES)


def test_usage_errors_are_one_line_with_status_2(built_resnet18_breast, capsys):
    install(built_resnet18_breast)
    cases = [([NAME, "--backend", "torch", "--onnx-only"], "--backend torch needs torch in the bento"),
             ([NAME, "--backend", "torch", "--with-torch", "--format", "onnx-int8"], "serves fp32 only"),
             ([NAME, "--tag", "Medzoo:Bad Tag"], "is not a BentoML tag"),
             (["baseline-resnet18-nosuchmnist"], "baseline-resnet18-nosuchmnist"),
             (["baseline-resnet18-dermamnist"], "not built; build it with `zoo build baseline-resnet18-dermamnist`"),
             ([f"{NAME}:onnx-0123"], "is a BentoML model tag")]
    for argv, words in cases:
        assert bento._main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("bento: error: ") and err.count("\n") == 1 and words in err, (argv, err)


def _docker_works() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "docker is not installed"
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"docker info failed: {e}"
    ok = r.returncode == 0 and "Cannot connect" not in r.stdout + r.stderr
    return ok, "" if ok else f"docker info: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"


DOCKER, DOCKER_WHY = _docker_works()


@pytest.mark.slow
@pytest.mark.skipif(not DOCKER, reason=f"no Docker daemon here ({DOCKER_WHY}); `bentoml containerize` needs one")
def test_bentoml_containerize(built):
    r = _run([BENTOML, "containerize", "medzoo:test", "-t", "medzoo:test"], built.env, timeout=3600)
    assert "medzoo:test" in r.stdout + r.stderr
