"""LLM captions against a real OpenAI-compatible HTTP server on 127.0.0.1: prompts, retries, cache, key, failures.

``FakeLLM`` (also used by test_fusion.py) is an http.server in a thread answering POST /v1/chat/completions with
text derived from the request, and can fail on demand; nothing in the client is mocked.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import typing
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from expblip.data.captions import (
    NO_AU_CAPTION,
    CaptionConfig,
    CaptionStats,
    au_caption,
    captions_for,
    captions_for_records,
)
from expblip.data.llm import LLMClient, LLMConfig, LLMError, clean_reply, llm_au_caption, llm_fuse

# The paper's wording, typed out here (not imported) so a drifting constant fails the tests.
PAPER_QUESTION = (
    "Describe briefly the facial actions or status of a face which contains {} in 1-9 sentences. "
    "Do not describe the emotion or facial expressions, and do not mention 'AU' in the reply."
)
PAPER_SHOT_ANSWER = (
    "The face shows the outer eyebrows raised, forehead wrinkles, a wrinkled nose, a stretched lip, "
    "and either parted lips or a dropped jaw."
)
PAPER_FUSION = (
    "Combine the facial action sentence with the emotion sentence. This combined sentence should describe "
    "all the facial actions and emotions mentioned in these two sentences by pointing out how each "
    "emotion is inferred from the corresponding facial actions."
)
KEY_ENV = "EXPBLIP_TEST_LLM_KEY"


def reply_for(messages: list[dict]) -> str:
    """The fake server's raw reply: deterministic in the messages, two lines, padded with spaces."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:10]
    return f"  The face shows reply {digest}.\n\nA second line follows.  "


def expected(messages: list[dict]) -> str:
    """What the client returns for ``reply_for``: one stripped paragraph."""
    return " ".join(reply_for(messages).split())


class FakeLLM:
    """A real chat-completions server; fails on demand (set the attributes between calls)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []  # {"path", "headers", "body"} of every request, failed ones included
        self.fail_next: list[tuple[int, dict]] = []  # (status, headers) answered first, one per request
        self.fail_always: int | None = None  # answer every request with this status
        self.fail_after: int | None = None  # after this many successful replies, answer 500 forever
        self.fail_when: Callable[[dict], int | None] = lambda body: None  # per-request status from the body
        self.reply: Callable[[list[dict]], str] = reply_for
        self.delay_once_s = 0.0  # the next request waits this long before answering (timeouts)
        self.successes = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that timed out closed the socket
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)

    def _status(self, body: dict) -> tuple[int, dict, float]:
        with self.lock:
            delay, self.delay_once_s = self.delay_once_s, 0.0
            if self.fail_next:
                return (*self.fail_next.pop(0), delay)
            if self.fail_always is not None:
                return self.fail_always, {}, delay
            if self.fail_after is not None and self.successes >= self.fail_after:
                return 500, {}, delay
            status = self.fail_when(body)
            if status is not None:
                return status, {}, delay
            self.successes += 1
            return 200, {}, delay

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, delay = fake._status(body)
                time.sleep(delay)
                if self.path != "/v1/chat/completions":
                    status = 404
                payload = {"error": {"message": f"fake failure {status}"}}
                if status == 200:
                    payload = {
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": fake.reply(body["messages"])}}
                        ],
                    }
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def start(self) -> FakeLLM:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm():
    server = FakeLLM().start()
    yield server
    server.stop()


def make_cfg(url: str, tmp_path: Path, **kw) -> LLMConfig:
    opts = dict(
        url=url,
        model="tiny-llm",
        api_key_env=KEY_ENV,
        retries=3,
        backoff_s=0.001,
        timeout_s=5,
        cache_dir=str(tmp_path / "llm-cache"),
    )
    return LLMConfig(**{**opts, **kw})


class Sleeps(list):
    """Records the client's back-off pauses instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------- prompts


