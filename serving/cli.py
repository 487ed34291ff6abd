"""``zoo serve NAME [NAME ...]``: check and prepare the models, start the BentoML server, wait until ready.

Imports nothing heavy at module level (``zoo`` builds its parser from :func:`add_arguments`); BentoML,
torch and the export layer load inside :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVICE = "serving.service:ZooService"
REPO = Path(__file__).resolve().parents[1]  # the worker imports `serving` from here (`python -m` puts cwd first)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="NAME", help="zoo names (or folders of built entries / runs)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (default 3000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                   help="onnx: ONNX Runtime on the exported bundle, made when missing (default); torch: zoo.load")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="ONNX bundle served: fp32 (default), fp16, or int8 (static QDQ, calibrated on training "
                        "images; about 4x faster on CPU, agreement with fp32 in its export.json)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most images per adaptive batch (default 32)")
    p.add_argument("--max-latency-ms", type=int, default=10_000,
                   help="adaptive batching latency budget; requests predicted to miss it get 503 (default 10000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB (default 10)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="largest image, width x height, checked before decoding (default 16777216)")
    p.add_argument("--threads", type=int, default=0, help="runtime intra-op threads per model (default: all cores)")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    p.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for the models to load before giving up (default 600)")


def config_from_args(a: argparse.Namespace):
    """The :class:`serving.config.ServeConfig` the arguments describe (pydantic errors are ValueErrors)."""
    from serving.config import MIB, ServeConfig

    return ServeConfig(models=a.models, backend=a.backend, precision=a.precision, max_batch_size=a.max_batch_size,
                       max_latency_ms=a.max_latency_ms, max_upload_bytes=int(a.max_upload_mb * MIB),
                       max_pixels=a.max_pixels, threads=a.threads, access_log=a.access_log)


def prepare(cfg, say=lambda m: print(m, file=sys.stderr, flush=True)) -> list[str]:
    """Fail fast on names that cannot be served, and export missing ONNX bundles before the server starts."""
    from serving.runtime import ensure_onnx, entry_folder

    for name in cfg.models:
        folder = entry_folder(name)  # unknown names raise here, with the closest ones
        if cfg.backend == "onnx":
            ensure_onnx(name, say, cfg.precision)  # not built -> NotBuiltError with the `zoo build` command
        elif not (folder / "config.json").is_file():
            from zoo.api import NotBuiltError

            raise NotBuiltError(f"{name} is not built; build it with `zoo build {name}`")
    return list(cfg.models)


def check_port(host: str, port: int) -> None:
    from serving.runtime import ServingError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServingError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None


def wait_ready(url: str, server, timeout: float) -> dict:
    """Poll ``GET /models`` until every model is loaded; a failed load stops with its reason."""
    from serving.runtime import ServingError

    deadline = time.monotonic() + timeout
    started = time.monotonic() + 60
    while not server.running:  # the arbiter starts in its own thread
        if time.monotonic() > started:
            raise ServingError("the BentoML server did not start within 60 s; see the log above")
        time.sleep(0.05)
    while time.monotonic() < deadline:
        if not server.running:
            raise ServingError("the server stopped while loading; see the log above")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                listing = json.loads(r.read())
        except (OSError, urllib.error.URLError, json.JSONDecodeError):
            listing = {"status": "starting"}
        if listing["status"] == "ready":
            return listing
        if listing["status"] == "failed":
            raise ServingError(f"the models failed to load: {listing['error']}")
        time.sleep(0.25)
    raise ServingError(f"the models were not ready after {timeout:.0f} s; raise --ready-timeout or see the log")


def main(a: argparse.Namespace) -> str:
    """Serve until interrupted (Ctrl-C or SIGTERM); returns the one-line summary ``zoo`` prints."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no usage analytics from a medical-imaging server
    cfg = config_from_args(a)
    check_port(a.host, a.port)
    names = prepare(cfg)
    import bentoml

    t0 = time.monotonic()
    server = bentoml.serve(SERVICE, host=a.host, port=a.port, working_dir=str(REPO), args=cfg.model_dump())
    url = f"http://{'localhost' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        listing = wait_ready(url, server, a.ready_timeout)
        versions = ", ".join(f"{m['name']} ({m['version']})" for m in listing["models"])
        print(f"ready: {versions} on {url} ({cfg.backend} {cfg.precision}, {time.monotonic() - t0:.1f} s to load); "
              f"POST {url}/classify?model=NAME with an image as the body; Ctrl-C stops", file=sys.stderr, flush=True)
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    return f"served {len(names)} model(s) at {url} for {time.monotonic() - t0:.0f} s"


def _interrupt(signum, frame):
    raise KeyboardInterrupt
