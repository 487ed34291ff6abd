"""Real BreastMNIST: build a zoo entry, then load and predict it in a fresh process; the figures must
equal the card's and medmnist's own Evaluator."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import OFFLINE_ENV, REPO, THREADS_ENV

REAL_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "medmnist"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (REAL_ROOT / "breastmnist.npz").is_file(),
                       reason=f"real MedMNIST data not found at {REAL_ROOT / 'breastmnist.npz'}"),
]

FRESH = textwrap.dedent("""
    import sys, numpy as np, zoo
    model = zoo.load("baseline-resnet18-breastmnist")
    test = np.load(sys.argv[1] + "/breastmnist.npz")
    np.save(sys.argv[2], model.predict(test["test_images"]).probs)
""")


def test_build_then_predict_in_fresh_process(monkeypatch, tmp_path):
    import os

    from medmnist import Evaluator

    import zoo

    monkeypatch.setenv("MEDMNIST_ROOT", str(REAL_ROOT))
    d = zoo.build("baseline-resnet18-breastmnist",
                  ["train.epochs=2", "train.progress=false", "data.download=false"], progress=False)
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["epochs"] == 2

    scores = tmp_path / "probs.npy"
    env = {**os.environ, **OFFLINE_ENV, **THREADS_ENV}
    r = subprocess.run([sys.executable, "-c", FRESH, str(REAL_ROOT), str(scores)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    probs = np.load(scores)
    assert probs.shape == (156, 2)  # BreastMNIST test split

    from zoo.metrics import compute_metrics

    labels = np.load(REAL_ROOT / "breastmnist.npz")["test_labels"]
    ours = compute_metrics(labels, probs, "binary-class")
    assert ours["acc"] == metrics["test"]["acc"]
    assert abs(ours["auc"] - metrics["test"]["auc"]) <= 1e-12
    ref = Evaluator("breastmnist", "test", root=str(REAL_ROOT)).evaluate(probs)
    assert ref.ACC == metrics["test"]["acc"]
    assert abs(ref.AUC - metrics["test"]["auc"]) <= 1e-12
    assert metrics["test"]["auc"] > 0.5  # two epochs learn something on the real data
