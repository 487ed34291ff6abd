"""The BentoML service: ``POST /classify`` and ``POST /localize`` for the zoo entries chosen at start-up.

Run it with ``zoo serve NAME [NAME ...]`` (which exports missing ONNX bundles first), or with BentoML
directly: ``bentoml serve serving.service:ZooService --arg models=NAME``. Endpoints:

- ``POST /classify?model=NAME``: the body is one image (PNG, JPEG or ``.npy``), JSON out
  (:class:`serving.schemas.ClassifyResponse`). ``model`` may be left out when one model is served.
- ``POST /localize?model=NAME[&label=L][&threshold=T]``: the prediction plus a heatmap, its top
  region as a box, and a PNG overlay (:class:`serving.schemas.LocalizeResponse`).
- ``GET /models``: the served models (name, version, task, labels, preprocessing) and load status.
- BentoML's ``/livez``, ``/readyz`` (200 only once every model is loaded and warmed up),
  ``/metrics`` (Prometheus: BentoML's request metrics, labelled by route, and ``medzoo_*`` batch
  metrics), ``/docs.json`` (OpenAPI, with the query parameters and ``GET /models`` added) and the
  Swagger UI at ``/``, from BentoML's bundled assets only (BentoML's own page loads an analytics script).

Every refusal is a JSON ``{"error": "..."}`` with a 4xx status (503 while loading or overloaded),
and so is every other error answer (:class:`serving.traffic.JsonErrors`); the checks are in
:mod:`serving.inputs` and :class:`RequestGuard`. Large uploads are decoded no larger than the model
and its overlay need, within a budget of decoded pixels in flight (``max_pixels_in_flight``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from typing import Annotated, Any

import anyio.to_thread
import bentoml
from bentoml.validators import ContentType
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import traffic
from serving.config import ServeConfig
from serving.inputs import RequestError, open_upload
from serving.localization import DEFAULT_THRESHOLD, OVERLAY_MAX_SIDE
from serving.runtime import is_model_tag
from serving.schemas import ClassifyResponse, ErrorResponse, LocalizeResponse

log = logging.getLogger("bentoml.serve.medzoo")  # under BentoML's logger, so the worker's log shows it

API_PATHS = ("/classify", "/localize")
# Uploads above this many pixels are decoded and resized in a thread, so the event loop keeps serving,
# and hold their pixels in the service's PixelBudget meanwhile.
INLINE_PIXELS = 256 * 256
RETRY_AFTER_S = "1"
# Memory goes back to the system this long after the last large decode of a burst (not per request).
RELEASE_AFTER_S = 0.5

# Read at import, because BentoML takes its logging settings from the decorator; everything else is
# read in the worker from the same bento arguments (ServeConfig).
ACCESS_LOG = TypeAdapter(bool).validate_python(getattr(bentoml.use_arguments(), "access_log", False))
# Served names that are BentoML model tags (NAME:VERSION, the bundles `zoo bento` saves) are declared as
# the service's models, so `bentoml build --arg models=TAG` packs them into the bento (and its
# containers); zoo names are read from $ZOO_HOME at run time and declare nothing.
_NAMES = getattr(bentoml.use_arguments(), "models", None) or []
BUNDLED = [m.strip() for m in (_NAMES.split(",") if isinstance(_NAMES, str) else _NAMES) if is_model_tag(m.strip())]


def _error(status: int, message: str) -> JSONResponse:
    """Every refusal's body; a 503 says when to retry."""
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware in front of the two image endpoints: the request-size limit and the body's form.

    BentoML 1.4 has no request-size limit, so the body is read here, in chunks, up to
    ``max_upload_bytes`` (413 beyond it; a ``Content-Length`` above it is refused before reading).
    A multipart form (``curl -F image=@scan.png``) gives its first file; its text fields are ignored,
    so a URL in one is never fetched (BentoML's own form parser would fetch it). The image bytes are
    then handed on as ``application/octet-stream``, which BentoML passes to the endpoint's ``bytes``
    parameter untouched, whatever ``Content-Type`` the client sent.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in API_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        svc = bentoml.get_current_service()
        if svc is None:
            return await _error(503, "the service is starting")(scope, receive, send)
        try:
            body = await self._read(scope, receive, svc.config.max_upload_bytes)
        except RequestError as e:
            svc.metrics["refused"].labels(scope["path"].lstrip("/"), str(e.status)).inc()
            return await _error(e.status, e.message)(scope, receive, send)
        if body is None:  # the client went away
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)

    @staticmethod
    async def _read(scope, receive, limit: int) -> bytes | None:
        """The image bytes: the body, or a form's first file; at most ``limit`` bytes are read."""
        sent_headers = dict(scope["headers"])
        length = sent_headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            raise _too_large(int(length), limit)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise _too_large(len(body), limit, at_least=more)
        if sent_headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            body = bytearray(await _form_file(scope, bytes(body)))
        if not body:
            raise RequestError(400, "empty request body: send the image bytes (PNG, JPEG or .npy) as the body")
        return bytes(body)


