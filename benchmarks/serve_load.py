"""Load test of ``zoo serve``: concurrent HTTP clients on loopback, against onnxruntime called directly.

The script builds nothing: it serves a built zoo entry (default the 28 px student
``baseline-resnet18-breastmnist``) with ``python -m serving`` (what ``zoo serve`` runs), and

1. measures onnxruntime called directly in this process on the same ``model.onnx``, on every core
   (the strongest single-process baseline), one image per ``run`` (what one request asks for) and in
   batches of ``--max-batch-size``; before the load and again after it, and averages the two, as the
   machine may be shared with other work;
2. saturated phase: ``--clients`` concurrent clients (asyncio + aiohttp in this process, keep-alive,
   loopback only) each post the entry's real test images as PNG to ``/classify`` one after another
   (closed loop), for ``--requests`` requests or ``--duration`` seconds: throughput and latency;
3. paced phases: the same clients send ``--paced-requests`` requests at a fixed offered rate, for
   each of ``--paced-fractions`` of the direct batch-1 rate (latency counted from when each request
   was due, so waiting for a free client is not hidden): latency below saturation;
4. checks every answer: HTTP 200 and the label ``zoo.load(name).predict`` gives for that image, or
   with ``--precision fp16|int8`` the label the served bundle gives when run directly (its agreement
   with the FP32 model is in its ``export.json``); anything else counts as an error;
5. samples the server's resident memory (launcher and worker) every ``--rss-every`` seconds through
   both phases, and reads the batch sizes and runtime seconds from ``/metrics``;
6. large-image phase: ``--large-clients`` (40) concurrent ``/classify`` requests, each a PNG of
   ``--large-size``² pixels (4096², within the default limits; a test image upscaled, ~50 KB),
   sampling the worker's RSS every 50 ms: before the burst, its peak, and after it settles
   (``--large-settle`` s), against stated ceilings (peak at most :data:`LARGE_PEAK_CEILING_MB`
   above the level before, and back within :data:`LARGE_AFTER_CEILING_MB` of it afterwards).
   Requests the server refuses with 503 (decoded-pixel budget full) are counted, not errors.

Each phase stops at its request count or at ``--max-seconds``, whichever comes first.

    python -m benchmarks.serve_load                                  # 6000 saturated, 2 x 3000 paced, large
    python -m benchmarks.serve_load --duration 600                   # the 10-minute memory run
    python -m benchmarks.serve_load --format onnx-int8 --out benchmarks/results/serve_load_int8
    python -m benchmarks.serve_load --large-only --out /tmp/serve_large   # only the large-image burst (~1 min)

Writes ``benchmarks/results/serve_load.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import zoo.store as store
from benchmarks.host import host
from export.formats import FORMATS, SERVABLE, servable_for_precision
from serving.local import LocalServer

ROOT = Path(__file__).resolve().parents[1]

TARGET_RATIO = 0.8
TARGET_P99_MS = 50.0
# Large-image burst: 40 x 4096² PNGs once took the worker from 1.35 to 6.1 GB, and it stayed at 4.4-5.0 GB.
LARGE_PEAK_CEILING_MB = 1024.0  # peak worker RSS during the burst, above the level before it
LARGE_AFTER_CEILING_MB = 256.0  # worker RSS once the burst has settled, above the level before it


# ----------------------------------------------------------------------------------------- workload


def workload(name: str, n: int, bundle: Path | None = None) -> tuple[list[bytes], list[str], np.ndarray]:
    """Up to ``n`` real test images of the entry's dataset as PNG bytes, their expected labels and model input.

    The labels are ``zoo.load(name).predict``'s, or, given a ``bundle``, what its ``model.onnx`` gives
    (an FP16/INT8 bundle may disagree with the FP32 model on a few images; the server must not).
    """
    from PIL import Image

    from zoo.api import load, model_split
    from zoo.data import preprocess

    model = load(name)
    images = model_split(model, "test").images[:n]
    x = preprocess(images, model.entry.preprocess).numpy()
    if bundle is None:
        labels = model.predict(images).labels
    else:
        import torch

        from serving.runtime import OnnxRuntime
        from zoo.inference import logits_to_probs, make_prediction

        e, rt = model.entry, OnnxRuntime(bundle / "model.onnx", 1)
        logits = np.concatenate([rt(x[i:i + 64])[0] for i in range(0, len(x), 64)])
        labels = make_prediction(logits_to_probs(torch.from_numpy(logits), e.task), e.task, e.labels).labels
    pngs = []
    for im in images:
        a = im.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, labels, x


def direct_onnxruntime(model_path: Path, x: np.ndarray, threads: int, batch: int, seconds: float) -> dict:
    """Images per second of ``session.run`` in this process, ``batch`` images per call, for ``seconds``."""
    from serving.runtime import OnnxRuntime

    rt = OnnxRuntime(model_path, threads)  # the server's own session settings
    for i in range(3):
        rt(x[i * batch % len(x):][:batch])
    n = calls = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = x[(calls * batch) % len(x):][:batch]
        rt(chunk)
        n += len(chunk)
        calls += 1
    dt = time.perf_counter() - t0
    return {"batch": batch, "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1)}


# ----------------------------------------------------------------------------------------- server


def server_args(a) -> list[str]:
    """The ``zoo serve`` options of this benchmark's server."""
    return ["--max-batch-size", str(a.max_batch_size), "--max-latency-ms", str(a.max_latency_ms),
            "--threads", str(a.threads), "--format", a.format]