def test_au_caption_sends_the_papers_one_shot_prompt(fake_llm, tmp_path):
    client = LLMClient(make_cfg(fake_llm.url, tmp_path, temperature=0.2, max_tokens=77))
    caption = llm_au_caption(client, [12, 6])

    (req,) = fake_llm.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["messages"] == [
        {"role": "user", "content": PAPER_QUESTION.format("AU2, AU4, AU9, AU20, AU25")},
        {"role": "assistant", "content": PAPER_SHOT_ANSWER},
        {"role": "user", "content": PAPER_QUESTION.format("AU6, AU12")},
    ]
    assert req["body"]["model"] == "tiny-llm"
    assert req["body"]["temperature"] == 0.2 and req["body"]["max_tokens"] == 77
    assert caption == expected(req["body"]["messages"]) and "\n" not in caption and caption == caption.strip()
    with pytest.raises(ValueError, match="no-AU"):
        llm_au_caption(client, [])
    with pytest.raises(ValueError, match="unknown AU"):
        llm_au_caption(client, [3])


def test_fuse_sends_the_papers_fusion_prompt(fake_llm, tmp_path):
    client = LLMClient(make_cfg(fake_llm.url, tmp_path))
    au, emo = "It is a people who raises cheek and pulls lip corner.", "The face shows happiness."
    fused = llm_fuse(client, au, emo)

    (req,) = fake_llm.requests
    (message,) = req["body"]["messages"]
    assert message["role"] == "user"
    assert message["content"] == f"{PAPER_FUSION}\nFacial action sentence: {au}\nEmotion sentence: {emo}"
    assert fused == expected(req["body"]["messages"])


# ---------------------------------------------------------------- retries and failures


def test_retries_with_backoff_and_retry_after_then_success(fake_llm, tmp_path):
    fake_llm.fail_next = [(500, {}), (503, {}), (429, {"Retry-After": "7"}), (502, {})]
    sleeps = Sleeps()
    client = LLMClient(make_cfg(fake_llm.url, tmp_path, retries=4, backoff_s=0.01), sleep=sleeps)
    assert llm_fuse(client, "It is a people who raises cheek.", "The face shows happiness.")
    assert len(fake_llm.requests) == 5 and client.requests == 5
    assert sleeps == [0.01, 0.02, 7.0, 0.08]  # doubling back-off; the server's Retry-After wins


def test_transient_failures_past_retries_fail_naming_the_url(fake_llm, tmp_path):
    fake_llm.fail_always = 503
    sleeps = Sleeps()
    client = LLMClient(make_cfg(fake_llm.url, tmp_path, retries=2), sleep=sleeps)
    with pytest.raises(LLMError, match=r"127\.0\.0\.1:\d+/v1/chat/completions failed 3 times.*HTTP 503"):
        llm_fuse(client, "a.", "b.")
    assert len(fake_llm.requests) == 3 and len(sleeps) == 2


def test_connection_errors_and_timeouts_are_retried(fake_llm, tmp_path):
    sleeps = Sleeps()
    down = LLMClient(make_cfg(closed_port_url(), tmp_path, retries=2), sleep=sleeps)
    with pytest.raises(LLMError, match="failed 3 times") as err:
        llm_fuse(down, "a.", "b.")
    assert "127.0.0.1" in str(err.value) and down.requests == 3 and len(sleeps) == 3 - 1

    fake_llm.delay_once_s = 1.0  # the first answer comes after the client's timeout
    slow = LLMClient(make_cfg(fake_llm.url, tmp_path, timeout_s=0.2), sleep=Sleeps())
    assert llm_fuse(slow, "a.", "b.") and slow.requests == 2


def test_client_error_fails_at_once_naming_url_and_status(fake_llm, tmp_path):
    fake_llm.fail_always = 400
    sleeps = Sleeps()
    client = LLMClient(make_cfg(fake_llm.url, tmp_path), sleep=sleeps)
    with pytest.raises(LLMError) as err:
        llm_fuse(client, "a.", "b.")
    assert fake_llm.url + "/chat/completions" in str(err.value) and "HTTP 400" in str(err.value)
    assert len(fake_llm.requests) == 1 and sleeps == []


