"""Adaptive batching per served model: each batch takes every request that arrived while the last one ran.

Why not ``@bentoml.api(batchable=True)``: a batchable endpoint parses the body before any of our
checks (a ``PIL.Image`` parameter answers non-image bytes with a 500 and fetches URLs), so the
endpoints take the raw body, check and preprocess it, and batch the model input here. Why not
BentoML's own batcher (``CorkDispatcher``, behind ``batchable=True``) on that input: it holds
requests back for the average wait it has observed, and that wait feeds on itself. Measured on the
28 px ResNet-18 (2 cores, PNG requests at a steady 20-40 req/s after a burst), it added 60-120 ms to
every request (p99 107-203 ms) where running whatever is queued at once gave p99 14-43 ms.

So the batch size adapts to the load without a timer: an idle model runs a request at once (batch
of one, no added latency); under load, requests queue while a batch runs and the next batch takes
all of them, up to ``max_batch_size``. Before running, every request whose wait so far plus the
batch's predicted duration exceeds ``max_latency_ms`` is refused with 503 (BentoML's semantics for
``max_latency_ms``), so an overloaded server answers quickly instead of queueing without bound.
One batch runs at a time per model, in a worker thread (the runtimes release the GIL).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread
import numpy as np

from serving.inputs import RequestError

# At start-up, single requests and then full batches go through the batcher: the first runs of a
# session are slow, and the duration model below needs batches of more than one size.
WARMUP_SINGLE, WARMUP_FULL = 4, 2
HISTORY = 64  # recent (batch size, seconds) pairs behind the duration model


class Overloaded(RequestError):
    """The request would wait longer than ``max_latency_ms``."""

    def __init__(self, model: str, max_latency_ms: int):
        super().__init__(503, f"{model} is overloaded: this request would wait longer than the server's "
                         f"max latency ({max_latency_ms} ms); retry shortly")


@dataclass
class _Job:
    x: np.ndarray
    future: asyncio.Future
    queued: float


class AdaptiveBatcher:
    """Coalesces concurrent requests for one model into batches.

    Args:
        model: has ``name``, ``entry`` (``in_chans``, ``input_size``) and ``infer(batch) -> list``,
            one output per image, in order.
        max_batch_size: most images per batch.
        max_latency_ms: a request predicted to take longer than this in all gets 503.
        observe: called after every batch with (batch size, seconds in the runtime), for metrics.
    """

    def __init__(self, model, max_batch_size: int, max_latency_ms: int,
                 observe: Callable[[int, float], None] | None = None):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000
        self._observe = observe
        self._queue: collections.deque[_Job] = collections.deque()
        self._history: collections.deque[tuple[int, float]] = collections.deque(maxlen=HISTORY)
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._shed = True  # off while warming up, when the duration model has not seen a full batch yet

    async def __call__(self, x: np.ndarray):
        """One preprocessed image (C, S, S) -> its output, computed in whichever batch it joins."""
        loop = asyncio.get_running_loop()
        if self._runner is None:
            self._wake = asyncio.Event()
            self._runner = loop.create_task(self._run())
        job = _Job(x, loop.create_future(), time.perf_counter())
        self._queue.append(job)
        self._wake.set()
        return await job.future

    def predict_seconds(self, n: int) -> float:
        """Expected runtime of a batch of ``n``: a least-squares line through the recent batches."""
        if not self._history:
            return 0.0
        sizes, secs = np.array(self._history, dtype=np.float64).T
        if np.ptp(sizes) == 0:  # one batch size seen so far: scale its mean duration
            return float(secs.mean() * n / sizes[0])
        slope, intercept = np.polyfit(sizes, secs, 1)
        return float(max(0.0, intercept + slope * n))

    def _take(self) -> list[_Job]:
        """The next batch; queued requests that cannot finish within the budget are refused instead."""
        now = time.perf_counter()
        while self._queue and self._shed:
            n = min(len(self._queue), self.max_batch_size)
            job = self._queue[0]
            if now - job.queued + self.predict_seconds(n) <= self.max_latency:
                break
            self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(Overloaded(self.model.name, round(self.max_latency * 1000)))
        return [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let requests whose bytes have already arrived join this batch
            while batch := self._take():
                t0 = time.perf_counter()
                try:
                    outs = await anyio.to_thread.run_sync(self.model.infer, np.stack([j.x for j in batch]))
                except Exception as e:  # the runtime failed: every request of the batch gets the error
                    for j in batch:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                seconds = time.perf_counter() - t0
                self._history.append((len(batch), seconds))
                if self._observe is not None:
                    self._observe(len(batch), seconds)
                for j, out in zip(batch, outs):
                    if not j.future.done():  # a cancelled request (client gone) is skipped
                        j.future.set_result(out)

    async def warm_up(self) -> None:
        """Single requests, then bursts of ``max_batch_size``, through the batcher, before readiness."""
        e = self.model.entry
        x = np.zeros((e.in_chans, e.input_size, e.input_size), dtype=np.float32)
        self._shed = False
        try:
            for _ in range(WARMUP_SINGLE):
                await self(x)
            for _ in range(WARMUP_FULL):
                await asyncio.gather(*(self(x) for _ in range(self.max_batch_size)))
        finally:
            self._shed = True

    def shutdown(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        for j in self._queue:
            j.future.cancel()
