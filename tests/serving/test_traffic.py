"""The request timeout that replaces BentoML's: same 504, but no timer outlives its request."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serving.traffic import TimeoutMiddleware


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
