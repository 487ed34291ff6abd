"""The on-disk store of built zoo entries (``$ZOO_HOME``, default ``~/.cache/medzoo``).

One folder per entry::

    <ZOO_HOME>/<name>/
        model.safetensors      weights (student, or the probe's linear head)
        backbone/              transformers backbone (linear probes only), save_pretrained format
        config.json            the entry, the resolved recipe config, sha256 of every weight file
        metrics.json           val/test ACC and AUC, seed, wall time, history
        README.md              the model card, generated from the three files above

Writing: an entry is built in a staging folder beside it (``.<name>.building.<pid>.<host>.<start>.<random>``)
and swapped in whole by :func:`staged_dir`, so a crash never leaves a half-written entry and a reader polling
during a rebuild finds the old entry or the new one, never none. Staging folders of builds that were killed are
removed by the next build (:func:`remove_stale_staging`).

Reading: :func:`read_config` checks ``config.json``'s shape, :func:`verify` that its ``sha256`` covers every weight
file and matches, :func:`load_weights` loads one safetensors file from the same bytes it hashes. Weights are read
only from safetensors; nothing is unpickled. Every failure is one :class:`WeightsCorruptedError` line.

This module is the bottom layer: it imports only the standard library (safetensors inside :func:`load_weights`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from zoo.registry import ZooEntry

if TYPE_CHECKING:
    from torch import Tensor


def zoo_home() -> Path:
    """The store folder: ``$ZOO_HOME``, else ``$XDG_CACHE_HOME/medzoo``, else ``~/.cache/medzoo``."""
    env = os.environ.get("ZOO_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "medzoo"


def entry_dir(name: str) -> Path:
    """``<ZOO_HOME>/<name>``, built or not."""
    return zoo_home() / name


def is_built(name: str) -> bool:
    """Whether ``name`` has a config.json and its weights in the store (their sha256 is not checked here)."""
    d = entry_dir(name)
    # Classifiers keep their weights in model.safetensors; DINO-MX backbones in backbone/ with their heads.
    bb = d / "backbone"
    return (d / "config.json").is_file() and (
        (d / "model.safetensors").is_file()
        or ((bb / "model.safetensors").is_file() and (bb / "dinomx_heads.safetensors").is_file()))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def weight_files(d: Path) -> list[Path]:
    """Every ``*.safetensors`` file under ``d``, in any subfolder, sorted."""
    return sorted(p for p in d.rglob("*.safetensors") if p.is_file())


def entry_version(d: Path) -> tuple[int, int, int]:
    """An identity of the folder ``d`` names now; it changes with every swap by :func:`staged_dir`.

    A rebuild swaps a new folder in under the same name while readers may be reading, so a reader that reads
    several files (config.json, then the weights it records) can compare this before and after and read again
    when it changed, rather than check one build's weights against the other's hashes. The change time is part of
    it because a deleted folder's inode number may be reused by a later build.
    """
    st = os.stat(d)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a temporary file beside it, which then
    replaces ``path`` in one rename, so a crash or kill mid-write leaves the old file (or none).

    ``write`` takes the temporary path (``torch.save``, ``safetensors.torch.save_file``, ``PIL``'s
    ``save`` and ``Path.write_bytes`` all accept one; not ``np.savez``, which appends ``.npz`` to a
    name). The file gets ordinary 0644 permissions (``mkstemp`` makes it private).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object (optional files:
    a folder's metrics, export receipt or hub record, shown when present)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written with :func:`write_atomic`."""
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


# ------------------------------------------------------------------------------------- staging and swap

# A staging folder unchanged for this long whose owner cannot be checked (another host sharing the store, a name
# from an older store without a pid) is taken as dead. A week: a DINO-MX pretraining runs inside its staging
# folder and writes into it only at the end, and removing a live build's folder would cost its run.
STALE_AFTER_S = 7 * 24 * 3600.0

