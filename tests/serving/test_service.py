"""The HTTP service over a real socket: one ``python -m serving`` server (ONNX Runtime backend) for the
module, serving tiny students of three task types (by folder) and a tiny ViT probe (by zoo name).

Answers must equal ``zoo.load(...).predict`` on the same images; every bad input gets its 4xx JSON
error and the server keeps answering; health, readiness, metrics, OpenAPI and the model listing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import (
    Server,
    images_hwc,
    jpeg,
    lying_jpeg,
    mutations,
    npy,
    npy_without_brace,
    ok,
    png,
    png16,
    read_json,
    seed_bodies,
    zero_png,
)

from export.graph import ExportGraph
from serving.localization import normalise, top_box
from zoo.api import load
from zoo.data import load_split, preprocess

PROBE = "linear-dinov2-vits14-breastmnist"
TASKS = {"binary-class": "breastmnist", "multi-label, binary-class": "chestmnist", "multi-class": "dermamnist"}
N_IMAGES = 16


@pytest.fixture(scope="module")
def served(tiny_runs, built_linear_breast, medmnist_root, tmp_path_factory):
    """The server, the served folders by task, and the models loaded in this process for reference."""
    root = tmp_path_factory.mktemp("serve")
    home = root / "zoo_home"
    folders = {}
    for task in TASKS:  # copies: exporting writes <run>/export/, and the session's runs are shared
        folders[task] = root / f"run-{task.split(',')[0]}"
        shutil.copytree(tiny_runs[task], folders[task])
    folders["probe"] = home / PROBE
    shutil.copytree(built_linear_breast, folders["probe"])
    env = {"ZOO_HOME": str(home), "MEDMNIST_ROOT": str(medmnist_root), "BENTOML_HOME": str(root / "bentoml")}
    names = [str(folders[t]) for t in TASKS] + [PROBE]
    srv = Server(names, env, root / "server.log", "--threads", "1", "--max-batch-size", "8")
    try:
        listing = srv.wait_ready()
        models = {k: load(f) for k, f in folders.items()}
        yield SimpleNamespace(srv=srv, listing=listing, folders=folders, models=models)
    finally:
        srv.stop()


def _name(served, key: str) -> str:
    return served.models[key].entry.name


def _test_images(served, key: str, n: int = N_IMAGES) -> torch.Tensor:
    return load_split(served.models[key].entry.dataset, "test").images[:n]


# ------------------------------------------------------------------------------------ classify / localize


@pytest.mark.parametrize("task", list(TASKS))
def test_classify_equals_predict(served, task):
    model = served.models[task]
    images = _test_images(served, task)
    want = model.predict(images)
    for i, a in enumerate(images_hwc(images)):
        r = ok(served.srv.post("/classify", png(a), model=model.entry.name))
        assert r["model"] == model.entry.name and r["task"] == task
        assert r["label"] == want.labels[i]
        assert r["labels"] == want.label_sets[i]  # multi-label: every label above 0.5
        assert list(r["probabilities"]) == list(model.entry.labels)
        np.testing.assert_allclose(list(r["probabilities"].values()), want.probs[i], atol=1e-4)
        assert r["threshold"] == (None if task == "multi-class" else 0.5)
        assert r["version"] == served.listing["models"][list(TASKS).index(task)]["version"]


def test_probe_by_zoo_name_with_attention_map(served):
    model = served.models["probe"]
    images = _test_images(served, "probe", 8)
    want = model.predict(images)
    graph = ExportGraph(model.net, model.entry.input_size, with_localization=True).eval()
    with torch.no_grad():
        attn = graph(preprocess(images, model.entry.preprocess))[1].numpy()
    for i, a in enumerate(images_hwc(images)):
        r = ok(served.srv.post("/localize", png(a), model=PROBE))
        assert r["label"] == want.labels[i] and r["map_kind"] == "attention" and r["target"] == "cls"
        heat = np.asarray(r["heatmap"])
        s = model.entry.input_size  # linear-* entries see DINOv2's 224 px (a 32 x 32 grid of patch 7)
        assert heat.shape == (s, s)
        # the patch grid, upsampled: its maximum lies in the patch where the attention is largest
        gy, gx = np.unravel_index(attn[i].argmax(), attn[i].shape)
        assert heat[gy * 7:(gy + 1) * 7, gx * 7:(gx + 1) * 7].max() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("task", ["binary-class", "multi-class"])
def test_localize_cam_box_and_overlay(served, task):
    model = served.models[task]
    images = _test_images(served, task, 6)
    want = model.predict(images)
    graph = ExportGraph(model.net, model.entry.input_size, with_localization=True).eval()
    with torch.no_grad():
        cams = graph(preprocess(images, model.entry.preprocess))[1].numpy()
    for i, a in enumerate(images_hwc(images)):
        r = ok(served.srv.post("/localize", png(a), model=model.entry.name))
        assert r["label"] == want.labels[i] and r["map_kind"] == "cam" and r["target"] == want.labels[i]
        k = int(want.indices[i])
        cam = cams[i][0] * (1 if k == 1 else -1) if task == "binary-class" else cams[i][k]
        np.testing.assert_allclose(r["heatmap"], normalise(cam), atol=2e-4)
        heat = np.asarray(r["heatmap"])
        assert r["box_input"] == vars(top_box(heat, 0.5)) == r["box"]  # a 28 px upload: the same pixels
        b = r["box_input"]
        assert heat[b["y0"]:b["y1"], b["x0"]:b["x1"]].max() == 1.0
        overlay = Image.open(io.BytesIO(base64.b64decode(r["overlay_png"])))
        assert overlay.format == "PNG" and overlay.size == (224, 224) == tuple(r["overlay_size"])
    # another label's map, another threshold
    other = model.entry.labels[0]
    r = ok(served.srv.post("/localize", png(images_hwc(images)[0]), model=model.entry.name, label=other,
                                  threshold="0.2"))
    assert r["target"] == other and r["box_threshold"] == 0.2


def test_upload_forms_conversion_and_resize(served):
    """JPEG, .npy (uint8 and float), a form upload, RGB for a grey model and grey for an RGB one, other sizes:
    each answers as ``predict`` does on the same image."""
    srv, grey, rgb = served.srv, served.models["binary-class"], served.models["multi-class"]
    a = images_hwc(_test_images(served, "binary-class", 1))[0][:, :, 0]  # (28, 28) uint8
    base = ok(srv.post("/classify", png(a), model=grey.entry.name))
    assert ok(srv.post("/classify", npy(a), model=grey.entry.name)) == base
    r = ok(srv.post("/classify", npy(a[:, :, None].astype(np.float32) / 255), model=grey.entry.name))
    assert r["label"] == base["label"]
    np.testing.assert_allclose(list(r["probabilities"].values()), list(base["probabilities"].values()), atol=1e-5)
    form = srv.client.post("/classify", files={"image": ("scan.bin", png(a), "application/octet-stream")},
                           params={"model": grey.entry.name})
    assert ok(form) == base
    rng = np.random.default_rng(0)
    cases = [(grey, rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)),   # RGB -> grey, resized
             (rgb, rng.integers(0, 256, (64, 64), dtype=np.uint8)),       # grey -> RGB, resized
             (rgb, rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))]
    for model, img in cases:
        want = model.predict([Image.fromarray(img)])
        for body in (png(img), npy(img)):
            r = ok(srv.post("/classify", body, model=model.entry.name))
            assert r["label"] == want.labels[0]
            np.testing.assert_allclose(list(r["probabilities"].values()), want.probs[0], atol=1e-4)
    img = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    r = ok(srv.post("/classify", jpeg(img), model=rgb.entry.name))
    assert r["label"] == rgb.predict([Image.open(io.BytesIO(jpeg(img)))]).labels[0]
    # boxes come back in the uploaded image's pixels
    r = ok(srv.post("/localize", png(np.kron(a, np.ones((4, 4), dtype=np.uint8))), model=grey.entry.name))
    b, bi = r["box"], r["box_input"]
    assert (b["x0"], b["y0"], b["x1"], b["y1"]) == tuple(4 * v for v in (bi["x0"], bi["y0"], bi["x1"], bi["y1"]))


# ------------------------------------------------------------------------------------ refusals


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(png(np.zeros((28, 28), np.uint8)))

    def log_message(self, *args):
        pass


def _bad_inputs(a: np.ndarray, url: str) -> dict[str, tuple[bytes, dict, int, str]]:
    """name -> (body, query, status, words the message must hold)."""
    good = png(a)
    deep = Image.fromarray(a.astype(np.uint16) * 257)
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    return {
        "empty body": (b"", {}, 400, "empty"),
        "not an image": (b"GIF89a" + bytes(64), {}, 415, "not a supported image"),
        "text": (b"hello, is this an image?", {}, 415, "not a supported image"),
        "truncated png": (good[: len(good) // 2], {}, 400, "truncated"),
        "50 MB upload": (b"\x89PNG\r\n\x1a\n" + bytes(50 * 2**20), {}, 413, "at most"),
        "20000 x 20000 png": (zero_png(20000, 20000), {}, 413, "pixels"),
        "16-bit png": (buf.getvalue(), {}, 415, "16-bit"),
        "npy channels first": (npy(np.zeros((1, 28, 28), np.uint8)), {}, 422, "shape"),
        "npy 4-d": (npy(np.zeros((2, 28, 28, 1), np.uint8)), {}, 422, "shape"),
        "npy int64": (npy(np.zeros((28, 28), np.int64)), {}, 422, "dtype"),
        "npy objects": (npy(np.array([[None]], dtype=object)), {}, 422, "pickle"),
        "npy float out of range": (npy(np.full((28, 28), 3.0, np.float32)), {}, 422, "[0, 1]"),
        "npy truncated": (npy(np.zeros((28, 28), np.uint8))[:-100], {}, 400, "truncated"),
        "npy header without its }": (npy_without_brace(np.zeros((28, 28), np.uint8)), {}, 400, "header is corrupt"),
        "jpeg claiming 4000 x 4000": (lying_jpeg(4000, 4000), {}, 400, "truncated"),
        "16-bit rgb png": (png16(np.full((8, 8, 3), 40000)), {}, 415, "16-bit"),
        "not a png after its signature": (b"\x89PNG\r\n\x1a\n" + bytes(40), {}, 400, "corrupt"),
        "unknown model": (good, {"model": "baseline-resnet18-nosuchmnist"}, 404, "not served"),
        "no model among several": (good, {"model": None}, 400, "?model="),
        "url instead of bytes": (url.encode(), {}, 400, "does not fetch URLs"),
        "quoted url": (f'"{url}"'.encode(), {}, 400, "does not fetch URLs"),
        "form without a file": (b"", {"form": {"image": url}}, 400, "no file"),
    }


def test_bad_inputs_get_4xx_json_and_the_server_keeps_serving(served):
    srv, name = served.srv, _name(served, "binary-class")
    a = images_hwc(_test_images(served, "binary-class", 1))[0][:, :, 0]
    good = ok(srv.post("/classify", png(a), model=name))
    recorder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{recorder.server_address[1]}/scan.png"
    try:
        for case, (body, query, status, words) in _bad_inputs(a, url).items():
            params = {"model": name, **{k: v for k, v in query.items() if k != "form"}}
            params = {k: v for k, v in params.items() if v is not None}
            for path in ("/classify", "/localize"):
                if "form" in query:
                    r = srv.client.post(path, data=query["form"], files={"note": (None, "x")}, params=params)
                else:
                    r = srv.post(path, body, **params)
                assert r.status_code == status, (case, path, r.status_code, r.text)
                assert words in read_json(r)["error"], (case, r.text)
                assert not re.search(r"0x[0-9a-fA-F]{6,}|allow_pickle", r.text), (case, r.text)
                assert ok(srv.post("/classify", png(a), model=name)) == good, case  # still serving
    finally:
        recorder.shutdown()
    assert _Recorder.hits == []  # no URL was fetched
    metrics = srv.client.get("/metrics").text
    assert 'medzoo_refused_requests_total{endpoint="classify",status="413"} 2.0' in metrics  # 50 MB and 20000 px


def test_bad_query_parameters(served):
    srv, name = served.srv, _name(served, "binary-class")
    body = png(images_hwc(_test_images(served, "binary-class", 1))[0])
    for params, words in [({"threshold": "1.5"}, "threshold"), ({"threshold": "nan"}, "threshold"),
                          ({"label": "no such label"}, "not one of")]:
        r = srv.post("/localize", body, model=name, **params)
        assert r.status_code == 422 and words in read_json(r)["error"]


def test_float_rgb_array_for_a_grey_model_is_refused(served):
    r = served.srv.post("/classify", npy(np.zeros((28, 28, 3), np.float32)), model=_name(served, "binary-class"))
    assert r.status_code == 422 and "1-channel" in read_json(r)["error"]


# ------------------------------------------------------------------------------------ batching, service endpoints


def test_concurrent_requests_are_batched(served):
    srv, model = served.srv, served.models["multi-class"]
    images = _test_images(served, "multi-class", 48)
    want = model.predict(images).labels
    bodies = [png(a) for a in images_hwc(images)]

    def batches() -> tuple[float, float]:
        text = srv.client.get("/metrics").text
        get = lambda key: sum(float(ln.split()[-1]) for ln in text.splitlines()  # noqa: E731
                              if ln.startswith(key) and model.entry.name in ln)
        return get("medzoo_batch_size_sum"), get("medzoo_batch_size_count")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/classify", content=b, params={"model": model.entry.name})
                                          for b in bodies))

    images0, n0 = batches()
    responses = asyncio.run(burst())
    assert [ok(r)["label"] for r in responses] == want
    images1, n1 = batches()
    assert images1 - images0 == len(bodies)
    assert n1 - n0 < len(bodies)  # some requests shared a batch
    assert srv.client.get("/metrics").text.count("medzoo_batch_size_bucket") > 0


def test_health_readiness_listing_metrics_openapi(served):
    c = served.srv.client
    assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
    listing = ok(c.get("/models"))
    assert listing["status"] == "ready" and listing["backend"] == "onnx"
    names = [m["name"] for m in listing["models"]]
    assert names == [served.models[k].entry.name for k in [*TASKS, "probe"]]
    probe = listing["models"][-1]
    e = served.models["probe"].entry
    assert probe["localization"] == "attention" and probe["mean"] == list(e.mean) and probe["in_chans"] == 3
    assert listing["models"][0]["localization"] == "cam" and listing["models"][0]["image_mode"] == "L"
    metrics = c.get("/metrics").text
    assert "bentoml_service_request_total" in metrics and "medzoo_models_ready 4.0" in metrics
    spec = ok(c.get("/docs.json"))
    for path in ("/classify", "/localize"):
        op = spec["paths"][path]["post"]
        assert [p["name"] for p in op["parameters"]][0] == "model"
        assert {"image/png", "image/jpeg", "multipart/form-data"} <= set(op["requestBody"]["content"])
        assert {"413", "415", "422"} <= set(op["responses"])
    assert "/models" in spec["paths"] and "/readyz" in spec["paths"]
    assert any(k.startswith("LocalizeResponse") for k in spec["components"]["schemas"])  # BentoML adds a suffix


def test_loaded_bundles_are_the_entries_exports(served):
    for task in TASKS:
        d = Path(served.folders[task]) / "export" / "onnx"
        assert {"model.onnx", "export.json", "preprocess.json"} <= {p.name for p in d.iterdir()}


def test_endpoint_inputs_take_the_body_as_it_is():
    """The shortcut past BentoML's per-request schema building keeps its result: the raw bytes."""
    from serving.service import ZooService

    for api in ZooService.apis.values():
        for body in (b"\x89PNG\r\n\x1a\n\xff\x00", b'{"image": "not parsed"}', b"https://example.com/a.png"):
            assert api.input_spec.model_validate_json(body).root == body