async def _form_file(scope, body: bytes) -> bytes:
    """The first file of a multipart form (read from ``body``, already bounded by the upload limit)."""
    from starlette.datastructures import UploadFile

    async def once():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(scope, once).form(max_files=1, max_fields=32) as form:
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    return await value.read()
    except Exception as e:  # starlette raises its own HTTPException / MultiPartException on bad forms
        raise RequestError(400, f"cannot read the multipart form: {getattr(e, 'detail', e)}") from None
    raise RequestError(400, "the multipart form has no file: send -F image=@scan.png, or the raw bytes as the body")


def _too_large(n: int, limit: int, at_least: bool = False) -> RequestError:
    got = f"at least {n:,}" if at_least else f"{n:,}"
    return RequestError(413, f"the upload is {got} bytes; this server takes at most {limit:,} bytes per image")


# ----------------------------------------------------------------------------------------- extra routes


async def _list_models(request: Request) -> JSONResponse:
    svc = bentoml.get_current_service()
    if svc is None:
        return _error(503, "the service is starting")
    return JSONResponse(svc.listing())


async def _openapi(request: Request) -> JSONResponse:
    """BentoML's OpenAPI document, plus what its generator cannot see: query parameters and ``GET /models``."""
    spec = ZooService.openapi_spec.asdict()
    params = {"model": "zoo name of a served model (GET /models); optional when one model is served"}
    extra = {"/localize": {"label": "the label whose CAM to show (default: the predicted one)",
                           "threshold": f"box threshold in [0, 1] on the normalised map (default {DEFAULT_THRESHOLD})"}}
    for path in API_PATHS:
        op = spec["paths"][path]["post"]
        op["parameters"] = [{"name": k, "in": "query", "required": False, "description": v,
                             "schema": {"type": "number" if k == "threshold" else "string"}}
                            for k, v in {**params, **extra.get(path, {})}.items()]
        raw = {"schema": {"type": "string", "format": "binary"}}
        op["requestBody"]["content"] = {
            **{t: raw for t in ("image/png", "image/jpeg", "application/octet-stream")},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"image": raw}}}}
        error = {"application/json": {"schema": ErrorResponse.model_json_schema()}}
        op["responses"].update({str(s): {"description": d, "content": error} for s, d in REFUSALS.items()})
    spec["paths"]["/models"] = {"get": {"tags": ["Service APIs"], "operationId": "medzoo__models",
                                        "description": "The served models and the load status.",
                                        "responses": {"200": {"description": "served models"}}}}
    return JSONResponse(spec)


REFUSALS = {
    400: "empty, corrupt or truncated body or form; a URL instead of image bytes; several models, no ?model=",
    404: "unknown model",
    413: "body above the upload limit, or image above the pixel limit",
    415: "not PNG, JPEG or .npy (sniffed from the bytes), or a 16-bit image",
    422: "a .npy array of the wrong shape, dtype or range; a bad label or threshold",
    503: "models still loading, the batcher predicts the request would miss its max latency, or large "
         "images in flight fill the decoded-pixel budget (retry after Retry-After)",
}