# ".<name>.building." then, from this store, "<pid>.<host>.<start ticks>." and mkdtemp's random part; older
# stores wrote only the random part. A name with ".old" after it is a previous entry being swapped out.
_STAGING = re.compile(r"^\..+\.building\.(?:(\d+)\.([A-Za-z0-9-]*)\.(\d+)\.)?")
_LEGACY_OLD = re.compile(r"^\..+\.old\.\d+$")  # older stores' swap: the previous entry, renamed away


@functools.cache
def _host() -> str:
    """This machine's name as it appears in staging names (a pid is only meaningful on its own host)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """Linux's state letter and start time (clock ticks since boot) of process ``pid``; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
        # the command name (field 2) may hold spaces and parentheses: count fields from the last ')'
        fields = line.rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _staging_prefix(name: str) -> str:
    pid = os.getpid()
    st = _proc_stat(pid)
    return f".{name}.building.{pid}.{_host()}.{st[1] if st else 0}."


def _owner_alive(m: re.Match[str]) -> bool | None:
    """Whether the build that made a staging folder still runs; None where that cannot be known."""
    if m.group(1) is None or m.group(2) != _host() or os.name != "posix":
        return None
    pid, start = int(m.group(1)), int(m.group(3))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    st = _proc_stat(pid)
    if st is None:
        return True
    # a killed build is a zombie until its parent reaps it, and its pid may since belong to a new process
    return st[0] != "Z" and (start == 0 or st[1] == start)


def _remove(p: Path) -> None:
    """Delete a folder tree, file or link if it is there; errors are ignored so cleanup never masks the real one."""
    try:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


