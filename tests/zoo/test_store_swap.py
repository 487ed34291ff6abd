"""The store under concurrency and kills: rebuilds swap atomically for readers, killed builds are cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from zoo import store

# The repo root of the store under test, so subprocesses import the same zoo.store.
ROOT = Path(store.__file__).resolve().parents[1]
NAME = "swap-entry"


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _build(name: str, gen: int) -> None:
    """A rebuild as training.build does one: a staged folder with weights and config.json, swapped in."""
    with store.staged_dir(store.entry_dir(name)) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w%d" % gen)
        (tmp / "config.json").write_text(json.dumps({"gen": gen}))


def _listing() -> list[str]:
    return sorted(p.name for p in store.zoo_home().iterdir())


# A reader in another process (no GIL shared with the builder): it polls the entry until told to stop.
READER = """
    import json, os, sys
    d, stop = sys.argv[1], sys.argv[2]
    checks = misses = 0
    gens = set()
    print("ready", flush=True)
    while not os.path.exists(stop):
        checks += 1
        try:
            with open(os.path.join(d, "config.json")) as f:
                gens.add(json.load(f)["gen"])
            if not os.path.isfile(os.path.join(d, "model.safetensors")):
                misses += 1
        except (OSError, ValueError):
            misses += 1
    print(json.dumps({"checks": checks, "misses": misses, "gens": len(gens)}))
"""


def test_readers_never_find_a_rebuilt_entry_missing(tmp_path):
    # The store once renamed the old entry away, then the new one in: a poller found no entry 3,141 times in
    # 272,391 checks. Readers in a thread (is_built, config.json) and in a process poll through 250 rebuilds.
    _build(NAME, 0)
    d = store.entry_dir(NAME)
    stop = threading.Event()
    seen = {"checks": 0, "misses": 0, "gens": set()}

    def poll() -> None:
        while not stop.is_set():
            seen["checks"] += 1
            try:
                ok = store.is_built(NAME)
                seen["gens"].add(json.loads((d / "config.json").read_text())["gen"])
            except (OSError, ValueError):
                ok = False
            seen["misses"] += not ok

    stop_file = tmp_path / "stop"
    proc = _python(READER, str(d), str(stop_file))
    try:
        assert proc.stdout.readline().strip() == "ready"
        reader = threading.Thread(target=poll)
        reader.start()
        try:
            for gen in range(1, 251):
                _build(NAME, gen)
        finally:
            stop.set()
            reader.join()
            stop_file.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    other = json.loads(out)
    assert seen["misses"] == 0 and other["misses"] == 0, (seen["misses"], other, err)
    assert seen["checks"] > 250 and other["checks"] > 250  # they did poll throughout
    assert len(seen["gens"]) > 1 and other["gens"] > 1  # and saw rebuilds happen
    assert json.loads((d / "config.json").read_text()) == {"gen": 250}
    assert _listing() == [NAME]  # no previous versions or staging folders left


# A build that is killed while its staging folder is half written.
KILLED_BUILD = """
    import sys, time
    from pathlib import Path
    from zoo import store
    with store.staged_dir(Path(sys.argv[1])) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        print(tmp, flush=True)
        time.sleep(600)