# The Swagger UI from the assets BentoML bundles (its /static_content/ mount), without what its own page
# at / adds: a Google Tag Manager script and iframe. The validator badge is off too (Swagger UI would
# send the document to validator.swagger.io), and the Content-Security-Policy keeps the page on this host.
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>medzoo: MedMNIST models over HTTP</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
    <link rel="stylesheet" type="text/css" href="./static_content/index.css">
  </head>
  <body>
    <div id="swagger-ui"><p>The API: its OpenAPI document, <a href="./docs.json">/docs.json</a>.</p></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="./docs-init.js" charset="UTF-8"></script>
  </body>
</html>
"""
DOCS_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "./docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
  });
};
"""
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'")


async def _docs_page(request: Request) -> Response:
    return Response(DOCS_PAGE, media_type="text/html", headers={"Content-Security-Policy": DOCS_CSP})


async def _docs_init(request: Request) -> Response:
    return Response(DOCS_INIT, media_type="text/javascript")


_extra_routes = Starlette(routes=[Route("/models", _list_models, methods=["GET"]),
                                  Route("/docs.json", _openapi, methods=["GET"]),
                                  Route("/", _docs_page, methods=["GET"]),
                                  Route("/docs-init.js", _docs_init, methods=["GET"])])


# ----------------------------------------------------------------------------------------- metrics


@functools.cache
def _metrics() -> dict[str, Any]:
    """Prometheus metrics, created once per worker (after BentoML has set up multiprocess collection)."""
    import prometheus_client as prom

    return {
        "batch_size": prom.Histogram("medzoo_batch_size", "Images per adaptive batch", ["model"],
                                     buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]),
        "batch_seconds": prom.Histogram("medzoo_batch_inference_seconds", "Runtime seconds per batch", ["model"],
                                        buckets=[.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5]),
        "refused": prom.Counter("medzoo_refused_requests", "Requests refused with a 4xx/503", ["endpoint", "status"]),
        "ready": prom.Gauge("medzoo_models_ready", "Models loaded and warmed up", multiprocess_mode="livemax"),
    }


# ----------------------------------------------------------------------------------------- service


