"""HTTP API and browser page over a Captioner: upload a face or a clip, read its AUs and emotions in words.

    app = create_app(Captioner.from_export("runs/stage2"), crop_face=True)   # then: uvicorn, or launch/serve.py

    GET  /            the page (static/index.html: an image or a video, caption, AU and emotion chips, timeline)
    GET  /health      {"status": "ok", "model", "image_size", "crop_face", "auth", "max_upload_bytes", "formats",
                       "video": {...}, "batching": {...}}
    GET  /vocabulary  {"aus": [{"au": 1, "name": "inner brow raiser"}, ...], "emotions": ["neutral", ...]}
    GET  /metrics     Prometheus text: requests by route and status, latency and batch-size histograms, queue depth
    POST /describe    multipart/form-data, file field "image" (query: beams, max_new_tokens) →
                      {"caption", "aus": [{"au": 12, "name": "lip corner puller"}], "emotions": ["happiness"],
                       "face": {"x", "y", "width", "height"} | null, "crop": "face" | "centre" | "none",
                       "image": {"width", "height"}}
    POST /describe/video  multipart, file field "video" (MP4/MOV, MKV/WebM, AVI; query: fps) →
                      {"frames": [{"frame", "time", "caption", "aus", "emotions", "face"?}], "timeline": {...},
                       "timeline_png": "data:image/png;base64,...", "video": {"frames", "fps"}}
    POST /v1/chat/completions, GET /v1/models   OpenAI-compatible (expblip.serve.openai_api)
    GET  /openapi.json  the contract: every route's parameters with their bounds, its answer, and each status it
                      can answer with its error body (expblip.serve.schemas; tests/test_api_contract.py fuzzes it)

Requests are batched (expblip.serve.batching): concurrent images with the same decoding settings share one
``generate`` call on the one model copy. The queue is bounded: when full the answer is 503 with Retry-After; a request
not answered within ``request_timeout_s`` gets 504. With ``api_key`` (launch/serve.py --api-key, or $EXPBLIP_API_KEY)
every API route (/describe*, /v1/*, /metrics) needs ``Authorization: Bearer KEY``; the page asks for the key.

``face`` is in the uploaded (EXIF-upright) image's pixels; with ``crop_face`` the model sees the square around it,
or the centre square when no face was found (``crop: "centre"``, ``face: null``). Every error is JSON
``{"error": "..."}`` (OpenAI's ``{"error": {"message", "type", "param", "code"}}`` under /v1): 400 no or empty file or
a parameter out of bounds, 401 no or wrong key, 413 upload above its limit (refused while the body is read, before any decoding) or image above
``max_pixels`` (read from the header, nothing allocated) or video too long, 415 not a PNG, JPEG, WebP or BMP (sniffed
from the bytes; the declared content type is ignored) or not a video, 422 a truncated or corrupt file, 503 queue
full, 504 timed out. Weights come from the export's safetensors (Captioner); nothing here unpickles, and nothing
imports Ray or DeepSpeed.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import math
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from starlette.exceptions import HTTPException

from expblip.data.facs import AUS, EMOTIONS
from expblip.infer import face as face_detection
from expblip.infer import video as video_io
from expblip.infer.captioner import Captioner, ImageError, load_image, resolve_export
from expblip.infer.parse import parse_caption
from expblip.model.generation import Generated, GenerationConfig
from expblip.pixels import AspectError
from expblip.serve.batching import DEFAULT_MAX_WAIT_MS, Arrival, Batcher, QueueFull
from expblip.serve.metrics import CONTENT_TYPE, ServeMetrics
from expblip.serve.options import ServeOptions
from expblip.serve.schemas import (
    PROTECTED,
    Description,
    Health,
    VideoDescription,
    Vocabulary,
    error_body,
    error_responses,
)

MiB = 1024 * 1024
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # PIL decoders tried; no EPS/PDF/... (EPS would run Ghostscript)
MAX_PIXELS = 40_000_000  # an 8K photo; decoding it takes ~120 MB of RGB
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the file, allowed on top of max_upload_bytes
MAX_BEAMS = 8  # a request's beam width: 1..MAX_BEAMS
MAX_FPS = 30.0  # video frames sampled per second, a request's fps and the server's default: above 0, at most this
STATIC = Path(__file__).with_name("static")
SECURITY_HEADERS = {  # the page loads only its own files: no CDN, no inline script
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
IMAGE_ERROR_STATUS = {"not_image": 415, "too_large": 413, "corrupt": 422}
VIDEO_ERROR_STATUS = {"not_video": 415, "too_large": 413, "corrupt": 422}
PROMETHEUS_TEXT = {200: {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}}
CAPTIONING = ("/describe", "/describe/video", "/v1/chat/completions")  # POST routes whose images go through the queue
# The request's announcement to the batcher (made by the middleware as the request starts, before its body is read),
# ended once its images are queued: a batch that is forming waits for requests already on their way in.
ARRIVAL: ContextVar[Arrival | None] = ContextVar("expblip_arrival", default=None)


def _arrived() -> None:
    arrival = ARRIVAL.get()
    if arrival is not None:
        arrival.done()


class UploadRejected(HTTPException):
    """An upload refused with a status and a message that says what to send instead."""


def au_chips(aus: list[int]) -> list[dict]:
    """AU numbers → [{"au": 12, "name": "lip corner puller"}, ...] (FACS names from expblip.data.facs)."""
    return [{"au": au, "name": AUS[au].name if au in AUS else f"action unit {au}"} for au in aus]


def decode_upload(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Upload bytes → upright RGB image; UploadRejected (400/413/415/422) naming the file otherwise."""
    if not data:
        raise UploadRejected(400, f"{name}: the upload is empty; choose an image file")
    try:
        image = load_image(io.BytesIO(data), name=name, formats=UPLOAD_FORMATS, max_pixels=max_pixels)
    except ImageError as err:
        raise UploadRejected(IMAGE_ERROR_STATUS[err.kind], str(err)) from err
    return ImageOps.exif_transpose(image)  # phone photos: the model sees what the browser preview shows


