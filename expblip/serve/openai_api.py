"""OpenAI-compatible routes, so that VLM clients (the official ``openai`` package, anything speaking its API) can ask
an expblip model about a face:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    answer = client.chat.completions.create(model="expblip", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}]}])
    answer.choices[0].message.content          # the caption
    answer.model_extra["expblip"]              # {"aus": [{"au", "name"}], "emotions", "face", "crop", "image"}

    GET  /v1/models, /v1/models/{id}   the one model this server holds
    POST /v1/chat/completions          the last user message: exactly one ``image_url`` part, as a ``data:`` URL
                                       (base64), and optional ``text`` parts

Remote image URLs (http, https, anything but ``data:``) are refused with 400: the server never fetches on a client's
behalf. The text parts become the prompt, laid out as the LM family's turn after BOS, exactly as the export's chat
template places them for stock transformers; Exp-BLIP models were trained with an empty prompt, so send the image
alone for the paper's captions, and a task-prompted model's task prompt (GET /health lists them) for its tasks.
Decoding: the server's (beam search) unless the request sets ``temperature`` > 0 or ``top_p`` (nucleus sampling);
``max_completion_tokens`` / ``max_tokens`` lower the length limit. ``n`` must be 1 and ``stream`` false. The image goes
through the same upload checks and the same batching queue as POST /describe.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Path
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from expblip.model.generation import Generated, GenerationConfig
from expblip.serve.app import QUEUE_ERRORS, MiB, Service, UploadRejected
from expblip.serve.schemas import Parse, error_responses

# JSON Schema for "at least one message is the user's" (user_turn refuses a request without one)
HAS_USER_MESSAGE = {"contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}}


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that expblip reads; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str  # the served model's id (GET /v1/models); any other is 404
    messages: list[dict[str, Any]] = Field(min_length=1, json_schema_extra=HAS_USER_MESSAGE)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] | None = 1  # one caption per request
    stream: Literal[False] | None = False  # no streaming

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, n: Any) -> Any:
        if isinstance(n, int) and not isinstance(n, bool) and n != 1:  # the message the client shows; else pydantic's
            raise ValueError(f"n={n}: one caption per request; send n: 1")
        return n

    @field_validator("stream", mode="before")
    @classmethod
    def _no_streaming(cls, stream: Any) -> Any:
        if stream is True:
            raise ValueError("streaming is not supported; send stream: false")
        return stream


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str  # the caption
    refusal: None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion, with expblip's parse of the caption in the extra field ``expblip``."""

    id: str = Field(pattern="^chatcmpl-")
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[Choice]
    usage: Usage
    expblip: Parse


def user_turn(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(the image's URL, the text) of the last user message; UploadRejected(400) saying what is missing."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise UploadRejected(400, "no user message: send {'role': 'user', 'content': [{'type': 'image_url', ...}]}")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise UploadRejected(400, "the user message's content must be a string or a list of parts")
    urls, texts = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            url = part.get("image_url")
            urls.append(url.get("url") if isinstance(url, dict) else url)
        elif kind == "text":
            texts.append(str(part.get("text", "")))
        else:
            raise UploadRejected(400, f"content part of type {kind!r} is not supported; send 'image_url' and 'text'")
    if len(urls) != 1 or not isinstance(urls[0], str):
        raise UploadRejected(400, f"the user message holds {len(urls)} images; send exactly one 'image_url' part "
                                  "with a data: URL (data:image/png;base64,...)")
    return urls[0], "".join(texts).strip()


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:`` URL; 400 for a remote or malformed URL, 413 above ``max_bytes``."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a bare path"
        raise UploadRejected(400, f"image URLs of scheme {scheme!r} are refused: the server never fetches on a "
                                  "client's behalf; send the image inline as a data: URL (data:image/png;base64,...)")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise UploadRejected(400, "the data: URL must be base64-encoded (data:image/png;base64,...)")
    if len(payload) > max_bytes * 4 / 3 + 4:
        raise UploadRejected(413, f"the image is larger than the {max_bytes / MiB:g} MiB limit; send a smaller image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise UploadRejected(400, f"the data: URL is not valid base64 ({err})") from err


def chat_gen(base: GenerationConfig, request: ChatCompletionRequest) -> GenerationConfig:
    """The server's decoding, sampling when asked (temperature > 0 or top_p), length limited by the request."""
    gen = base
    limit = request.max_completion_tokens or request.max_tokens
    if limit is not None:
        gen = replace(gen, max_new_tokens=min(limit, base.max_new_tokens))
    if (request.temperature or 0) > 0 or request.top_p is not None:
        gen = replace(gen, sample=True, temperature=request.temperature or 1.0, top_p=request.top_p or base.top_p)
    return gen


def completion(model: str, described: dict, generated: Generated, prompt_tokens: int) -> dict:
    """OpenAI's chat.completion object, with expblip's parse in the extra field ``expblip``. Usage counts the
    tokens the model saw (query tokens, </s>, the prompt) and generated (the caption end token included)."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": generated.text, "refusal": None},
                         "finish_reason": "stop" if generated.stopped else "length", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated.tokens,
                      "total_tokens": prompt_tokens + generated.tokens},
            "expblip": {k: described[k] for k in ("aus", "emotions", "face", "crop", "image")}}


CHAT_ERRORS = {400: "a malformed request: no user message, not exactly one data: image URL, bad base64, n or stream",
               404: "no such model (GET /v1/models)", 413: "the image above the upload limit",
               415: "not a PNG, JPEG, WebP or BMP", 422: "a truncated or corrupt image", **QUEUE_ERRORS}


def install_openai_routes(app: FastAPI, service: Service, model_name: str, max_body_bytes: int,
                          auth: bool = False) -> None:
    """GET /v1/models, GET /v1/models/{id} and POST /v1/chat/completions on ``app`` (``auth``: behind the API key,
    which the app's middleware checks)."""
    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "expblip"}
    max_image_bytes = int((max_body_bytes - 64 * 1024) * 3 / 4)

    @app.get("/v1/models", response_model=ModelList, responses=error_responses("/v1/models", {}, auth))
    def models() -> dict:
        return {"object": "list", "data": [card]}

    served = {"enum": [model_name]}  # the schema's model ids: the one model (any other is 404)
    model_field = Path(description="the served model's id", json_schema_extra=served)
    request_model = create_model("ChatCompletionRequest", __base__=ChatCompletionRequest,
                                 model=(str, Field(description="the served model's id", json_schema_extra=served)))

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses=error_responses("/v1/models/{model_id}", {404: "no such model"}, auth))
    def model(model_id: str = model_field) -> dict:
        if model_id != model_name:
            raise UploadRejected(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}")
        return card

    async def chat_completions(request: ChatCompletionRequest) -> dict:
        if request.model != model_name:
            raise UploadRejected(404, f"the model {request.model!r} does not exist; this server serves "
                                      f"{model_name!r} (GET /v1/models)")
        url, prompt = user_turn(request.messages)
        data = data_url_bytes(url, max_image_bytes)
        gen = chat_gen(service.gen, request)
        described, generated, prompt_tokens = await service.describe(data, "image_url", gen, prompt)
        return completion(model_name, described, generated, prompt_tokens)

    # FastAPI reads the body's model from the annotation, and this one is made here: set it as an object (a string
    # annotation would be looked up among the module's names)
    chat_completions.__annotations__["request"] = Annotated[request_model, Body()]
    app.post("/v1/chat/completions", response_model=ChatCompletion, max_body_size=max_body_bytes,
             responses=error_responses("/v1/chat/completions", CHAT_ERRORS, auth))(chat_completions)