class ZooService:
    """Classification and localization for MedMNIST zoo models (medzoo).

    Send one image per request as the raw body (PNG, JPEG or a NumPy .npy array; the format is read
    from the bytes): `curl --data-binary @scan.png 'http://HOST:PORT/classify?model=NAME'`.
    """

    def __init__(self) -> None:
        self.config = bentoml.use_arguments(ServeConfig)
        self.models: dict[str, Any] = {}
        self.batchers: dict[str, Any] = {}
        self.status, self.load_error = "loading", None
        self.metrics = _metrics()
        self._loader: asyncio.Task | None = None
        self.pixels = traffic.PixelBudget(self.config.max_pixels_in_flight, on_idle=self._after_burst)
        self._release: asyncio.Task | None = None
        traffic.tune_malloc()

    # --- start-up: load in the background so /livez answers at once and /readyz says when it is done

    @bentoml.on_startup
    async def _start_loading(self) -> None:
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        from serving.batching import AdaptiveBatcher  # loaded in the background task, so /livez answers at once

        cfg = self.config
        try:
            models = await anyio.to_thread.run_sync(_load_all, cfg)
            batchers = {m.name: AdaptiveBatcher(m, cfg.max_batch_size, cfg.max_latency_ms,
                                                functools.partial(self._observe, m.name)) for m in models}
            for b in batchers.values():
                await b.warm_up()
        except Exception as e:  # the worker stays up and says why in GET /models and every request
            log.exception("loading the models failed")
            self.status, self.load_error = "failed", f"{type(e).__name__}: {e}"
            return
        self.models, self.batchers = {m.name: m for m in models}, batchers
        # torch, transformers and the models leave ~500k long-lived objects: a full collection walks them
        # all (~0.3 s, every few seconds under load, stalling every request in flight). Frozen, they are
        # skipped; what requests allocate is still collected.
        gc.collect()
        gc.freeze()
        self.status = "ready"
        self.metrics["ready"].set(len(models))
        log.info("serving %s (%s backend, %s)", ", ".join(self.models), cfg.backend, cfg.format)

    async def __is_ready__(self) -> bool:
        return self.status == "ready"

    @bentoml.on_shutdown
    def _stop(self) -> None:
        for b in self.batchers.values():
            b.shutdown()

    def _after_burst(self) -> None:
        """The last large upload in flight is decoded: hand memory back soon (once, however many follow)."""
        if self._release is None or self._release.done():
            self._release = asyncio.get_running_loop().create_task(self._release_memory())

    async def _release_memory(self) -> None:
        await asyncio.sleep(RELEASE_AFTER_S)
        if self.pixels.used == 0:  # still idle; otherwise the next idle moment schedules it again
            await anyio.to_thread.run_sync(traffic.release_memory)

    def _observe(self, model: str, n: int, seconds: float) -> None:
        self.metrics["batch_size"].labels(model).observe(n)
        self.metrics["batch_seconds"].labels(model).observe(seconds)

    def listing(self) -> dict[str, Any]:
        """``GET /models``."""
        cfg = self.config
        return {"status": self.status, "error": self.load_error, "backend": cfg.backend,
                "format": cfg.format, "precision": cfg.precision,
                "models": [m.describe() for m in self.models.values()],
                "limits": {"max_upload_bytes": cfg.max_upload_bytes, "max_pixels": cfg.max_pixels,
                           "max_pixels_in_flight": cfg.max_pixels_in_flight,
                           "max_batch_size": cfg.max_batch_size, "max_latency_ms": cfg.max_latency_ms}}

    # --- endpoints

    @bentoml.api(route="/classify")
    async def classify(self, image: Annotated[bytes, ContentType("application/octet-stream")], /,
                       ctx: bentoml.Context) -> ClassifyResponse:
        """Classify one image: the body is a PNG, JPEG or .npy array; `?model=NAME` picks the model."""
        try:
            model, prep, out = await self._predict(image, ctx)
        except RequestError as e:
            return self._refuse(ctx, "classify", e)
        return ClassifyResponse(**model.classification(out))

    @bentoml.api(route="/localize")
    async def localize(self, image: Annotated[bytes, ContentType("application/octet-stream")], /,
                       ctx: bentoml.Context) -> LocalizeResponse:
        """Where the model looked: CAM (CNN students) or CLS attention (ViTs) as a heatmap, its top region
        as a box and a PNG overlay. `?label=L` explains another label; `?threshold=T` sets the box threshold."""
        q = ctx.request.query_params
        try:
            threshold = _threshold(q.get("threshold"))
            model, prep, out = await self._predict(image, ctx)
            body = await anyio.to_thread.run_sync(model.localization, prep, out, q.get("label"), threshold)
        except RequestError as e:
            return self._refuse(ctx, "localize", e)
        return LocalizeResponse(**body)

    async def _predict(self, body: bytes, ctx: bentoml.Context):
        model = self._pick(ctx.request.query_params.get("model"))
        # Large images are decoded no larger than the model input and the overlay (long side 512) need.
        upload = open_upload(body, self.config.max_pixels, max(model.entry.input_size, OVERLAY_MAX_SIDE))
        if upload.decode_pixels <= INLINE_PIXELS:
            prep = model.prepare(upload.load())
        else:
            try:
                async with self.pixels.hold(upload.decode_pixels, self.config.max_latency_ms / 1000):
                    prep = await anyio.to_thread.run_sync(lambda: model.prepare(upload.load()))
            except traffic.PixelBudget.Busy as e:
                raise RequestError(503, f"the server is decoding other large images ({e}); retry shortly, or "
                                   "send the image resized to the model's input size") from None
        return model, prep, await self.batchers[model.name](prep.x)

    def _pick(self, name: str | None):
        if self.status != "ready":
            if self.status == "failed":
                raise RequestError(503, f"the models failed to load: {self.load_error}")
            raise RequestError(503, "the models are still loading; GET /readyz returns 200 once they are ready")
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise RequestError(400, f"{len(self.models)} models are served: choose one with ?model=NAME "
                               f"({', '.join(self.models)})")
        if name not in self.models:
            raise RequestError(404, f"model {name!r} is not served here; served: {', '.join(self.models)}")
        return self.models[name]

    def _refuse(self, ctx: bentoml.Context, endpoint: str, e: RequestError) -> JSONResponse:
        self.metrics["refused"].labels(endpoint, str(e.status)).inc()
        ctx.response.status_code = e.status  # BentoML copies the context's status onto returned responses
        return _error(e.status, e.message)


