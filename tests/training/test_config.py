"""Configs are data: default YAML <- override files <- key=value, strictly merged."""

from __future__ import annotations

import pytest
import yaml

from training import config as C
from training.config import CONFIG_DIR, ConfigError, load_config, merge, parse_overrides
from training.dinomx.config import parse as parse_dinomx
from training.medalmighty.config import parse as parse_medalmighty

SHIPPED = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def test_shipped_configs_found():
    assert "medalmighty/default.yaml" in SHIPPED and len(SHIPPED) >= 3
    assert C.families() == ["dinomx", "medalmighty"]


def test_default_loads():
    cfg = load_config(None, family="medalmighty")
    assert cfg == yaml.safe_load((CONFIG_DIR / "medalmighty" / "default.yaml").read_text())
    assert cfg["method"] == "medalmighty" and cfg["train"]["epochs"] == 100
    # The paper's loss weights; the other distill keys (search grid, gate, CA-MKD) are options that default off.
    assert cfg["train"]["milestones"] == [0.5, 0.75]
    assert (cfg["distill"]["alpha"], cfg["distill"]["temperature"]) == (0.2, 2.0)
    assert cfg["distill"]["search"] == "none" and cfg["distill"]["require_stronger_teacher"] is False


@pytest.mark.parametrize("rel", SHIPPED)
def test_every_shipped_yaml_loads_and_validates(rel):
    cfg = load_config(rel)
    family = rel.split("/")[0]
    default = C.default_config(family)
    assert C._flat_keys(cfg) == C._flat_keys(default)  # same key set, nothing added or dropped
    if family == "medalmighty":
        parse_medalmighty(cfg)  # values are ones the recipe accepts
    else:  # a DINO-MX config's values are ones the recipe accepts
        parse_dinomx(cfg)
    override = C._read_yaml(CONFIG_DIR / rel)
    for section, values in override.items():  # the file's values won
        if isinstance(values, dict):
            for k, v in values.items():
                assert cfg[section][k] == v
        else:
            assert cfg[section] == values


def test_override_file_then_key_value():
    cfg = load_config("medalmighty/cpu-fast.yaml", ["train.epochs=3", "data.dataset=bloodmnist", "train.lr=5.0e-4",
                                                    "data.mean=[0.1, 0.2, 0.3]", "run_name=", "seed=7"])
    assert cfg["train"]["epochs"] == 3 and isinstance(cfg["train"]["epochs"], int)
    assert cfg["train"]["schedule"] == "cosine"  # from the file
    assert cfg["train"]["amp"] == "auto"
    assert cfg["train"]["batch_size"] == 128  # untouched default
    assert cfg["data"]["dataset"] == "bloodmnist"
    assert cfg["train"]["lr"] == 5e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["data"]["mean"] == [0.1, 0.2, 0.3]
    assert cfg["run_name"] is None and cfg["seed"] == 7


def test_extra_files_apply_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("recipe: medalmighty\ntrain:\n  epochs: 5\n  lr: 0.1\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  epochs: 6\n")
    cfg = load_config(a, extra_files=[b], overrides=["train.lr=0.2"])
    assert (cfg["train"]["epochs"], cfg["train"]["lr"]) == (6, 0.2)


def test_default_is_not_mutated():
    load_config(None, ["train.epochs=1"], family="medalmighty")
    assert C.default_config("medalmighty")["train"]["epochs"] == 100


def test_unknown_key_on_command_line_suggests_close_one():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["train.epohcs=3"], family="medalmighty")
    msg = str(ei.value)
    assert "'train.epohcs'" in msg and "command-line overrides" in msg and "did you mean train.epochs" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown config key 'sede'.*did you mean seed"):
        load_config(None, ["sede=1"], family="medalmighty")


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("recipe: medalmighty\ndistill:\n  temprature: 4.0\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    msg = str(ei.value)
    assert "'distill.temprature'" in msg and str(f) in msg and "did you mean distill.temperature" in msg


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["=3"])


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match="'train' in command-line overrides is a section"):
        load_config(None, ["train=3"], family="medalmighty")


def test_conflicting_overrides():
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["train=1", "train.epochs=3"])


def test_scalar_given_a_section():
    with pytest.raises(ConfigError):
        load_config(None, ["train.epochs.x=1"], family="medalmighty")


def test_parse_overrides_yaml_scalars():
    assert parse_overrides(["a.b=3", "a.c=true", "d=null", "e=x y", "f=[1, 2]", "g=1.0e-3", "h=0.5"]) == {
        "a": {"b": 3, "c": True}, "d": None, "e": "x y", "f": [1, 2], "g": 1e-3, "h": 0.5}


def test_exponent_without_dot_is_a_float():
    cfg = load_config(None, ["train.lr=1e-4"], family="medalmighty")
    assert cfg["train"]["lr"] == 1e-4 and isinstance(cfg["train"]["lr"], float)


def test_merge_is_strict_and_pure():
    base = {"a": 1, "s": {"x": 1, "y": 2}}
    out = merge(base, {"s": {"y": 3}}, "t")
    assert out == {"a": 1, "s": {"x": 1, "y": 3}} and base["s"]["y"] == 2
    with pytest.raises(ConfigError, match="'s.z' in t"):
        merge(base, {"s": {"z": 1}}, "t")


def test_file_without_family(tmp_path):
    f = tmp_path / "orphan.yaml"
    f.write_text("train:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="recipe: <family>"):
        load_config(f)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(lst)
    with pytest.raises(ConfigError, match="unknown recipe family 'dino'"):
        load_config(None, family="dino")


def test_yaml_tags_that_call_code_are_rejected(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("recipe: medalmighty\nseed: !!python/object/apply:os.getpid []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_dump_roundtrip():
    cfg = load_config("medalmighty/demo.yaml")
    assert yaml.safe_load(C.dump_config(cfg)) == cfg


@pytest.mark.parametrize("override,match", [("method=teacher", "method must be one of"),
                                            ("model.arch=vgg", "model.arch must be one of"),
                                            ("distributed.strategy=horovod", "distributed.strategy must be one of"),
                                            ("data.dataset=mnist", "unknown MedMNIST 2D dataset"),
                                            ("train.max_steps=-1", r"train.max_steps must be 0 \(no cap\) or at "
                                                                   r"least train.min_steps \(0\), got -1")])
def test_recipe_value_checks(override, match):
    with pytest.raises(ValueError, match=match):
        parse_medalmighty(load_config(None, [override], family="medalmighty"))
