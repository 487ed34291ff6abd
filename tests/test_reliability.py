"""The adversarial user's cases, replayed: each is a one-line error with the right exit status, no
traceback, and nothing lost (the entry that was there before is intact, byte for byte)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import install
from safetensors.torch import save_file

from training import checkpoint
from zoo.cli import main

NAME = "baseline-resnet18-breastmnist"


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _one_line_error(capsys, status: int, argv: list[str], pattern: str) -> str:
    assert main(argv) == status, argv
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("zoo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], (pattern, lines[0])
    return lines[0]


# --- 7: bad training configs never replace a good entry ---------------------------------------------

BAD_BUILDS = {
    "train.epochs=0": "train.epochs must be at least 1",
    "train.epochs=-1": "train.epochs must be at least 1",
    "train.batch_size=-5": "train.batch_size must be at least 1",
    "train.batch_size=0": "train.batch_size must be at least 1",
    "train.milestones=abc": "train.milestones must be a list",
    "train.epochs=[1]": "train.epochs",
    "seed=1.5": "seed must be a whole number",
    "train.epochs=1.5": "train.epochs must be a whole number",
    "train.epochs=true": "train.epochs must be a whole number",
    "train.progress=maybe": "train.progress must be true or false",
    "train.lr=-1": "train.lr must be positive",
    "distill.alpha=2": "distill.alpha must be in [0, 1]",
}


@pytest.mark.parametrize("override", list(BAD_BUILDS))
def test_bad_config_values_are_one_line_usage_errors_and_keep_the_entry(override, built_resnet18_breast, capsys):
    d = install(built_resnet18_breast)
    before = _tree(d)
    _one_line_error(capsys, 2, ["build", NAME, override, "--quiet"], BAD_BUILDS[override])
    assert _tree(d) == before
    assert not any(p.name.startswith(".") for p in d.parent.iterdir() if p.name != ".cache")


def test_a_preprocessing_override_is_refused_before_anything_is_built(built_resnet18_breast, capsys):
    d = install(built_resnet18_breast)
    before = _tree(d)
    _one_line_error(capsys, 2, ["build", NAME, "data.input_size=0"], "use `zoo train`")
    assert _tree(d) == before


# --- 9: the integrity check cannot be bypassed ------------------------------------------------------


def _rewrite_config(d: Path, change) -> None:
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case,change,pattern", [
    ("empty sha256", lambda c: c.update(sha256={}), "sha256"),
    ("no sha256", lambda c: c.pop("sha256"), 'has no "sha256"'),
    ("no entry", lambda c: c.pop("entry"), 'has no "entry"'),
    ("sha256 a list", lambda c: c.update(sha256=[]), "not an object"),
    ("entry a string", lambda c: c.update(entry="x"), "not an object"),
])
def test_a_tampered_config_is_refused_for_every_use(case, change, pattern, built_resnet18_breast, capsys):
    d = install(built_resnet18_breast)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-100] ^= 0xFF  # and corrupted weights: they must not load, evaluate or export
    (d / "model.safetensors").write_bytes(bytes(raw))
    _rewrite_config(d, change)
    for argv in (["eval", NAME], ["export", NAME, "--max-images", "4"]):
        _one_line_error(capsys, 1, argv, pattern)


def test_invalid_safetensors_and_wrong_shapes_are_one_line_errors(built_resnet18_breast, capsys):
    d = install(built_resnet18_breast)
    (d / "model.safetensors").write_bytes(b"not a safetensors file at all")
    _rewrite_config(d, lambda c: c["sha256"].update({"model.safetensors": hashlib.sha256(
        (d / "model.safetensors").read_bytes()).hexdigest()}))
    _one_line_error(capsys, 1, ["eval", NAME], "safetensors")
    save_file({"fc.weight": torch.zeros(3, 3)}, d / "model.safetensors")
    _rewrite_config(d, lambda c: c["sha256"].update({"model.safetensors": hashlib.sha256(
        (d / "model.safetensors").read_bytes()).hexdigest()}))
    _one_line_error(capsys, 1, ["eval", NAME], "do not fit resnet18")


# --- 10: a folder named like an entry never shadows the store ----------------------------------------


def test_names_resolve_to_the_store_not_the_working_directory(built_resnet18_breast, tmp_path, monkeypatch, capsys):
    install(built_resnet18_breast)
    decoy = tmp_path / "cwd" / NAME
    decoy.mkdir(parents=True)
    (decoy / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["eval", NAME, "--json"]) == 0  # the store's entry, not the decoy
    assert json.loads(capsys.readouterr().out)["model"] == NAME
    _one_line_error(capsys, 1, ["eval", f"./{NAME}"], "entry")  # as a path, it is the decoy (not an entry)


# --- 13: an export never moves a user's file away --------------------------------------------------


def test_export_out_an_existing_file_is_refused(built_resnet18_breast, tmp_path, capsys):
    install(built_resnet18_breast)
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    _one_line_error(capsys, 2, ["export", NAME, "--out", str(f)], "is a file")
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "zoo_home"]


# --- 14: damaged DINO-MX checkpoints ----------------------------------------------------------------

TINY = ["model.backbone=vit-test", "head.out_dim=32", "head.hidden_dim=16", "head.bottleneck_dim=8",
        "optim.batch_size=8", "optim.steps=3", "crops.local_number=1", "log.progress=false", "eval.linear=false",
        "data.download=false", "data.datasets=[breastmnist]", "checkpoint.every=1", "run_name=tiny", "--quiet"]


def _damage(path: Path, how: str) -> None:
    if how == "dir":
        path.unlink()
        path.mkdir()
        return
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "garbage":
        data = bytearray(b"\x00garbage" * 100)
    elif how == "flipped":
        data[-50] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,pattern", [("truncated", "checksum"), ("empty", "is empty"),
                                         ("garbage", "not a checkpoint"), ("flipped", "checksum"),
                                         ("dir", "not a file")])
def test_a_damaged_checkpoint_is_a_one_line_error(how, pattern, tmp_path, capsys):
    assert main(["pretrain", "dinomx/default.yaml", *TINY, f"output_dir={tmp_path}"]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.pt"
    _damage(ckpt, how)
    line = _one_line_error(capsys, 2, ["pretrain", "dinomx/default.yaml", *TINY, f"output_dir={tmp_path}"], pattern)
    assert "checkpoint.resume=false" in line and "delete" in line


def test_a_checkpoint_beyond_the_run_is_refused(tmp_path, capsys):
    assert main(["pretrain", "dinomx/default.yaml", *TINY, f"output_dir={tmp_path}"]) == 0
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.pt"
    st = checkpoint.load(ckpt)
    st["step"] = 10**9
    checkpoint.save(ckpt, st)
    capsys.readouterr()
    _one_line_error(capsys, 2, ["pretrain", "dinomx/default.yaml", *TINY, f"output_dir={tmp_path}"],
                    "outside this run's 0..3")