def test_mutated_bodies_over_http_get_4xx_json_never_5xx(served):
    """A few hundred mutated PNG, JPEG and .npy bodies, 8 at a time, to both endpoints (tests/serving/test_inputs.py
    runs thousands through the decoder directly)."""
    srv, name = served.srv, _name(served, "binary-class")
    bodies = list(mutations(seed_bodies(), 300, seed=1))

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(c.post(("/classify", "/localize")[i % 2], content=b, params={"model": name})
                                          for i, b in enumerate(bodies)))

    answers = asyncio.run(burst())
    statuses = sorted({r.status_code for r in answers})
    assert all(s == 200 or 400 <= s < 500 for s in statuses), statuses
    for r in answers:
        if r.status_code != 200:
            assert set(read_json(r)) == {"error"} and not re.search(r"0x[0-9a-fA-F]{6,}", r.text), r.text
    assert ok(srv.post("/classify", png(np.zeros((28, 28), np.uint8)), model=name))["model"] == name


def test_every_error_answer_is_json(served):
    c = served.srv.client
    for method, path, status, words in [("GET", "/no/such/page", 404, "/no/such/page"),
                                        ("GET", "/classify", 405, "POST"), ("DELETE", "/models", 405, "GET"),
                                        ("POST", "/docs.json", 405, "GET")]:
        r = c.request(method, path)
        assert r.status_code == status and words in read_json(r)["error"], (method, path, r.text)
    with socket.create_connection(("127.0.0.1", served.srv.port), timeout=10) as s:  # not HTTP at all
        s.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), raw
    assert "invalid HTTP request" in json.loads(body)["error"]


