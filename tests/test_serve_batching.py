"""The batching server: concurrent requests share generate calls, other decoding settings batch apart, a bad upload
under load gets its own 4xx, a full queue answers 503 at once, a slow answer 504, and /metrics counts it all."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_serve import GEN, get, png_bytes, post_file

from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner
from expblip.infer.video import VideoLimits
from expblip.model.blip2 import GenerationConfig
from expblip.serve.app import background_server, create_app
from expblip.serve.batching import Batcher, QueueFull
from expblip.serve.metrics import parse_histogram


@pytest.fixture(scope="module")
def captioner(tiny_run_dir) -> Captioner:
    return Captioner.from_export(tiny_run_dir / "export")


@pytest.fixture(scope="module")
def faces() -> list:
    return [r["image"] for r in synthetic_records(12, seed=11)]


def metrics_text(url: str) -> str:
    status, headers, raw = get(f"{url}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return raw.decode()


def metric_samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample in Prometheus text (parsed by prometheus_client)."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


class Recorder:
    """A caption function that records each batch (size, decoding settings, prompt) and can be held back."""

    def __init__(self):
        self.batches: list[tuple[int, GenerationConfig, str]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, pixels: torch.Tensor, gen: GenerationConfig, prompt: str) -> list[str]:
        self.started.set()
        self.release.wait(30)
        self.batches.append((len(pixels), gen, prompt))
        return [f"caption {float(p.mean()):.4f} beams {gen.num_beams} {prompt}".strip() for p in pixels]


class HeldCaptioner(Captioner):
    """The tiny export's captioner whose generate calls wait until ``release`` is set (a busy model, on demand)."""

    release: threading.Event
    started: threading.Event

    def caption_pixels(self, pixel_values, gen=None, prompt="", with_lengths=False):
        self.started.set()
        self.release.wait(30)
        return super().caption_pixels(pixel_values, gen, prompt, with_lengths)


def held(captioner: Captioner) -> HeldCaptioner:
    copy = HeldCaptioner(**{f.name: getattr(captioner, f.name) for f in fields(Captioner)})
    copy.release, copy.started = threading.Event(), threading.Event()
    return copy


# ---------------------------------------------------------------- the queue alone


def test_batches_gather_concurrent_images_and_keep_settings_apart():
    recorder = Recorder()
    recorder.release.clear()
    batcher = Batcher(recorder, max_batch=4, max_wait_s=0.05, max_queue=32)
    try:
        blocker = batcher.submit(torch.zeros(1, 3, 8, 8), GEN)  # holds the worker while the rest queue up
        assert recorder.started.wait(5)
        beams, greedy = GEN, GenerationConfig(num_beams=1, max_new_tokens=6)
        futures = [batcher.submit(torch.full((1, 3, 8, 8), float(i)), beams if i % 2 else greedy)[0]
                   for i in range(10)]
        futures += batcher.submit(torch.ones(3, 3, 8, 8), greedy, prompt="a face")
        assert batcher.queued == 13
        recorder.release.set()
        captions = [f.result(10) for f in futures]
        blocker[0].result(10)
    finally:
        batcher.close()
    assert all(f"beams {1 if i % 2 == 0 else 2}" in c for i, c in enumerate(captions[:10]))
    assert captions[-1].endswith("a face")
    sizes = [size for size, _, _ in recorder.batches[1:]]
    assert max(sizes) == 4 and sum(sizes) == 13  # bounded, and nothing lost
    for _, gen, prompt in recorder.batches[1:]:  # one setting per batch: 5 beam, 5 greedy, 3 greedy + prompt
        assert (gen, prompt) in [(beams, ""), (greedy, ""), (greedy, "a face")]
    assert sorted(s for s, g, p in recorder.batches[1:] if (g, p) == (beams, "")) == [1, 4]


def test_full_queue_refuses_at_once_and_cancelled_images_leave_it():
    recorder = Recorder()
    recorder.release.clear()
    batcher = Batcher(recorder, max_batch=2, max_wait_s=0.0, max_queue=4)
    try:
        running = batcher.submit(torch.zeros(2, 3, 8, 8), GEN)
        assert recorder.started.wait(5)
        waiting = batcher.submit(torch.zeros(3, 3, 8, 8), GEN)
        start = time.monotonic()
        with pytest.raises(QueueFull) as full:
            batcher.submit(torch.zeros(2, 3, 8, 8), GEN)  # 3 + 2 > 4: all or nothing
        assert time.monotonic() - start < 5 and full.value.retry_after_s >= 1  # not after the held batch (30 s)
        for future in waiting:
            future.cancel()  # a request that timed out
        assert batcher.queued == 0
        batcher.submit(torch.zeros(4, 3, 8, 8), GEN)  # room again
        with pytest.raises(ValueError, match="more than the queue holds"):
            batcher.submit(torch.zeros(5, 3, 8, 8), GEN)
        recorder.release.set()
        assert [f.result(10) for f in running]
    finally:
        batcher.close()
    assert sum(size for size, _, _ in recorder.batches) == 6  # the cancelled three never reached the model


# ---------------------------------------------------------------- the HTTP server


