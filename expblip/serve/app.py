"""HTTP API and browser page over a Captioner: upload a face, read its AUs and emotions in words.

    app = create_app(Captioner.from_export("runs/stage2"), crop_face=True)   # then: uvicorn, or launch/serve.py

    GET  /            the page (static/index.html: choose or drop an image, see caption, AU and emotion chips)
    GET  /health      {"status": "ok", "image_size", "crop_face", "max_upload_bytes", "formats"}
    GET  /vocabulary  {"aus": [{"au": 1, "name": "inner brow raiser"}, ...], "emotions": ["neutral", ...]}
    POST /describe    multipart/form-data, file field "image" →
                      {"caption", "aus": [{"au": 12, "name": "lip corner puller"}], "emotions": ["happiness"],
                       "face": {"x", "y", "width", "height"} | null, "crop": "face" | "centre" | "none",
                       "image": {"width", "height"}}

``face`` is in the uploaded (EXIF-upright) image's pixels; with ``crop_face`` the model sees the square around it,
or the centre square when no face was found (``crop: "centre"``, ``face: null``). Every error is JSON
``{"error": "..."}``: 400 no or empty file, 413 upload above ``max_upload_bytes`` (refused while the body is read,
before any decoding) or image above ``max_pixels`` (read from the header, nothing allocated), 415 not a PNG, JPEG,
WebP or BMP (sniffed from the bytes; the declared content type is ignored), 422 a truncated or corrupt image.
Weights come from the export's safetensors (Captioner); nothing here unpickles, and nothing imports Ray or DeepSpeed.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from expblip.data.facs import AUS, EMOTIONS
from expblip.infer import face as face_detection
from expblip.infer.captioner import Captioner, ImageError, load_image
from expblip.model.blip2 import GenerationConfig

MiB = 1024 * 1024
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # PIL decoders tried; no EPS/PDF/... (EPS would run Ghostscript)
MAX_PIXELS = 40_000_000  # an 8K photo; decoding it takes ~120 MB of RGB
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the file, allowed on top of max_upload_bytes
STATIC = Path(__file__).with_name("static")
SECURITY_HEADERS = {  # the page loads only its own files: no CDN, no inline script
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
IMAGE_ERROR_STATUS = {"not_image": 415, "too_large": 413, "corrupt": 422}


class AUChip(BaseModel):
    au: int  # FACS number
    name: str  # FACS name


class FaceBox(BaseModel):
    x: int
    y: int
    width: int
    height: int


class ImageSize(BaseModel):
    width: int
    height: int


class Description(BaseModel):
    caption: str
    aus: list[AUChip]  # parsed from the caption, ascending
    emotions: list[str]  # parsed from the caption, sorted
    face: FaceBox | None  # the face the model saw, in the uploaded image's pixels; None: none found or not cropping
    crop: Literal["face", "centre", "none"]  # what the model saw: face square, centre square (no face), whole image
    image: ImageSize  # the uploaded image, EXIF-upright


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


def describe_image(captioner: Captioner, image: Image.Image, crop_face: bool,
                   gen: GenerationConfig | None = None) -> dict:
    """One image → the /describe JSON (see the module docstring)."""
    crop: Literal["face", "centre", "none"] = "none"
    face = None
    seen = image
    if crop_face:
        seen, face = face_detection.crop_face(image)
        crop = "face" if face else "centre"
    described = captioner.describe([seen], gen)[0]
    return {"caption": described["caption"], "aus": au_chips(described["aus"]), "emotions": described["emotions"],
            "face": face.as_dict() if face else None, "crop": crop,
            "image": {"width": image.width, "height": image.height}}


def _too_large(max_upload_bytes: int) -> str:
    return f"the upload is larger than the {max_upload_bytes / MiB:g} MiB limit; send a smaller image"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, max_upload_bytes: int) -> None:
    """Every error as {"error": message}; the body limit's bare 413 gets a message that names the limit."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 413 and not isinstance(exc, UploadRejected):  # starlette's body limit
            message = _too_large(max_upload_bytes)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "send the image as multipart/form-data in the file field 'image' "
                           f"(e.g. curl -F image=@face.jpg {request.url})")


def create_app(captioner: Captioner, max_upload_bytes: int = 5 * MiB, crop_face: bool = False,
               gen: GenerationConfig | None = None, max_pixels: int = MAX_PIXELS) -> FastAPI:
    """The FastAPI app: the page, /health, /vocabulary and POST /describe over one loaded captioner.

    Requests are described one at a time (a lock around the model): generation already uses every core.
    """
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
    app = FastAPI(title="expblip", summary="Facial action units and emotions, in words",
                  docs_url=None, redoc_url=None)  # the Swagger/ReDoc pages load from a CDN; /openapi.json stays
    lock = threading.Lock()
    _install_error_handlers(app, max_upload_bytes)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # An honest Content-Length above the limit is refused here, before the body is read: starlette's own
        # refusal for that case (the route's max_body_size) is plain text. The route's limit counts chunked bodies.
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes + MULTIPART_OVERHEAD:
            response: Response = _error(413, _too_large(max_upload_bytes), {"Connection": "close"})
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "image_size": captioner.image_size, "crop_face": crop_face,
                "max_upload_bytes": max_upload_bytes, "formats": [f.lower() for f in UPLOAD_FORMATS]}

    @app.get("/vocabulary")
    def vocabulary() -> dict:
        return {"aus": au_chips(sorted(AUS)), "emotions": list(EMOTIONS)}

    def describe_bytes(data: bytes, name: str) -> dict:
        image = decode_upload(data, name, max_pixels)
        with lock:
            return describe_image(captioner, image, crop_face, gen)

    @app.post("/describe", response_model=Description, max_body_size=max_upload_bytes + MULTIPART_OVERHEAD,
              responses={code: {"description": why} for code, why in [
                  (400, "no or empty file"), (413, "upload or image too large"), (415, "not a PNG/JPEG/WebP/BMP"),
                  (422, "corrupt image")]})
    async def describe(image: Annotated[UploadFile, File(description="a face photo (PNG, JPEG, WebP or BMP)")]):
        name = Path(image.filename or "upload").name
        if image.size is not None and image.size > max_upload_bytes:  # the body limit allows for multipart framing
            raise UploadRejected(413, f"{name}: {image.size} bytes is above the {max_upload_bytes / MiB:g} MiB "
                                      "upload limit; send a smaller image")
        return await run_in_threadpool(describe_bytes, await image.read(), name)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server in a thread (port 0: a free one); yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
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