"""


def _start_build(name: str) -> tuple[subprocess.Popen, Path]:
    proc = _python(KILLED_BUILD, str(store.entry_dir(name)))
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return proc, Path(line)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_next_build_removes_staging_of_a_killed_build(sig):
    _build(NAME, 1)
    proc, staging = _start_build(NAME)
    proc.send_signal(sig)  # neither runs staged_dir's cleanup
    proc.wait(timeout=60)
    assert staging.is_dir() and _listing() == sorted([NAME, staging.name])
    assert json.loads((store.entry_dir(NAME) / "config.json").read_text()) == {"gen": 1}  # never published
    _build("another-entry", 1)  # the next build of any entry in the store
    assert _listing() == ["another-entry", NAME]
    assert staging.parent == store.zoo_home() and staging.name.startswith(f".{NAME}.building.{proc.pid}.")


def test_a_zombie_build_counts_as_dead():
    proc, staging = _start_build(NAME)
    os.kill(proc.pid, signal.SIGKILL)
    # not reaped yet: the pid still exists as a zombie until wait()
    deadline = time.time() + 30
    while store._proc_stat(proc.pid) and store._proc_stat(proc.pid)[0] != "Z" and time.time() < deadline:
        time.sleep(0.01)
    try:
        assert store.remove_stale_staging(store.zoo_home()) == [staging]
    finally:
        proc.wait(timeout=60)


def test_a_live_builds_staging_is_left_alone():
    proc, staging = _start_build(NAME)
    try:
        _build("another-entry", 1)
        assert staging.is_dir()
        with store.staged_dir(store.entry_dir("third")) as mine:
            assert store.remove_stale_staging(store.zoo_home()) == []  # this process's own build too
            assert mine.is_dir() and staging.is_dir()
            (mine / "f").write_text("x")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    _build("another-entry", 2)
    assert _listing() == ["another-entry", "third"]


def test_stale_staging_of_unknown_owners_goes_by_age(tmp_path):
    home = store.zoo_home()
    home.mkdir(parents=True)
    old = time.time() - 2 * store.STALE_AFTER_S
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {
        ".a.building.k2j4h_x1": True,  # an older store's staging name: no pid
        ".a.old.1712345678901234": True,  # an older store's previous entry, renamed away mid-swap
        f".a.building.123.other-host.0.abc{os.getpid()}": True,  # another host's: its pid means nothing here
        f".a.building.{os.getpid()}.{store._host()}.1.abcdefgh": False,  # this pid, but a new process: reused
        f".a.building.{dead.stdout.strip()}.{store._host()}.0.abcdefgh": False,  # a pid that exited
    }
    keep = [".cache", ".a.tmp", "a", ".a.building"]  # not staging folders
    for n in [*names, *keep]:
        (home / n).mkdir()
        (home / n / "f").write_text("x")
    for n, aged in names.items():
        if aged:
            os.utime(home / n, (old, old))
    for n in keep:
        os.utime(home / n, (old, old))
    fresh = [n for n, aged in names.items() if aged]
    for n in fresh:  # the same names, recent: their owners may still be building
        (home / (n + "2")).mkdir()
    expected = {home / n for n in names}
    if store._proc_stat(os.getpid()) is None:  # no /proc: a reused pid cannot be told from its first owner
        expected.discard(home / f".a.building.{os.getpid()}.{store._host()}.1.abcdefgh")
    assert set(store.remove_stale_staging(home)) == expected
    left = [n for n in names if home / n not in expected]
    assert _listing() == sorted(keep + [n + "2" for n in fresh] + left)


def test_store_imports_only_the_standard_library():
    code = """
        import json, sys
        before = set(sys.modules)
        import zoo.store
        new = {m.split(".")[0] for m in set(sys.modules) - before} - {"zoo"}
        print(json.dumps(sorted(new - set(sys.stdlib_module_names))))
    """
    proc = _python(code)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out) == []


def test_swap_without_an_exchange_call_still_replaces_the_entry(monkeypatch):
    # NFS and some FUSE filesystems refuse RENAME_EXCHANGE: the two-rename swap, with nothing left behind
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    for gen in range(3):
        _build(NAME, gen)
        assert json.loads((store.entry_dir(NAME) / "config.json").read_text()) == {"gen": gen}
        assert _listing() == [NAME]


def test_concurrent_builders_of_one_entry_leave_one_complete_entry():
    errors = []

    def builder(k: int) -> None:
        try:
            for i in range(40):
                _build(NAME, 1000 * k + i)
        except BaseException as e:  # reported below, in the test thread
            errors.append(e)

    threads = [threading.Thread(target=builder, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    d = store.entry_dir(NAME)
    gen = json.loads((d / "config.json").read_text())["gen"]
    assert (d / "model.safetensors").read_bytes() == b"w%d" % gen  # both files from the same build
    assert _listing() == [NAME]


def test_entry_version_changes_with_each_swap():
    _build(NAME, 1)
    d = store.entry_dir(NAME)
    v1 = store.entry_version(d)
    (d / "config.json").read_text()
    assert store.entry_version(d) == v1  # reading does not change it
    seen = {v1}
    for gen in range(2, 12):  # deleted folders' inode numbers come back; the version must not
        _build(NAME, gen)
        seen.add(store.entry_version(d))
    assert len(seen) == 11