def test_concurrent_requests_share_batches_and_get_their_own_captions(captioner, faces):
    app = create_app(captioner, gen=GEN, max_wait_ms=300, max_batch=8)  # a long wait: batching is certain
    expected = [d["caption"] for d in captioner.describe(faces, GEN, batch_size=1)]
    with background_server(app) as url, ThreadPoolExecutor(len(faces)) as pool:
        answers = list(pool.map(lambda face: post_file(f"{url}/describe", png_bytes(face)), faces))
        text = metrics_text(url)
    assert [status for status, _ in answers] == [200] * len(faces)
    assert [body["caption"] for _, body in answers] == expected  # each request its own image's caption
    samples, batches = metric_samples(text), parse_histogram(text, "expblip_batch_size")
    calls = samples[("expblip_batch_size_count", frozenset())]
    assert samples[("expblip_batch_size_sum", frozenset())] == len(faces) and calls < len(faces)
    assert batches[1.0] < calls == batches[8.0]  # some batches held more than one image, none more than 8
    assert samples[("expblip_requests_total", frozenset({("route", "/describe"), ("status", "200")}))] == len(faces)


def test_bad_upload_under_load_gets_its_4xx_and_the_others_their_captions(captioner, faces):
    good = [png_bytes(face) for face in faces[:8]]
    bad = {3: (b"not an image at all", "notes.txt", 415), 6: (good[0][: len(good[0]) // 2], "cut.png", 422)}
    uploads = [(bad[i][0], bad[i][1]) if i in bad else (data, f"face{i}.png") for i, data in enumerate(good)]
    with background_server(create_app(captioner, gen=GEN, max_wait_ms=100)) as url, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda u: post_file(f"{url}/describe", u[0], u[1]), uploads))
        samples = metric_samples(metrics_text(url))
    expected = captioner.describe(faces[:8], GEN, batch_size=1)
    for i, (status, body) in enumerate(answers):
        if i in bad:
            assert status == bad[i][2] and bad[i][1] in body["error"]
        else:
            assert status == 200 and body["caption"] == expected[i]["caption"]
    by_status = {dict(lb)["status"]: v for (n, lb), v in samples.items()
                 if n == "expblip_requests_total" and dict(lb).get("route") == "/describe"}
    assert by_status == {"200": 6.0, "415": 1.0, "422": 1.0}


def test_full_queue_answers_503_with_retry_after_and_never_hangs(captioner, faces):
    busy = held(captioner)
    app = create_app(busy, gen=GEN, max_batch=1, max_wait_ms=0, max_queue=2,
                     video_limits=VideoLimits(max_frames=2))
    face = png_bytes(faces[0])
    with background_server(app) as url, ThreadPoolExecutor(3) as pool:
        first = pool.submit(post_file, f"{url}/describe", face)  # runs (held)
        assert busy.started.wait(10)
        queued = [pool.submit(post_file, f"{url}/describe", face) for _ in range(2)]  # fill the queue
        deadline = time.monotonic() + 10
        while app.state.service.batcher.queued < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        status, body = post_file(f"{url}/describe", face)
        assert time.monotonic() - start < 5  # answered at once, not after the held batch
        assert status == 503 and "queue is full" in body["error"]
        assert get(f"{url}/health")[0] == 200  # the server still answers other routes
        busy.release.set()
        assert [f.result(30)[0] for f in [first, *queued]] == [200, 200, 200]
        samples = metric_samples(metrics_text(url))
    assert samples[("expblip_requests_total", frozenset({("route", "/describe"), ("status", "503")}))] == 1


def test_retry_after_header_and_timeout_is_504(captioner, faces):
    import http.client
    import uuid
    from urllib.parse import urlsplit

    busy = held(captioner)
    app = create_app(busy, gen=GEN, max_batch=1, max_wait_ms=0, max_queue=1, request_timeout_s=3.0,
                     video_limits=VideoLimits(max_frames=1))
    face = png_bytes(faces[0])
    with background_server(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_file, f"{url}/describe", face)  # runs, held past its timeout
        assert busy.started.wait(10)
        second = pool.submit(post_file, f"{url}/describe", face)  # queued, times out while waiting
        deadline = time.monotonic() + 2
        while app.state.service.batcher.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.service.batcher.queued == 1  # the queue is full: the next request must get 503
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="f.png"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + face + f"\r\n--{boundary}--\r\n".encode()
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("POST", "/describe", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        assert response.status == 503 and int(response.getheader("Retry-After")) >= 1
        conn.close()
        assert first.result(30)[0] == 504 and second.result(30)[0] == 504
        assert "busy" in second.result()[1]["error"]
        busy.release.set()
        assert app.state.service.batcher.queued == 0  # the timed-out request left the queue


def test_a_lone_image_runs_at_once_and_a_batch_waits_only_for_announced_arrivals():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=4, max_wait_s=10.0, max_queue=8)
    try:
        start = time.monotonic()
        batcher.submit(torch.zeros(1, 3, 8, 8), GEN)[0].result(20)
        assert time.monotonic() - start < 5  # nothing on its way in: no 10 s wait
        with batcher.arriving():  # a request being decoded: the queued image waits for it
            first = batcher.submit(torch.zeros(1, 3, 8, 8), GEN)
            time.sleep(0.3)
            second = batcher.submit(torch.ones(1, 3, 8, 8), GEN)
        assert first[0].result(10) and second[0].result(10)
    finally:
        batcher.close()
    assert [size for size, _, _ in recorder.batches] == [1, 2]
