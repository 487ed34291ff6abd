"""benchmarks/dinomx_strategies.py on a tiny backbone: parameter counts, memory and times are real numbers."""

from __future__ import annotations

import math

import pytest

from benchmarks import dinomx_strategies as bench

TINY = ["--backbone", "vit-test", "--data", "random", "--images", "16", "--batch", "8", "--steps", "2",
        "--freeze-blocks", "1", "--lora-r", "2", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16"]


def _worker(strategy: str) -> dict:
    return bench.worker(bench.parser().parse_args([*TINY, "--worker", strategy]))


def test_strategies_in_process_and_summary():
    rows = [_worker(s) for s in bench.STRATEGIES]
    by = {r["strategy"]: r for r in rows}
    for r in rows:
        assert 0 < r["backbone_trainable"] <= r["backbone_total"]
        assert r["student_trainable"] > r["backbone_trainable"]  # the heads train in every run
        assert r["heads_trainable"] == by["full"]["heads_trainable"]
        assert math.isfinite(r["peak_memory_mb"]) and r["peak_memory_mb"] > 0
        assert math.isfinite(r["median_step_s"]) and r["median_step_s"] > 0
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
    assert by["full"]["backbone_trainable"] == by["full"]["backbone_total"]
    assert by["lora"]["backbone_trainable"] < by["freeze"]["backbone_trainable"] < by["full"]["backbone_trainable"]
    extra = bench.summarise(rows, min_ratio=10.0)
    check = extra["lora_check"]
    assert check["backbone_trainable_full_over_lora"] == by["lora"]["fewer_backbone_trainable_than_full"]
    assert check["passed"] is (check["backbone_trainable_full_over_lora"] >= 10.0)
    md = bench.markdown({"backbone": "vit-test", "preset": "default", "batch": 8, "steps": 2, "threads": 1,
                         "rows": rows, **extra})
    assert md.count("\n| ") >= 4 and "LoRA check" in md


def test_strategy_overrides():
    assert bench.strategy_overrides("full", 3, 8) == []
    assert "strategy.lora.enabled=true" in bench.strategy_overrides("lora", 3, 8)
    assert bench.strategy_overrides("freeze", 3, 8) == ["strategy.freeze.blocks=3", "strategy.freeze.patch_embed=true"]
    with pytest.raises(ValueError):
        bench.strategy_overrides("prune", 3, 8)


@pytest.mark.slow
def test_one_strategy_in_a_subprocess():
    r = bench.run_strategy("freeze", bench.parser().parse_args(TINY))
    assert r["strategy"] == "freeze" and r["backbone_trainable"] < r["backbone_total"]
    assert r["peak_memory_mb"] >= r["start_rss_mb"] > 0