@pytest.mark.parametrize(
    "text",
    ["", "   \n ", "As an AI language model, I cannot describe faces.", "I'm sorry, but I can't help with that."],
)
def test_empty_or_refusing_reply_raises_and_is_not_cached(fake_llm, tmp_path, text):
    fake_llm.reply = lambda messages: text
    client = LLMClient(make_cfg(fake_llm.url, tmp_path))
    with pytest.raises(LLMError, match="empty|refused"):
        llm_fuse(client, "a.", "b.")
    with pytest.raises(LLMError):
        llm_fuse(client, "a.", "b.")
    assert len(fake_llm.requests) == 2  # the bad reply was not cached


def test_clean_reply_makes_one_paragraph():
    assert clean_reply('  "The brows rise.\n\nThe lips part."  ') == "The brows rise. The lips part."
    assert (
        clean_reply("The face shows a raised cheek; it is not an AI.")
        == "The face shows a raised cheek; it is not an AI."
    )


# ---------------------------------------------------------------- cache and key


def test_cache_serves_reruns_without_requests(fake_llm, tmp_path):
    cfg = make_cfg(fake_llm.url, tmp_path)
    first = llm_au_caption(LLMClient(cfg), [1, 2])
    assert len(fake_llm.requests) == 1

    again = LLMClient(cfg)  # a new process would build a new client: the cache is on disk
    assert llm_au_caption(again, [2, 1]) == first and again.cache_hits == 1 and again.requests == 0
    elsewhere = LLMClient(make_cfg(closed_port_url(), tmp_path))  # the key leaves the URL out
    assert llm_au_caption(elsewhere, [1, 2]) == first and elsewhere.requests == 0
    assert len(fake_llm.requests) == 1

    LLMClient(make_cfg(fake_llm.url, tmp_path, temperature=0.7)).complete([{"role": "user", "content": "x"}])
    llm_au_caption(LLMClient(make_cfg(fake_llm.url, tmp_path, max_tokens=9)), [1, 2])
    llm_au_caption(LLMClient(make_cfg(fake_llm.url, tmp_path, model="other")), [1, 2])
    assert len(fake_llm.requests) == 4  # temperature, max_tokens and model are part of the key


def test_api_key_comes_from_the_env_and_never_reaches_the_cache(fake_llm, tmp_path, monkeypatch):
    secret = "sk-test-very-secret-0123456789"
    monkeypatch.setenv(KEY_ENV, secret)
    cfg = make_cfg(fake_llm.url, tmp_path)
    llm_au_caption(LLMClient(cfg), [4])
    assert fake_llm.requests[-1]["headers"]["Authorization"] == f"Bearer {secret}"
    assert secret not in repr(cfg)

    files = [p for p in (tmp_path / "llm-cache").rglob("*") if p.is_file()]
    assert files and all(secret not in p.read_text() for p in files)
    assert all(KEY_ENV not in p.read_text() for p in files)

    monkeypatch.delenv(KEY_ENV)
    llm_au_caption(LLMClient(cfg), [5])
    assert "Authorization" not in fake_llm.requests[-1]["headers"]  # a local server needs no key


# ---------------------------------------------------------------- caption configs and records


def test_caption_config_llm_options_are_checked(fake_llm, tmp_path):
    with pytest.raises(ValueError, match="caption.llm.url"):
        CaptionConfig(au_source="llm")
    with pytest.raises(ValueError, match="caption.llm.model"):
        CaptionConfig(style="concat", fusion="llm", llm=LLMConfig(url="http://127.0.0.1:1/v1"))
    with pytest.raises(ValueError, match="fusion"):
        CaptionConfig(fusion="gpt")  # type: ignore[arg-type]
    assert not CaptionConfig(style="emotion", au_source="llm").needs_llm  # emotion captions never call it

    # expblip.config.from_dict builds nested dataclasses from these hints (YAML `caption.llm.url: ...`).
    assert typing.get_type_hints(CaptionConfig)["llm"] == LLMConfig | None
    cfg = CaptionConfig(style="concat", fusion="llm", au_source="both", llm=LLMConfig(fake_llm.url, "tiny-llm"))
    assert cfg.needs_llm
    with pytest.raises(ValueError, match="LLMClient"):
        captions_for({"aus": [6], "emotions": ["happiness"]}, cfg)


