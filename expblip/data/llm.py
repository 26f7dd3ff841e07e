"""LLM captions: the paper's one-shot AU prompt and fusion prompt, sent to any OpenAI-compatible server.

    client = LLMClient(LLMConfig(url="http://127.0.0.1:8000/v1", model="meta-llama/Llama-3.1-8B-Instruct"))
    llm_au_caption(client, [6, 12])            # "The face shows raised cheeks and pulled lip corners."
    llm_fuse(client, au_sentence, emotion_sentence)

``LLMClient.complete`` POSTs ``{url}/chat/completions`` (vLLM, llama.cpp, TGI and OpenAI all speak it) with the
standard library's urllib, so captioning needs no extra dependency. Connection errors, timeouts, 429 and 5xx are
retried with exponential back-off (a server's ``Retry-After`` wins); any other 4xx fails at once, naming the URL and
status. Replies are cached on disk under ``cache_dir``, keyed by the sha256 of model + messages + temperature +
max_tokens (not the URL: the same model behind another address gives the same answer), so a re-run makes no request.

The API key is read from the environment variable *named* by ``api_key_env`` at each request; it is never stored in
the config, the client, a cache file or a log line. A server without authentication (a local vLLM) needs none.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from expblip.data.facs import validate_aus

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the paper's prompts (EXPBLIP.md, "Captions")

AU_QUESTION = (
    "Describe briefly the facial actions or status of a face which contains {aus} in 1-9 sentences. "
    "Do not describe the emotion or facial expressions, and do not mention 'AU' in the reply."
)
AU_SHOT_AUS = (2, 4, 9, 20, 25)
AU_SHOT_ANSWER = (
    "The face shows the outer eyebrows raised, forehead wrinkles, a wrinkled nose, a stretched lip, "
    "and either parted lips or a dropped jaw."
)
FUSION_PROMPT = (
    "Combine the facial action sentence with the emotion sentence. This combined sentence should describe all the "
    "facial actions and emotions mentioned in these two sentences by pointing out how each emotion is inferred from "
    "the corresponding facial actions."
)
# The paper does not say how the two sentences follow its instruction; this layout is ours.
FUSION_TEMPLATE = FUSION_PROMPT + "\nFacial action sentence: {au}\nEmotion sentence: {emotion}"

# A reply that starts like this (or says "as an AI" anywhere) is a refusal, not a caption.
_REFUSAL = re.compile(
    r"\bas an ai\b|^(?:i'?m sorry|i am sorry|sorry[,.!]|i apologi[sz]e|i cannot|i can'?t|i'?m unable|i am unable"
    r"|i won'?t)",
    re.IGNORECASE,
)
RETRY_STATUSES = frozenset({408, 409, 425, 429})  # plus every 5xx
MAX_RETRY_AFTER_S = 600.0  # a server asking for a longer pause is treated as asking for this one


class LLMError(RuntimeError):
    """An LLM call failed for good (after retries, or at once for a client error) or gave an unusable reply."""


@dataclass
class LLMConfig:
    """An OpenAI-compatible chat-completions endpoint and how to call it."""

    url: str = ""  # base URL, e.g. http://127.0.0.1:8000/v1 (the client POSTs {url}/chat/completions)
    model: str = ""  # model name the server knows, e.g. meta-llama/Llama-3.1-8B-Instruct
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env variable holding the key (unset: no Authorization header)
    temperature: float = 0.0  # 0: the same prompt gives the same caption (and the cache stays truthful)
    max_tokens: int = 256  # reply length limit
    timeout_s: float = 60  # per request
    retries: int = 4  # further attempts after a transient failure (connection, timeout, 429, 5xx)
    backoff_s: float = 1.0  # first pause between attempts; doubles each time
    cache_dir: str = ".cache/llm"  # on-disk reply cache ("" disables it)

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"llm.url must start with http:// or https://, got {self.url!r}")
        if self.temperature < 0 or self.max_tokens < 1 or self.timeout_s <= 0:
            raise ValueError("llm.temperature must be >= 0, llm.max_tokens >= 1 and llm.timeout_s > 0")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("llm.retries and llm.backoff_s must be >= 0")

    def check_endpoint(self, prefix: str = "llm") -> None:
        """Raise ValueError unless url and model are set (a default-built config has neither)."""
        missing = [name for name in ("url", "model") if not getattr(self, name)]
        if missing:
            raise ValueError(
                f"set {' and '.join(f'{prefix}.{m}' for m in missing)} (an OpenAI-compatible server, "
                "e.g. url=http://127.0.0.1:8000/v1 from `vllm serve MODEL`)"
            )


def display_url(url: str) -> str:
    """``url`` without any user:password part, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def clean_reply(text: str) -> str:
    """One stripped paragraph (line breaks and runs of spaces become one space); LLMError if empty or a refusal."""
    text = " ".join(str(text).split())
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    if not text:
        raise LLMError("the LLM replied with an empty text")
    if _REFUSAL.search(text):
        raise LLMError(f"the LLM refused instead of describing: {text[:120]!r}")
    return text