@dataclass
class Prepared:
    """An image ready for the model: its pixels, and what the answer says about the crop."""

    pixels: torch.Tensor  # [3, S, S] ([3, H, W] at dynamic resolution)
    face: dict | None
    crop: Literal["face", "centre", "none"]
    size: dict  # {"width", "height"} of the image as uploaded (upright)


def prepare_image(captioner: Captioner, image: Image.Image, crop_face: bool) -> Prepared:
    """Crop (if asked) and preprocess one image: the work a request thread does before its image is queued."""
    crop: Literal["face", "centre", "none"] = "none"
    face = None
    seen = image
    if crop_face:
        seen, box = face_detection.crop_face(image)
        crop, face = ("face", box.as_dict()) if box else ("centre", None)
    return Prepared(captioner.preprocess([seen])[0], face, crop, {"width": image.width, "height": image.height})


def description(caption: str, prepared: Prepared) -> dict:
    """The /describe JSON (see the module docstring) of one caption."""
    parsed = parse_caption(caption)
    return {"caption": caption, "aus": au_chips(parsed["aus"]), "emotions": parsed["emotions"],
            "face": prepared.face, "crop": prepared.crop, "image": prepared.size}


def describe_image(captioner: Captioner, image: Image.Image, crop_face: bool,
                   gen: GenerationConfig | None = None) -> dict:
    """One image → the /describe JSON, captioned here and now (no queue): for scripts and tests."""
    prepared = prepare_image(captioner, image, crop_face)
    return description(captioner.caption_pixels([prepared.pixels], gen)[0], prepared)


def _too_large(max_upload_bytes: int, what: str = "image") -> str:
    return f"the upload is larger than the {max_upload_bytes / MiB:g} MiB limit; send a smaller {what}"


