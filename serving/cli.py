"""``zoo serve NAME [NAME ...]``: check and prepare the models, start the BentoML server, wait until ready.

Imports nothing heavy at module level (``zoo`` builds its parser from :func:`add_arguments`); BentoML,
torch and the export layer load inside :func:`main`.

Errors are one line. :func:`exit_status` tells usage errors (bad arguments, unknown or unbuilt
models, a port that cannot be used: status 2) from runtime errors (an export, the server or a model
load that failed: status 1). :class:`UsageError` and :class:`ServeFailed` are ``ValueError`` s, so
``zoo serve`` reports them in one line too (with its own statuses).
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

from export.formats import FORMATS, SERVABLE, servable_for_precision

SERVICE = "serving.service:ZooService"
USAGE, RUNTIME = 2, 1  # exit statuses
REPO = Path(__file__).resolve().parents[1]  # the worker imports `serving` from here (`python -m` puts cwd first)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="NAME", help="zoo names (or folders of built entries / runs)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port, 1-65535 (default 3000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                   help="onnx: ONNX Runtime on the exported bundle, made when missing (default); torch: zoo.load")
    p.add_argument("--format", choices=SERVABLE, default="onnx",
                   help="export format served (the `zoo export --format` names): "
                        + "; ".join(f"{n}: {FORMATS[n].summary}" for n in SERVABLE) + " (default onnx)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="deprecated: the same choice as --format (fp32 = onnx, fp16 = onnx-fp16, int8 = onnx-int8)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most images per adaptive batch (default 32)")
    p.add_argument("--max-latency-ms", type=int, default=10_000,
                   help="adaptive batching latency budget; requests predicted to miss it get 503 (default 10000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB (default 10)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="largest image, width x height, checked before decoding (default 16777216)")
    p.add_argument("--max-pixels-in-flight", type=int, default=None,
                   help="most decoded pixels held at once by the uploads being decoded, all requests together; "
                        "an upload that finds no room waits up to --max-latency-ms, then gets 503 "
                        "(default 4 x --max-pixels)")
    p.add_argument("--threads", type=int, default=0, help="runtime intra-op threads per model (default: all cores)")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    p.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for the models to load before giving up (default 600)")


class UsageError(ValueError):
    """The command line asks for something that cannot be served as asked (exit status 2).

    Like :class:`zoo.errors.UsageError` it carries its exit status, so ``zoo serve`` exits as
    ``python -m serving`` does without this module importing the zoo package.
    """

    exit_status = 2


class ServeFailed(ValueError):
    """Serving failed once started: an export, the server or a model load (exit status 1)."""


def exit_status(e: BaseException) -> int:
    """2 for a usage error (the arguments, an unknown name), 1 for a runtime error (the export, server or models)."""
    from zoo.registry import UnknownModelError  # the registry imports torch: not while `zoo` builds its parser

    return USAGE if isinstance(e, UsageError | UnknownModelError) or getattr(e, "exit_status", 1) == 2 else RUNTIME


def config_from_args(a: argparse.Namespace):
    """The :class:`serving.config.ServeConfig` the arguments describe (pydantic errors are ValueErrors)."""
    from serving.config import MIB, ServeConfig  # start-up cost: pydantic

    fmt = a.format
    if a.precision is not None:
        fmt = servable_for_precision(a.precision)
        print(f"zoo serve: note: --precision {a.precision} is deprecated; use --format {fmt}", file=sys.stderr)
    return ServeConfig(models=a.models, backend=a.backend, format=fmt, max_batch_size=a.max_batch_size,
                       max_latency_ms=a.max_latency_ms, max_upload_bytes=int(a.max_upload_mb * MIB),
                       max_pixels=a.max_pixels, max_pixels_in_flight=getattr(a, "max_pixels_in_flight", None),
                       threads=a.threads, access_log=a.access_log)


def prepare(cfg, say=lambda m: print(m, file=sys.stderr, flush=True)) -> list[str]:
    """Fail fast on names that cannot be served (:class:`UsageError`), then export missing ONNX bundles
    before the server starts (a failed export is a runtime error)."""
    from serving.runtime import ensure_onnx, entry_folder  # start-up cost: torch and onnxruntime

    for name in cfg.models:
        folder = entry_folder(name)  # unknown names raise UnknownModelError here, with the closest ones
        if not (folder / "config.json").is_file():
            raise UsageError(f"{name} is not built; build it with `zoo build {name}`")
    if cfg.backend == "onnx":
        for name in cfg.models:
            ensure_onnx(name, say, cfg.format)
    return list(cfg.models)


def check_port(host: str, port: int) -> None:
    """A port in 1-65535 that ``host`` can listen on now, else :class:`UsageError`."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port or "
                             "--host") from None


def wait_ready(url: str, server, timeout: float) -> dict:
    """Poll ``GET /models`` until every model is loaded; a failed load stops with its reason (:class:`ServeFailed`)."""
    deadline = time.monotonic() + timeout
    started = time.monotonic() + 60
    while not server.running:  # the arbiter starts in its own thread
        if time.monotonic() > started:
            raise ServeFailed("the BentoML server did not start within 60 s; see the log above")
        time.sleep(0.05)
    while time.monotonic() < deadline:
        if not server.running:
            raise ServeFailed("the server stopped while loading; see the log above")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                listing = json.loads(r.read())
        except (OSError, urllib.error.URLError, json.JSONDecodeError):
            listing = {"status": "starting"}
        if listing["status"] == "ready":
            return listing
        if listing["status"] == "failed":
            raise ServeFailed(f"the models failed to load: {listing['error']}")
        time.sleep(0.25)
    raise ServeFailed(f"the models were not ready after {timeout:.0f} s; raise --ready-timeout or see the log")


def main(a: argparse.Namespace) -> str:
    """Serve until interrupted (Ctrl-C or SIGTERM); returns the one-line summary ``zoo`` prints."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no usage analytics from a medical-imaging server
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        raise UsageError(str(e)) from None
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
        print(f"ready: {versions} on {url} ({cfg.backend} {cfg.format}, {time.monotonic() - t0:.1f} s to load); "
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
