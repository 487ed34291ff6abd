"""DINO-MX end to end on tiny configs: zoo pretrain, presets, zoo entries, teachers, distillation, HF export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import OFFLINE_ENV, THREADS_ENV

from training.config import ConfigError, load_config
from training.dinomx.data import PretrainData
from training.dinomx.recipe import Pretraining, run

TINY = ["model.backbone=vit-test", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "optim.batch_size=8", "optim.steps=4", "crops.local_number=2", "log.progress=false", "log.every=1",
        "eval.linear_epochs=2", "data.download=false", "data.datasets=[breastmnist]", "checkpoint.every=2"]


def tiny_cfg(*extra: str, preset: str = "dinomx/default.yaml") -> dict:
    return load_config(preset, overrides=TINY + list(extra))


@pytest.mark.parametrize("preset", ["dinomx/dino.yaml", "dinomx/dinov2.yaml", "dinomx/dinov3.yaml"])
def test_presets_train_with_their_losses(preset, tmp_path):
    cfg = tiny_cfg(preset=preset)
    pt = Pretraining(cfg)
    pt.fit(tmp_path / "ckpt", progress=False)
    keys = set().union(*(h.keys() for h in pt.history))
    assert "dino" in keys
    assert ("ibot" in keys) == (preset != "dinomx/dino.yaml")
    assert ("koleo" in keys) == (preset != "dinomx/dino.yaml")
    assert ("gram" in keys) == (preset == "dinomx/dinov3.yaml")  # anchor taken half-way (gram.start=0.5)
    assert all(np.isfinite(h["loss"]) for h in pt.history)
    assert pt.history[0]["teacher_temp"] == pytest.approx(0.04)


def test_ema_teacher_follows_the_student_with_the_momentum(tmp_path):
    cfg = tiny_cfg("optim.steps=1", "optim.momentum_teacher=0.5", "optim.momentum_teacher_end=0.5")
    pt = Pretraining(cfg)
    before_t = {k: v.clone() for k, v in pt.teacher.state_dict().items()}
    pt.fit(None, progress=False, stop_after=1)  # one step (there is no train_step any more)
    s, t = pt.student.state_dict(), pt.teacher.state_dict()
    name = "encoder.model.encoder.layer.0.attention.q_proj.weight"
    name = name if name in s else next(k for k in s if k.endswith("weight") and "layer.0" in k)
    assert torch.allclose(t[name], 0.5 * before_t[name] + 0.5 * s[name], atol=1e-6)
    assert not any(p.requires_grad for p in pt.teacher.parameters())


def test_low_precision_stream_runs_student_and_teacher_in_bf16_only_under_bf16(tmp_path):
    on = Pretraining(tiny_cfg("optim.amp=bf16", "optim.low_precision_stream=true"))
    assert on.task.student.stream_dtype == torch.bfloat16 and on.task.teacher.stream_dtype == torch.bfloat16
    on.fit(None, progress=False, stop_after=2)
    assert all(np.isfinite(h["loss"]) for h in on.history)
    assert all(p.dtype == torch.float32 for p in on.student.parameters())  # master weights stay float32
    off = Pretraining(tiny_cfg("optim.amp=none", "optim.low_precision_stream=true"))
    assert off.task.student.stream_dtype is None  # nothing to keep in low precision without autocast


def test_unknown_keys_and_small_data_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown config key"):
        tiny_cfg("optim.learning_rate=1")
    with pytest.raises(ConfigError, match="fewer than optim.batch_size"):
        Pretraining(tiny_cfg("optim.batch_size=512"))
    with pytest.raises(ValueError, match="centering"):
        Pretraining(tiny_cfg("dino.centering=mean"))


def test_zoo_pretrain_writes_a_backbone_that_plain_transformers_loads(tmp_path):
    from zoo.cli import main

    rc = main(["pretrain", "dinomx/default.yaml", *TINY, f"output_dir={tmp_path}", "run_name=tiny", "--quiet"])
    assert rc == 0
    d = tmp_path / "tiny"
    m = json.loads((d / "metrics.json").read_text())
    assert set(m["knn"]["breastmnist"]) == {"val", "test"} and 0 <= m["knn"]["breastmnist"]["test"]["acc"] <= 1
    assert m["linear"]["breastmnist"]["test"]["auc"] is not None
    assert m["report"]["steps"] == 4 and m["report"]["parameters"]["backbone_trainable"] > 0
    assert (d / "config.yaml").is_file() and (d / "README.md").is_file()
    assert (d / "checkpoints" / "last.pt").is_file()

    # features through the project's own loader ...
    from zoo.api import load_backbone

    bb, prep = load_backbone(d / "backbone")
    assert prep.in_chans == 1 and prep.mean == (0.5,)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        want = bb.model(pixel_values=x).last_hidden_state.numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    # ... equal those of a process that never imports the project
    script = (
        "import sys, numpy as np, torch\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(d / 'backbone')!r}).eval()\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        "    y = m(pixel_values=x).last_hidden_state.numpy()\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        "bad = [n for n in ('zoo', 'training', 'export', 'serving') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**OFFLINE_ENV, **THREADS_ENV, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.allclose(np.load(tmp_path / "y.npy"), want, atol=1e-5)

    # rerunning the same finished command resumes at the end: no training, same weights
    before = (d / "backbone" / "model.safetensors").read_bytes()
    assert main(["pretrain", "dinomx/default.yaml", *TINY, f"output_dir={tmp_path}", "run_name=tiny", "--quiet"]) == 0
    assert (d / "backbone" / "model.safetensors").read_bytes() == before


def test_dinomx_entry_builds_and_teaches_a_medalmighty_student(tmp_path):
    from training.entries import train_config
    from zoo.api import build, load, load_backbone
    from zoo.registry import get_entry

    name = "dinomx-vit-mini-p4-breastmnist"
    e = get_entry(name)
    assert e.method == "dinomx" and e.in_chans == 1
    ov = ["head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "optim.batch_size=8", "optim.steps=2",
          "crops.local_number=1", "log.progress=false", "eval.linear=false", "data.download=false"]
    d = build(name, ov, progress=False)
    assert (d / "backbone" / "config.json").is_file() and json.loads((d / "config.json").read_text())["entry"]
    # backbone/ keeps the grey model; hf/ is its 3-channel fold for transformers' pipelines (write_native)
    assert json.loads((d / "hf" / "config.json").read_text())["num_channels"] == 3
    assert json.loads((d / "backbone" / "preprocessor_config.json").read_text())["image_mean"] == [0.5]
    with pytest.raises(ValueError, match="pretrained backbone, not a classifier"):
        load(name)
    bb, prep = load_backbone(name)
    assert bb.in_chans == 1 and prep.input_size == 28
    with pytest.raises(ConfigError, match="vit-mini-p4 backbone"):
        build(name, ov + ["model.backbone=vit-test"], progress=False)

    run_dir = train_config("medalmighty/default.yaml", [
        "method=medalmighty", "data.dataset=breastmnist", "model.arch=resnet-test", "train.epochs=1",
        "train.progress=false", "probe.epochs=2", "data.download=false", f"teacher.backbone={name}",
        f"output_dir={tmp_path}"], progress=False)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["lineage"]["teacher_backbone"] == name
    m = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= m["teacher"]["test"]["acc"] <= 1


def test_distillation_from_a_dinomx_teacher_and_from_a_plain_hf_backbone(tmp_path, tiny_teacher_dir):
    teacher_cfg = tiny_cfg("model.backbone=vitreg-test", "eval.linear=false")
    run(teacher_cfg, tmp_path / "teacher", tmp_path / "teacher" / "ckpt", progress=False)

    cfg = tiny_cfg(f"strategy.distill.teacher={tmp_path / 'teacher'}", "optim.steps=2")
    pt = Pretraining(cfg)
    assert pt.distill_mode == "dino"  # the teacher has DINO-MX heads: DINOv2-style distillation
    frozen = {k: v.clone() for k, v in pt.teacher.state_dict().items()}
    pt.fit(None, progress=False)
    assert all(torch.equal(frozen[k], v) for k, v in pt.teacher.state_dict().items())  # never updated
    assert "dino" in pt.history[-1]

    # a plain transformers backbone (no heads, 3 channels, patch 7): feature distillation through a projector
    cfg = tiny_cfg(f"strategy.distill.teacher={tiny_teacher_dir}", "optim.steps=2", "crops.global_size=28",
                   "crops.local_size=14")
    pt = Pretraining(cfg)
    assert pt.distill_mode == "feature" and pt.student.projector is not None
    pt.fit(None, progress=False)
    assert np.isfinite(pt.history[-1]["distill"])
    with pytest.raises(ConfigError, match="needs a teacher with DINO-MX heads"):
        Pretraining(tiny_cfg(f"strategy.distill.teacher={tiny_teacher_dir}", "strategy.distill.loss=dino"))


def test_lora_and_frozen_runs_report_trainable_parameters(tmp_path):
    full = Pretraining(tiny_cfg()).params
    lora = Pretraining(tiny_cfg("strategy.lora.enabled=true", "strategy.lora.r=2")).params
    frozen = Pretraining(tiny_cfg("strategy.freeze.blocks=1", "strategy.freeze.patch_embed=true")).params
    assert full["backbone_trainable"] == full["backbone_total"]
    assert lora["backbone_trainable"] * 10 <= full["backbone_trainable"]
    assert 0 < frozen["backbone_trainable"] < full["backbone_trainable"]
    pt = Pretraining(tiny_cfg("strategy.lora.enabled=true", "strategy.lora.r=2", "optim.steps=2"))
    pt.fit(None, progress=False)
    out = pt.save_outputs(tmp_path)  # adapters merged: a plain transformers model comes out
    from transformers import AutoModel

    m = AutoModel.from_pretrained(tmp_path / "backbone")
    assert not any("lora" in n for n, _ in m.named_parameters()) and out["in_chans"] == 1


def test_label_guided_regions_from_a_file(tmp_path):
    from zoo.data import load_split

    n = len(load_split("breastmnist", "train"))
    boxes = np.full((n, 4), np.nan, dtype=np.float32)
    boxes[::2] = [4, 4, 12, 12]
    np.save(tmp_path / "boxes.npy", boxes)
    pt = Pretraining(tiny_cfg(f"data.regions={tmp_path / 'boxes.npy'}", "crops.label_guided=1.0", "optim.steps=1"))
    assert pt.data.regions is not None and pt.data.regions.shape == (n, 4)
    pt.fit(None, progress=False)
    np.save(tmp_path / "bad.npy", boxes[:10])
    with pytest.raises(ConfigError, match="must hold an"):
        Pretraining(tiny_cfg(f"data.regions={tmp_path / 'bad.npy'}"))


def test_pretraining_on_given_images_with_rgb_data():
    imgs = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8)
    pt = Pretraining(tiny_cfg("optim.steps=2", "model.backbone=dinov3-test"), data=PretrainData(imgs))
    assert pt.in_chans == 3
    pt.fit(None, progress=False)
    assert len(pt.history) == 2


def test_pretrain_entries_exist_for_every_dataset():
    from zoo.data import datasets_2d
    from zoo.registry import list_models

    names = list_models("dinomx-*")
    assert len(names) == len(datasets_2d())


def test_zoo_train_with_a_dinomx_config_pretrains(tmp_path, capsys):
    from zoo.cli import main

    assert main(["train", "dinomx/dino.yaml", *TINY, "optim.steps=2", "eval.linear=false", f"output_dir={tmp_path}",
                 "--quiet"]) == 0
    assert "kNN test acc" in capsys.readouterr().out
    assert (tmp_path / "dinomx-vit-test-breastmnist" / "backbone" / "config.json").is_file()


def test_every_run_logs_the_collapse_monitor_and_a_collapsing_run_warns(tmp_path, capsys):
    """A teacher at temperature 1 gives near-uniform targets: the DINO loss sits at ln K, the run says so once."""
    from zoo.cli import main

    common = [*TINY, "optim.steps=20", "log.every=2", "eval.linear=false", f"output_dir={tmp_path}", "--quiet"]
    assert main(["pretrain", "dinomx/default.yaml", *common, "run_name=flat", "dino.teacher_temp=1.0",
                 "dino.warmup_teacher_temp=1.0"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: DINO-MX collapse") == 1, err
    assert "ln K" in err and "optim.lr_scaling=linear" in err and "dino.teacher_temp" in err
    m = json.loads((tmp_path / "flat" / "metrics.json").read_text())
    c = m["collapse"]
    assert c["collapsed"] is True and "uniform" in c["reasons"] and c["first_warning_step"] is not None
    assert c["ln_k"] == pytest.approx(np.log(64), abs=1e-3) and c["dino_below_ln_k_share"] < 0.05
    assert c["advice"] and c["verdict"].startswith("collapsed")
    for row in m["history"]:  # the monitor's figures are in every logged row
        assert {"teacher_entropy", "student_entropy", "eff_prototypes", "bottleneck_cos", "cls_cos"} <= set(row)
        assert 0 <= row["teacher_entropy"] <= np.log(64) + 1e-4 and 1 <= row["eff_prototypes"] <= 64 + 1e-3
    assert m["history"][-1]["teacher_entropy"] > 0.95 * np.log(64)


def test_linear_lr_scaling_follows_the_batch():
    lin = Pretraining(tiny_cfg("optim.lr=4e-4", "optim.lr_scaling=linear", "optim.warmup=0"))
    assert lin.task.lr[0] == pytest.approx(4e-4 * 8 / 256)
    none = Pretraining(tiny_cfg("optim.lr=4e-4", "optim.lr_scaling=none", "optim.warmup=0"))
    assert none.task.lr[0] == pytest.approx(4e-4)
    from training.dinomx.config import parse

    with pytest.raises(ConfigError, match="lr_scaling"):
        parse(tiny_cfg("optim.lr_scaling=sqrt"))
