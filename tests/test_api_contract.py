"""The API contract (issue 23): the server's own /openapi.json is true. Requests generated from it (schemathesis
strategies, in process over ASGI, a tiny random export) get no 5xx, only statuses the schema lists for their route,
and bodies that match the documented schemas, whether the schema allows the request or forbids it; real uploads get
2xx bodies that match; and the requests the server refuses are ones the schema forbids.

Schemathesis' pytest plugin (``schema.parametrize``) does not run under pytest 9 (it sets ``Function._nodeid``), so
each operation's strategy is driven by a plain Hypothesis ``@given`` here: derandomized, a fixed budget."""

from __future__ import annotations

import base64

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_serve import GEN, png_bytes

from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner
from expblip.serve.app import MAX_BEAMS, MAX_FPS, MAX_PROMPT_CHARS, create_app

KEY = "contract-key"
NAME = "expblip-tiny"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
FUZZ = settings(max_examples=30, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def captioner(tiny_run_dir) -> Captioner:
    return Captioner.from_export(tiny_run_dir / "export")


def api(captioner: Captioner, **kwargs) -> schemathesis.BaseSchema:
    """The schema of a test server, its operations bound to the app in process."""
    app = create_app(captioner, gen=GEN, max_upload_bytes=256 * 1024, max_wait_ms=0, model_name=NAME, **kwargs)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


# ---------------------------------------------------------------- generated requests


def fuzz(operation, mode: GenerationMode) -> None:
    """FUZZ's budget of ``mode`` requests at one operation, each answer checked against the schema."""

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        case.call_and_validate(checks=CHECKS)

    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # no invalid request exists: no parameters, or only a path string (which any string satisfies)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("auth", ["open", "keyed"])
def test_every_answer_is_documented(captioner, auth, mode):
    """Every operation of the schema, on an open server and on one behind an API key (no key sent: 401s)."""
    schema = api(captioner, api_key=KEY if auth == "keyed" else None)
    failures = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            fuzz(operation, mode)
        except (AssertionError, FailureGroup) as err:  # every operation is fuzzed; the failures reported together
            failures[operation.label] = str(err)
    assert not failures, "\n\n".join(f"{label}\n{why}" for label, why in failures.items())


# ---------------------------------------------------------------- real uploads


@pytest.fixture(scope="module")
def face_png() -> bytes:
    return png_bytes(next(iter(synthetic_records(1, seed=5)))["image"])


def chat_body(image: bytes | str, **fields) -> dict:
    url = image if isinstance(image, str) else "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            **fields}


def test_captions_match_their_documented_schemas(captioner, face_png, tmp_path):
    """The 2xx of each captioning route (a random fuzz never makes a decodable image), with face crops on."""
    from test_video import write_clip

    schema = api(captioner, crop_face=True)
    clip = write_clip(tmp_path / "clip.mp4").read_bytes()
    cases = [schema["/describe"]["POST"].Case(body={"image": face_png}, media_type="multipart/form-data",
                                              query={"beams": 1, "task": "describe"}),
             schema["/describe/video"]["POST"].Case(body={"video": clip}, media_type="multipart/form-data",
                                                    query={"fps": 0.5}),
             schema["/v1/chat/completions"]["POST"].Case(body=chat_body(face_png, max_tokens=3, n=1, stream=False),
                                                         media_type="application/json")]
    answers = {}
    for case in cases:
        response = case.call_and_validate(checks=CHECKS)
        assert response.status_code == 200, (case.operation.label, response.text)
        answers[case.operation.path] = response.json()
    assert answers["/describe"]["crop"] in ("face", "centre")
    assert len(answers["/describe/video"]["frames"]) == 2  # 4 s at 0.5 frames/s
    assert all("face" in frame for frame in answers["/describe/video"]["frames"])  # cropping: each frame's face
    completion = answers["/v1/chat/completions"]
    assert len(completion["choices"]) == 1 and completion["usage"]["completion_tokens"] <= 3


# ---------------------------------------------------------------- refusals are schema-invalid


def request_errors(doc: dict, path: str, query: dict, body: dict, media_type: str) -> list[str]:
    """Why the schema ``doc`` forbids a POST to ``path`` with ``query`` and ``body`` (files as bytes); [] if it
    allows it."""
    operation = doc["paths"][path]["post"]
    root = {"components": doc["components"]}  # the $refs of the operation's schemas point into it
    errors = []
    for parameter in operation.get("parameters", []):
        if parameter["name"] in query:
            validator = jsonschema.Draft202012Validator({**root, **parameter["schema"]})
            errors += [f"{parameter['name']}: {e.message}" for e in validator.iter_errors(query[parameter["name"]])]
    sent = {k: v.decode("latin-1") if isinstance(v, bytes) else v for k, v in body.items()}  # a file: its octets
    validator = jsonschema.Draft202012Validator({**root, **operation["requestBody"]["content"][media_type]["schema"]})
    return errors + [e.message for e in validator.iter_errors(sent)]


REFUSED = {  # id: (path, query, body ("face": a valid upload; /v1: the fields that differ from a valid request), status)
    "empty-image": ("/describe", {}, {"image": b""}, 400),
    "beams-0": ("/describe", {"beams": 0}, "face", 400),
    "beams-above-MAX_BEAMS": ("/describe", {"beams": MAX_BEAMS + 1}, "face", 400),
    "max_new_tokens-0": ("/describe", {"max_new_tokens": 0}, "face", 400),
    "unknown-task": ("/describe", {"task": "poetry"}, "face", 400),
    "prompt-too-long": ("/describe", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "face", 400),
    "image-above-the-limit": ("/describe", {}, {"image": b"\x89PNG" + bytes(256 * 1024)}, 413),
    "empty-video": ("/describe/video", {}, {"video": b""}, 400),
    "fps-0": ("/describe/video", {"fps": 0}, {"video": b"\x1aE\xdf\xa3"}, 400),
    "fps-above-MAX_FPS": ("/describe/video", {"fps": MAX_FPS + 1}, {"video": b"\x1aE\xdf\xa3"}, 400),
    "unknown-model": ("/v1/chat/completions", {}, {"model": "gpt-4o"}, 404),
    "no-messages": ("/v1/chat/completions", {}, {"messages": []}, 400),
    "no-user-message": ("/v1/chat/completions", {}, {"messages": [{"role": "system", "content": "x"}]}, 400),
    "max_tokens-0": ("/v1/chat/completions", {}, {"max_tokens": 0}, 400),
    "max_completion_tokens-0": ("/v1/chat/completions", {}, {"max_completion_tokens": 0}, 400),
    "temperature-above-2": ("/v1/chat/completions", {}, {"temperature": 2.5}, 400),
    "top_p-0": ("/v1/chat/completions", {}, {"top_p": 0}, 400),
    "n-2": ("/v1/chat/completions", {}, {"n": 2}, 400),
    "stream": ("/v1/chat/completions", {}, {"stream": True}, 400),
}


@pytest.fixture(scope="module")
def open_schema(captioner):
    return api(captioner)


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_the_server_refuses_the_schema_forbids(open_schema, face_png, name):
    path, query, body, status = REFUSED[name]
    if path == "/v1/chat/completions":  # a valid request but for the fields given
        media_type, body = "application/json", chat_body(face_png) | body
    else:
        media_type, body = "multipart/form-data", {"image": face_png} if body == "face" else body
    response = open_schema[path]["POST"].Case(query=query, body=body, media_type=media_type).call()
    assert response.status_code == status, response.text
    assert request_errors(open_schema.raw_schema, path, query, body, media_type), f"the schema allows {name}"
