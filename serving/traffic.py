"""Traffic-level pieces of the service that BentoML 1.4 lacks or gets wrong; :func:`install` puts them in place.

- :class:`TimeoutMiddleware`: BentoML's per-request timeout (``traffic.timeout``: 504 after that many
  seconds) without its timer leak. BentoML 1.4's schedules ``loop.call_later(timeout, ...)`` for every
  request and never cancels it, so each finished request leaves a timer (handle, future, context,
  bound method) alive for the whole timeout. At ~1000 req/s with the 60 s timeout that is ~60,000 live
  timers, ~360,000 objects that every full garbage collection walks: measured on the INT8 28 px
  ResNet-18 (2 cores, 32 clients), a 100-160 ms pause of the worker every ~1.6 s, which made p99
  150 ms where p90 was 32 ms. This one keeps BentoML's behaviour (the same 504 JSON answer when the
  response has not started in time), cancels its timer as soon as the request is done, and stops
  waiting when the app ends without sending anything (BentoML's waits out the timeout).
- :class:`RouteMetricsMiddleware`: BentoML's request metrics, labelled by route template instead of
  the raw path. BentoML labels ``endpoint`` with ``scope["path"]``, so every distinct path a client
  sends is a new Prometheus series: 10,000 unknown paths grew ``/metrics`` from 36 KB to 35.7 MB.
  Unknown paths share the one label :data:`UNMATCHED`.
- :class:`JsonErrors` and the JSON 400/500 answers of uvicorn and Starlette: every error body is
  ``{"error": "..."}``, including the framework's 404, 405 and malformed-request 400, with no memory
  addresses in the message.
- :class:`PixelBudget`: decoded pixels in flight across concurrent requests, bounded; with
  :func:`tune_malloc` and :func:`release_memory`, what keeps a burst of large images from taking the
  worker's memory (and keeping it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import json
import platform
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Match

from zoo.images import strip_addresses

UNMATCHED = "unmatched"  # the one metrics label of every path that no route serves
ROUTE_CACHE_SIZE = 1024


class TimeoutMiddleware:
    """ASGI: answer 504 if the response has not started within ``timeout`` seconds."""

    replaces: type | None = None  # BentoML's, once :func:`install` has run

    def __init__(self, app, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    @staticmethod
    def _expire(waiter: asyncio.Future) -> None:
        if not waiter.done():
            waiter.set_exception(asyncio.TimeoutError())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # done when the response starts, the app ends, or time is up
        timer = loop.call_later(self.timeout, self._expire, started)

        async def _send(message: dict[str, Any]) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, _send))
        task.add_done_callback(lambda _: started.done() or started.set_result(None))
        try:
            await started
        except asyncio.TimeoutError:
            if task.cancel():
                await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                   status_code=504)(scope, receive, send)
            return
        finally:
            timer.cancel()
        await task


# ----------------------------------------------------------------------------------------- metrics


def route_label(routes: list, scope: dict[str, Any]) -> str | None:
    """The template of the route that serves ``scope`` (``/classify``, ``/static_content/{path}``), or None."""
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        prefix = getattr(route, "path", "")
        sub = getattr(route, "routes", None)
        if sub is None:  # a Route
            return prefix or "/"
        if not sub:  # a Mount of an app without routes (static files): one label for all it serves
            return f"{prefix}/{{path}}"
        inner = route_label(sub, {**scope, **child})  # a Mount of a router: the route inside, if any
        return None if inner is None else prefix + inner
    return None


class _OriginalPath:
    """Hands the app the path the metrics middleware replaced with its label."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        scope = dict(scope)
        scope["path"] = scope.pop("medzoo.path")
        await self.app(scope, receive, send)