class RssSampler:
    """Resident memory of the server: the launcher (``python -m serving``) and its worker(s), on a timer."""

    def __init__(self, srv: LocalServer, every: float):
        self.srv, self.every = srv, every
        self.samples: list[dict] = []
        self._t0 = time.monotonic()

    def sample(self) -> None:
        import psutil

        mb = {}
        for i, p in enumerate(self.srv.processes()):
            try:
                mb["launcher" if i == 0 else f"worker{i}"] = round(p.memory_info().rss / 2**20, 1)
            except psutil.Error:
                pass
        workers = sum(v for k, v in mb.items() if k != "launcher")
        self.samples.append({"t": round(time.monotonic() - self._t0, 2), "total_mb": round(sum(mb.values()), 1),
                             "workers_mb": round(workers, 1), **mb})

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except asyncio.TimeoutError:
                pass
        self.sample()


def batch_metrics(url: str) -> dict[str, float]:
    """Sums of the server's ``medzoo_batch_*`` Prometheus series (batches, images, runtime seconds)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    keys = {"medzoo_batch_size_sum": "images", "medzoo_batch_size_count": "batches",
            "medzoo_batch_inference_seconds_sum": "runtime_s"}
    out = dict.fromkeys(keys.values(), 0.0)
    for line in text.splitlines():
        k = line.split("{")[0].split(" ")[0]
        if k in keys:
            out[keys[k]] += float(line.split()[-1])
    return out


def cpu_seconds(procs: list) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# ----------------------------------------------------------------------------------------- load


async def drive(url: str, name: str, pngs: list[bytes], labels: list[str], clients: int, requests: int | None,
                seconds: float, rate: float | None = None) -> dict:
    """``clients`` concurrent clients posting images until ``requests`` are sent or ``seconds`` pass.

    Closed loop (``rate`` None): each client sends its next request when its answer arrives. Paced
    (``rate`` requests/s in all): request k is due at k / rate; a free client sends it then, and its
    latency counts from when it was due, so time spent waiting for a free client is not hidden.
    Returns the latencies (ms) of correct answers and the errors by kind.
    """
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    start = time.perf_counter()
    t_end = start + seconds
    endpoint = f"{url}/classify?model={name}"

    def next_request() -> tuple[int, float] | None:
        nonlocal issued
        due = start + issued / rate if rate else time.perf_counter()
        if (requests is not None and issued >= requests) or max(due, time.perf_counter()) >= t_end:
            return None
        issued += 1
        return issued - 1, due

    async def client(session: aiohttp.ClientSession) -> None:
        while (job := next_request()) is not None:
            i, due = job
            k = i % len(pngs)
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            try:
                async with session.post(endpoint, data=pngs[k], headers={"Content-Type": "image/png"}) as r:
                    body = await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            ms = (time.perf_counter() - due) * 1e3
            if status != 200:
                errors[f"http {status}"] = errors.get(f"http {status}", 0) + 1
            elif json.loads(body)["label"] != labels[k]:
                errors["wrong label"] = errors.get("wrong label", 0) + 1
            else:
                latencies.append(ms)

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return {"latencies": latencies, "errors": errors, "issued": issued, "seconds": time.perf_counter() - start}


def summary(res: dict) -> dict:
    lat = res["latencies"]
    n_err = sum(res["errors"].values())

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 2) if lat else None

    return {"requests": res["issued"], "ok": len(lat), "errors": n_err, "error_kinds": res["errors"],
            "seconds": round(res["seconds"], 1), "throughput_rps": round((len(lat) + n_err) / res["seconds"], 1),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": round(max(lat), 2) if lat else None,
            "mean_ms": round(statistics.fmean(lat), 2) if lat else None}


def rss_summary(samples: list[dict], key: str) -> dict:
    """Start/end/min/max of one RSS series during the load, the growth after the first minute, and the
    trend over the second half (MB per minute, least squares)."""
    t = np.array([s["t"] for s in samples])
    mb = np.array([s[key] for s in samples])
    half = t >= t[0] + (t[-1] - t[0]) / 2
    slope = float(np.polyfit(t[half], mb[half], 1)[0] * 60) if half.sum() >= 3 else None
    after_1min = mb[t >= t[0] + 60]
    return {"start_mb": float(mb[0]), "end_mb": float(mb[-1]), "min_mb": float(mb.min()), "max_mb": float(mb.max()),
            "growth_mb": round(float(mb[-1] - mb[0]), 1),
            "growth_after_first_minute_mb": round(float(mb[-1] - after_1min[0]), 1) if len(after_1min) else None,
            "second_half_slope_mb_per_min": None if slope is None else round(slope, 3)}


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def large_png(image: np.ndarray, size: int) -> bytes:
    """A test image (H, W, C) uint8 upscaled to ``size`` x ``size`` (nearest), as PNG: tens of KB, ``size``² pixels."""
    from PIL import Image

    a = image[:, :, 0] if image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(a).resize((size, size), Image.NEAREST).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def worker_rss_mb(srv: LocalServer) -> float:
    import psutil

    total = 0.0
    for p in srv.processes()[1:]:
        try:
            total += p.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return round(total, 1)


async def large_image_phase(url: str, name: str, srv: LocalServer, body: bytes, label: str, clients: int,
                            settle: float) -> dict:
    """``clients`` concurrent posts of one large PNG; the worker's RSS before, at its peak, and after settling."""
    import aiohttp

    before = worker_rss_mb(srv)
    peak, stop = before, asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, worker_rss_mb(srv))
            await asyncio.sleep(0.05)

    statuses: dict[str, int] = {}
    labels_agree = 0
    endpoint = f"{url}/classify?model={name}"

    async def one(session: aiohttp.ClientSession) -> float:
        nonlocal labels_agree
        t = time.perf_counter()
        try:
            async with session.post(endpoint, data=body, headers={"Content-Type": "image/png"}) as r:
                answer = await r.read()
                key = str(r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            answer, key = b"", type(e).__name__
        statuses[key] = statuses.get(key, 0) + 1
        if key == "200" and json.loads(answer)["label"] == label:
            labels_agree += 1
        return (time.perf_counter() - t) * 1e3

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        latencies = await asyncio.gather(*(one(session) for _ in range(clients)))
    burst_s = time.perf_counter() - t0
    await asyncio.sleep(settle)
    stop.set()
    await sampler
    after = worker_rss_mb(srv)
    peak = max(peak, after)
    return {"clients": clients, "png_bytes": len(body), "statuses": statuses, "labels_agree_with_28px": labels_agree,
            "burst_seconds": round(burst_s, 2), "settle_seconds": settle,
            "max_ms": round(max(latencies), 1), "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "worker_rss_before_mb": before, "worker_rss_peak_mb": peak, "worker_rss_after_mb": after,
            "peak_growth_mb": round(peak - before, 1), "after_growth_mb": round(after - before, 1),
            "ceilings": {"peak_growth_mb": LARGE_PEAK_CEILING_MB, "after_growth_mb": LARGE_AFTER_CEILING_MB},
            "peak_met": peak - before <= LARGE_PEAK_CEILING_MB, "after_met": after - before <= LARGE_AFTER_CEILING_MB,
            "no_5xx_but_503": all(k == "200" or k == "503" for k in statuses)}


def large_markdown(g: dict, size: int) -> str:
    refused = g["statuses"].get("503", 0)
    return (f"Large images: {g['clients']} concurrent `/classify` requests, each a {size} x {size} PNG "
            f"({g['png_bytes'] / 1024:.0f} KB), answered in {g['burst_seconds']} s ({g['statuses'].get('200', 0)} "
            f"x 200, {refused} x 503 for a full decoded-pixel budget; answers {g['statuses']}). Worker RSS "
            f"**{g['worker_rss_before_mb']} MB before, {g['worker_rss_peak_mb']} MB at the peak "
            f"(+{g['peak_growth_mb']} MB; ceiling +{LARGE_PEAK_CEILING_MB:.0f} MB: {_met(g['peak_met'])}), "
            f"{g['worker_rss_after_mb']} MB {g['settle_seconds']:.0f} s after** (+{g['after_growth_mb']} MB; "
            f"ceiling +{LARGE_AFTER_CEILING_MB:.0f} MB: {_met(g['after_met'])}).")


def markdown(r: dict) -> str:
    sat, d, m, c = r["saturated"], r["direct_onnxruntime"], r["rss"], r["config"]
    w = m["worker"]
    served = c.get("format") or servable_for_precision(c["precision"])  # results from before --format say precision
    row = ("| {phase} | {requests} | {errors} | {seconds} | {throughput_rps} | {p50_ms} | {p90_ms} | {p99_ms} | "
           "{max_ms} |")
    lines = [
        f"`zoo serve {r['model']} --format {served}` ({r['backend']} on `{r['bundle']}`, max batch "
        f"{c['max_batch_size']}, max latency "
        f"{c['max_latency_ms']} ms, {c['threads']} runtime thread(s)) on {r['host']['cpu_count']} CPU cores shared "
        f"with {r['clients']} concurrent loopback clients (aiohttp, one process); PNG test images of {r['dataset']} to "
        f"`/classify`, every answer checked against {r['labels_from']}. Load average "
        f"{r['host']['loadavg_before']} before, {r['host']['loadavg_after']} after.",
        "",
        "| phase | requests | errors | seconds | req/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        row.format(phase=f"saturated: {r['clients']} closed-loop clients", **sat),
        *(row.format(phase=f"paced: {p['rate']} req/s offered ({p['rate_fraction']:.0%} of direct batch 1)", **p)
          for p in r["paced"]),
        "",
        f"Direct onnxruntime in one process on the same `model.onnx` ({d['threads']} threads; mean of before and after "
        f"the load): **{d['batch1']['images_per_s']} img/s** one image per `run`, {d['batched']['images_per_s']} img/s "
        f"in batches of {d['batched']['batch']}.",
        f"Saturated throughput / direct batch-1: **{r['ratio_to_direct']}** (target >= {TARGET_RATIO}: "
        f"{_met(r['targets']['ratio_met'])}); / direct "
        f"batched: {r['ratio_to_batched']}. Mean adaptive batch {r['batching']['mean_batch_size']} "
        f"({r['batching']['batches']} batches); the runtime was busy "
        f"{r['batching']['runtime_share_of_wall']:.0%} of the wall time; server CPU "
        f"{r['cpu']['server_cpu_ms_per_request']} ms per request.",
        f"p99 target < {TARGET_P99_MS:.0f} ms: saturated **{sat['p99_ms']} ms** "
        f"({_met(r['targets']['p99_met_saturated'])}; with every client waiting on its answer, "
        f"latency is clients / throughput: {r['clients']} / {sat['throughput_rps']} req/s = "
        f"{r['clients'] / sat['throughput_rps'] * 1e3:.0f} ms on average); paced: "
        + "; ".join(f"{p['p99_ms']} ms at {p['rate']} req/s" for p in r["paced"]) + ".",
        "",
        f"Server memory over {m['seconds']:.0f} s of load ({m['samples']} samples): worker RSS {w['start_mb']} MB at "
        f"the start, {w['end_mb']} MB at the end (min {w['min_mb']}, max {w['max_mb']}; growth {w['growth_mb']} MB, "
        f"{w['growth_after_first_minute_mb']} MB after the first minute; trend over the second half "
        f"{w['second_half_slope_mb_per_min']} MB/min). Launcher + worker: {m['total']['start_mb']} -> "
        f"{m['total']['end_mb']} MB.",
    ]
    if r.get("large_images"):
        lines += ["", large_markdown(r["large_images"], r["config"]["large_size"])]
    return "\n".join(lines) + "\n"


async def phases(url: str, a, pngs, labels, sampler: RssSampler, rates: list[float]) -> tuple[dict, list[dict]]:
    """The saturated phase, then one paced phase per rate, with the RSS sampler running throughout."""
    stop = asyncio.Event()
    rss = asyncio.create_task(sampler.run(stop))
    try:
        saturated = await drive(url, a.model, pngs, labels, a.clients, None if a.duration else a.requests,
                                min(a.duration or a.max_seconds, a.max_seconds))
        paced = [await drive(url, a.model, pngs, labels, a.clients, a.paced_requests, a.max_seconds, rate)
                 for rate in rates]
    finally:
        stop.set()
        await rss
    return saturated, paced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="baseline-resnet18-breastmnist", help="a built zoo entry (28 px student)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=6000, help="saturated phase: requests in all")
    ap.add_argument("--duration", type=float, default=None, help="saturated phase: run this many seconds instead")
    ap.add_argument("--paced-requests", type=int, default=3000, help="each paced phase: requests in all")
    ap.add_argument("--paced-fractions", default=f"0.5,{TARGET_RATIO}",
                    help="paced phases: offered rates as fractions of direct batch-1 onnxruntime (default 0.5,0.8)")
    ap.add_argument("--max-seconds", type=float, default=900, help="hard bound on each phase")
    ap.add_argument("--images", type=int, default=512, help="distinct test images cycled through")
    ap.add_argument("--format", choices=SERVABLE, default=None,
                    help="export format served and measured directly (zoo serve --format; default onnx)")
    ap.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                    help="the same choice in precision words (int8 = --format onnx-int8)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-latency-ms", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=0, help="server runtime threads (default: the server's own)")
    ap.add_argument("--direct-threads", type=int, default=0, help="direct run's threads (default: every core)")
    ap.add_argument("--direct-seconds", type=float, default=10.0)
    ap.add_argument("--rss-every", type=float, default=1.0)
    ap.add_argument("--large-clients", type=int, default=40, help="large-image phase: concurrent requests (0: skip)")
    ap.add_argument("--large-size", type=int, default=4096, help="large-image phase: side of each PNG in pixels")
    ap.add_argument("--large-settle", type=float, default=5.0,
                    help="large-image phase: seconds after the burst before the 'after' RSS is read")
    ap.add_argument("--large-only", action="store_true",
                    help="run only the large-image phase (no direct baseline, saturated or paced phases)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"))
    a = ap.parse_args()
    # One vocabulary: the format decides; precision words (the results files' "precision") follow from it.
    a.format = a.format or (servable_for_precision(a.precision) if a.precision else "onnx")
    a.precision = FORMATS[a.format].precision

    from serving.runtime import default_threads, ensure_onnx

    threads = a.direct_threads or os.cpu_count() or 1  # the strongest single-process baseline
    server_threads = a.threads or default_threads()
    bundle = ensure_onnx(a.model, print, a.format)
    pngs, labels, x = workload(a.model, a.images, None if a.precision == "fp32" else bundle)
    if a.large_only:
        return large_only(a, pngs, labels)
    print(f"{len(pngs)} test images of {a.model}; direct onnxruntime ({threads} threads) ...", flush=True)

    def direct_run() -> dict:
        return {"batch1": direct_onnxruntime(bundle / "model.onnx", x, threads, 1, a.direct_seconds),
                "batched": direct_onnxruntime(bundle / "model.onnx", x, threads, a.max_batch_size, a.direct_seconds)}

    load0 = os.getloadavg()
    before = direct_run()
    rates = [round(float(f) * before["batch1"]["images_per_s"], 1) for f in a.paced_fractions.split(",")]
    print(f"direct: {before['batch1']['images_per_s']} img/s (batch 1), {before['batched']['images_per_s']} img/s "
          f"(batch {a.max_batch_size}); paced phases at {rates} req/s", flush=True)

    log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
    srv = LocalServer([a.model], server_args(a), log=log, cwd=ROOT)
    url = srv.url
    try:
        t0 = time.monotonic()
        listing = srv.wait_ready()
        procs = srv.processes()
        print(f"server ready in {time.monotonic() - t0:.1f} s (log {log}); {a.clients} clients, saturated for "
              f"{f'{a.duration:.0f} s' if a.duration else f'{a.requests} requests'}, then paced ...", flush=True)
        sampler = RssSampler(srv, a.rss_every)
        m0, cpu0 = batch_metrics(url), cpu_seconds(procs)
        # This process holds torch and the zoo (~500k long-lived objects): each full collection walks
        # them all and stalls every client for a few hundred ms, which would show up as server latency.
        gc.collect()
        gc.freeze()
        res_sat, res_paced = asyncio.run(phases(url, a, pngs, labels, sampler, rates))
        m1, cpu1 = batch_metrics(url), cpu_seconds(procs)
        large = None
        if a.large_clients:
            print(f"large-image phase: {a.large_clients} concurrent {a.large_size}² PNGs ...", flush=True)
            large = asyncio.run(large_image_phase(url, a.model, srv, large_png(_first_image(pngs), a.large_size),
                                                  labels[0], a.large_clients, a.large_settle))
    finally:
        srv.stop()
    # Measured again after the load and averaged: other work on a shared machine hits both sides alike.
    after = direct_run()
    load1 = os.getloadavg()
    direct = {"threads": threads, "before_load": before, "after_load": after,
              **{k: {"batch": before[k]["batch"],
                     "images_per_s": round((before[k]["images_per_s"] + after[k]["images_per_s"]) / 2, 1)}
                 for k in ("batch1", "batched")}}

    sat, paced = summary(res_sat), [summary(p) for p in res_paced]
    for p, rate in zip(paced, rates):
        p.update(rate=rate, rate_fraction=round(rate / direct["batch1"]["images_per_s"], 3))
    dm = {k: m1[k] - m0[k] for k in m0}
    wall = res_sat["seconds"] + sum(p["seconds"] for p in res_paced)
    batching = {"batches": int(dm["batches"]), "images": int(dm["images"]),
                "mean_batch_size": round(dm["images"] / dm["batches"], 2) if dm["batches"] else None,
                "runtime_s": round(dm["runtime_s"], 1), "runtime_share_of_wall": round(dm["runtime_s"] / wall, 3)}
    cpu = {"server_cpu_s": round(cpu1 - cpu0, 1),
           "server_cpu_ms_per_request": round((cpu1 - cpu0) / (sat["requests"] + sum(p["requests"] for p in paced))
                                              * 1e3, 3)}
    thr = sat["throughput_rps"]

    model = listing["models"][0]
    labels_from = ("`zoo.load(...).predict`" if a.precision == "fp32" else
                   f"the labels `{bundle.name}/model.onnx` gives run directly")
    r = {"model": a.model, "version": model["version"], "dataset": model["dataset"], "backend": model["backend"],
         "bundle": f"export/{bundle.name}/model.onnx", "labels_from": labels_from,
         "clients": a.clients, "config": {"format": a.format, "precision": a.precision,
                                          "max_batch_size": a.max_batch_size, "max_latency_ms": a.max_latency_ms,
                                          "threads": server_threads, "duration": a.duration, "requests": a.requests,
                                          "paced_requests": a.paced_requests, "paced_fractions": a.paced_fractions,
                                          "large_clients": a.large_clients, "large_size": a.large_size},
         "saturated": sat, "paced": paced, "direct_onnxruntime": direct, "batching": batching, "cpu": cpu,
         "ratio_to_direct": round(thr / direct["batch1"]["images_per_s"], 3),
         "ratio_to_batched": round(thr / direct["batched"]["images_per_s"], 3),
         "targets": {"ratio_to_direct": TARGET_RATIO, "p99_ms": TARGET_P99_MS,
                     "ratio_met": thr / direct["batch1"]["images_per_s"] >= TARGET_RATIO,
                     "p99_met_saturated": (sat["p99_ms"] or 1e9) < TARGET_P99_MS,
                     "p99_met_paced": {str(p["rate"]): (p["p99_ms"] or 1e9) < TARGET_P99_MS for p in paced},
                     "zero_errors": sat["errors"] + sum(p["errors"] for p in paced) == 0},
         "rss": {"samples": len(sampler.samples), "seconds": sampler.samples[-1]["t"] - sampler.samples[0]["t"],
                 "every_s": a.rss_every, "worker": rss_summary(sampler.samples, "workers_mb"),
                 "total": rss_summary(sampler.samples, "total_mb")},
         "rss_series": sampler.samples,
         "large_images": large,
         "host": host("onnxruntime", loadavg_before=[round(v, 2) for v in load0],
                      loadavg_after=[round(v, 2) for v in load1]),
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), r)
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _first_image(pngs: list[bytes]) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(pngs[0])))
    return a[:, :, None] if a.ndim == 2 else a


def large_only(a, pngs: list[bytes], labels: list[str]) -> None:
    """``--large-only``: start the server, run the large-image burst, write its results alone."""
    log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
    srv = LocalServer([a.model], server_args(a), log=log, cwd=ROOT)
    try:
        listing = srv.wait_ready()
        print(f"server ready (log {log}); {a.large_clients} concurrent {a.large_size}² PNGs ...", flush=True)
        large = asyncio.run(large_image_phase(srv.url, a.model, srv, large_png(_first_image(pngs), a.large_size),
                                              labels[0], a.large_clients, a.large_settle))
    finally:
        srv.stop()
    r = {"model": a.model, "version": listing["models"][0]["version"], "limits": listing["limits"],
         "config": {"format": a.format, "precision": a.precision, "max_batch_size": a.max_batch_size,
                    "max_latency_ms": a.max_latency_ms,
                    "large_clients": a.large_clients, "large_size": a.large_size},
         "large_images": large,
         "host": {"cpu_count": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()]},
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), r)
    out.with_suffix(".md").write_text(large_markdown(large, a.large_size) + "\n")
    print(large_markdown(large, a.large_size))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
