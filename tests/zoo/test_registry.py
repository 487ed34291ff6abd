"""The registry: one frozen entry per name, complete over datasets x methods x architectures."""

from __future__ import annotations

import dataclasses
import json

import pytest

import zoo
from zoo.data import dataset_info, datasets_2d
from zoo.registry import (
    DINOMX_BACKBONES,
    IMAGENET_MEAN,
    STUDENT_ARCHS,
    TEACHER_BACKBONES,
    UnknownModelError,
    ZooEntry,
    get_entry,
    list_models,
    registry,
)

EXPECTED_PER_DATASET = [f"{m}-{a}" for m in ("baseline", "medalmighty", "ensemble")
                        for a in ("resnet18", "resnet50", "seresnet50", "skresnet50")] + [
    f"linear-dinov2-{v}" for v in ("vits14", "vitb14", "vitl14")] + ["dinomx-vit-mini-p4", "finetune-vit-mini-p4"]


def test_every_dataset_has_every_entry():
    names = set(list_models())
    want = {f"{prefix}-{flag}" for flag in datasets_2d() for prefix in EXPECTED_PER_DATASET}
    assert names == want
    assert len(names) == 12 * 17
    assert list_models() == sorted(names)
    assert zoo.list_models() == list_models()


@pytest.mark.parametrize("name", list_models())
def test_entry_fields_consistent(name):
    e = get_entry(name)
    info = dataset_info(e.dataset)
    assert e.name == f"{e.method}-{e.arch}-{e.dataset}"
    assert (e.task, e.labels, e.license) == (info.task, info.labels, info.license)
    # Hub ViT probes see the image at DINOv2's own 224 px (the paper's); everything else at MedMNIST's 28.
    assert e.input_size == (224 if e.method == "linear" else 28)
    assert len(e.mean) == len(e.std) == e.in_chans
    if e.method == "linear":
        assert e.arch in TEACHER_BACKBONES and not e.is_student
        assert e.in_chans == 3 and e.mean == IMAGENET_MEAN
        assert e.teacher == TEACHER_BACKBONES[e.arch]
        assert f"teacher.backbone={e.teacher}" in e.overrides
    elif e.method == "finetune":  # that backbone fine-tuned with the labels: a teacher, named as such
        assert e.arch in DINOMX_BACKBONES and not e.is_student and e.recipe == "medalmighty/finetune.yaml"
        assert e.teacher == f"dinomx-{e.arch}-{e.dataset}" and f"teacher.backbone={e.teacher}" in e.overrides
        assert e.in_chans == info.n_channels
    elif e.method == "dinomx":  # a backbone pretrained here, on the dataset's own channels
        assert e.arch in DINOMX_BACKBONES and not e.is_student and e.recipe == "dinomx/default.yaml"
        assert e.in_chans == info.n_channels and e.teacher is None
        assert f"model.backbone={e.arch}" in e.overrides and f"data.datasets=[{e.dataset}]" in e.overrides
    else:
        assert e.arch in STUDENT_ARCHS and e.is_student
        assert e.in_chans == info.n_channels
        assert f"model.arch={e.arch}" in e.overrides
        assert (e.teacher is not None) == (e.method == "medalmighty")
        if e.method == "ensemble":  # a teacher made of supervised students: members in its recipe
            assert "ensemble" in e.recipe or any(o.startswith("ensemble.") for o in e.overrides)
    if e.method != "dinomx":
        assert f"method={e.method}" in e.overrides and f"data.dataset={e.dataset}" in e.overrides
    p = e.preprocess
    assert (p.input_size, p.in_chans, p.mean, p.std, p.resize) == (e.input_size, e.in_chans, e.mean, e.std, e.resize)


def test_num_outputs():
    assert get_entry("baseline-resnet18-breastmnist").num_outputs == 1
    assert get_entry("baseline-resnet18-pneumoniamnist").num_outputs == 1
    assert get_entry("baseline-resnet18-dermamnist").num_outputs == 7
    assert get_entry("linear-dinov2-vits14-retinamnist").num_outputs == 5
    assert get_entry("medalmighty-resnet50-chestmnist").num_outputs == 14
    assert get_entry("baseline-resnet18-pathmnist").num_outputs == 9


def test_pattern_glob_and_substring():
    glob = list_models("baseline-*")
    assert len(glob) == 12 * 4 and all(n.startswith("baseline-") for n in glob)
    sub = list_models("breastmnist")
    assert len(sub) == 17 and all(n.endswith("-breastmnist") for n in sub)
    assert list_models("*-resnet18-*mnist") == [n for n in list_models() if "-resnet18-" in n]
    assert list_models("linear-dinov2-vit?14-bloodmnist") == [
        "linear-dinov2-vitb14-bloodmnist", "linear-dinov2-vitl14-bloodmnist", "linear-dinov2-vits14-bloodmnist"]
    assert list_models("nothing-like-this") == []
    assert list_models("") == list_models(None) == list_models()


def test_unknown_name_lists_closest():
    with pytest.raises(UnknownModelError) as ei:
        get_entry("baseline-resnet18-breastmnst")
    msg = str(ei.value)
    assert msg.startswith("unknown zoo model 'baseline-resnet18-breastmnst'")
    assert "baseline-resnet18-breastmnist" in msg.split("Closest:")[1]
    assert isinstance(ei.value, KeyError)
    with pytest.raises(UnknownModelError, match="zoo list"):
        get_entry("qqqq")


def test_entries_are_frozen():
    e = get_entry("baseline-resnet18-breastmnist")
    assert dataclasses.is_dataclass(e)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.arch = "resnet50"
    assert hash(e) == hash(dataclasses.replace(e))


def test_registry_is_built_once():
    assert registry() is registry()


@pytest.mark.parametrize("name", ["baseline-resnet18-breastmnist", "linear-dinov2-vitl14-chestmnist",
                                  "medalmighty-skresnet50-dermamnist"])
def test_to_dict_from_dict_roundtrip_through_json(name):
    e = get_entry(name)
    d = json.loads(json.dumps(e.to_dict()))
    assert "extra" not in d
    back = ZooEntry.from_dict(d)
    assert back == e
    assert isinstance(back.labels, tuple) and isinstance(back.overrides, tuple)


def test_from_dict_rejects_unknown_fields():
    d = get_entry("baseline-resnet18-breastmnist").to_dict()
    d["colour"] = "blue"
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        ZooEntry.from_dict(d)


def test_metadata_is_medmnists_own_info_read_without_importing_medmnist(monkeypatch):
    import sys

    from medmnist import INFO

    from zoo.datasets import medmnist_info

    monkeypatch.delitem(sys.modules, "medmnist.info")  # as in a process that never imported medmnist
    medmnist_info.cache_clear()
    try:
        got = medmnist_info()
        assert got == INFO and got is not INFO  # the same file's INFO, executed on its own
    finally:
        medmnist_info.cache_clear()


def test_registry_imports_no_torch(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys, zoo.cli, zoo.registry; zoo.registry.list_models(); "
            "e = zoo.registry.get_entry('baseline-resnet18-breastmnist'); e.to_dict(); e.pins(); "
            "print(sorted(m for m in ('torch', 'torchvision', 'medmnist', 'zoo.data', 'zoo.tasks') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "ZOO_HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