def error_response(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """{"error": message}, or OpenAI's {"error": {"message", "type", "param", "code"}} under /v1/ (schemas)."""
    return JSONResponse(error_body(path, status, message), status_code=status, headers=headers)


QUEUE_ERRORS = {503: "the queue is full: retry after Retry-After seconds",
                504: "no caption within the request timeout"}  # every captioning route's (Service.submit, .wait)


@dataclass
class Service:
    """What every route shares: the captioner, its batching queue, and the server's settings."""

    captioner: Captioner
    batcher: Batcher
    gen: GenerationConfig
    crop_face: bool = False
    max_pixels: int = MAX_PIXELS
    request_timeout_s: float = 120.0
    video_fps: float = 2.0
    video_limits: video_io.VideoLimits = video_io.VideoLimits()

    def submit(self, pixels: torch.Tensor, gen: GenerationConfig, prompt: str = "") -> list:
        """Queue pixels [k, 3, S, S]; 503 with Retry-After when the queue cannot take them."""
        try:
            return self.batcher.submit(pixels, gen, prompt)
        except QueueFull as err:
            raise UploadRejected(503, str(err), headers={"Retry-After": str(err.retry_after_s)}) from err

    async def wait(self, futures: list) -> list[Generated]:
        """The captions of queued images; 504 after the request timeout."""
        try:
            return await self.batcher.wait(futures, self.request_timeout_s)
        except TimeoutError as err:
            raise UploadRejected(504, f"no caption within {self.request_timeout_s:g} s: the server is busy; "
                                      "retry later", headers={"Retry-After": "5"}) from err

    async def describe(self, data: bytes, name: str, gen: GenerationConfig | None = None,
                       prompt: str = "") -> tuple[dict, Generated, int]:
        """Upload bytes → (the /describe JSON, the caption with its token count, the tokens read before it)."""
        prepared = await run_in_threadpool(self._prepare, data, name)
        futures = self.submit([prepared.pixels], gen or self.gen, prompt)
        _arrived()
        generated = (await self.wait(futures))[0]
        prompt_tokens = self.captioner.prompt_length(prompt, tuple(prepared.pixels.shape[-2:]))
        return description(generated.text, prepared), generated, prompt_tokens

    def _prepare(self, data: bytes, name: str) -> Prepared:
        image = decode_upload(data, name, self.max_pixels)
        try:
            return prepare_image(self.captioner, image, self.crop_face)
        except AspectError as err:  # dynamic resolution: an aspect the model's bounds cannot hold
            raise UploadRejected(400, f"{name}: {err}") from err

    async def describe_video(self, data: bytes, name: str, fps: float) -> dict:
        """Video bytes → per-frame descriptions, the timeline spans and the timeline plot."""
        frames, pixels, faces = await run_in_threadpool(self._video_frames, data, name, fps)
        futures = self.submit(pixels, self.gen)
        _arrived()
        captions = [g.text for g in await self.wait(futures)]
        rows = video_io.frame_rows(frames, captions, faces if self.crop_face else None)
        png = await run_in_threadpool(video_io.timeline_png, rows, name)
        return {**video_io.video_summary(rows), "video": {"name": name, "frames": len(rows), "fps": fps},
                "timeline_png": "data:image/png;base64," + base64.b64encode(png).decode()}

    def _video_frames(self, data: bytes, name: str, fps: float):
        if not data:
            raise UploadRejected(400, f"{name}: the upload is empty; choose a video file")
        try:
            frames = video_io.sample_frames(io.BytesIO(data), fps, self.video_limits, name)
        except video_io.VideoError as err:
            raise UploadRejected(VIDEO_ERROR_STATUS[err.kind], str(err)) from err
        images, faces = video_io.crop_frames(frames, self.crop_face)
        try:
            return frames, self.captioner.preprocess(images), faces
        except AspectError as err:
            raise UploadRejected(400, f"{name}: {err}") from err


def _install_error_handlers(app: FastAPI, max_upload_bytes: int) -> None:
    """Every error as JSON (see error_response); the body limit's bare 413 gets a message that names the limit."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 413 and not isinstance(exc, UploadRejected):  # starlette's body limit
            message = _too_large(max_upload_bytes, "file")
        return error_response(request.url.path, exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, 400, _invalid_request(request, exc))


def _invalid_request(request: Request, exc: RequestValidationError) -> str:
    """The 400 message of a request FastAPI refused: the field and pydantic's reason; how to upload, for a form."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = first.get("loc", ())
    if loc[:1] == ("body",) and not request.url.path.startswith("/v1/"):  # the multipart form: no or wrong field
        field = "video" if request.url.path == "/describe/video" else "image"
        return (f"send the {field} as multipart/form-data in the file field '{field}' "
                f"(e.g. curl -F {field}=@FILE {request.url})")
    where = ".".join(str(p) for p in loc if p != "body")
    return f"invalid request: {where} {first.get('msg', '')}".strip()


def _body_limits(max_upload_bytes: int, max_video_bytes: int) -> dict[str, int]:
    """Largest accepted request body per route: the file plus multipart framing, or its base64 in a JSON body."""
    return {"/describe": max_upload_bytes + MULTIPART_OVERHEAD,
            "/describe/video": max_video_bytes + MULTIPART_OVERHEAD,
            "/v1/chat/completions": math.ceil(max_upload_bytes * 4 / 3) + 64 * 1024}


def _install_middleware(app: FastAPI, metrics: ServeMetrics, limits: dict[str, int], api_key: str | None,
                        batcher: Batcher) -> None:
    """One middleware: body-size guard, API key, security headers, and the request metrics (route, status, time)."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.monotonic()
        path = request.url.path
        # An honest Content-Length above the limit is refused here, before the body is read: starlette's own
        # refusal for that case (the route's max_body_size) is plain text. The route's limit counts chunked bodies.
        declared = request.headers.get("content-length", "")
        limit = limits.get(path)  # only the routes that read a body have a limit (and document 413)
        if limit is not None and declared.isdigit() and int(declared) > limit:
            what = "video" if path == "/describe/video" else "image"
            response: Response = error_response(path, 413, _too_large(limit - MULTIPART_OVERHEAD, what),
                                                {"Connection": "close"})
        elif api_key and path.startswith(PROTECTED) and not _authorised(request, api_key):
            response = error_response(path, 401, "missing or wrong API key: send the header "
                                                 "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
        elif request.method == "POST" and path in CAPTIONING:
            arrival = batcher.arrival()
            token = ARRIVAL.set(arrival)
            try:
                response = await call_next(request)
            finally:
                arrival.done()  # refused before its images were queued, or already done
                ARRIVAL.reset(token)
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        route = getattr(request.scope.get("route"), "path", None)  # None: refused here, or no such route
        if route is None:
            route = path if any(getattr(r, "path", None) == path for r in app.routes) else "other"
        metrics.request(route, response.status_code, time.monotonic() - start)
        return response


def _authorised(request: Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


MAX_PROMPT_CHARS = 1000


def request_prompt(captioner: Captioner, task: str | None, prompt: str | None) -> str:
    """The prompt of a /describe request: one of the model's tasks (its trained prompt), an instruction of the
    request's own, or none (the paper's captioning); 400 when both are given or the task is unknown."""
    if task and prompt:
        raise UploadRejected(400, "give task or prompt, not both")
    if task:
        try:
            return captioner.task_prompt(task)
        except ValueError as err:
            raise UploadRejected(400, str(err)) from err
    return prompt or ""


def request_gen(base: GenerationConfig, beams: int | None, max_new_tokens: int | None) -> GenerationConfig:
    """The server's decoding with a request's beam width and length limit (bounded by the server's own)."""
    gen = base
    if beams is not None:
        gen = replace(gen, num_beams=beams, sample=False)
    if max_new_tokens is not None:
        gen = replace(gen, max_new_tokens=min(max_new_tokens, base.max_new_tokens))
    return gen


def create_app(captioner: Captioner, max_upload_bytes: int = 5 * MiB, crop_face: bool = False,
               gen: GenerationConfig | None = None, max_pixels: int = MAX_PIXELS, *, max_batch: int = 16,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_queue: int = 256, request_timeout_s: float = 120.0,
               api_key: str | None = None, model_name: str = "expblip", max_video_bytes: int = 50 * MiB,
               video_fps: float = 2.0, video_limits: video_io.VideoLimits | None = None) -> FastAPI:
    """The FastAPI app over one loaded captioner: the page, /health, /vocabulary, /metrics, /describe(/video) and the
    OpenAI-compatible /v1 routes. Images are captioned in batches of up to ``max_batch``, gathered for at most
    ``max_wait_ms``; at most ``max_queue`` images wait (it must hold a whole video: video_limits.max_frames)."""
    if max_upload_bytes < 1 or max_video_bytes < 1:
        raise ValueError(f"max_upload_bytes and max_video_bytes must be >= 1, got {max_upload_bytes}, "
                         f"{max_video_bytes}")
    if not 0 < video_fps <= MAX_FPS:
        raise ValueError(f"video_fps must be above 0 and at most {MAX_FPS:g} (a request's own limit), got {video_fps}")
    video_limits = video_limits or video_io.VideoLimits()
    if max_queue < video_limits.max_frames:
        raise ValueError(f"max_queue ({max_queue} images) must hold a whole video (video_limits.max_frames = "
                         f"{video_limits.max_frames}); raise it or lower the frame limit")
    gen = gen or GenerationConfig()
    metrics = ServeMetrics()
    def generate(pixels: torch.Tensor, gen: GenerationConfig, prompt: str) -> list[Generated]:
        return captioner.caption_pixels(pixels, gen, prompt, with_lengths=True)

    batcher = Batcher(generate, max_batch, max_wait_ms / 1000, max_queue, on_batch=metrics.batch)
    metrics.watch_queue(lambda: batcher.queued)
    service = Service(captioner, batcher, gen, crop_face, max_pixels, request_timeout_s, video_fps, video_limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="expblip", summary="Facial action units and emotions, in words", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the Swagger/ReDoc pages load from a CDN; /openapi.json stays
    app.state.service, app.state.metrics = service, metrics
    _install_error_handlers(app, max_upload_bytes)
    limits = _body_limits(max_upload_bytes, max_video_bytes)
    _install_middleware(app, metrics, limits, api_key, batcher)
    _install_routes(app, service, max_upload_bytes, max_video_bytes, limits, bool(api_key), model_name)

    from expblip.serve.openai_api import install_openai_routes

    install_openai_routes(app, service, model_name, limits["/v1/chat/completions"], bool(api_key))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: _openapi(app, bool(api_key))  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, auth: bool) -> dict[str, Any]:
    """FastAPI's schema, made true: it lists 422 HTTPValidationError on every route with parameters, but this server
    answers an invalid request 400 with its own error (documented per route); with a key, the bearer scheme."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                responses = operation["responses"]
                if "HTTPValidationError" in str(responses.get("422", "")):
                    del responses["422"]
                if auth and path.startswith(PROTECTED):
                    operation["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        if auth:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return app.openapi_schema


def _install_routes(app: FastAPI, service: Service, max_upload_bytes: int, max_video_bytes: int,
                    limits: dict[str, int], auth: bool, model_name: str) -> None:
    _install_info_routes(app, service, max_upload_bytes, max_video_bytes, auth, model_name)
    _install_describe_routes(app, service, max_upload_bytes, max_video_bytes, limits, auth)


def _install_info_routes(app: FastAPI, service: Service, max_upload_bytes: int, max_video_bytes: int, auth: bool,
                         model_name: str) -> None:
    captioner, batcher = service.captioner, service.batcher

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", response_model=Health)
    def health() -> dict:
        limits_ = service.video_limits
        return {"status": "ok", "model": model_name, "image_size": captioner.image_size, "tasks": captioner.tasks,
                "crop_face": service.crop_face, "auth": auth, "max_upload_bytes": max_upload_bytes,
                "formats": [f.lower() for f in UPLOAD_FORMATS],
                "video": {"max_upload_bytes": max_video_bytes, "fps": service.video_fps,
                          "max_frames": limits_.max_frames, "max_seconds": limits_.max_seconds,
                          "formats": ["mp4", "mov", "mkv", "webm", "avi"]},
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait_s * 1000,
                             "max_queue": batcher.max_queue, "queued": batcher.queued}}

    @app.get("/vocabulary", response_model=Vocabulary)
    def vocabulary() -> dict:
        return {"aus": au_chips(sorted(AUS)), "emotions": list(EMOTIONS)}

    # response_class Response (no media type of its own): the errors are documented as JSON, the 200 as text
    @app.get("/metrics", response_class=Response, responses={**PROMETHEUS_TEXT, **error_responses("/metrics", {}, auth)})
    def metrics() -> Response:
        """Prometheus text: requests by route and status, latency and batch-size histograms, queue depth."""
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE)


def _upload(what: str, max_bytes: int) -> Any:
    """The file field of an upload route: non-empty and at most ``max_bytes`` (the server's 400 and 413)."""
    return File(description=what, json_schema_extra={"minLength": 1, "maxLength": max_bytes})


def _install_describe_routes(app: FastAPI, service: Service, max_upload_bytes: int, max_video_bytes: int,
                             limits: dict[str, int], auth: bool) -> None:
    captioner = service.captioner
    image_field = _upload("a face photo (PNG, JPEG, WebP or BMP)", max_upload_bytes)
    video_field = _upload("a clip (MP4/MOV, MKV/WebM or AVI)", max_video_bytes)

    @app.post("/describe", response_model=Description, max_body_size=limits["/describe"],
              responses=error_responses("/describe", {
                  400: "no or empty file, a bad parameter, task and prompt together, or an unknown task",
                  413: "the file above the upload limit, or the image above max_pixels",
                  415: "not a PNG, JPEG, WebP or BMP (sniffed from the bytes)",
                  422: "a truncated or corrupt image", **QUEUE_ERRORS}, auth))
    async def describe(image: UploadFile = image_field,
                       beams: Annotated[int | None, Query(ge=1, le=MAX_BEAMS)] = None,
                       max_new_tokens: Annotated[int | None, Query(ge=1)] = None,
                       task: str | None = Query(None, description="one of the model's tasks (GET /health)",
                                                json_schema_extra={"enum": sorted(captioner.tasks)}),
                       prompt: Annotated[str | None, Query(max_length=MAX_PROMPT_CHARS,
                                                           description="an instruction of your own")] = None):
        name = Path(image.filename or "upload").name
        if image.size is not None and image.size > max_upload_bytes:  # the body limit allows for multipart framing
            raise UploadRejected(413, f"{name}: {image.size} bytes is above the {max_upload_bytes / MiB:g} MiB "
                                      "upload limit; send a smaller image")
        gen = request_gen(service.gen, beams, max_new_tokens)
        return (await service.describe(await image.read(), name, gen, request_prompt(captioner, task, prompt)))[0]

    # face is absent from the frames unless the server crops faces: exclude_unset keeps it so
    @app.post("/describe/video", response_model=VideoDescription, response_model_exclude_unset=True,
              max_body_size=limits["/describe/video"], responses=error_responses("/describe/video", {
                  400: "no or empty file, or a bad parameter",
                  413: "the file above the video limit, or the clip too long, too large or too many frames at fps",
                  415: "not an MP4/MOV, MKV/WebM or AVI video", 422: "a truncated or corrupt video",
                  **QUEUE_ERRORS}, auth))
    async def describe_video(video: UploadFile = video_field,
                             fps: Annotated[float | None, Query(gt=0, le=MAX_FPS)] = None):
        name = Path(video.filename or "upload").name
        if video.size is not None and video.size > max_video_bytes:
            raise UploadRejected(413, f"{name}: {video.size} bytes is above the {max_video_bytes / MiB:g} MiB "
                                      "video limit; send a shorter clip")
        return await service.describe_video(await video.read(), name, fps or service.video_fps)


def app_for_export(opts: ServeOptions, api_key: str | None = None) -> FastAPI:
    """create_app over the export ``opts.model`` names, loaded once: what launch/serve.py and each Ray Serve replica
    serve."""
    captioner = Captioner.from_export(resolve_export(opts.model), device=opts.device, dtype=opts.dtype)
    return create_app(captioner, max_upload_bytes=int(opts.max_upload_mb * MiB), crop_face=opts.crop_face,
                      gen=GenerationConfig(num_beams=opts.beams, max_new_tokens=opts.max_new_tokens),
                      max_batch=opts.max_batch, max_wait_ms=opts.max_wait_ms, max_queue=opts.max_queue,
                      request_timeout_s=opts.request_timeout_s, api_key=api_key,
                      model_name=opts.model_name or model_name(opts.model),
                      max_video_bytes=int(opts.max_video_mb * MiB), video_fps=opts.video_fps,
                      video_limits=video_io.VideoLimits(opts.max_frames, opts.max_seconds))


def model_name(model: str | Path) -> str:
    """The id /v1/models shows for a model path: a run directory's name for RUN_DIR or RUN_DIR/export, else the
    export directory's own name."""
    path = Path(model).resolve()
    return path.parent.name if path.name == "export" else path.name


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server in a thread (port 0: a free one); yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="expblip-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout:g} s")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
