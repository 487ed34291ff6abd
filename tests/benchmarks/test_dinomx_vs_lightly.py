"""benchmarks/dinomx_vs_lightly.py on a tiny configuration: structure and real numbers, no timing claims."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lightly")

from benchmarks import dinomx_vs_lightly as bench  # noqa: E402

TINY_HEAD = ["head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16"]


def test_tiny_run_writes_rows_and_ratios(tmp_path):
    out = tmp_path / "vs_lightly"
    res = bench.main(["--backbone", "vit-test", "--data", "random", "--images", "16", "--batch", "8", "--steps", "2",
                      "--warmup", "1", "--dinov2", "--lightly-fused", "--stream", "--amp", "none", "bf16",
                      "--out", str(out),
                      *TINY_HEAD])
    assert [r["precision"] for r in res["runs"]] == ["none", "bf16"]
    assert [r["autocast_dtype"] for r in res["runs"]] == ["float32", "torch.bfloat16"]
    for r in res["runs"]:
        sides = [row["side"] for row in r["rows"]]
        stream = ["dinomx (DINO preset, bf16 stream)"] if r["precision"] == "bf16" else []  # bf16 runs only
        assert sides == ["dinomx (DINO preset)", *stream, "lightly DINO", "lightly DINO (fused backbone)",
                         "dinomx (DINOv2 preset)"]
        for row in r["rows"]:
            assert len(row["step_times_s"]) == 2
            assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
            assert row["student_parameters"]["trainable"] > 0
        assert set(r["ratio_images_per_s"]) == {f"{s} / lightly DINO" for s in sides if s != "lightly DINO"}
        assert all(math.isfinite(v) and v > 0 for v in r["ratio_images_per_s"].values())
        # Same backbone and head sizes on both DINO sides: the same number of trainable parameters.
        assert r["same_trainable_parameters"] is True
        assert r["crops"] == {"global": [2, 28], "local": [6, 12]}
        assert r["target"]["best_side"] in ("dinomx (DINO preset)", *stream)
        assert isinstance(r["target"]["met"], bool)
        assert r["target"]["autocast_only"]["best_side"] == "dinomx (DINO preset)"
    assert json.loads(out.with_suffix(".json").read_text())["runs"][0]["rows"][1]["side"] == "lightly DINO"
    md = out.with_suffix(".md").read_text()
    assert "| lightly DINO |" in md and "excluded from both" in md and "**float32**" in md and "bfloat16" in md
    assert "Target >= 1.5x" in md


def test_lightly_step_trains_on_given_crops():
    import torch

    from training.config import load_config
    from training.dinomx.crops import CropConfig, MultiCrop

    cfg = load_config("dinomx/dino.yaml", ["model.backbone=vit-test", "optim.amp=none", *TINY_HEAD])
    lt = bench.LightlyTrainer(cfg, in_chans=3, total=3, device=torch.device("cpu"))
    crops = MultiCrop(CropConfig(local_number=2))(torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8),
                                                   torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in lt.model.teacher_backbone.parameters()]
    losses = [lt.train_step(s, crops) for s in range(3)]
    assert all(math.isfinite(v) for v in losses)
    # The EMA teacher moved (momentum < 1 before the last step) and never receives gradients.
    after = list(lt.model.teacher_backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(not p.requires_grad for p in after)
