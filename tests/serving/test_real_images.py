"""Real BreastMNIST test images through a real server (torch backend): every classify and localize answer
carries the label ``zoo.load(...).predict`` gives for the same image."""

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

    from training.build import train_config

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
