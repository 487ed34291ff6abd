"""A name fixes its preprocessing and teacher: overrides that contradict an entry are refused with the
variant to build, configs are derived from the entry, and what loads is what the registry says."""

from __future__ import annotations

import pytest

import zoo
from training.config import ConfigError
from training.entries import entry_config
from zoo.registry import get_entry, list_models, variants_of

TINY = ["train.epochs=1", "train.batch_size=32", "train.progress=false", "data.download=false"]


@pytest.mark.parametrize("override,variant", [
    ("data.input_size=224", "baseline-resnet18-breastmnist.224"),
    ("data.resize=nearest", "baseline-resnet18-breastmnist.224"),
    ("model.small_stem=false", "baseline-resnet18-breastmnist.224"),
    ("data.size=224", "baseline-resnet18-breastmnist.plus224"),
])
def test_an_override_that_changes_preprocessing_names_the_variant(override, variant):
    with pytest.raises(ConfigError, match=f"build the variant {variant.replace('.', '[.]')} instead"):
        zoo.build("baseline-resnet18-breastmnist", [override, *TINY], progress=False)


def test_preprocessing_no_variant_has_is_refused_with_zoo_train():
    with pytest.raises(ConfigError, match=r"data\.mean=\[0\.1\].*use `zoo train`"):
        zoo.build("baseline-resnet18-breastmnist", ["data.mean=[0.1]", *TINY], progress=False)
    with pytest.raises(ConfigError, match="teacher.input_size=28"):
        zoo.build("medalmighty-resnet18-breastmnist", ["teacher.input_size=28", *TINY], progress=False)


def test_another_teacher_is_another_name():
    with pytest.raises(ConfigError, match=r"build the variant medalmighty-resnet18-breastmnist[.]dinomx-28 instead"):
        zoo.build("medalmighty-resnet18-breastmnist", ["teacher.backbone=dinomx-vit-mini-p4-breastmnist", *TINY],
                  progress=False)


def test_override_files_are_checked_like_key_values(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("recipe: medalmighty\ndata:\n  input_size: 64\n")
    with pytest.raises(ConfigError, match="data.input_size=64"):
        entry_config(get_entry("baseline-resnet18-breastmnist"), [], [str(f)])


def test_the_config_is_derived_from_the_entry():
    e = get_entry("medalmighty-resnet50-pathmnist.224")
    cfg = entry_config(e, [])
    assert (cfg["data"]["input_size"], cfg["data"]["resize"], cfg["model"]["small_stem"]) == (224, "nearest", False)
    assert cfg["data"]["mean"] == list(e.mean) and cfg["teacher"]["input_size"] == 224 == e.teacher_input_size
    e = get_entry("medalmighty-resnet18-bloodmnist.dinomx-28")
    cfg = entry_config(e, [])
    assert cfg["teacher"]["backbone"] == "dinomx-vit-mini-p4-bloodmnist" and cfg["teacher"]["input_size"] == 28
    assert cfg["data"]["mean"] == [0.5, 0.5, 0.5]  # per channel: BloodMNIST is RGB
    # values the entry already has are accepted as given
    assert entry_config(e, ["data.input_size=28", "model.arch=resnet18"])["data"]["input_size"] == 28


def test_variants_are_listed_on_request():
    base = list_models("breastmnist")
    assert not any("." in n for n in base)
    tagged = list_models("breastmnist", variants=True)
    assert {"baseline-resnet18-breastmnist.224", "medalmighty-resnet18-breastmnist.dinomx-28"} <= set(tagged)
    dinomx = list_models("*.dinomx-28")  # a pattern with a tag lists tagged names
    assert "medalmighty-resnet18-breastmnist.dinomx-28" in dinomx and all(n.endswith(".dinomx-28") for n in dinomx)
    assert variants_of("medalmighty-resnet18-breastmnist.dinomx-28")[0] == "medalmighty-resnet18-breastmnist"


def test_what_loads_is_what_the_registry_says(tiny_teacher_dir):
    teacher = [f"teacher.backbone={tiny_teacher_dir}", "probe.epochs=2"]
    for name, extra in [("baseline-resnet18-breastmnist.224", []), ("medalmighty-resnet18-breastmnist", teacher)]:
        d = zoo.build(name, [*TINY, *extra], progress=False)
        model = zoo.load(name)
        assert model.entry == get_entry(name)
        assert model.info["config"]["data"]["input_size"] == get_entry(name).input_size
        assert d.name == name
    lineage = zoo.load("medalmighty-resnet18-breastmnist").info["lineage"]
    assert lineage["teacher_backbone"] == str(tiny_teacher_dir) and lineage["teacher_input_size"] == 224


def test_the_finetuned_teacher_chain_builds_by_name():
    """dinomx-* (pretrained) -> finetune-* (that backbone trained with labels) -> the .ft-28 student."""
    backbone, ft, student = ("dinomx-vit-mini-p4-breastmnist", "finetune-vit-mini-p4-breastmnist",
                             "medalmighty-resnet18-breastmnist.ft-28")
    zoo.build(backbone, ["head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "optim.batch_size=8",
                         "optim.steps=2", "crops.local_number=1", "log.progress=false", "eval.linear=false",
                         "data.download=false"], progress=False)
    with pytest.raises(FileNotFoundError, match=f"build it with `zoo build {ft}`"):
        zoo.build(student, TINY, progress=False)  # its teacher is not built yet: the error names the command
    zoo.build(ft, [*TINY, "probe.epochs=2", "train.min_steps=0"], progress=False)
    m = zoo.load(ft)
    assert m.entry == get_entry(ft) and m.info["lineage"]["teacher_backbone"] == backbone
    assert m.info["config"]["train"]["optimizer"] == "adamw"  # the entry's recipe: medalmighty/finetune.yaml
    d = zoo.build(student, TINY, progress=False)
    lineage = zoo.load(student).info["lineage"]
    assert lineage["teacher_backbone"] == ft and lineage["teacher_input_size"] == 28
    assert "fine-tuned" in (d / "README.md").read_text() or ft in (d / "README.md").read_text()
