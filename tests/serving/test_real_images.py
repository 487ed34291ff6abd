"""Real BreastMNIST test images through a real server (torch backend): every classify and localize answer
carries the label ``zoo.load(...).predict`` gives for the same image. The INT8 bundle served with
``--precision int8`` answers as that bundle does when run directly."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import Server, ok, png

from zoo.api import load

_env_root = Path(os.environ.get("MEDMNIST_ROOT", "/nonexistent"))
REAL_ROOT = _env_root if (_env_root / "breastmnist.npz").is_file() else \
    Path(__file__).resolve().parents[2].parent / "shared" / "medmnist"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (REAL_ROOT / "breastmnist.npz").is_file(),
                       reason=f"real MedMNIST data not found at {REAL_ROOT / 'breastmnist.npz'} (set MEDMNIST_ROOT)"),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny student trained for two epochs on the real BreastMNIST, served with the torch backend."""
    from conftest import tiny_overrides

    from training.entries import train_config

    root = tmp_path_factory.mktemp("real_serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDMNIST_ROOT", str(REAL_ROOT))
        run = train_config("medalmighty/default.yaml",
                           tiny_overrides("baseline", "breastmnist", root / "runs", f"data.root={REAL_ROOT}"),
                           progress=False)
    env = {"ZOO_HOME": str(root / "zoo_home"), "MEDMNIST_ROOT": str(REAL_ROOT), "BENTOML_HOME": str(root / "bml")}
    srv = Server([str(run)], env, root / "server.log", "--backend", "torch", "--threads", "1")
    try:
        srv.wait_ready()
        srv.run = str(run)
        yield srv, load(run)
    finally:
        srv.stop()


def test_real_test_images_classify_and_localize_like_predict(real):
    srv, model = real
    test = np.load(REAL_ROOT / "breastmnist.npz")
    images = test["test_images"]  # (156, 28, 28) uint8, the real split
    want = model.predict(images)
    bodies = [png(a) for a in images]

    def ask(i: int) -> tuple[dict, dict]:
        return (ok(srv.post("/classify", bodies[i])), ok(srv.post("/localize", bodies[i])))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(len(bodies))))
    assert len(answers) == 156
    for i, (c, loc) in enumerate(answers):
        assert c["label"] == loc["label"] == want.labels[i], i
        np.testing.assert_allclose(list(c["probabilities"].values()), want.probs[i], atol=1e-5)
        assert c["backend"].startswith("torch") and loc["map_kind"] == "cam"


def test_int8_bundle_serves_what_it_computes(real, tmp_path):
    """``--precision int8`` exports the static-QDQ bundle (calibrated on real training images) and serves it."""
    import torch

    from serving.runtime import OnnxRuntime, ensure_onnx
    from zoo.data import preprocess
    from zoo.inference import logits_to_probs

    srv, model = real
    env = {"ZOO_HOME": str(tmp_path / "zoo_home"), "MEDMNIST_ROOT": str(REAL_ROOT)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        bundle = ensure_onnx(srv.run, fmt="onnx-int8")
    assert bundle.name == "onnx-int8"
    images = np.load(REAL_ROOT / "breastmnist.npz")["test_images"][:48]
    x = preprocess(torch.from_numpy(images)[:, None], model.entry.preprocess).numpy()
    logits, cam = OnnxRuntime(bundle / "model.onnx", 1)(x)
    want = logits_to_probs(torch.from_numpy(logits), model.entry.task).numpy()
    assert cam is not None and cam.shape[0] == len(images)

    int8 = Server([srv.run], {**env, "BENTOML_HOME": str(tmp_path / "bml")}, tmp_path / "int8.log",
                  "--precision", "int8", "--threads", "1")
    try:
        listing = int8.wait_ready()
        assert listing["precision"] == "int8" and listing["models"][0]["precision"] == "int8"
        for i, a in enumerate(images):
            c = ok(int8.post("/classify", png(a)))
            np.testing.assert_allclose(list(c["probabilities"].values()), want[i], atol=1e-5)
        loc = ok(int8.post("/localize", png(images[0])))
        assert loc["map_kind"] == "cam" and loc["label"] == ok(int8.post("/classify", png(images[0])))["label"]
    finally:
        int8.stop()

