"""serving/traffic.py: the request timeout that replaces BentoML's (same 504, but no timer outlives its request),
the decoded-pixel budget, route-labelled metrics and JSON error answers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serving.traffic import (
    JsonErrors,
    PixelBudget,
    RouteMetricsMiddleware,
    TimeoutMiddleware,
    release_memory,
    route_label,
    tune_malloc,
)


async def _fast_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(middleware, n: int = 1):
    """Run ``n`` requests through ``middleware``; returns the messages sent and the loop's live timers."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main():
        for _ in range(n):
            await middleware({"type": "http", "path": "/classify", "method": "POST", "headers": []}, receive, send)
        loop = asyncio.get_running_loop()
        return [h for h in loop._scheduled if not h.cancelled()]  # asyncio's timer heap

    return sent, asyncio.run(main())


def test_no_timer_outlives_its_request_unlike_bentomls():
    from bentoml._internal.server.http import traffic

    bento_timeout = TimeoutMiddleware.replaces or traffic.TimeoutMiddleware  # installed or not yet
    sent, live = _call(TimeoutMiddleware(_fast_app, timeout=60), n=200)
    assert len(sent) == 400 and live == []
    # BentoML 1.4.40's own leaves one 60 s timer per request: the reason serving/traffic.py exists
    _, live = _call(bento_timeout(_fast_app, timeout=60), n=200)
    assert len(live) == 200


def test_a_slow_request_gets_504_in_time():
    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    t0 = time.perf_counter()
    sent, _ = _call(TimeoutMiddleware(slow, timeout=0.05))
    assert time.perf_counter() - t0 < 2
    assert sent[0]["status"] == 504
    assert "0.05 seconds" in json.loads(sent[1]["body"])["error"]


def test_an_app_that_fails_before_answering_is_not_waited_for():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="boom"):
        _call(TimeoutMiddleware(broken, timeout=30))
    assert time.perf_counter() - t0 < 2


def test_the_service_installs_it_for_bentoml():
    from bentoml._internal.server.http import traffic

    import serving.service  # noqa: F401

    assert traffic.TimeoutMiddleware is TimeoutMiddleware


# ------------------------------------------------------------------------------------ decoded-pixel budget


def test_pixel_budget_bounds_what_is_in_flight_and_waits_in_order():
    idle: list[int] = []
    budget = PixelBudget(100, on_idle=lambda: idle.append(budget.used))
    peak, order = 0, []

    async def job(i: int, n: int, hold_s: float):
        nonlocal peak
        async with budget.hold(n, timeout=5):
            order.append(i)
            peak = max(peak, budget.used)
            await asyncio.sleep(hold_s)

    async def main():
        await asyncio.gather(*(job(i, 40, 0.02) for i in range(6)), job(6, 1000, 0.01))

    asyncio.run(main())
    assert peak <= 100 and order == list(range(7))  # first come, first served; the huge one ran alone
    assert budget.used == 0 and idle and idle[-1] == 0


def test_pixel_budget_refuses_after_its_wait_and_cleans_up():
    budget = PixelBudget(10)

    async def main():
        async with budget.hold(10, timeout=1):
            with pytest.raises(PixelBudget.Busy):
                async with budget.hold(5, timeout=0.05):
                    pass
            waiter = asyncio.ensure_future(budget.hold(5, timeout=5).__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()  # a client that went away while waiting
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert budget.used == 0 and not budget._waiting
        async with budget.hold(10, timeout=0.05):  # the cancelled waiter left no claim behind
            assert budget.used == 10

    asyncio.run(main())


def test_memory_helpers_run_here():
    assert isinstance(tune_malloc(), bool)
    release_memory()


# ------------------------------------------------------------------------------------ metrics labels, JSON errors


def test_route_labels_are_templates_and_unknown_paths_are_none():
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def ok(request):  # pragma: no cover (never called)
        return None

    inner = Starlette(routes=[Route("/models", ok)])
    app = Starlette(routes=[Route("/classify", ok, methods=["POST"]), Route("/items/{item}", ok),
                            Mount("/static_content", StaticFiles(directory=".")), Mount("", inner)])

    def label(path: str, method: str = "GET"):
        return route_label(app.routes, {"type": "http", "path": path, "method": method, "root_path": ""})

    assert label("/classify", "POST") == label("/classify") == "/classify"  # a wrong method is still the route
    assert label("/items/42") == label("/items/x") == "/items/{item}"
    assert label("/static_content/swagger-ui.css") == "/static_content/{path}"
    assert label("/models") == "/models"
    assert label("/no/such/path") is None and label("/classify/x") is None


def _through(middleware_cls, app, path: str = "/x", method: str = "GET") -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": path, "method": method, "headers": [], "query_string": b"", "root_path": ""}
    asyncio.run(middleware_cls(app)(scope, receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_error_answers_become_json():
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    def app_of(response):
        async def app(scope, receive, send):
            await response(scope, receive, send)
        return app

    status, headers, body = _through(JsonErrors, app_of(PlainTextResponse("Not Found", 404)), "/nope")
    assert status == 404 and headers[b"content-type"] == b"application/json"
    assert "/nope" in json.loads(body)["error"] and int(headers[b"content-length"]) == len(body)
    status, headers, body = _through(
        JsonErrors, app_of(PlainTextResponse("Method Not Allowed", 405, headers={"Allow": "POST"})), "/classify")
    assert status == 405 and headers[b"allow"] == b"POST" and "use POST" in json.loads(body)["error"]
    listed = JSONResponse([{"error": "bad <_io.BytesIO object at 0x7f0011223344> input"}], 415)  # BentoML's form
    assert json.loads(_through(JsonErrors, app_of(listed))[2]) == {"error": "bad input"}
    fine = Response(b"\x89PNG", 200, media_type="image/png")
    assert _through(JsonErrors, app_of(fine))[1:] == ({b"content-type": b"image/png", b"content-length": b"4"},
                                                      b"\x89PNG")


def test_install_answers_the_frameworks_errors_in_json():
    from bentoml._internal.server.http import instruments
    from starlette.middleware.errors import ServerErrorMiddleware
    from uvicorn.protocols.http import h11_impl, httptools_impl

    import serving.service  # noqa: F401 (installs)

    assert instruments.RunnerTrafficMetricsMiddleware is RouteMetricsMiddleware
    assert httptools_impl.HttpToolsProtocol.send_400_response.__module__ == "serving.traffic"
    assert h11_impl.H11Protocol.send_400_response.__module__ == "serving.traffic"
    r = ServerErrorMiddleware(None).error_response(None, RuntimeError("at 0x7f0011223344"))
    assert r.status_code == 500 and "0x" not in json.loads(r.body)["error"]