def _threshold(raw: str | None) -> float:
    if raw is None:
        return DEFAULT_THRESHOLD
    try:
        t = float(raw)
    except ValueError:
        t = float("nan")
    if not 0.0 <= t <= 1.0:
        raise RequestError(422, f"threshold must be a number in [0, 1], got {raw!r}")
    return t


def _load_all(cfg: ServeConfig) -> list:
    """Load and warm up every model (in a thread: ONNX sessions and torch modules take seconds).

    The ONNX backend imports no torch: preprocessing and task rules are numpy (``export.edge``), so a
    bento without torch serves it; a bento's models (BentoML tags) carry their bundles.
    """
    from serving.runtime import (  # loaded in the background task, so /livez answers at once
        ServingError,
        ensure_onnx,
        load_model,
    )

    models = []
    for name in cfg.models:
        if cfg.backend == "onnx":
            # `zoo serve` has done this already; `bentoml serve` may not have
            ensure_onnx(name, fmt=cfg.format)
        m = load_model(name, cfg.backend, cfg.threads, cfg.format)
        if any(m.name == o.name for o in models):
            raise ServingError(f"{m.name} is given twice")
        m.warm_up(cfg.max_batch_size)
        models.append(m)
        log.info("loaded %s (%s, version %s)", m.name, m.runtime.name, m.version)
    return models


def _fixed_input_schema(service) -> None:
    """Validate the endpoints' raw-body inputs without rebuilding their JSON schema on every request.

    BentoML 1.4's ``IORootModel.model_validate_json`` builds a pydantic ``TypeAdapter`` and its JSON
    schema on every request only to learn that a root ``bytes`` input takes the body as it is. Under
    load that was about a third of the event loop's time (py-spy on the worker, INT8 28 px ResNet-18
    at ~800 req/s). The schema of these inputs never changes, so it is checked once here, and each
    request goes straight to ``model_validate``, which is what BentoML calls for such a schema.
    """
    for name, api in service.apis.items():
        spec = api.input_spec
        if spec.model_json_schema().get("type") not in ("string", "file"):
            raise TypeError(f"{name}: the input is no longer the raw body; remove this shortcut")
        spec.model_validate_json = classmethod(lambda cls, data, **kw: cls.model_validate(data, **kw))


for _i, _tag in enumerate(BUNDLED):  # before the decorator, which collects the class's models
    setattr(ZooService, f"bundle_{_i}", bentoml.models.BentoModel(_tag))
# BentoML records no spans unless a tracing exporter is configured, yet its OpenTelemetry middleware
# still builds each request's span attributes (about a third of the per-request Python work here):
# every URL is excluded from it.
ZooService = bentoml.service(
    name="medzoo", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": ACCESS_LOG}},
    tracing={"excluded_urls": ".*"})(bentoml.asgi_app(_extra_routes, path="/")(ZooService))
ZooService.add_asgi_middleware(traffic.JsonErrors)  # outside RequestGuard: every error answer is JSON
ZooService.add_asgi_middleware(RequestGuard)
_fixed_input_schema(ZooService)
# BentoML's request timeout without one live timer per request, its metrics labelled by route, and the
# framework's own error answers in JSON (serving/traffic.py)
traffic.install()
