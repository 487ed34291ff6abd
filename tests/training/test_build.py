"""Recipes end to end: `zoo train` runs and `zoo build` entries, their files, lineage and atomicity."""

from __future__ import annotations

import datetime
import json
import re
import types

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, TASK_FLAG, install, tiny_overrides
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import zoo
from training import entries as E
from training.config import ConfigError, load_config
from training.medalmighty import recipe as R
from zoo import store
from zoo.backbones import ViTBackbone
from zoo.card import _f
from zoo.data import load_split
from zoo.inference import logits_to_probs
from zoo.metrics import compute_metrics
from zoo.models import state_dict_sha256
from zoo.registry import get_entry

FILES = {"model.safetensors", "config.json", "config.yaml", "metrics.json", "README.md"}


def _read(d):
    return json.loads((d / "config.json").read_text()), json.loads((d / "metrics.json").read_text())


@pytest.mark.parametrize("task", list(TASK_FLAG))
def test_run_folder_layout(tiny_runs, task):
    d = tiny_runs[task]
    flag = TASK_FLAG[task]
    assert re.fullmatch(rf"baseline-resnet-test-{flag}-\d{{8}}-\d{{6}}", d.name)
    assert FILES <= {p.name for p in d.iterdir()}
    cfg, metrics = _read(d)
    assert cfg["format"] == 1
    want = load_config("medalmighty/default.yaml", tiny_overrides("baseline", flag, d.parent))
    assert cfg["config"] == want
    assert cfg["sha256"] == {"model.safetensors": store.sha256_file(d / "model.safetensors")}
    e = cfg["entry"]
    assert (e["name"], e["method"], e["arch"], e["dataset"], e["task"]) == (
        f"baseline-resnet-test-{flag}", "baseline", "resnet-test", flag, task)
    assert e["in_chans"] == SYNTHETIC[flag][1] and e["mean"] == [0.5] * e["in_chans"]
    assert cfg["lineage"] == {} and e["teacher"] is None
    for split in ("val", "test"):
        assert set(metrics[split]) == {"acc", "auc"} and all(0 <= v <= 1 for v in metrics[split].values())
    assert metrics["seed"] == 0 and metrics["epochs"] == 2 and len(metrics["history"]) == 2
    assert metrics["best_epoch"] in (1, 2)
    assert metrics["val"]["auc"] == max(h["val_auc"] for h in metrics["history"])
    assert all(h["kd"] == 0 and h["loss"] == pytest.approx(h["task"]) for h in metrics["history"])  # no teacher
    card = ModelCard((d / "README.md").read_text()).text  # the body, after the Hub's front matter
    assert card.startswith(f"# baseline-resnet-test-{flag}\n")
    assert f"| test | {_f(metrics['test']['acc'])} | {_f(metrics['test']['auc'])} |" in card
    assert cfg["sha256"]["model.safetensors"] in card
    assert "Research use only" in card and e["license"] in card


