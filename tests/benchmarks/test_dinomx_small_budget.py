"""The small-budget benchmark reads each run's own collapse verdict, resumes finished runs, and writes its table."""

from __future__ import annotations

import json

from benchmarks import dinomx_small_budget as bench

TINY = ["model.backbone=vit-test", "optim.steps=4", "optim.batch_size=8", "data.max_images=32",
        "crops.local_number=2", "eval.knn_k=3"]


def test_rows_from_the_runs_metrics_and_resume(tmp_path, monkeypatch):
    out, work = tmp_path / "small", tmp_path / "work"
    r = bench.main(["--datasets", "breastmnist", "--work", str(work), "--out", str(out), *TINY])
    rows = {x["setting"]: x for x in r["rows"]}
    assert set(rows) == {"preset", "dino-defaults"}
    for setting, x in rows.items():
        m = json.loads((work / f"demo-{setting}-breastmnist" / "metrics.json").read_text())
        assert x["verdict"] == m["collapse"]["verdict"] and x["dino_final"] == m["collapse"]["final"]["dino"]
        assert x["steps"] == 4 and 0 < x["majority_rate"] < 1
    # The two settings differ in the head: ln K is that of each run's prototypes.
    assert rows["preset"]["ln_k"] < rows["dino-defaults"]["ln_k"] == round(__import__("math").log(4096), 4)
    md = out.with_suffix(".md").read_text()
    assert "| breastmnist | preset (`dinomx/demo.yaml`) | 4 |" in md and "head.out_dim=4096" in md

    def no_training(*a, **k):
        raise AssertionError("both runs finished: they are read back, not trained again")

    monkeypatch.setattr("training.dinomx.recipe.pretrain_config", no_training)
    again = bench.main(["--datasets", "breastmnist", "--work", str(work), "--out", str(out), *TINY])
    assert again["rows"] == r["rows"]


def test_bf16_stream_setting_runs_the_preset_with_the_stream_on(tmp_path):
    out, work = tmp_path / "small", tmp_path / "work"
    r = bench.main(["--datasets", "breastmnist", "--settings", "bf16-stream", "--work", str(work), "--out", str(out),
                    *TINY])
    (row,) = r["rows"]
    assert row["setting"] == "bf16-stream" and "optim.low_precision_stream=true" in row["overrides"]
    import yaml

    cfg = yaml.safe_load((work / "demo-bf16-stream-breastmnist" / "config.yaml").read_text())  # the resolved config
    assert cfg["optim"]["low_precision_stream"] is True and cfg["optim"]["amp"] == "bf16"
    assert "`bf16-stream`: the preset with `optim.amp=bf16`" in out.with_suffix(".md").read_text()
