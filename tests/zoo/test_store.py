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


# --- strict integrity records (verify, read_config) ------------------------------------------------


def _entry(d: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Write ``files`` under ``d``; their sha256 record, as a build writes it into config.json."""
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def _one_line_with_fix(e: pytest.ExceptionInfo, name: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and f"zoo build {name}" in msg and "delete" in msg
    return msg


@pytest.mark.parametrize("recorded,why", [
    ({}, r'records no weight file sha256 \("sha256": \{\}\)'),
    ([], 'config.json "sha256" is a JSON array, not an object'),
    (None, '"sha256" is a JSON null'),
    ("abc", '"sha256" is a JSON string'),
    ({"w.safetensors": "abc"}, r"\"sha256\" of w.safetensors is 'abc', not a 64-digit hex sha256"),
    ({"w.safetensors": 5}, "is '5', not a 64-digit hex"),
    ({"w.safetensors": None}, "is 'None', not a 64-digit hex"),
    ({"w.safetensors": "g" * 64}, "not a 64-digit hex"),
    ({"../e/w.safetensors": "0" * 64}, "key '../e/w.safetensors' is not a relative path inside the entry"),
    ({"/abs/w.safetensors": "0" * 64}, "is not a relative path inside the entry"),
    ({"": "0" * 64}, "is not a relative path inside the entry"),
])
def test_verify_rejects_malformed_records(tmp_path, recorded, why):
    d = tmp_path / "e"
    d.mkdir()
    _entry(d, {"w.safetensors": b"weights"})
    with pytest.raises(store.WeightsCorruptedError, match=why) as e:
        store.verify(d, recorded)
    _one_line_with_fix(e, "e")


def test_verify_requires_every_weight_file_to_be_recorded(tmp_path):
    # `"sha256": {}` (or a record naming only some files) once let corrupted weights load and export
    d = tmp_path / "e"
    d.mkdir()
    rec = _entry(d, {"model.safetensors": b"m", "backbone/model.safetensors": b"b"})
    store.verify(d, rec)
    store.verify(d, {"./model.safetensors": rec["model.safetensors"],  # normalised keys, upper-case hex
                     "backbone//model.safetensors": rec["backbone/model.safetensors"].upper()})
    with pytest.raises(store.WeightsCorruptedError, match="backbone/model.safetensors in .* not recorded") as e:
        store.verify(d, {"model.safetensors": rec["model.safetensors"]})
    _one_line_with_fix(e, "e")
    (d / "backbone" / "dinomx_heads.safetensors").write_bytes(b"unhashed")  # a file nobody recorded
    with pytest.raises(store.WeightsCorruptedError, match="dinomx_heads.safetensors in .* not recorded"):
        store.verify(d, rec)
    for i in range(4):
        (d / f"x{i}.safetensors").write_bytes(b"x")
    with pytest.raises(store.WeightsCorruptedError, match=r"backbone/dinomx_heads.safetensors, x0.safetensors, "
                                                          r"x1.safetensors and 2 more in"):
        store.verify(d, rec)


def test_verify_still_hashes_recorded_non_weight_files(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    rec = _entry(d, {"model.safetensors": b"m", "extra.bin": b"x"})
    store.verify(d, rec)
    (d / "extra.bin").write_bytes(b"y")
    with pytest.raises(store.WeightsCorruptedError, match="sha256 mismatch for .*extra.bin"):
        store.verify(d, rec)


GOOD_CONFIG = {"format": 1, "entry": {"name": "e"}, "config": {}, "sha256": {"model.safetensors": "0" * 64}}


@pytest.mark.parametrize("content,why", [
    (None, r"cannot read .*config.json: the file is missing"),
    (b"{not json", r"cannot read .*config.json: not JSON \(Expecting property name .* at line 1 column 2\)"),
    (b"\xff\xfe\x00garbage", r"cannot read .*config.json: it is not UTF-8 text"),
    (b"", r"cannot read .*config.json: not JSON"),
    (b"[1, 2]", r"config.json holds a JSON array, not an object"),
    (b"null", r"config.json holds a JSON null, not an object"),
    (b'{"entry": {}}', r'config.json has no "sha256"'),
    (b'{"sha256": {}}', r'config.json has no "entry"'),
    (b'{"entry": [], "sha256": {}}', r'config.json "entry" is a JSON array, not an object'),
    (b'{"entry": {}, "sha256": []}', r'config.json "sha256" is a JSON array, not an object'),
    (b'{"entry": {}, "sha256": "abc"}', r'config.json "sha256" is a JSON string, not an object'),
    (b'{"entry": null, "sha256": {}}', r'config.json "entry" is a JSON null, not an object'),
])
def test_read_config_rejects_what_is_not_a_zoo_config(tmp_path, content, why):
    d = tmp_path / "e"
    d.mkdir()
    if content is not None:
        (d / "config.json").write_bytes(content)
    with pytest.raises(store.WeightsCorruptedError, match=why) as e:
        store.read_config(d)
    _one_line_with_fix(e, "e")


def test_read_config(tmp_path):
    d = tmp_path / "e"
    store.write_json_atomic(d / "config.json", GOOD_CONFIG)
    assert store.read_config(d) == GOOD_CONFIG
    (d / "config.json").unlink()
    (d / "config.json").mkdir()  # unreadable as a file
    with pytest.raises(store.WeightsCorruptedError, match="cannot read .*config.json"):
        store.read_config(d)


# --- safetensors files ------------------------------------------------------------------------------


def _tensors():
    import torch

    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": torch.ones(3, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 4), "i": torch.tensor([1, 2], dtype=torch.int64)}


def _saved(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(_tensors(), path, metadata={"format": "pt"})
    return path


def _garbage_variants(good: bytes) -> dict[str, bytes]:
    """Files that are not safetensors, from ways weights get damaged: truncation, garbage, stray bytes."""
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    header["w"]["shape"] = [3, 3]  # claims more bytes than its offsets span
    bad_header = json.dumps(header).encode()
    return {
        "empty": b"",
        "short": good[:5],
        "huge header length": (10**12).to_bytes(8, "little") + good[8:],
        "garbage": b"\x93NUMPY" + os.urandom(200),
        "header not JSON": good[:8] + b"{" * n + good[8 + n:],
        "header a list": len(b"[1]").to_bytes(8, "little") + b"[1]",
        "truncated data": good[:-1],
        "stray bytes": good + b"\x00" * 8,
        "shape mismatch": len(bad_header).to_bytes(8, "little") + bad_header + good[8 + n:],
    }


def test_load_weights(tmp_path):
    import torch

    p = _saved(tmp_path / "model.safetensors")
    h = store.sha256_file(p)
    for got in (store.load_weights(p), store.load_weights(p, h), store.load_weights(p, h.upper())):
        assert got.keys() == _tensors().keys() and all(torch.equal(got[k], v) for k, v in _tensors().items())
    with pytest.raises(store.WeightsCorruptedError, match="sha256 mismatch for .*model.safetensors") as e:
        store.load_weights(p, "0" * 64)
    assert "\n" not in str(e.value)
    with pytest.raises(store.WeightsCorruptedError, match="weight file .*nope.safetensors is missing"):
        store.load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(store.WeightsCorruptedError, match="is missing"):
        store.load_weights(tmp_path / "nope.safetensors", h)


GARBAGE = ["empty", "short", "huge header length", "garbage", "header not JSON", "header a list", "truncated data",
           "stray bytes", "shape mismatch"]


@pytest.mark.parametrize("variant", GARBAGE)
def test_load_weights_on_a_damaged_file_is_one_line(tmp_path, variant):
    good = _saved(tmp_path / "good.safetensors").read_bytes()
    p = store.entry_dir("e") / "model.safetensors"
    p.parent.mkdir(parents=True)
    p.write_bytes(_garbage_variants(good)[variant])
    for sha in (None, store.sha256_file(p)):  # a damaged file whose sha256 was recorded still fails
        with pytest.raises(store.WeightsCorruptedError, match=r"^e: .*model.safetensors is not a valid safetensors "
                                                              r"file \(.*\); delete .* `zoo build e`$") as e:
            store.load_weights(p, sha)
        assert "\n" not in str(e.value)


def test_check_safetensors_agrees_with_safetensors(tmp_path):
    from safetensors.torch import load

    good = _saved(tmp_path / "good.safetensors").read_bytes()
    store.check_safetensors(tmp_path / "good.safetensors")
    variants = _garbage_variants(good)
    assert list(variants) == GARBAGE
    for variant, data in variants.items():
        p = tmp_path / f"{variant}.safetensors"
        p.write_bytes(data)
        with pytest.raises(Exception):  # noqa: B017 - safetensors' own verdict: any error
            load(data)
        with pytest.raises(store.WeightsCorruptedError, match="is not a valid safetensors file") as e:
            store.check_safetensors(p)
        assert "\n" not in str(e.value), variant
    with pytest.raises(store.WeightsCorruptedError, match="is missing"):
        store.check_safetensors(tmp_path / "nope.safetensors")


# --- staged_dir: permissions, failures --------------------------------------------------------------


def test_staged_dir_publishes_files_readable_by_everyone(tmp_path):
    target = tmp_path / "entry"
    old_umask = os.umask(0o077)  # a private umask, as under some schedulers and in mkstemp
    try:
        with store.staged_dir(target) as tmp:
            fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            (tmp / "backbone").mkdir(mode=0o700)
            (tmp / "backbone" / "config.json").write_text("{}")
            os.chmod(tmp / "backbone" / "config.json", 0o600)
            (tmp / "runner.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "runner.sh", 0o700)
            (tmp / "link").symlink_to("model.safetensors")
    finally:
        os.umask(old_umask)
    modes = {p.relative_to(target).as_posix(): oct(p.lstat().st_mode & 0o777) for p in target.rglob("*")
             if not p.is_symlink()}
    assert modes == {"model.safetensors": "0o644", "backbone": "0o755", "backbone/config.json": "0o644",
                     "runner.sh": "0o755"}
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_publish_tree(tmp_path):
    d = tmp_path / "t"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "f").write_text("x")
    for p in (d / "a" / "b" / "f", d / "a" / "b", d / "a", d):
        os.chmod(p, 0o600 if p.is_file() else 0o700)
    store.publish_tree(d)
    assert [oct(p.stat().st_mode & 0o777) for p in (d, d / "a", d / "a" / "b", d / "a" / "b" / "f")] == [
        "0o755", "0o755", "0o755", "0o644"]


def test_staged_dir_failure_at_the_swap_keeps_old_and_leaves_no_staging(tmp_path, monkeypatch):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old").write_text("old")

    def fail(new, tgt):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_swap_in", fail)
    with pytest.raises(OSError, match="No space left"), store.staged_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_staged_dir_body_error_never_replaces_a_good_entry(tmp_path):
    target = tmp_path / "entry"
    with store.staged_dir(target) as tmp:
        (tmp / "config.json").write_text('{"v": 1}')
    for exc in (RuntimeError("training diverged"), SystemExit(1)):
        with pytest.raises(type(exc)), store.staged_dir(target) as tmp:
            (tmp / "config.json").write_text('{"v": 2}')
            raise exc
        assert json.loads((target / "config.json").read_text()) == {"v": 1}
        assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_staged_dir_first_publish_and_replacing_an_empty_folder(tmp_path):
    target = tmp_path / "a" / "entry"
    with store.staged_dir(target) as tmp:
        (tmp / "f").write_text("1")
    assert (target / "f").read_text() == "1" and not target.is_symlink()
    with store.staged_dir(target) as tmp:
        (tmp / "f").write_text("2")
    assert (target / "f").read_text() == "2" and [p.name for p in target.parent.iterdir()] == ["entry"]
