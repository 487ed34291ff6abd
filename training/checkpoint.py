"""Resumable checkpoints: written atomically, with a checksum, validated before anything is restored.

A checkpoint file is ``MAGIC`` + the sha256 of the payload + the payload (``torch.save`` of the
state); it is replaced in one rename, so a crash leaves the previous checkpoint or none. Loading
checks the magic, the checksum (flipped bits), that the payload loads without pickle
(``weights_only``) and that the fields a resume needs are there and sane. Every failure is one
:class:`CheckpointError` line that says to delete the file or set ``checkpoint.resume=false``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from training.config import ConfigError
from zoo.store import write_atomic

MAGIC = b"MEDZOO-CKPT-1\n"
_DIGEST = 64  # hex characters of a sha256


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message says what to do."""


def _advice(path: Path) -> str:
    return f"delete {path} to start over, or set checkpoint.resume=false"


def save(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` with its checksum, atomically."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    write_atomic(path, lambda p: p.write_bytes(MAGIC + digest + b"\n" + payload))


def load(path: Path, required: Mapping[str, type | tuple[type, ...]] = (), total_steps: int | None = None
         ) -> dict[str, Any]:
    """The state saved at ``path``, checked.

    Args:
        required: field -> expected type(s); each must be present with that type.
        total_steps: when given, ``step`` must be an int within [0, total_steps].
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file; {_advice(path)}")
    data = path.read_bytes()
    head = len(MAGIC) + _DIGEST + 1
    if not data.startswith(MAGIC) or len(data) < head:
        what = "empty" if not data else "truncated" if MAGIC.startswith(data[:len(MAGIC)]) else "not a checkpoint"
        raise CheckpointError(f"checkpoint {path} is {what} (written by another version, or damaged); "
                              f"{_advice(path)}")
    digest, payload = data[len(MAGIC):head - 1].decode("ascii", "replace"), data[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} does not match its checksum (truncated or changed on disk); "
                              f"{_advice(path)}")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a foreign payload
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); {_advice(path)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state; {_advice(path)}")
    for key, types in dict(required).items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}; {_advice(path)}")
        if not isinstance(state[key], types) or isinstance(state[key], bool) and types is int:
            raise CheckpointError(f"checkpoint {path}: {key!r} is a {type(state[key]).__name__}; {_advice(path)}")
    if total_steps is not None:
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total_steps:
            raise CheckpointError(f"checkpoint {path} is at step {step!r}, outside this run's 0..{total_steps}; "
                                  f"{_advice(path)}")
    return state
