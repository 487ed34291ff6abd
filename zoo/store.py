"""The on-disk store of built zoo entries (``$ZOO_HOME``, default ``~/.cache/medzoo``).

One folder per entry::

    <ZOO_HOME>/<name>/
        model.safetensors      weights (student, or the probe's linear head)
        backbone/              transformers backbone (linear probes only), save_pretrained format
        config.json            the entry, the resolved recipe config, sha256 of every weight file
        metrics.json           val/test ACC and AUC, seed, wall time, history
        README.md              the model card, generated from the three files above

Entries are written into a temporary folder beside the target and swapped in by rename, so a
crash never leaves a half-written entry. Weights are read only from safetensors, after their
sha256 has been checked; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def zoo_home() -> Path:
    env = os.environ.get("ZOO_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "medzoo"


def entry_dir(name: str) -> Path:
    return zoo_home() / name


def is_built(name: str) -> bool:
    d = entry_dir(name)
    # Classifiers keep their weights in model.safetensors; DINO-MX backbones in backbone/ with their heads.
    bb = d / "backbone"
    return (d / "config.json").is_file() and (
        (d / "model.safetensors").is_file()
        or ((bb / "model.safetensors").is_file() and (bb / "dinomx_heads.safetensors").is_file()))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*.safetensors") if p.is_file())


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


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written with :func:`write_atomic`."""
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh folder; on success it replaces ``target`` (the old one is removed after)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a store entry is shared like any cache folder
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old.{int(time.time() * 1e6)}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class WeightsCorruptedError(RuntimeError):
    """A weight file's sha256 does not match the one recorded when the entry was built."""


def verify(d: Path, recorded: dict[str, str]) -> None:
    """Check every recorded weight file's sha256; any mismatch or missing file is an error."""
    name = d.name
    for rel, want in recorded.items():
        p = d / rel
        if not p.is_file():
            raise WeightsCorruptedError(
                f"{name}: weight file {p} is missing; rebuild with `zoo build {name}`"
            )
        got = sha256_file(p)
        if got != want:
            raise WeightsCorruptedError(
                f"{name}: sha256 mismatch for {p} (expected {want[:12]}..., got {got[:12]}...): the file is "
                f"corrupted or was changed; delete {d} and rebuild with `zoo build {name}`"
            )