class RouteMetricsMiddleware(RunnerTrafficMetricsMiddleware):
    """BentoML's HTTP request metrics (same names and labels), with ``endpoint`` the route template.

    BentoML's middleware reads the label from ``scope["path"]``; it is given the label there, and the
    app below it the real path back.
    """

    def __init__(self, app, **kwargs: Any) -> None:
        super().__init__(_OriginalPath(app), **kwargs)
        self.labels: dict[str, str] = {}

    def label(self, scope: dict[str, Any]) -> str:
        """The ``endpoint`` label of a request: its route's template, or :data:`UNMATCHED`."""
        path = scope["path"]
        if (known := self.labels.get(path)) is not None:
            return known
        app = scope.get("app")
        label = route_label(getattr(app, "routes", []), scope) if app is not None else None
        if label is None:
            return UNMATCHED  # not cached: there is no end to unknown paths
        if len(self.labels) < ROUTE_CACHE_SIZE:
            self.labels[path] = label
        return label

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app.app(scope, receive, send)
        label = "/metrics" if scope["path"] == "/metrics" else self.label(scope)
        await super().__call__({**scope, "path": label, "medzoo.path": scope["path"]}, receive, send)


# ----------------------------------------------------------------------------------------- JSON errors


def error_body(message: str) -> bytes:
    """The JSON body of every error answer."""
    return json.dumps({"error": message}).encode()


class JsonErrors:
    """ASGI: every answer with status >= 400 carries ``{"error": "..."}`` (JSON), whoever made it.

    Starlette answers an unknown path (404) or method (405) in plain text; BentoML wraps some of its
    errors in a list. Such bodies are rewritten; JSON error bodies lose any memory address in their
    message. Other answers pass through untouched.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def _send(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is complete
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._answer(scope, start, b"".join(chunks), send)

        await self.app(scope, receive, _send)

    @staticmethod
    async def _answer(scope, start: dict[str, Any], body: bytes, send) -> None:
        status = start["status"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type",
                                                                                      b"content-length")]
        content_type = next((v for k, v in start.get("headers", []) if k.lower() == b"content-type"), b"")
        out = json_error(status, body, content_type, scope, dict(headers).get(b"allow", b"").decode("latin-1"))
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else out})


def json_error(status: int, body: bytes, content_type: bytes, scope: dict[str, Any], allow: str = "") -> bytes:
    """The JSON error body for an answer with ``status`` whose body was ``body``."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if content_type.startswith(b"application/json"):
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, list) and len(data) == 1:  # BentoML answers some errors as [{"error": ...}]
            data = data[0]
        if isinstance(data, dict):
            data["error"] = strip_addresses(str(data.get("error") or phrase))
            return json.dumps(data).encode()
    text = strip_addresses(body.decode("utf-8", "replace"))[:500]
    method, path = scope.get("method", "?"), scope.get("path", "?")[:200]
    if status == 404 and text in ("", phrase):
        text = f"no endpoint at {path}; GET /docs.json lists the API (POST /classify, POST /localize, GET /models)"
    elif status == 405 and text in ("", phrase):
        text = f"{method} is not allowed on {path}" + (f"; use {allow}" if allow else "")
    return error_body(text or phrase)


def _httptools_400(self, msg: str) -> None:
    """uvicorn (httptools) on a malformed request: its 400, with a JSON body."""
    content = error_body(f"invalid HTTP request: {msg}")
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in self.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\n", b"content-length: " + str(len(content)).encode() + b"\r\n",
             b"connection: close\r\n\r\n", content]
    self.transport.write(b"".join(head))
    self.transport.close()


def _h11_400(self, msg: str) -> None:
    """uvicorn (h11) on a malformed request: its 400, with a JSON body."""
    import h11

    content = error_body(f"invalid HTTP request: {msg}")
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
    self.transport.write(self.conn.send(h11.Data(data=content)))
    self.transport.write(self.conn.send(h11.EndOfMessage()))
    self.transport.close()


def _server_error(self, request, exc: Exception) -> JSONResponse:
    """Starlette's answer to an exception nothing else caught (it logs the traceback): JSON, no details."""
    return JSONResponse({"error": "an unexpected error has occurred; see the server log"}, status_code=500)