def _pipelined_gets(port: int, paths: list[str], depth: int = 100) -> dict[int, int]:
    """GET each path over one keep-alive connection, ``depth`` requests per write (HTTP/1.1 pipelining, so the
    client costs next to nothing); the count of each status answered."""
    counts: dict[int, int] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        buf = b""
        for start in range(0, len(paths), depth):
            chunk = paths[start:start + depth]
            s.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: test\r\n\r\n".encode() for p in chunk))
            for _ in chunk:
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(1 << 16)
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(buf) < length:
                    buf += s.recv(1 << 16)
                buf = buf[length:]
                status = int(head.split()[1])
                counts[status] = counts.get(status, 0) + 1
    return counts


def test_unknown_paths_do_not_grow_the_metrics(served):
    """Request metrics are labelled by route: 10,000 distinct unknown paths are one series, not 10,000."""
    paths = [f"/probe-{i}/x{i * 7919}" for i in range(10_000)]
    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(lambda k: _pipelined_gets(served.srv.port, paths[k::4]), range(4)))
    assert sum(c.get(404, 0) for c in counts) == len(paths)
    metrics = served.srv.client.get("/metrics").text
    assert len(metrics.encode()) < 100_000, len(metrics)
    assert "probe-" not in metrics and 'endpoint="unmatched"' in metrics
    assert 'endpoint="/classify"' in metrics and 'endpoint="/models"' in metrics


