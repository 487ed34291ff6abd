"""The on-disk store: where it lives, atomic writes and swaps, sha256 verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from zoo import store


def test_zoo_home_precedence(monkeypatch, tmp_path):
    assert store.zoo_home() == tmp_path / "zoo_home"
    monkeypatch.delenv("ZOO_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.zoo_home() == tmp_path / "xdg" / "medzoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert store.zoo_home() == Path("~/.cache/medzoo").expanduser()


def test_write_json_atomic(tmp_path):
    p = tmp_path / "sub" / "x.json"
    store.write_json_atomic(p, {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        store.write_json_atomic(p, {"a": object()})  # not serialisable: old file kept, no temp left
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]
    assert oct(p.stat().st_mode & 0o777) == "0o644"


def test_write_atomic_keeps_the_old_file_when_the_writer_fails_half_way(tmp_path):
    import torch

    p = tmp_path / "ckpt.pt"
    store.write_atomic(p, lambda q: torch.save({"step": 1}, q))
    assert torch.load(p)["step"] == 1

    def half(q: Path) -> None:
        q.write_bytes(b"partial checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        store.write_atomic(p, half)
    assert torch.load(p)["step"] == 1
    assert [q.name for q in tmp_path.iterdir()] == ["ckpt.pt"]


def test_staged_dir_swaps_in_on_success(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old").write_text("old")
    with store.staged_dir(target) as tmp:
        assert tmp.parent == tmp_path and ".entry.building." in tmp.name
        (tmp / "new").write_text("new")
        assert (target / "old").exists()  # the old entry stays readable until the swap
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_staged_dir_failure_keeps_old(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt), store.staged_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_is_built_and_weight_files(tmp_path):
    d = store.entry_dir("some-entry")
    assert d == tmp_path / "zoo_home" / "some-entry" and not store.is_built("some-entry")
    (d / "backbone").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "backbone" / "model.safetensors").write_bytes(b"b")
    assert not store.is_built("some-entry")  # no model.safetensors at the top
    (d / "model.safetensors").write_bytes(b"a")
    assert store.is_built("some-entry")
    assert store.weight_files(d) == [d / "backbone" / "model.safetensors", d / "model.safetensors"]
    (d / "model.safetensors").unlink()  # a DINO-MX backbone entry: backbone weights and its heads
    (d / "backbone" / "dinomx_heads.safetensors").write_bytes(b"h")
    assert store.is_built("some-entry")


def test_verify(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    (d / "w.safetensors").write_bytes(b"weights")
    rec = {"w.safetensors": store.sha256_file(d / "w.safetensors")}
    assert rec["w.safetensors"] == hashlib.sha256(b"weights").hexdigest()
    store.verify(d, rec)
    (d / "w.safetensors").write_bytes(b"weightz")
    with pytest.raises(store.WeightsCorruptedError, match="sha256 mismatch.*zoo build e"):
        store.verify(d, rec)
    os.remove(d / "w.safetensors")
    with pytest.raises(store.WeightsCorruptedError, match="is missing"):
        store.verify(d, rec)
