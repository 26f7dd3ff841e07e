"""The OpenAI-compatible API, spoken to by the official ``openai`` client: models, chat completions with a data: URL
image (and an optional text prompt), the caption as the message and the parse in the extra field; remote URLs,
wrong keys and unknown models refused the way the client understands."""

from __future__ import annotations

import base64

import openai
import pytest
from test_serve import GEN, png_bytes, post_file

from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner
from expblip.infer.parse import parse_caption
from expblip.serve.app import background_server, create_app, model_name

KEY = "test-key-123"
NAME = "expblip-tiny"


@pytest.fixture(scope="module")
def captioner(tiny_run_dir) -> Captioner:
    return Captioner.from_export(tiny_run_dir / "export")


@pytest.fixture(scope="module")
def server(captioner):
    with background_server(create_app(captioner, gen=GEN, api_key=KEY, model_name=NAME)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def face():
    return next(iter(synthetic_records(1, seed=5)))["image"]


def image_message(image, text: str | None = None, url: str | None = None) -> list[dict]:
    url = url or "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "system", "content": "You describe faces."}, {"role": "user", "content": parts}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "expblip"


def test_chat_completion_is_the_caption_with_the_parse_beside_it(client, captioner, face):
    answer = client.chat.completions.create(model=NAME, messages=image_message(face))
    expected = captioner.describe([face], GEN)[0]
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected["caption"]
    extra = answer.model_extra["expblip"]
    assert [a["au"] for a in extra["aus"]] == parse_caption(expected["caption"])["aus"]
    assert extra["emotions"] == expected["emotions"] and extra["image"] == {"width": 64, "height": 64}
    assert answer.object == "chat.completion" and answer.model == NAME and answer.id.startswith("chatcmpl-")
    generated = captioner.caption_pixels(captioner.preprocess([face]), GEN, with_lengths=True)[0]
    assert answer.usage.completion_tokens == generated.tokens and answer.usage.prompt_tokens == 8 + 1  # 8 queries
    assert choice.finish_reason == ("stop" if generated.stopped else "length")


def test_text_part_is_the_prompt_and_max_tokens_limits_length(client, captioner, face):
    answer = client.chat.completions.create(model=NAME, messages=image_message(face, "raises"))
    assert answer.choices[0].message.content == captioner.caption([face], GEN, prompt="raises")[0]
    assert answer.usage.prompt_tokens == captioner.model.config.num_query_tokens + 1 + captioner.count_tokens("raises")
    short = client.chat.completions.create(model=NAME, messages=image_message(face), max_tokens=2)
    assert short.usage.completion_tokens <= 2 and short.choices[0].finish_reason == "length"


def test_remote_urls_are_refused_without_fetching(client, face):
    for url in ("http://127.0.0.1:9/face.png", "https://example.com/face.jpg", "file:///etc/passwd"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=NAME, messages=image_message(face, url=url))
        assert "never fetches" in info.value.message and info.value.status_code == 400


def test_bad_requests_are_named(client, face):
    with pytest.raises(openai.BadRequestError, match="exactly one 'image_url'"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "describe a face"}])
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        client.chat.completions.create(model=NAME, messages=image_message(face, url="data:image/png;base64,%%%"))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=NAME, messages=image_message(
            face, url="data:text/plain;base64," + base64.b64encode(b"hello").decode()))
    assert info.value.status_code == 415
    with pytest.raises(openai.NotFoundError, match="this server serves 'expblip-tiny'"):
        client.chat.completions.create(model="gpt-4o", messages=image_message(face))
    with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
        client.chat.completions.create(model=NAME, messages=image_message(face), stream=True)


def test_the_key_guards_both_apis(server, face):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, body = post_file(f"{server}/describe", png_bytes(face))
    assert status == 401 and "Authorization: Bearer" in body["error"]
    from test_serve import get

    assert get(f"{server}/health")[0] == 200 and get(f"{server}/")[0] == 200  # the page and health stay open
    assert get(f"{server}/metrics")[0] == 401


def test_serve_script_takes_the_key_from_the_environment(monkeypatch):
    from conftest import launch_module

    serve = launch_module("serve")
    monkeypatch.setenv("EXPBLIP_API_KEY", "from-env")
    args = serve.parse_args(["--model", "runs/s2/export"])
    assert args.api_key == "from-env" and args.host == "127.0.0.1"
    assert model_name("runs/s2/export") == "s2" and model_name("exports/small") == "small"
