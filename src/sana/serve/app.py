"""The HTTP API: an OpenAI-compatible image generation endpoint over one `Pipeline`, /health, /metrics, a web page.

Endpoints (all JSON errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`):

- `POST /v1/images/generations` — OpenAI Images API: prompt, n, size "WIDTHxHEIGHT" (or "auto": the model's
  size), response_format "b64_json" (default) or "url", output_format "png", model (accepted, not checked: one
  model is served), user. Extensions: seed, steps, guidance, negative_prompt, progress_id. Any other field is a
  400 naming it. Image i of a request is generated from seed + i, the same image `sana generate --seed SEED+i`
  makes, whatever batch it shares. Answer: `{created, data: [{b64_json | url, revised_prompt, seed}], model,
  size, seed, steps, guidance, flagged, output_format}`; `revised_prompt` is the prompt generated ("A red heart."
  when the safety check flagged it, with `flagged: true`). The PNGs carry the generation parameters as
  `sana generate` writes them (`parameters` A1111 text and `sana` JSON chunks).
- response_format "url": the PNG is kept in memory (the newest `url_images`, at most one hour) at
  `/v1/images/files/<random token>.png`, served without the API key (the token is the capability, as OpenAI's
  signed URLs are).
- `GET /v1/progress/{progress_id}` — state of a request sent with that progress_id: queued (with its position),
  running (sampling step of steps), or 404 once answered.
- `GET /v1/models` — the served model, OpenAI list shape.
- `GET /health` — 503 until the model is loaded and warmed up by one 1-step generation, then 200; the JSON holds
  the model's defaults and limits (the web page reads them). `GET /metrics` — Prometheus text.
- `GET /` — the web page (static HTML/JS/CSS in this package, no external resources).

With `api_key`, every /v1/ path but image files needs `Authorization: Bearer KEY`: 401 without one, 403 for a
wrong one. /, /health and /metrics stay open.

Queue: see `batching`. A full queue answers 429 with Retry-After; a client that disconnects has its queued images
dropped; a request not answered within `request_timeout_s` gets 504 and its images are dropped. Shutdown (SIGTERM,
uvicorn's graceful shutdown): no new connections are accepted, every request already received is generated and
answered, then the worker stops and the process exits (see `server.serve` for the time limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from sana.outputs import png_bytes
from sana.safety import SafetyChecker, Verdict
from sana.serve import metrics as prom
from sana.serve.batching import Batcher, BatchKey, Closed, Job, JobState, QueueFull

log = logging.getLogger("sana.serve")

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_SEED = 2**53 - 1  # exact in JavaScript numbers
MAX_BODY_BYTES = 1 << 20
GENERATIONS_PATH = "/v1/images/generations"
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ImageRequest(BaseModel):
    """The body of POST /v1/images/generations: OpenAI's fields, then this server's extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="what to draw (1 to 2000 characters)")
    model: str | None = Field(None, max_length=256, description="accepted for compatibility; one model is served")
    n: int | None = Field(None, ge=1, description="number of images (1 to the server's max_images)")
    size: str | None = Field(None, max_length=16, description='"WIDTHxHEIGHT", multiples of 32, or "auto"')
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json (default) or url")
    output_format: Literal["png"] | None = Field(None, description="png only")
    user: str | None = Field(None, max_length=256, description="an end-user id (accepted, not stored)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i (default: random)")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="sampling steps (default: the model's)")
    guidance: float | None = Field(
        None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, description="guidance scale (default: the model's)"
    )
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="negative prompt")
    progress_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="an id to poll GET /v1/progress/{progress_id} with"
    )


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON; `code` also labels sana_errors_total."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