@pytest.mark.parametrize("task", list(TASK_FLAG))
def test_medalmighty_run_with_tiny_teacher(tiny_teacher_dir, tmp_path, task):
    flag = TASK_FLAG[task]
    d = E.train_config("medalmighty/default.yaml", tiny_overrides(
        "medalmighty", flag, tmp_path, f"teacher.backbone={tiny_teacher_dir}", "probe.epochs=3", "train.epochs=1"),
        progress=False)
    cfg, metrics = _read(d)
    assert set(cfg["sha256"]) == {"model.safetensors", "teacher_head.safetensors"}
    lin = cfg["lineage"]
    backbone = ViTBackbone.from_pretrained(tiny_teacher_dir)
    assert lin["teacher_backbone"] == str(tiny_teacher_dir) == cfg["entry"]["teacher"]
    assert lin["teacher_sha256"] == state_dict_sha256(backbone)
    assert lin["pooling"] == "cls+mean" and lin["teacher_input_size"] == 28
    # The teacher's recorded metrics are those of its saved head on its backbone features.
    head = load_file(d / "teacher_head.safetensors")
    test = load_split(flag, "test")
    prep = zoo.data.Preprocess(28, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        logits = backbone(prep(test.images)) @ head["weight"].T + head["bias"]
    m = compute_metrics(test.labels.numpy(), logits_to_probs(logits, task).numpy(), task)
    assert m["acc"] == pytest.approx(metrics["teacher"]["test"]["acc"], abs=1 / 48 + 1e-9)
    assert m["auc"] == pytest.approx(metrics["teacher"]["test"]["auc"], abs=1e-4)
    # the student was distilled: the KD term is in its loss, weighted as configured
    for h in metrics["history"]:
        assert h["kd"] > 0
        assert h["loss"] == pytest.approx(0.2 * h["task"] + 0.8 * 4.0 * h["kd"], rel=1e-5)
    card = (d / "README.md").read_text()
    assert "## Lineage" in card and "Loss: 0.2 * task + (1 - 0.2) * 2.0^2 * KL" in card
    assert "Teacher on the same splits" in card


def test_registered_medalmighty_entry_with_teacher_directory(tiny_teacher_dir):
    d = zoo.build("medalmighty-resnet18-chestmnist",
                  [f"teacher.backbone={tiny_teacher_dir}", "probe.epochs=2", "train.epochs=1", "train.progress=false",
                   "data.download=false"], progress=False)
    model = zoo.load("medalmighty-resnet18-chestmnist")
    # A name always means its registered entry: the offline copy of the teacher is recorded in the lineage
    # (config.json), not in the entry (whose teacher used to become the directory).
    assert model.entry == get_entry("medalmighty-resnet18-chestmnist")
    assert get_entry("medalmighty-resnet18-chestmnist").teacher == "facebook/dinov2-base"
    cfg, metrics = _read(d)
    assert cfg["lineage"]["teacher_backbone"] == str(tiny_teacher_dir)  # the teacher actually used
    assert cfg["config"]["teacher"]["backbone"] == str(tiny_teacher_dir) and cfg["config"]["probe"]["epochs"] == 2
    assert set(metrics["teacher"]) == {"val", "test"}
    pred = model.predict(np.zeros((2, 28, 28), np.uint8))
    assert pred.probs.shape == (2, 14) and len(pred.label_sets) == 2


def test_linear_run_from_config_loads_by_path(tiny_teacher_dir, tmp_path, medmnist_root):
    d = E.train_config("medalmighty/default.yaml", [
        "method=linear", "data.dataset=dermamnist", f"teacher.backbone={tiny_teacher_dir}", "probe.epochs=2",
        f"output_dir={tmp_path}", "data.download=false", "train.progress=false"], progress=False)
    assert d.name.startswith("linear-vit-dermamnist-")
    model = zoo.load(d)
    assert model.entry.arch == "vit" and model.entry.recipe == "medalmighty/default.yaml"
    raw = np.load(medmnist_root / "dermamnist.npz")
    m = compute_metrics(raw["test_labels"], model.predict(raw["test_images"]).probs, "multi-class")
    assert m["acc"] == _read(d)[1]["test"]["acc"]


def test_linear_entry_build(built_linear_breast, tiny_teacher_dir):
    d = built_linear_breast
    assert d.name == "linear-dinov2-vits14-breastmnist"
    cfg, metrics = _read(d)
    assert set(cfg["sha256"]) == {"model.safetensors", "backbone/model.safetensors", "hf/model.safetensors"}
    assert (d / "backbone" / "config.json").is_file()
    e = cfg["entry"]
    # The entry keeps its registered teacher (the hub id); the local copy it was built from is in the lineage.
    assert (e["method"], e["arch"], e["in_chans"], e["teacher"]) == ("linear", "dinov2-vits14", 3,
                                                                      "facebook/dinov2-small")
    assert cfg["lineage"]["teacher_backbone"] == str(tiny_teacher_dir)
    assert e["mean"] == [0.485, 0.456, 0.406]
    assert metrics["epochs"] == 5 and len(metrics["history"]) == 5
    head = load_file(d / "model.safetensors")
    assert head["weight"].shape == (1, 64)
    assert "linear probe" in (d / "README.md").read_text()


def test_medalmighty_build_with_linear_entry_as_teacher(built_linear_breast):
    install(built_linear_breast)
    teacher_name = "linear-dinov2-vits14-breastmnist"
    # Entries fix their teacher: the default one distils DINOv2 ViT-B/14, so the ViT-S/14 probe teaches the
    # variant whose teacher is facebook/dinov2-small (which accepts its built linear-* entry).
    name = "medalmighty-resnet18-breastmnist.dinov2s-224"
    d = zoo.build(name,
                  [f"teacher.backbone={teacher_name}", "train.epochs=1", "train.progress=false",
                   "data.download=false"], progress=False)
    assert d == store.entry_dir(name)
    cfg, metrics = _read(d)
    teacher = zoo.load(teacher_name)
    assert cfg["lineage"]["teacher_backbone"] == teacher_name
    assert cfg["entry"]["teacher"] == get_entry(name).teacher == "facebook/dinov2-small"
    assert cfg["lineage"]["teacher_sha256"] == state_dict_sha256(teacher.net)
    # the probe head is reused, not retrained
    assert torch.equal(load_file(d / "teacher_head.safetensors")["weight"], teacher.net.head.weight)
    _, teacher_metrics = _read(built_linear_breast)
    for split in ("val", "test"):
        assert metrics["teacher"][split]["auc"] == pytest.approx(teacher_metrics[split]["auc"], abs=1e-6)
        assert metrics["teacher"][split]["acc"] == pytest.approx(teacher_metrics[split]["acc"], abs=1 / 48 + 1e-9)
    assert zoo.load(name).predict(np.zeros((28, 28), np.uint8)).probs.shape == (1, 2)


def test_registered_entry_build(built_resnet18_breast):
    d = built_resnet18_breast
    assert d.name == "baseline-resnet18-breastmnist" and FILES <= {p.name for p in d.iterdir()}
    cfg, metrics = _read(d)
    assert cfg["entry"] == get_entry("baseline-resnet18-breastmnist").to_dict() | {
        "labels": list(get_entry("baseline-resnet18-breastmnist").labels),
        "mean": [0.5], "std": [0.5],
        # the entry pins its preprocessing too now (not only method, arch and dataset)
        "overrides": list(get_entry("baseline-resnet18-breastmnist").overrides)}
    assert cfg["config"]["model"]["arch"] == "resnet18" and cfg["config"]["train"]["epochs"] == 1
    assert metrics["epochs"] == 1
    assert (d / "config.yaml").read_text().startswith("recipe: medalmighty\n")


def test_build_applies_config_files_then_overrides(monkeypatch):
    seen = {}
    monkeypatch.setattr(R, "run", lambda cfg, out, entry=None, progress=True: seen.update(cfg=cfg))
    zoo.build("baseline-resnet50-dermamnist", ["train.epochs=1"], config_files=["medalmighty/cpu-fast.yaml"])
    cfg = seen["cfg"]
    assert cfg["train"]["schedule"] == "cosine" and cfg["train"]["epochs"] == 1
    assert (cfg["method"], cfg["model"]["arch"], cfg["data"]["dataset"]) == ("baseline", "resnet50", "dermamnist")


@pytest.mark.parametrize("override,key", [("model.arch=resnet-test", "arch"), ("method=linear", "method"),
                                          ("data.dataset=dermamnist", "dataset")])
def test_build_rejects_overriding_pinned_fields(override, key):
    with pytest.raises(ConfigError, match=f"an override set {key} to"):
        zoo.build("baseline-resnet18-breastmnist", [override])
    assert not store.zoo_home().exists() or not any(store.zoo_home().iterdir())


def test_build_unknown_config_key():
    with pytest.raises(ConfigError, match="'train.epohcs'.*did you mean train.epochs"):
        zoo.build("baseline-resnet18-breastmnist", ["train.epohcs=1"])


def test_failed_build_keeps_previous_entry(built_resnet18_breast, monkeypatch):
    d = install(built_resnet18_breast)
    before = {p.name: store.sha256_file(p) for p in d.iterdir() if p.is_file()}

    def crash(*a, **k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(R, "fit", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        zoo.build("baseline-resnet18-breastmnist", ["train.epochs=1", "train.progress=false"], progress=False)
    assert {p.name: store.sha256_file(p) for p in d.iterdir() if p.is_file()} == before
    assert [p.name for p in store.zoo_home().iterdir()] == ["baseline-resnet18-breastmnist"]  # no .building. left
    assert zoo.load("baseline-resnet18-breastmnist").predict(np.zeros((28, 28), np.uint8)).probs.shape == (1, 2)


def test_failed_first_build_leaves_nothing(monkeypatch):
    monkeypatch.setattr(R, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        zoo.build("baseline-resnet18-breastmnist", ["train.progress=false"], progress=False)
    assert list(store.zoo_home().iterdir()) == []


def test_rebuild_replaces_entry(built_resnet18_breast):
    d = install(built_resnet18_breast)
    old = (d / "config.json").read_text()
    zoo.build("baseline-resnet18-breastmnist", ["train.epochs=1", "train.progress=false", "seed=1"], progress=False)
    assert (d / "config.json").read_text() != old
    assert json.loads((d / "metrics.json").read_text())["seed"] == 1
    assert [p.name for p in store.zoo_home().iterdir()] == ["baseline-resnet18-breastmnist"]


def test_missing_dataset_file_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "nodata"))
    with pytest.raises(zoo.data.DatasetNotFoundError, match="MEDMNIST_ROOT"):
        zoo.build("baseline-resnet18-breastmnist", ["data.download=false"], progress=False)


def test_card_reports_epochs_actually_trained(tmp_path):
    d = E.train_config("medalmighty/default.yaml", tiny_overrides(
        "baseline", "breastmnist", tmp_path, "train.epochs=1", "train.min_steps=6"), progress=False)
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["epochs"] == 2  # 96 images, batch 32: 3 steps an epoch
    card = (d / "README.md").read_text()
    assert "epoch " in card and f"of {metrics['epochs']}." in card
    assert f", {metrics['epochs']} epochs" in card


class _FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 1, 2, 3, 4, 5, tzinfo=tz)


def test_two_runs_in_the_same_second_keep_both(tmp_path, monkeypatch):
    def fake_run(cfg, out, entry=None, progress=True, **kw):
        (out / "marker").write_text(str(cfg["seed"]))

    monkeypatch.setattr(R, "run", fake_run)
    monkeypatch.setattr(E, "dt", types.SimpleNamespace(datetime=_FrozenClock, timezone=datetime.timezone))
    ov = tiny_overrides("baseline", "breastmnist", tmp_path)
    a = E.train_config("medalmighty/default.yaml", ov + ["seed=1"], progress=False)
    b = E.train_config("medalmighty/default.yaml", ov + ["seed=2"], progress=False)
    assert a != b
    assert (a / "marker").read_text() == "1" and (b / "marker").read_text() == "2"
