"""A real ``python -m serving`` server in a subprocess for the serving tests, and request bodies."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import psutil
from conftest import OFFLINE_ENV, REPO, THREADS_ENV
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m serving NAMES...`` on a free loopback port; stops it, and every process it started, on exit."""

    def __init__(self, models: list[str], env: dict[str, str], log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "serving", *models, "--port", str(self.port), *args]
        full_env = {**os.environ, **OFFLINE_ENV, **THREADS_ENV, "BENTOML_DO_NOT_TRACK": "true", **env}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.children: list[int] = []
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 240) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                listing = self.client.get("/models").json()
                if listing["status"] == "ready":
                    self.children = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
                    return listing
                assert listing["status"] != "failed", listing["error"]
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def post(self, path: str, body: bytes, **params) -> httpx.Response:
        return self.client.post(path, content=body, params=params)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.children:  # the worker, should the launcher have died without stopping it
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


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