# ----------------------------------------------------------------------------------------- memory


class PixelBudget:
    """Decoded pixels in flight across concurrent requests: at most ``limit``, granted first come, first served.

    A 48 KB PNG of 4096 x 4096 pixels decodes to ~50-70 MB; forty at once took the worker from 1.35 to
    6.1 GB. Each large upload holds its decoded pixel count here while it is decoded; one that cannot
    get it within ``timeout`` seconds raises :class:`Busy` (the service answers 503 with Retry-After).
    ``on_idle`` runs whenever the last holder leaves, e.g. to hand freed memory back to the system.
    """

    class Busy(Exception):
        """No room in the budget within the wait allowed."""

    def __init__(self, limit: int, on_idle: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.on_idle = on_idle
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, timeout: float) -> AsyncIterator[None]:
        n = min(pixels, self.limit)  # an image above the whole budget (never above max_pixels) runs alone
        if self._waiting or self.used + n > self.limit:
            fut = asyncio.get_running_loop().create_future()
            entry = (n, fut)
            self._waiting.append(entry)
            try:
                await asyncio.wait_for(fut, timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError) as e:
                if fut.done() and not fut.cancelled():  # granted just as the wait ended
                    self._release(n)
                else:
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(entry)
                    self._grant()  # the head may have left: the next ones may fit now
                if isinstance(e, asyncio.TimeoutError):
                    raise PixelBudget.Busy(f"{self.used:,} of {self.limit:,} pixels in flight") from None
                raise
        else:
            self.used += n
        try:
            yield
        finally:
            self._release(n)

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            n, fut = self._waiting.popleft()
            if not fut.done():
                self.used += n
                fut.set_result(None)

    def _release(self, n: int) -> None:
        self.used -= n
        self._grant()
        if self.used == 0 and self.on_idle is not None:
            self.on_idle()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Allocate every block of 1 MiB or more with its own mmap (glibc), so freeing it returns it to the system.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    decoded images (Pillow allocates them in 16 MiB blocks) come from per-thread heaps that keep
    their size when freed: after a burst of large images the worker stayed at 4.4-5.0 GB. A fixed
    threshold turns that adjustment off. Requests for small images allocate no such blocks.
    Returns whether it applied (glibc only).
    """
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_memory() -> None:
    """After a burst of large images: collect garbage, and hand the heaps' free pages back to the system
    (glibc's ``malloc_trim``; a trim walks every heap, so it runs once per burst, not per request)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# ----------------------------------------------------------------------------------------- install


def install() -> None:
    """Put this module's pieces in place for every BentoML app built from now on in this process.

    BentoML's apps import ``TimeoutMiddleware`` and ``RunnerTrafficMetricsMiddleware`` from their
    modules when they assemble their middleware, so replacing the module attributes is enough; the
    JSON answers of uvicorn (malformed requests) and Starlette (uncaught exceptions) are methods
    replaced on their classes. :class:`JsonErrors` is added by the service itself.
    """
    from bentoml._internal.server.http import instruments, traffic
    from starlette.middleware.errors import ServerErrorMiddleware

    if traffic.TimeoutMiddleware is not TimeoutMiddleware:
        TimeoutMiddleware.replaces = traffic.TimeoutMiddleware
        traffic.TimeoutMiddleware = TimeoutMiddleware
    instruments.RunnerTrafficMetricsMiddleware = RouteMetricsMiddleware
    ServerErrorMiddleware.error_response = _server_error
    with contextlib.suppress(ImportError):  # uvicorn runs httptools when it is installed, else h11
        from uvicorn.protocols.http import httptools_impl

        httptools_impl.HttpToolsProtocol.send_400_response = _httptools_400
    with contextlib.suppress(ImportError):
        from uvicorn.protocols.http import h11_impl

        h11_impl.H11Protocol.send_400_response = _h11_400
