"""``python -m serving NAME ...`` on a free loopback port, for the demo, the load benchmark and the tests.

:class:`LocalServer` starts the server in its own session, waits until every model is loaded
(``GET /models`` says ``ready``; a failed load or an exited server stops the wait with the log's
tail), lists the processes it started (launcher and worker) and stops all of them::

    with LocalServer(["baseline-resnet18-breastmnist"], log=Path("serve.log")) as srv:
        srv.wait_ready()
        answer = srv.post("/classify", png_bytes, model="baseline-resnet18-breastmnist").json()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """A ``python -m serving`` subprocess on loopback (see the module doc).

    Args:
        models: zoo names (or entry folders) to serve.
        args: more ``zoo serve`` options (``--precision int8``, ``--max-batch-size 32``, ...).
        env: variables added to this process's environment (``ZOO_HOME``, ...); the hub is offline.
        log: where the server's output goes (a temporary file by default); :meth:`tail` reads it.
        cwd: the working directory (the checkout, so ``-m serving`` finds the package either way).
    """

    def __init__(self, models: Sequence[str], args: Sequence[str] = (), env: dict[str, str] | None = None,
                 log: Path | None = None, cwd: Path | None = None, host: str = "127.0.0.1"):
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log = Path(log) if log is not None else Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "serving", *models, "--host", host, "--port", str(self.port), *args]
        full_env = {**os.environ, **OFFLINE, **(env or {})}
        root = cwd or Path(__file__).resolve().parents[1]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.children: list[int] = []

    # -- life cycle ----------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 600) -> dict[str, Any]:
        """``GET /models`` once every model is loaded; raises with the log's tail if the server fails."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                listing = self.get_json("/models")
            except (OSError, urllib.error.URLError, json.JSONDecodeError):
                listing = {"status": "starting"}
            if listing.get("status") == "ready":
                self.children = [p.pid for p in self.processes()[1:]]
                return listing
            if listing.get("status") == "failed":
                raise RuntimeError(f"the models failed to load: {listing.get('error')}\n{self.tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready after {timeout:.0f} s:\n{self.tail()}")

    def processes(self) -> list:
        """psutil processes of the launcher and every process it started (the worker)."""
        import psutil  # only where processes are inspected (the load benchmark samples their memory)

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the launcher (it stops its worker); then make sure every process it started is gone."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in self.children:  # a worker whose launcher died without stopping it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- requests ------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 10) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes, timeout: float = 60, **params: str):
        """An ``httpx`` POST of raw bytes (``?model=...`` and other query parameters as keywords)."""
        import httpx  # the client of the callers that send requests (demo, tests)

        return httpx.post(f"{self.url}{path}", content=body, params=params, timeout=timeout)
