"""benchmarks/dinomx_pointing.py: the synthetic task and a tiny end-to-end run (two 2-step pretrainings)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import dinomx_pointing as bench


@pytest.mark.parametrize("size", [28, 56])
def test_synthetic_images_and_boxes(size):
    x, boxes = bench.synthetic(16, size, seed=3)
    assert x.shape == (16, 1, size, size) and x.dtype == torch.uint8
    assert boxes.shape == (16, 4) and boxes.dtype == torch.float32
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= size).all() and (boxes[:, 3] <= size).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # Pixels in the lesion's box deviate from the background level more than background pixels do.
    for img, (x0, y0, x1, y1) in zip(x[:, 0].float(), boxes.int().tolist()):
        outside = torch.ones_like(img, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        level = img[outside].median()
        assert (img[y0:y1, x0:x1] - level).abs().mean() > (img[outside] - level).abs().mean()
    again, _ = bench.synthetic(16, size, seed=3)
    assert torch.equal(x, again)


def test_chance_and_contrast_maps():
    boxes = torch.tensor([[0.0, 0.0, 14.0, 14.0], [0.0, 0.0, 28.0, 28.0]])
    c = bench.chance(boxes, 28, 7)
    assert c["box_area_share"] == pytest.approx((0.25 + 1.0) / 2)
    # Cell centres lie at 2, 6, 10, ... px; [0, 14) holds three per axis (14 itself is outside, half-open).
    assert c["cell_centre_share"] == pytest.approx((9 / 49 + 1.0) / 2, abs=1e-4)
    img = torch.full((1, 1, 28, 28), 100, dtype=torch.uint8)
    img[0, 0, 20:24, 4:8] = 250
    m = bench.contrast_maps(img, 7)
    assert m.shape == (1, 7, 7) and int(m[0].argmax()) == 5 * 7 + 1
    assert bench.hits(m, torch.tensor([[4.0, 20.0, 8.0, 24.0]]), 28).tolist() == [True]


TINY = ["--train", "48", "--val", "16", "--test", "16", "--seeds", "0", "1", "--steps", "4", "--warmup-steps", "2",
        "--batch", "16", "--width", "32", "--depth", "2", "--heads", "2", "--out-dim", "64", "--hidden-dim", "32"]


def test_tiny_end_to_end(tmp_path, monkeypatch):
    """Two seeds of warm-up + two branched arms; one seed's runs are declared collapsed: it gives no number."""
    real_live = bench.live

    def live(pt):  # seed 1's runs are declared collapsed: that seed must report no conclusion
        out = real_live(pt)
        return {**out, "alive": pt.cfg.seed != 1, "verdict": out["verdict"] if pt.cfg.seed != 1 else "collapsed"}

    monkeypatch.setattr(bench, "live", live)
    out = tmp_path / "pointing"
    r = bench.main([*TINY, "--out", str(out)])
    rows = {row["seed"]: row for row in r["seeds"]}
    assert r["live_seeds"] == [0] and rows[1]["difference"] is None and not rows[1]["alive"]
    row = rows[0]
    for key in ("random_init", "warmup", "without", "with"):
        for m in bench.METRICS:
            assert 0.0 <= row[key][m] <= 1.0, (key, m)
        assert 0 <= row[key]["best_head"] < 2
    for key in ("without", "with"):
        assert math.isfinite(row[key]["final"]["dino"]) and row[key]["alive"]
    assert row["difference"]["pointing"] == pytest.approx(row["with"]["pointing"] - row["without"]["pointing"],
                                                          abs=1e-4)
    assert row["only_with"] + row["only_without"] <= 16
    assert r["effect"]["pointing"]["n"] == 1 and "No conclusion" in r["conclusion"]  # one live seed: no interval
    assert r["budget"]["only_difference"] == {"crops.label_guided": [0.0, 0.5]}
    assert 0 < r["chance"]["box_area_share"] < 1 and 0 <= r["contrast_baseline"]["pointing"] <= 1
    assert json.loads(out.with_suffix(".json").read_text())["seeds"][0]["seed"] == 0
    md = out.with_suffix(".md").read_text()
    assert "label-guided crops 0.5" in md and "no conclusion" in md and "| 1 | no |" in md

    # Each finished seed was kept: a rerun (a stopped session resumed, one more seed) trains nothing it has.
    def no_training(*args, **kwargs):
        raise AssertionError("seed 0 and 1 are done; nothing may train again")

    monkeypatch.setattr(bench, "run_seed", no_training)
    again = bench.main([*TINY, "--out", str(out)])
    assert again["seeds"] == r["seeds"] and again["effect"] == r["effect"]


def test_both_arms_branch_from_the_warm_up_checkpoint(tmp_path):
    """The arms start from the warm-up's state: same step, same teacher, same optimizer state."""
    from training.dinomx.data import PretrainData
    from training.dinomx.recipe import Pretraining

    a = bench.parser().parse_args(TINY)
    x, boxes = bench.synthetic(48, 28, seed=1)
    init = bench.random_backbone(tmp_path / "init", 28, 32, 2, 2, 4, seed=0)
    warm = Pretraining(bench.run_config(init, 0.0, 0, a), PretrainData(x, boxes))
    warm.fit(None, progress=False, stop_after=2)
    warm.save_checkpoint(tmp_path / "warm")
    arm = Pretraining(bench.run_config(init, 0.5, 0, a), PretrainData(x, boxes))
    arm.branch(tmp_path / "warm" / "last.pt", {"crops.label_guided": 0.0})
    assert arm.state.step == 2 and arm.history == warm.history
    for k, v in warm.teacher.state_dict().items():
        assert torch.equal(arm.teacher.state_dict()[k], v), k
    from training.config import ConfigError

    other = Pretraining(bench.run_config(init, 0.5, 1, a), PretrainData(x, boxes))  # another seed: refused
    with pytest.raises(ConfigError, match="not written by this config"):
        other.branch(tmp_path / "warm" / "last.pt", {"crops.label_guided": 0.0})


def test_paired_interval():
    e = bench.paired([0.1, 0.2, 0.0, 0.3])
    assert e["n"] == 4 and e["mean"] == pytest.approx(0.15) and e["positive"] == 3 and e["zero"] == 1
    lo, hi = e["t_ci"]
    assert lo < 0.15 < hi and hi - 0.15 == pytest.approx(0.15 - lo, abs=1e-4)
    assert e["bootstrap_ci"][0] <= 0.15 <= e["bootstrap_ci"][1]
    assert bench.paired([])["n"] == 0 and "t_ci" not in bench.paired([0.2])


def test_box_iou():
    m = torch.zeros(1, 7, 7)
    m[0, 1:3, 2:4] = 1.0  # cells (rows 1-2, cols 2-3): pixels y 4..12, x 8..16 at 28 px
    iou = bench.box_iou(m, torch.tensor([[8.0, 4.0, 16.0, 12.0]]), 28)
    assert 0.3 < iou[0] <= 1.0  # bilinear upsampling widens the thresholded box a little
    far = bench.box_iou(m, torch.tensor([[20.0, 20.0, 28.0, 28.0]]), 28)
    assert far[0] == 0.0