def cache_key(model: str, messages: list[dict], temperature: float, max_tokens: int) -> str:
    """sha256 of what determines a reply (the URL is left out on purpose)."""
    payload = {"model": model, "messages": messages, "temperature": float(temperature), "max_tokens": max_tokens}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _retry_after(value: str | None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class _Transient(Exception):
    """One attempt failed in a way another attempt may not; ``wait_s`` is the server's Retry-After, if any."""

    def __init__(self, detail: str, wait_s: float | None = None) -> None:
        super().__init__(detail)
        self.wait_s = wait_s


class LLMClient:
    """Chat completions with retries and an on-disk reply cache; safe to share between threads.

    Counters (for reports): ``requests`` HTTP attempts sent, ``cache_hits`` replies served from disk.
    ``sleep`` is injectable so tests can record the back-off without waiting for it.
    """

    def __init__(self, cfg: LLMConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        cfg.check_endpoint()
        self.cfg, self.sleep = cfg, sleep
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"
        self.requests = self.cache_hits = 0
        self._lock = threading.Lock()

    def complete(self, messages: list[dict]) -> str:
        """The model's reply to ``messages`` as one clean paragraph (from the cache when it holds it)."""
        key = cache_key(self.cfg.model, messages, self.cfg.temperature, self.cfg.max_tokens)
        cached = self._cache_get(key)
        if cached is not None:
            with self._lock:
                self.cache_hits += 1
            return cached
        reply = clean_reply(self._post_with_retries(messages))  # an unusable reply raises and is not cached
        self._cache_put(key, messages, reply)
        return reply

    # ------------------------------------------------------------ HTTP

    def _post_with_retries(self, messages: list[dict]) -> str:
        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            try:
                return self._post_once(messages)
            except _Transient as exn:
                if attempt == attempts - 1:
                    raise LLMError(
                        f"{display_url(self.endpoint)} failed {attempts} times; last error: {exn}. "
                        "Check the server is up, or raise llm.retries / llm.timeout_s"
                    ) from None
                wait = exn.wait_s if exn.wait_s is not None else self.cfg.backoff_s * 2**attempt
                log.warning(
                    "LLM request to %s failed (%s); retry %d/%d in %.3g s",
                    display_url(self.endpoint),
                    exn,
                    attempt + 1,
                    attempts - 1,
                    wait,
                )
                self.sleep(wait)
        raise AssertionError("unreachable")

    def _request(self, messages: list[dict]) -> urllib.request.Request:
        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "expblip"}
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(
            self.endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )

    def _post_once(self, messages: list[dict]) -> str:
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(self._request(messages), timeout=self.cfg.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exn:
            self._raise_for_status(exn)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exn:
            reason = getattr(exn, "reason", exn)
            raise _Transient(f"{type(reason).__name__}: {reason}") from None
        return self._reply_text(payload)

    def _raise_for_status(self, exn: urllib.error.HTTPError) -> NoReturn:
        detail = exn.read(300).decode("utf-8", "replace").strip() if exn.fp else ""
        if exn.code in RETRY_STATUSES or exn.code >= 500:
            raise _Transient(f"HTTP {exn.code} {detail[:120]}", _retry_after(exn.headers.get("Retry-After")))
        raise LLMError(
            f"{display_url(self.endpoint)} answered HTTP {exn.code} ({detail[:200] or exn.reason}); "
            f"check llm.url, llm.model and the key in ${self.cfg.api_key_env}"
        ) from None

    def _reply_text(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"{display_url(self.endpoint)} sent no chat completion: {payload[:200]!r}") from None
        if not isinstance(content, str):
            raise LLMError(f"{display_url(self.endpoint)} sent a non-text message content: {content!r:.200}")
        return content

    # ------------------------------------------------------------ cache

    def _cache_path(self, key: str) -> Path | None:
        return Path(self.cfg.cache_dir, key[:2], f"{key}.json") if self.cfg.cache_dir else None

    def _cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            return clean_reply(json.loads(path.read_text("utf-8"))["reply"])
        except (ValueError, KeyError, TypeError, LLMError):
            log.warning("ignoring unreadable LLM cache entry %s", path)
            return None

    def _cache_put(self, key: str, messages: list[dict], reply: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # What determines the reply, and the reply: never the URL's credentials or the API key.
        entry = {
            "model": self.cfg.model,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            "messages": messages,
            "reply": reply,
        }
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(entry, ensure_ascii=False, indent=1), "utf-8")
        os.replace(tmp, path)  # atomic: a crash never leaves a torn entry


# ---------------------------------------------------------------- the two prompts as messages


def au_list(aus: Iterable[int]) -> str:
    """``[12, 6]`` → ``"AU6, AU12"`` (the paper's spelling in the prompt)."""
    return ", ".join(f"AU{au}" for au in validate_aus(aus))


def au_messages(aus: Iterable[int]) -> list[dict]:
    """The paper's one-shot AU prompt: its example question and answer, then the question for ``aus``."""
    listed = au_list(aus)
    if not listed:
        raise ValueError("au_messages() needs at least one AU (a face with none gets the fixed no-AU caption)")
    return [
        {"role": "user", "content": AU_QUESTION.format(aus=au_list(AU_SHOT_AUS))},
        {"role": "assistant", "content": AU_SHOT_ANSWER},
        {"role": "user", "content": AU_QUESTION.format(aus=listed)},
    ]


def fusion_messages(au_sentence: str, emotion_sentence: str) -> list[dict]:
    """The paper's fusion prompt followed by the two sentences."""
    au_sentence, emotion_sentence = au_sentence.strip(), emotion_sentence.strip()
    if not au_sentence or not emotion_sentence:
        raise ValueError("fusion_messages() needs a non-empty AU sentence and emotion sentence")
    return [{"role": "user", "content": FUSION_TEMPLATE.format(au=au_sentence, emotion=emotion_sentence)}]


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


# Provenance stamps: change a prompt and the stamp (and so every cache key and shard meta) changes with it.
AU_PROMPT_SHA = _sha([AU_QUESTION, list(AU_SHOT_AUS), AU_SHOT_ANSWER])
FUSION_PROMPT_SHA = _sha(FUSION_TEMPLATE)


def llm_au_caption(client: LLMClient, aus: Iterable[int]) -> str:
    """The LLM's description of a face showing ``aus`` (one paragraph); LLMError when it fails or refuses."""
    return client.complete(au_messages(aus))


def llm_fuse(client: LLMClient, au_sentence: str, emotion_sentence: str) -> str:
    """The LLM's fusion of an AU sentence and an emotion sentence (one paragraph); LLMError when it fails."""
    return client.complete(fusion_messages(au_sentence, emotion_sentence))