def test_docs_page_loads_nothing_from_elsewhere(served):
    c = served.srv.client
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    assert "googletagmanager" not in page and "gtm" not in page.lower()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page)
    assert refs and not [u for u in refs if re.match(r"(?i)(https?:)?//", u)], refs
    assert "./docs.json" in refs
    for ref in refs:  # everything the page loads is served here
        asset = c.get(ref.removeprefix("."))
        assert asset.status_code == 200, ref
        if ref.endswith(".css"):
            assert not re.search(r"url\(\s*['\"]?(https?:)?//", asset.text), ref
        if ref.endswith("docs-init.js"):
            assert "validatorUrl: null" in asset.text  # Swagger UI would send the document to swagger.io


def _worker_rss_mb(srv: Server) -> float:
    import psutil

    total = 0
    for pid in srv.children:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


def test_large_pngs_are_decoded_small_within_the_budget(served):
    """A 4088 x 4088 PNG (~20 KB, within the limits) answers like ``predict`` on that image, boxes in its pixels;
    a burst of 12 at once leaves the worker's memory where it was (each once cost it ~110 MB, and kept it)."""
    srv, model = served.srv, served.models["binary-class"]
    a = images_hwc(_test_images(served, "binary-class", 1))[0][:, :, 0]
    big = np.kron(a, np.ones((146, 146), np.uint8))  # 28 x 146 = 4088
    body = png(big)
    want = model.predict([Image.fromarray(big)])
    r = ok(srv.post("/classify", body, model=model.entry.name))
    np.testing.assert_allclose(list(r["probabilities"].values()), want.probs[0], atol=0.02)
    loc = ok(srv.post("/localize", body, model=model.entry.name))
    assert 0 <= loc["box"]["x0"] < loc["box"]["x1"] <= 4088 and loc["overlay_size"] == [512, 512]

    before, peak, done = _worker_rss_mb(srv), 0.0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _worker_rss_mb(srv))
            time.sleep(0.02)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/classify", content=body, params={"model": model.entry.name})
                                          for _ in range(12)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers = asyncio.run(burst())
    finally:
        done.set()
        sampler.join()
    assert {r.status_code for r in answers} == {200}
    time.sleep(2)  # the worker hands memory back shortly after the burst
    after = _worker_rss_mb(srv)
    assert peak - before < 600, (before, peak, after)  # 4 x 16.7 MP in flight, decoded to 512 px at once
    assert after - before < 200, (before, peak, after)
    assert served.listing["limits"]["max_pixels_in_flight"] == 4 * served.listing["limits"]["max_pixels"]


def test_an_entry_recorded_by_an_older_zoo_is_the_same_entry():
    """A store built before fields with defaults were added (tag, data_size, ...) must stay servable: the
    export records today's writing of the entry, config.json the older one (issue found on a real store)."""
    from serving.runtime import same_entry
    from zoo.registry import get_entry

    e = get_entry("baseline-resnet18-breastmnist").to_dict()
    older = {k: v for k, v in e.items() if k not in ("tag", "data_size", "small_stem", "teacher_input_size")}
    assert same_entry(e, older) and same_entry(e, e)
    assert not same_entry(e, {**older, "dataset": "pneumoniamnist"})  # a field both record differs
    assert not same_entry(older, e)  # the export lacks a field the build recorded: an older export
    assert not same_entry(None, e) and not same_entry(e, [])