def _records() -> list[dict]:
    labels = [
        {"aus": [6, 12], "emotions": ["happiness"]},
        {"aus": [9, 15], "emotions": ["disgust"]},
        {"aus": [], "emotions": None},
        {"aus": None, "emotions": None},
        {"aus": [1, 2], "emotions": None},
    ]
    return [
        {"key": f"r{i}", "image": None, "labels": dict(lab, dataset="tiny"), "captions": []}
        for i, lab in enumerate(labels)
    ]


def _fails_on_au9(body: dict) -> int | None:
    return 500 if "AU9" in body["messages"][-1]["content"] else None  # the shot's AU9 is in messages[0], not [-1]


def test_both_sources_keep_the_rule_caption_and_report_llm_failures(fake_llm, tmp_path):
    fake_llm.fail_when = _fails_on_au9
    cfg = CaptionConfig(style="au", au_source="both", llm=make_cfg(fake_llm.url, tmp_path, retries=1))
    stats = CaptionStats()
    out = {r["key"]: r for r in captions_for_records(_records(), cfg, stats=stats)}

    assert out["r0"]["captions"] == [au_caption([6, 12]), expected(fake_llm.requests[0]["body"]["messages"])]
    assert out["r0"]["labels"]["caption_sources"] == ["rule", "llm"] and "caption_errors" not in out["r0"]["labels"]
    assert out["r1"]["captions"] == [au_caption([9, 15])]  # the LLM failed: rule caption only, no stand-in
    assert "HTTP 500" in out["r1"]["labels"]["caption_errors"][0]
    assert out["r2"]["captions"] == [NO_AU_CAPTION] and out["r3"]["captions"] == []
    assert (stats.ok, stats.failed, stats.skipped, stats.empty) == (3, 1, 0, 1)
    assert stats.errors[0].startswith("r1: llm_au:") and stats.requests == 2 + 2  # r0, r4 + r1 twice


def test_llm_only_skips_failed_samples_and_counts_cache_hits(fake_llm, tmp_path):
    fake_llm.fail_when = _fails_on_au9
    cfg = CaptionConfig(style="au", au_source="llm", llm=make_cfg(fake_llm.url, tmp_path, retries=0))
    stats = CaptionStats()
    out = {r["key"]: r for r in captions_for_records(_records(), cfg, stats=stats)}
    assert "r1" not in out and stats.skipped == 1 and stats.failed == 1  # no template caption for r1
    assert out["r0"]["labels"]["caption_sources"] == ["llm"] and out["r2"]["captions"] == [NO_AU_CAPTION]

    fake_llm.fail_when = lambda body: None
    n = len(fake_llm.requests)
    stats = CaptionStats()
    out = {r["key"]: r for r in captions_for_records(_records(), cfg, stats=stats)}
    assert len(fake_llm.requests) == n + 1  # only r1's caption is new
    assert (stats.ok, stats.failed, stats.cached, stats.requests) == (4, 0, 2, 1)
    assert out["r1"]["captions"] == [expected(fake_llm.requests[-1]["body"]["messages"])]


def test_concat_style_with_llm_fusion(fake_llm, tmp_path):
    cfg = CaptionConfig(style="concat", au_source="rule", fusion="llm", llm=make_cfg(fake_llm.url, tmp_path))
    out = {r["key"]: r for r in captions_for_records(_records(), cfg)}
    (req,) = [r for r in fake_llm.requests if au_caption([6, 12]) in r["body"]["messages"][0]["content"]]
    assert req["body"]["messages"][0]["content"].endswith("Emotion sentence: The face shows happiness.")
    assert out["r0"]["captions"] == [expected(req["body"]["messages"])]
    assert out["r0"]["labels"]["caption_sources"] == ["llm_fusion:rule"]
    assert out["r4"]["captions"] == [au_caption([1, 2])]  # one aspect only: nothing to fuse
    assert captions_for({"aus": [6, 12], "emotions": ["happiness"]}, cfg, LLMClient(cfg.llm)) == out["r0"]["captions"]
