"""Adaptive batching: an idle model answers at once, concurrent requests share batches and each gets its own
answer, and requests that cannot meet the latency budget are refused with 503 (not left hanging, not a 500)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from serving.batching import AdaptiveBatcher, Overloaded


class Model:
    """Stands in for a ServedModel: answers each image with its pixel sum, taking ``seconds`` per batch."""

    def __init__(self, seconds: float):
        self.name, self.seconds = "fake", seconds
        self.entry = SimpleNamespace(in_chans=1, input_size=4)
        self.batches: list[int] = []

    def infer(self, x: np.ndarray) -> list[float]:
        time.sleep(self.seconds)
        self.batches.append(len(x))
        return [float(v) for v in x.sum(axis=(1, 2, 3))]


def _run(model: Model, max_latency_ms: int, n: int) -> list:
    async def go():
        observed = []
        b = AdaptiveBatcher(model, max_batch_size=8, max_latency_ms=max_latency_ms,
                            observe=lambda k, s: observed.append(k))
        await b.warm_up()
        model.batches.clear()
        xs = [np.full((1, 4, 4), i, np.float32) for i in range(n)]
        out = await asyncio.gather(*(b(x) for x in xs), return_exceptions=True)
        b.shutdown()
        assert observed[-len(model.batches):] == model.batches
        return out

    return asyncio.run(go())


def test_concurrent_requests_share_batches_and_get_their_own_answers():
    model = Model(0.01)
    out = _run(model, max_latency_ms=10_000, n=40)
    assert out == [16.0 * i for i in range(40)]
    assert max(model.batches) > 1 and max(model.batches) <= 8 and sum(model.batches) == 40


def test_requests_beyond_the_latency_budget_get_503():
    model = Model(0.05)
    out = _run(model, max_latency_ms=120, n=60)
    refused = [o for o in out if isinstance(o, Exception)]
    assert refused and all(isinstance(o, Overloaded) and o.status == 503 for o in refused)
    assert "max latency (120 ms)" in refused[0].message
    answered = [o for o in out if not isinstance(o, Exception)]
    assert answered and all(o == 16.0 * out.index(o) for o in answered)


def test_an_idle_model_runs_a_request_at_once_and_durations_are_predicted():
    async def go():
        model = Model(0.0)
        b = AdaptiveBatcher(model, max_batch_size=8, max_latency_ms=10_000)
        await b.warm_up()
        t0 = time.perf_counter()
        assert await b(np.ones((1, 4, 4), np.float32)) == 16.0
        waited = time.perf_counter() - t0
        b.shutdown()
        return waited, model.batches

    waited, batches = asyncio.run(go())
    assert waited < 0.05 and batches[:4] == [1, 1, 1, 1] and set(batches[4:]) <= set(range(1, 9))
    b = AdaptiveBatcher(Model(0.0), max_batch_size=8, max_latency_ms=100)
    assert b.predict_seconds(4) == 0.0
    b._history.extend([(1, 0.010), (1, 0.010)])
    assert b.predict_seconds(4) == pytest.approx(0.040)  # one size seen: proportional
    b._history.extend([(8, 0.031), (8, 0.031)])
    assert b.predict_seconds(4) == pytest.approx(0.010 + 3 * 0.003)  # the line through both sizes
