"""A real ``python -m serving`` server in a subprocess for the serving tests, and request bodies."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
from conftest import OFFLINE_ENV, REPO, THREADS_ENV
from PIL import Image

from serving.local import LocalServer


class Server(LocalServer):
    """``python -m serving NAMES...`` on a free loopback port (:class:`serving.local.LocalServer`), with an
    httpx client; stops it, and every process it started, on exit."""

    def __init__(self, models: list[str], env: dict[str, str], log: Path, *args: str):
        super().__init__(models, args, env={**OFFLINE_ENV, **THREADS_ENV, **env}, log=log, cwd=REPO)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 240) -> dict:
        return super().wait_ready(timeout)

    def post(self, path: str, body: bytes, **params) -> httpx.Response:
        return self.client.post(path, content=body, params=params)

    def stop(self) -> None:
        self.client.close()
        super().stop()


def png(a: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def zero_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit grey PNG of any size, compressed row by row (a 20000 x 20000 one is ~0.4 MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def images_hwc(t) -> list[np.ndarray]:
    """uint8 (N, C, H, W) tensor -> N arrays (H, W, C)."""
    return [np.ascontiguousarray(x.permute(1, 2, 0).numpy()) for x in t]


def read_json(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return json.loads(r.content)


def ok(r: httpx.Response) -> dict:
    """The JSON of a 200 answer."""
    assert r.status_code == 200, r.text
    return read_json(r)


def png16(a: np.ndarray) -> bytes:
    """uint16 (H, W) or (H, W, 3) -> a 16-bit PNG (grey, or RGB, which Pillow would open as 8-bit RGB)."""
    if a.ndim == 2:
        buf = io.BytesIO()
        Image.fromarray(a.astype(np.uint16)).save(buf, format="PNG")
        return buf.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = a.shape[:2]
    rows = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def lying_jpeg(width: int = 4000, height: int = 4000) -> bytes:
    """An 8 x 8 JPEG whose frame header claims ``width`` x ``height``: complete, end marker and all, but
    libjpeg fills every missing row with grey and Pillow reports no error."""
    a = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    j = jpeg(a)
    i = j.index(b"\xff\xc0")  # baseline frame: marker, length (2), precision (1), height (2), width (2)
    return j[:i + 5] + struct.pack(">HH", height, width) + j[i + 9:]


def npy_without_brace(a: np.ndarray) -> bytes:
    """A .npy whose header dict lacks its closing brace (numpy's parser raises tokenize.TokenError)."""
    return npy(a).replace(b"}", b" ", 1)


def seed_bodies() -> list[bytes]:
    """Small valid bodies of every accepted form, for mutation."""
    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", progressive=True)
    return [png(grey), png(rgb), jpeg(rgb), buf.getvalue(), npy(rng.random((28, 28)).astype(np.float32)),
            npy(rgb), npy(grey[:, :, None])]


def mutations(seeds: list[bytes], n: int, seed: int = 0):
    """``n`` mutated copies of the seed bodies, cycling through them: flipped bits, overwritten, inserted
    and deleted bytes, truncation, and copies of the header's bytes elsewhere (reproducible)."""
    import random

    r = random.Random(seed)
    for k in range(n):
        b = bytearray(seeds[k % len(seeds)])
        for _ in range(r.randint(1, 4)):
            if not b:
                break
            i = r.randrange(len(b))
            op = r.randrange(6)
            if op == 0:
                b[i] ^= 1 << r.randrange(8)
            elif op == 1:
                b[i] = r.randrange(256)
            elif op == 2:
                b[i:i] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
            elif op == 3:
                del b[i:i + r.randint(1, 16)]
            elif op == 4:
                del b[i:]
            else:
                j = r.randrange(min(len(b), 64))
                b[i:i + 4] = b[j:j + 4]
        yield bytes(b)
