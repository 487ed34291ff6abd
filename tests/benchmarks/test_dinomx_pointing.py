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


def test_tiny_end_to_end(tmp_path):
    out = tmp_path / "pointing"
    r = bench.main(["--train", "48", "--test", "16", "--seeds", "0", "--steps", "2", "--batch", "16", "--width", "32",
                    "--depth", "2", "--heads", "2", "--out-dim", "64", "--hidden-dim", "32", "--presets", "dino",
                    "dinov2", "--out", str(out)])
    assert list(r["presets"]) == ["dino", "dinov2"]
    assert 0.0 <= r["random_init"]["per_seed"]["0"] <= 1.0
    for preset, x in r["presets"].items():
        (row,) = x["seeds"]
        for key in ("without", "with"):
            assert 0.0 <= row[key] <= 1.0
            assert math.isfinite(x["summary"][key]["mean"])
            assert math.isfinite(row[f"{key}_losses"]["last"]["dino"])
        assert row["only_with"] + row["only_without"] <= 16
        assert x["pretraining"]["crops"]["label_guided"] == 0.0  # the config of the unguided run
        assert x["pretraining"]["loss_weights"]["ibot"] == (1.0 if preset == "dinov2" else 0.0)
    assert r["budget"]["only_difference"] == {"crops.label_guided": [0.0, 0.5]}
    assert 0 < r["chance"]["box_area_share"] < 1 and 0 <= r["contrast_baseline"] <= 1
    assert json.loads(out.with_suffix(".json").read_text())["presets"]["dino"]["seeds"][0]["seed"] == 0
    md = out.with_suffix(".md").read_text()
    assert "`dino`: label-guided crops 0.5" in md and "`dinov2`: no label-guided crops" in md