class _BodyTooLarge(HTTPException):
    def __init__(self):
        super().__init__(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")


def encode_png(image: Image.Image, params: dict[str, Any]) -> bytes:
    """PNG bytes with the chunks `outputs.save_png` writes: `parameters` (A1111 text) and `sana` (JSON)."""
    return png_bytes(image, params)


class ImageStore:
    """The newest PNGs answered with response_format "url", by random token, each for at most `ttl_s`."""

    def __init__(self, max_items: int = 256, ttl_s: float = 3600.0):
        self.max_items, self.ttl_s = max_items, ttl_s
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._items[token] = (time.monotonic() + self.ttl_s, png)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> bytes | None:
        with self._lock:
            item = self._items.get(token)
            if item is None or item[0] < time.monotonic():
                self._items.pop(token, None)
                return None
            return item[1]


class Service:
    """The pipeline, its batching queue, metrics and readiness: what the routes share."""

    def __init__(
        self,
        pipeline,
        loader: Callable[[], Any] | None,
        *,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        max_images: int,
        api_key: str | None,
        safety: SafetyChecker | None,
        request_timeout_s: float,
        url_images: int,
    ):
        if (pipeline is None) == (loader is None):
            raise ValueError("give either a pipeline or a loader")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if api_key is not None and not api_key.strip():
            raise ValueError("the API key is empty")
        self.pipe, self.loader = pipeline, loader
        self.max_images, self.api_key, self.safety = max_images, api_key, safety
        self.request_timeout_s = request_timeout_s
        self.state = "loading"  # loading -> warming -> ready, or failed
        self.error: str | None = None
        self.metrics = prom.Metrics()
        self.batcher = Batcher(
            self._run,
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000,
            queue_size=queue_size,
            on_batch=self.metrics.observe_batch,
        )
        self.progress: dict[str, Job] = {}
        self.images = ImageStore(max_items=url_images)
        self.in_flight = 0

    # ---------------------------------------------------------------------------------------------------
    # Worker thread

    def _prepare(self) -> None:
        """Load (when given a loader) and warm up with one 1-step generation at the model's size."""
        try:
            if self.pipe is None:
                self.pipe = self.loader()
            self.state = "warming"
            size = self.pipe.default_size
            key = BatchKey(size, size, 1, float(self.pipe.guidance), self.sampler, "")
            self._run(key, ["warm-up"], [0], lambda i: None)
        except Exception as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            raise
        self.state = "ready"
        log.info("ready: %s", self.model_name)

    def _run(self, key: BatchKey, prompts: list[str], seeds: list[int], on_step: Callable[[int], None]) -> list:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]  # image i = `seed=seeds[i]` alone
        return self.pipe(
            prompts,
            negative_prompt=key.negative_prompt,
            height=key.height,
            width=key.width,
            steps=key.steps,
            guidance=key.guidance,
            sampler=key.sampler,
            generator=generators,
            num_images=1,
            callback=lambda i, x, x0: on_step(i),
            progress=False,
        )

    def start(self) -> None:
        self.batcher.start(self._prepare)

    def close(self) -> None:
        self.batcher.close()

    # ---------------------------------------------------------------------------------------------------
    # Facts about the model (once loaded)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def model_name(self) -> str:
        return str(getattr(self.pipe, "name", "sana"))

    @property
    def sampler(self) -> str:
        sampler = self.pipe.sampler
        return getattr(sampler, "value", str(sampler))

    @property
    def max_side(self) -> int:
        """The largest side the model's resolution bins reach (twice its native size), at most 4096."""
        return min(4096, 2 * self.pipe.default_size)

    @property
    def max_steps(self) -> int:
        return 4 if self.sampler == "scm" else MAX_STEPS  # Sana-Sprint is distilled for 1-4 steps

    def settings(self) -> dict[str, Any]:
        return dict(
            model=self.model_name,
            default_size=self.pipe.default_size,
            max_side=self.max_side,
            steps=self.pipe.steps,
            max_steps=self.max_steps,
            guidance=self.pipe.guidance,
            max_guidance=MAX_GUIDANCE,
            sampler=self.sampler,
            max_images=self.max_images,
            max_prompt_chars=MAX_PROMPT_CHARS,
            api_key_required=self.api_key is not None,
            safety=type(self.safety).__name__ if self.safety is not None else None,
        )

    # ---------------------------------------------------------------------------------------------------
    # Requests

    def check_ready(self) -> None:
        if self.state == "failed":
            raise ApiError(503, f"the model failed to load: {self.error}", "model_failed")
        if not self.ready:
            raise ApiError(
                503, f"the model is {self.state}; try again shortly", "loading", headers={"Retry-After": "5"}
            )

    def parse(self, body: ImageRequest) -> tuple[BatchKey, int]:
        """The batch key and n of a request, or ApiError(400) naming the field."""
        if not body.prompt.strip():
            raise ApiError(400, "prompt must not be empty", "invalid_value", "prompt")
        n = 1 if body.n is None else body.n
        if n > self.max_images:
            raise ApiError(400, f"n must be between 1 and {self.max_images}, got {n}", "invalid_value", "n")
        default = self.pipe.default_size
        width, height = default, default
        if body.size not in (None, "auto"):
            match = _SIZE.fullmatch(body.size)
            if match is None:
                raise ApiError(
                    400,
                    f'size must be "WIDTHxHEIGHT" (e.g. "{default}x{default}") or "auto", got {body.size!r}',
                    "invalid_value",
                    "size",
                )
            width, height = int(match.group(1)), int(match.group(2))
            for side in (width, height):
                if side < 32 or side % 32 or side > self.max_side:
                    raise ApiError(
                        400,
                        f"size {body.size}: width and height must be multiples of 32 from 32 to {self.max_side}",
                        "invalid_value",
                        "size",
                    )
        steps = self.pipe.steps if body.steps is None else body.steps
        if steps > self.max_steps:
            message = f"steps must be between 1 and {self.max_steps} for this model, got {steps}"
            raise ApiError(400, message, "invalid_value", "steps")
        guidance = float(self.pipe.guidance if body.guidance is None else body.guidance)
        return BatchKey(height, width, steps, guidance, self.sampler, body.negative_prompt or ""), n

    async def generate(self, body: ImageRequest, request: Request) -> dict[str, Any]:
        """Check, queue, wait for and answer one request."""
        self.check_ready()
        key, n = self.parse(body)
        if self.safety is not None:
            verdict = await run_in_threadpool(self.safety.check, body.prompt)
        else:
            verdict = Verdict(body.prompt, False)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        if seed + n - 1 > MAX_SEED:
            raise ApiError(400, f"seed + n - 1 must be at most {MAX_SEED}", "invalid_value", "seed")
        job = Job(key, verdict.prompt, seed, n)
        if body.progress_id is not None:
            self.progress[body.progress_id] = job
        try:
            try:
                self.batcher.submit(job)
            except QueueFull as e:
                retry = self.batcher.retry_after_s()
                raise ApiError(
                    429, f"{e}; retry after {retry} s", "queue_full", headers={"Retry-After": str(retry)}
                ) from None
            except Closed as e:
                raise ApiError(503, str(e), "shutting_down", headers={"Retry-After": "5"}) from None
            images = await self._wait(job, request)
        finally:
            if body.progress_id is not None and self.progress.get(body.progress_id) is job:
                del self.progress[body.progress_id]
        params = dict(
            prompt=verdict.prompt,
            negative_prompt=key.negative_prompt,
            steps=key.steps,
            sampler=key.sampler,
            guidance=key.guidance,
            width=key.width,
            height=key.height,
            model=self.model_name,
            dtype=str(getattr(self.pipe, "dtype", "")).removeprefix("torch."),
            device=str(getattr(self.pipe, "device", "")),
        )
        if verdict.flagged:
            params["safety_replaced"] = True
        pngs = await run_in_threadpool(
            lambda: [encode_png(image, {**params, "seed": seed + i}) for i, image in enumerate(images)]
        )
        data = []
        for i, png in enumerate(pngs):
            if body.response_format == "url":
                item = {"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{self.images.put(png)}.png"}
            else:
                item = {"b64_json": _b64(png)}
            data.append({**item, "revised_prompt": verdict.prompt, "seed": seed + i})
        return dict(
            created=int(time.time()),
            data=data,
            model=self.model_name,
            size=f"{key.width}x{key.height}",
            seed=seed,
            steps=key.steps,
            guidance=key.guidance,
            flagged=verdict.flagged,
            output_format="png",
        )

    async def _wait(self, job: Job, request: Request) -> list:
        """The job's images; cancels the job when the client disconnects (-> _ClientGone) or on timeout (504)."""
        result = asyncio.wrap_future(job.future)
        result.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even when abandoned
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait(
                {result, gone}, timeout=self.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
            if not job.future.done():
                self.batcher.cancel(job)
        if result in done:
            try:
                return result.result()
            except ValueError as e:  # the pipeline rejected the settings (sana errors are ValueErrors)
                raise ApiError(400, f"generation rejected: {e}", "invalid_value") from e
            except Exception as e:
                raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed") from e
        if gone in done:
            raise _ClientGone
        raise ApiError(504, f"the request was not answered within {self.request_timeout_s:g} s", "timeout")


class _ClientGone(Exception):
    pass


async def _disconnected(receive) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _error_response(service: Service, status: int, message: str, code: str, param=None, headers=None) -> JSONResponse:
    service.metrics.count_error(code)
    kind = _ERROR_TYPES.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(errors: list[dict]) -> tuple[str, str, str | None]:
    """(message, code, param) for pydantic/FastAPI validation errors, naming the fields."""
    accepted = ", ".join(ImageRequest.model_fields)
    parts, code, param = [], "invalid_value", None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        kind = e.get("type", "")
        param = param or (loc[0] if loc and kind != "json_invalid" else None)
        if kind == "json_invalid":
            code = "invalid_json"
            parts.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
        elif kind == "extra_forbidden":
            code = "unknown_field"
            parts.append(f"unknown field {field!r} (accepted: {accepted})")
        elif kind == "missing":
            code = "missing_field"
            parts.append(f"{field} is required" if field else "the request body is missing: send a JSON object")
        elif not loc:
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
        else:
            parts.append(f"{field}: {e.get('msg', 'invalid value')}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts), code, param


class _Guard:
    """ASGI middleware: the bearer API key on /v1/ paths and a limit on the request body size."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path, svc = scope["path"], self.service

        async def refuse(status: int, message: str, code: str, extra: dict | None = None) -> None:
            if path == GENERATIONS_PATH:
                svc.metrics.observe_request(status)
            await _error_response(svc, status, message, code, headers=extra)(scope, receive, send)

        if svc.api_key is not None and path.startswith("/v1/") and not path.startswith("/v1/images/files/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                message = "missing API key: send the header Authorization: Bearer KEY"
                return await refuse(401, message, "missing_api_key", {"WWW-Authenticate": "Bearer"})
            if not secrets.compare_digest(token.encode(), svc.api_key.encode()):
                return await refuse(403, "invalid API key", "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await refuse(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", "too_large")
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _static(name: str) -> bytes:
    return (resources.files("sana.serve") / "static" / name).read_bytes()


def create_app(
    pipeline=None,
    *,
    loader: Callable[[], Any] | None = None,
    max_batch: int = 4,
    max_wait_ms: float = 20,
    queue_size: int = 64,
    max_images: int = 4,
    api_key: str | None = None,
    safety: SafetyChecker | None = None,
    request_timeout_s: float = 300,
    url_images: int = 256,
) -> FastAPI:
    """The FastAPI app serving `pipeline` (a loaded `sana.Pipeline`), or the one `loader()` returns.

    The worker thread starts with the app's lifespan (uvicorn runs it): it calls `loader` if given, warms the
    model up, then generates queued requests in batches of up to `max_batch` images, waiting at most
    `max_wait_ms` for compatible requests. `queue_size` requests may wait; `max_images` is the largest n;
    `url_images` PNGs are kept for response_format "url". `safety` checks every prompt (`sana.safety`).
    """
    service = Service(
        pipeline,
        loader,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        max_images=max_images,
        api_key=api_key,
        safety=safety,
        request_timeout_s=request_timeout_s,
        url_images=url_images,
    )
    page = {name: _static(name) for name in ("index.html", "app.js", "style.css")}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.close)  # generates what is still queued, then stops the worker

    app = FastAPI(title="sana", summary="Sana text-to-image, OpenAI Images API compatible", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_Guard, service=service)

    def error(request: Request, status: int, message: str, code: str, param=None, headers=None) -> JSONResponse:
        if request.url.path == GENERATIONS_PATH:
            service.metrics.observe_request(status)
        return _error_response(service, status, message, code, param, headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error(request, e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, code, param = _validation_error(list(e.errors()))
        return error(request, 400, message, code, param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status_code, "http_error")
        return error(request, e.status_code, str(e.detail), code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(request, 500, f"internal error: {type(e).__name__}", "internal")

    @app.post(GENERATIONS_PATH)
    async def generations(body: ImageRequest, request: Request):
        """Generate images (OpenAI Images API)."""
        start = time.perf_counter()
        service.in_flight += 1
        try:
            answer = await service.generate(body, request)
        except _ClientGone:
            service.metrics.observe_request(499)
            service.metrics.count_error("client_disconnected")
            return Response(status_code=499)  # nobody reads it
        finally:
            service.in_flight -= 1
        service.metrics.observe_request(200, time.perf_counter() - start, len(answer["data"]))
        return JSONResponse(answer)

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        """A PNG answered with response_format "url"."""
        png = service.images.get(name.removesuffix(".png"))
        if png is None:
            raise ApiError(404, "no such image (images are kept for one hour, the newest ones only)", "not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/progress/{progress_id}")
    async def progress(progress_id: str):
        """Where a request sent with this progress_id stands: queued (position) or running (step of steps)."""
        job = service.progress.get(progress_id)
        if job is None:
            raise ApiError(404, f"no request in progress with progress_id {progress_id!r}", "not_found")
        position = service.batcher.position(job) if job.state is JobState.QUEUED else None
        return dict(
            state=job.state.value,
            step=job.step,
            steps=job.key.steps,
            images_done=job.finished,
            n=job.n,
            queue_position=position,
        )

    @app.get("/v1/models")
    async def models():
        service.check_ready()
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "sana"}]}

    @app.get("/health")
    async def health():
        """200 once the model is loaded and warmed up, 503 before (or when loading failed)."""
        if not service.ready:
            return JSONResponse({"status": service.state, "error": service.error}, status_code=503)
        return {"status": "ok", **service.settings()}

    @app.get("/metrics")
    async def metrics():
        batcher = service.batcher
        gauges = {
            "sana_ready": ("1 once the model is loaded and warmed up.", float(service.ready)),
            "sana_queue_depth": ("Requests waiting in the queue.", batcher.depth),
            "sana_queue_images": ("Images waiting in the queue.", batcher.queued_images),
            "sana_requests_in_flight": ("Image generation requests being handled.", service.in_flight),
        }
        info = (lambda: {"model": service.model_name, "sampler": service.sampler}) if service.ready else None
        return Response(service.metrics.render(gauges, info), media_type=prom.CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in page or name == "index.html":
            raise ApiError(404, f"no static file {name!r}", "not_found")
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(page[name], media_type=f"{media}; charset=utf-8")

    return app
