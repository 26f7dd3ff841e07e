"""The JSON of the HTTP API as pydantic models, and which error each route answers: FastAPI checks every answer
against its route's model and publishes them all in /openapi.json, so that the schema is the server's contract.

    @app.post("/describe", response_model=Description, responses=error_responses("/describe", {400: "why"}, auth))

Errors are ``{"error": "message"}`` (ErrorBody), and OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(OpenAIError) under /v1/, where the ``openai`` client reads them; ``error_body`` builds both from these models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

PROTECTED = ("/describe", "/v1/", "/metrics")  # path prefixes that need the API key when one is set
OPENAI_PREFIX = "/v1/"
# OpenAI's error type and code by status; any other status: invalid_request_error below 500, no code
OPENAI_KINDS = {401: ("invalid_request_error", "invalid_api_key"), 404: ("invalid_request_error", "model_not_found"),
                503: ("server_error", "overloaded"), 504: ("server_error", "timeout")}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


# ---------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    """Every error outside /v1/: what is wrong and what to send instead."""

    error: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str | None  # "invalid_api_key", "model_not_found", "overloaded", "timeout", or none


class OpenAIError(BaseModel):
    """Every error under /v1/, in OpenAI's shape."""

    error: OpenAIErrorDetail


def error_body(path: str, status: int, message: str) -> dict:
    """The JSON of an error answered at ``path``: OpenAIError under /v1/, ErrorBody elsewhere."""
    if not path.startswith(OPENAI_PREFIX):
        return ErrorBody(error=message).model_dump()
    kind, code = OPENAI_KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return OpenAIError(error=OpenAIErrorDetail(message=message, type=kind, param=None, code=code)).model_dump()


def error_responses(path: str, why: dict[int, str], auth: bool) -> dict[int | str, dict]:
    """FastAPI ``responses=`` for the refusals of the route at ``path``: each status of ``why`` (status -> when), and
    401 where the API key guards ``path``, with the error model that error_body answers there."""
    model = OpenAIError if path.startswith(OPENAI_PREFIX) else ErrorBody
    if auth and path.startswith(PROTECTED):
        why = {401: "no or wrong API key: send 'Authorization: Bearer KEY'", **why}
    return {status: {"model": model, "description": text, **({"headers": RETRY_AFTER} if status in (503, 504) else {})}
            for status, text in sorted(why.items())}


# ---------------------------------------------------------------- answers


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


class Parse(BaseModel):
    """What a caption says, and what the model saw."""

    aus: list[AUChip]  # parsed from the caption, ascending
    emotions: list[str]  # parsed from the caption, sorted
    face: FaceBox | None  # the face the model saw, in the uploaded image's pixels; None: none found or not cropping
    crop: Literal["face", "centre", "none"]  # what the model saw: face square, centre square (no face), whole image
    image: ImageSize  # the uploaded image, EXIF-upright


class Description(Parse):
    """POST /describe."""

    caption: str


class FrameDescription(BaseModel):
    frame: int  # index in the decoded stream
    time: float  # seconds; the frame's caption holds over [time, end)
    end: float
    caption: str
    aus: list[int]
    emotions: list[str]
    face: FaceBox | None = None  # only when the server crops faces: the face found in this frame, or null


Spans = dict[str, list[tuple[float, float]]]  # AU number (as text) or emotion -> [[start, end], ...] in seconds


class Timeline(BaseModel):
    aus: Spans
    emotions: Spans


class VideoInfo(BaseModel):
    name: str
    frames: int
    fps: float


class VideoDescription(BaseModel):
    """POST /describe/video."""

    frames: list[FrameDescription]
    timeline: Timeline
    video: VideoInfo
    timeline_png: str = Field(pattern=r"^data:image/png;base64,")


class VideoSettings(BaseModel):
    max_upload_bytes: int
    fps: float  # frames sampled per second unless the request sets fps
    max_frames: int
    max_seconds: float
    formats: list[str]


class BatchingSettings(BaseModel):
    max_batch: int
    max_wait_ms: float
    max_queue: int
    queued: int  # images waiting now


class Health(BaseModel):
    """GET /health: the server's settings, for the page and for clients."""

    status: Literal["ok"]
    model: str  # the id /v1/models shows
    image_size: int  # pixels per side the model sees
    tasks: dict[str, str]  # task -> the prompt it was trained with (POST /describe?task=)
    crop_face: bool
    auth: bool  # whether the API routes need the key
    max_upload_bytes: int
    formats: list[str]  # image formats
    video: VideoSettings
    batching: BatchingSettings


class Vocabulary(BaseModel):
    """GET /vocabulary: every AU and emotion a caption can name."""

    aus: list[AUChip]
    emotions: list[str]