def remove_stale_staging(parent: Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the staging folders in ``parent`` whose build will never finish, and return them.

    A SIGKILL or SIGTERM skips :func:`staged_dir`'s own cleanup, so its staging folder would stay forever.
    A staging folder is stale when the process that made it (its pid, on this host, with the same start time)
    is gone, or, when that cannot be checked (another host, a name from an older store without a pid, the
    previous entry an older store renamed away), when it has not changed for ``max_age_s``. Folders of live
    builds are left alone, this process's included.
    """
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    now = time.time()
    for n in names:
        m = _STAGING.match(n)
        if m is None and _LEGACY_OLD.match(n) is None:
            continue
        p = parent / n
        alive = _owner_alive(m) if m is not None else None
        if alive is None:
            try:
                if now - p.lstat().st_mtime < max_age_s:
                    continue
            except FileNotFoundError:  # its build just finished
                continue
        elif alive:
            continue
        _remove(p)
        removed.append(p)
    return removed


def _fsync(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder, or fsync a read-only handle
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_tree(path: Path) -> None:
    """Make the folder tree ``path`` readable by everyone and durable: folders 0755, files 0644 (0755 where
    executable), each flushed to disk.

    A store entry is shared like any cache folder (another user, a container or a server under another uid reads
    it), but ``mkdtemp`` and some writers create private 0700 folders and 0600 files. Flushing before the swap
    means that once an entry is visible its files are on disk: a power cut cannot publish empty weights. Links
    are left as they are (chmod would change their targets).
    """
    for root, _dirs, files in os.walk(path):
        r = Path(root)
        for n in files:
            p = r / n
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            os.chmod(p, 0o755 if mode & 0o111 else 0o644)
            if stat.S_ISREG(mode):
                _fsync(p)
        os.chmod(r, 0o755)
        _fsync(r)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h, for renamex_np
_RENAMEAT2_NR = {"x86_64": 316, "aarch64": 276}  # for a libc older than renameat2 (glibc < 2.28)
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}  # the OS or filesystem cannot


@functools.cache
def _exchange_call() -> Callable[[bytes, bytes], int] | None:
    """The C call that swaps two names in one step (0 on success, errno set otherwise), or None."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if hasattr(libc, "renameat2"):
            f = libc.renameat2
            f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            f.restype = ctypes.c_int
            return lambda a, b: f(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
        nr = _RENAMEAT2_NR.get(platform.machine())
        if nr is None:
            return None
        g = libc.syscall
        g.restype = ctypes.c_long
        return lambda a, b: g(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                              ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(_RENAME_EXCHANGE))
    if sys.platform == "darwin":
        libc = ctypes.CDLL(None, use_errno=True)
        if hasattr(libc, "renamex_np"):
            f = libc.renamex_np
            f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            f.restype = ctypes.c_int
            return lambda a, b: f(a, b, _RENAME_SWAP)
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` (both must exist) in one step; False where the OS or filesystem cannot."""
    call = _exchange_call()
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(new: Path, target: Path) -> Path | None:
    """Make ``target`` name the folder ``new``; return where the previous ``target`` now is (None: there was none)."""
    for _ in range(100):  # each retry means another process published or removed ``target`` meanwhile
        if not os.path.lexists(target):
            try:
                os.rename(new, target)
                return None
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue
        try:
            if _exchange(new, target):
                return new
        except FileNotFoundError:
            continue
        # No exchange here (NFS, some FUSE filesystems, Windows): two renames, between which ``target`` is missing.
        # The previous entry waits under a staging name, so a kill in between leaves it to the stale sweep.
        aside = new.with_name(new.name + ".old")
        os.replace(target, aside)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(aside, target)
            raise
        return aside
    raise OSError(f"could not swap {new} in as {target}: other processes keep changing it")


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``target``; when the body succeeds it replaces ``target`` in one step.

    If the body raises (or the swap fails), ``target`` is left as it was and the staging folder is removed.
    Before staging, folders of earlier builds that were killed are removed (:func:`remove_stale_staging`; the pid
    in the staging name says whose a folder is). Before the swap, :func:`publish_tree` makes the new folder 0755
    with 0644 files and flushes it to disk.

    The swap is one ``renameat2(RENAME_EXCHANGE)`` (``renamex_np(RENAME_SWAP)`` on macOS): ``target`` names the
    old folder, then the new one, and is never missing, so a reader that polls ``is_built`` or opens
    ``<target>/config.json`` during any number of rebuilds always finds a complete entry. The old folder,
    swapped to the staging name, is then deleted; a reader that had a file open keeps reading it, and a reader
    that reads several files can detect a swap with :func:`entry_version`. The store keeps one plain folder per
    entry rather than a symlink to versioned folders: an existing plain folder cannot be replaced by a symlink
    in one step (rename cannot replace a non-empty folder), so every store from an older version would have a
    window once, and the links and version folders would show up in listings and copies of the store. Where the
    filesystem has no exchange (NFS, some FUSE filesystems, Windows) the swap falls back to two renames, with a
    moment between them where ``target`` is missing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target.name)))
    old = None
    try:
        yield tmp
        publish_tree(tmp)
        old = _swap_in(tmp, target)
        _fsync(target.parent)  # the swap itself on disk
    finally:
        _remove(tmp)  # the unfinished build, or after an exchange the previous entry
        if old is not None:
            _remove(old)


# ------------------------------------------------------------------------------------------ reading


class WeightsCorruptedError(RuntimeError):
    """An entry's files do not match what was recorded when it was built, or cannot be read as what they are
    (config.json not a zoo config, a weight file unrecorded, changed, missing or not safetensors)."""


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}


def _json_type(v: object) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def _fix(d: Path) -> str:
    return f"delete {d} and rebuild with `zoo build {d.name}`"


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _rel_key(rel: object) -> str | None:
    """``rel`` as a normalised relative POSIX path inside an entry, or None if it is not one."""
    if not isinstance(rel, str) or not rel:
        return None
    p = PurePosixPath(rel.replace("\\", "/"))  # entries built on Windows record backslashes
    if p.is_absolute() or ".." in p.parts or p == PurePosixPath("."):
        return None
    return p.as_posix()


def read_config(d: Path) -> dict[str, Any]:
    """The entry folder ``d``'s ``config.json``: a JSON object with an ``entry`` object and a ``sha256`` object.

    Anything else (the file missing or unreadable, not JSON, another JSON type, a key missing or of another
    type) is a one-line :class:`WeightsCorruptedError` that says what is wrong and to delete and rebuild the
    entry. The contents of ``sha256`` are checked by :func:`verify`.
    """
    p = d / "config.json"
    fix = _fix(d)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeightsCorruptedError(f"{d.name}: cannot read {p}: the file is missing; {fix}") from None
    except OSError as e:
        raise WeightsCorruptedError(f"{d.name}: cannot read {p}: {e.strerror or e}; {fix}") from None
    except UnicodeDecodeError:
        raise WeightsCorruptedError(f"{d.name}: cannot read {p}: it is not UTF-8 text; {fix}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise WeightsCorruptedError(
            f"{d.name}: cannot read {p}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    except RecursionError:
        raise WeightsCorruptedError(f"{d.name}: cannot read {p}: JSON nested too deep; {fix}") from None
    if not isinstance(cfg, dict):
        raise WeightsCorruptedError(f"{d.name}: {p} holds a JSON {_json_type(cfg)}, not an object; {fix}")
    for key in ("entry", "sha256"):
        if key not in cfg:
            raise WeightsCorruptedError(f'{d.name}: {p} has no "{key}"; {fix}')
        if not isinstance(cfg[key], dict):
            raise WeightsCorruptedError(
                f'{d.name}: {p} "{key}" is a JSON {_json_type(cfg[key])}, not an object; {fix}')
    return cfg


def verify(d: Path, recorded: object) -> None:
    """Check the entry folder ``d`` against ``recorded``, its config.json's ``sha256`` (relative path -> sha256).

    ``recorded`` must be a non-empty object of relative paths to 64-digit hex sha256s that names every weight
    file (``*.safetensors``, in any subfolder) under ``d``, so a loader never reads a weight file nobody hashed;
    each named file must exist and have its sha256. Any failure (``"sha256": {}`` included) is a one-line
    :class:`WeightsCorruptedError` that says what is wrong and to delete and rebuild the entry.
    """
    name, fix = d.name, _fix(d)
    if not isinstance(recorded, dict):
        raise WeightsCorruptedError(f'{name}: config.json "sha256" is a JSON {_json_type(recorded)}, not an object '
                                    f"of weight file -> sha256; {fix}")
    if not recorded:
        raise WeightsCorruptedError(f'{name}: config.json records no weight file sha256 ("sha256": {{}}), so its '
                                    f"weights cannot be checked; {fix}")
    want: dict[str, str] = {}
    for rel, h in recorded.items():
        key = _rel_key(rel)
        if key is None:
            raise WeightsCorruptedError(
                f'{name}: config.json "sha256" key {str(rel)[:80]!r} is not a relative path inside the entry; {fix}')
        if not isinstance(h, str) or not _HEX64.fullmatch(h):
            raise WeightsCorruptedError(
                f'{name}: config.json "sha256" of {key} is {str(h)[:80]!r}, not a 64-digit hex sha256; {fix}')
        want[key] = h.lower()
    for key in sorted(want):
        if not (d / key).is_file():
            raise WeightsCorruptedError(f"{name}: weight file {d / key} is missing; {fix}")
    unrecorded = sorted({p.relative_to(d).as_posix() for p in weight_files(d)} - want.keys())
    if unrecorded:
        more = f" and {len(unrecorded) - 3} more" if len(unrecorded) > 3 else ""
        raise WeightsCorruptedError(
            f"{name}: weight file(s) {', '.join(unrecorded[:3])}{more} in {d} not recorded in config.json "
            f'"sha256", so they cannot be checked; {fix}')
    for key in sorted(want):
        p = d / key
        got = sha256_file(p)
        if got != want[key]:
            raise WeightsCorruptedError(
                f"{name}: sha256 mismatch for {p} (expected {want[key][:12]}..., got {got[:12]}...): the file is "
                f"corrupted or was changed; {fix}"
            )


def verified_entry(d: Path) -> tuple[dict[str, Any], ZooEntry]:
    """(config.json, entry) of a built folder whose weight files all match their recorded sha256; an entry
    that does not parse is a one-line :class:`WeightsCorruptedError` (load, backbone load and push read it so)."""
    info = read_config(d)
    verify(d, info["sha256"])
    try:
        entry = ZooEntry.from_dict(info["entry"])
    except ValueError as e:
        raise WeightsCorruptedError(f"{d / 'config.json'}: {e}; delete {d} and rebuild the entry") from None
    return info, entry


def _entry_of(path: Path) -> Path:
    """The entry folder a file is in, for error hints: its ancestor right under ZOO_HOME, else its own folder."""
    home = zoo_home()
    for parent in path.parents:
        if parent.parent == home:
            return parent
    return path.parent


def load_weights(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
    """The tensors of the safetensors file ``path``, on the CPU; with ``sha256``, only if the file has it.

    With ``sha256`` the file is read once and the same bytes are hashed and parsed, so nothing can change
    between check and load (a rebuild swapping the entry, a writer). A missing file, a wrong sha256 or a file
    that is not safetensors (safetensors raises ``SafetensorError`` and others on garbage) is a one-line
    :class:`WeightsCorruptedError`.
    """
    # function-level import: safetensors.torch imports torch (seconds), which listing and the CLI's start do not need
    from safetensors.torch import load, load_file

    d = _entry_of(path)
    try:
        if sha256 is None:
            return load_file(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsCorruptedError(f"{d.name}: weight file {path} is missing; {_fix(d)}") from None
    except Exception as e:  # SafetensorError, OSError, ...
        raise WeightsCorruptedError(
            f"{d.name}: {path} is not a valid safetensors file ({_one_line(e)}); {_fix(d)}") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha256.lower():
        raise WeightsCorruptedError(
            f"{d.name}: sha256 mismatch for {path} (expected {sha256[:12]}..., got {got[:12]}...): the file is "
            f"corrupted or was changed; {_fix(d)}")
    try:
        return load(data)
    except Exception as e:
        raise WeightsCorruptedError(
            f"{d.name}: {path} is not a valid safetensors file ({_one_line(e)}); {_fix(d)}") from e


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def _naturals(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def check_safetensors(path: Path) -> None:
    """Check that ``path`` is a well-formed safetensors file, reading only its header (no torch).

    The header must be a JSON object of tensors, each with a dtype, a shape and data offsets that match, and the
    offsets must tile the rest of the file exactly, as safetensors itself requires. For weight files a loader
    hands to another library (transformers' ``from_pretrained``), whose errors on a garbage file are long; a
    failure here is a one-line :class:`WeightsCorruptedError`. Sub-byte dtypes are not size-checked.
    """
    d = _entry_of(path)

    def bad(why: str) -> WeightsCorruptedError:
        return WeightsCorruptedError(f"{d.name}: {path} is not a valid safetensors file ({why}); {_fix(d)}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, too short for a header")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise bad(f"header length {n} exceeds the file's {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise WeightsCorruptedError(f"{d.name}: weight file {path} is missing; {_fix(d)}") from None
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {_json_type(header)}, not an object")
    spans = []
    for key, t in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(t, dict) and isinstance(t.get("dtype"), str) and _naturals(t.get("shape"))
                and _naturals(t.get("data_offsets")) and len(t["data_offsets"]) == 2):
            raise bad(f"tensor {key[:80]!r} has no valid dtype, shape and data_offsets")
        begin, end = t["data_offsets"]
        width = _DTYPE_BYTES.get(t["dtype"])
        if begin > end or (width is not None and end - begin != math.prod(t["shape"]) * width):
            raise bad(f"tensor {key[:80]!r} spans bytes {begin}-{end}, not a {t['dtype']} {t['shape']}")
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise bad("tensor data has gaps or overlaps")
        pos = end
    if pos != size - 8 - n:
        raise bad(f"tensors cover {pos} of its {size - 8 - n} data bytes")
