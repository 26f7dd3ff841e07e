"""Pipeline step 4 end to end on tiny shards: concat and LLM fusion, provenance, failures, resuming after an outage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_llm import FakeLLM, expected, make_cfg  # the real local chat-completions server

from expblip.data.captions import NEUTRAL_CAPTION, NO_AU_CAPTION, au_caption, concat_fusion, emotion_caption
from expblip.data.llm import FUSION_PROMPT_SHA, FUSION_TEMPLATE, LLMClient, fusion_messages
from expblip.data.shards import MANIFEST, PARTIAL_MANIFEST, read_manifest, resolve_shards, write_shards
from expblip.data.stream import ErrorCounter, read_shard
from expblip.pipeline.fusion import FAILURES_FILE, fuse_shards

# (labels, the AU sentences and emotion sentences fusion must use); None: nothing to fuse (no emotion).
CASES = [
    (
        {"au_caption": "The brows rise.", "emotion_caption": "The face shows surprise."},
        ["The brows rise."],
        ["The face shows surprise."],
    ),
    ({"aus": [6, 12], "emotions": ["happiness"]}, [au_caption([6, 12])], ["The face shows happiness."]),
    (
        {"au_caption": ["The lips part.", "The jaw drops."], "emotion_caption": "The face shows fear."},
        ["The lips part.", "The jaw drops."],
        ["The face shows fear."],
    ),
    ({"aus": [], "emotions": ["neutral"]}, [NO_AU_CAPTION], [NEUTRAL_CAPTION]),
    ({"aus": [1, 2], "emotions": None}, None, None),
    ({"aus": [4, 7], "emotion_caption": "The face shows anger."}, [au_caption([4, 7])], ["The face shows anger."]),
    (
        {"au_caption": "The nose wrinkles.", "emotions": ["disgust"]},
        ["The nose wrinkles."],
        ["The face shows disgust."],
    ),
    ({"aus": [1, 4, 15], "emotions": ["sadness"]}, [au_caption([1, 4, 15])], [emotion_caption(["sadness"])]),
    (
        {"aus": [12], "emotions": ["happiness", "surprise"]},
        [au_caption([12])],
        ["The face shows happiness and surprise."],
    ),
]
FUSABLE = [f"face-{i}" for i, case in enumerate(CASES) if case[1] is not None]
PAIRS = sum(len(a) * len(e) for _, a, e in CASES if a is not None)  # 9 fusions for 8 samples


def _image(i: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8))


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def in_shards(tmp_path) -> str:
    """9 hand-made samples in 3 shards; face-1 carries JPEG bytes, the rest PIL images (stored as PNG)."""
    records = [
        {
            "key": f"face-{i}",
            "image": _jpeg(i) if i == 1 else _image(i),
            "labels": dict(labels, dataset="tiny", subject=f"s{i % 2}"),
            "captions": [f"old caption {i}"],
        }
        for i, (labels, _, _) in enumerate(CASES)
    ]
    out = str(tmp_path / "in")
    write_shards(records, out, samples_per_shard=3, progress=False)
    return out


@pytest.fixture
def fake_llm():
    server = FakeLLM().start()
    yield server
    server.stop()


def read_samples(spec: str) -> dict[str, tuple[dict, dict]]:
    """key → (json labels, raw members) of every sample of finished shards at ``spec``."""
    urls, _ = resolve_shards(spec)
    errors = ErrorCounter(max_errors=0, max_error_rate=0.0)
    return {raw["__key__"]: (json.loads(raw["json"]), raw) for url in urls for raw in read_shard(url, errors)}


def expected_captions(fuse) -> dict[str, list[str]]:
    return {
        f"face-{i}": [fuse(a, e) for a in aus for e in emos]
        for i, (_, aus, emos) in enumerate(CASES)
        if aus is not None
    }


def llm_caption(au: str, emotion: str) -> str:
    return expected(fusion_messages(au, emotion))


def test_concat_fusion_end_to_end(in_shards, tmp_path):
    out = str(tmp_path / "cat")
    stats = fuse_shards(in_shards, out, "concat", samples_per_shard=4)

    assert stats["complete"] and stats["fused"] == stats["written"] == 8 and stats["shards"] == 2
    assert stats["missing_caption"] == 1 and stats["failed"] == 0 and "face-4" in stats["errors"][0]
    inputs, outputs = read_samples(in_shards), read_samples(out)
    assert {k: labels["captions"] for k, (labels, _) in outputs.items()} == expected_captions(concat_fusion)
    for key, (labels, raw) in outputs.items():
        assert labels["fusion"] == {"method": "concat", "model": None, "prompt_sha": None}
        assert labels["dataset"] == "tiny" and raw["txt"].decode() == labels["captions"][0]
        in_raw = inputs[key][1]
        assert raw.get("png", raw.get("jpg")) == in_raw.get("png", in_raw.get("jpg"))  # image bytes copied as is
    assert "jpg" in outputs["face-1"][1]
    assert outputs["face-2"][0]["au_caption"] == ["The lips part.", "The jaw drops."]
    assert outputs["face-1"][0]["au_caption"] == au_caption([6, 12])  # derived fields are written out
    assert read_manifest(out)["meta"]["fusion"]["method"] == "concat"

    again = fuse_shards(in_shards, out, "concat", samples_per_shard=4)
    assert again["already_done"] and again["written"] == 8


def test_llm_fusion_end_to_end_and_cache(in_shards, tmp_path, fake_llm):
    cfg = make_cfg(fake_llm.url, tmp_path)
    stats = fuse_shards(in_shards, str(tmp_path / "fused"), "llm", cfg, samples_per_shard=4, workers=3)

    assert stats["complete"] and stats["written"] == 8 and stats["requests"] == PAIRS and stats["cached"] == 0
    assert len(fake_llm.requests) == PAIRS
    assert all(
        r["body"]["messages"][0]["content"].startswith(FUSION_TEMPLATE.split("\n")[0]) for r in fake_llm.requests
    )
    outputs = read_samples(str(tmp_path / "fused"))
    assert {k: labels["captions"] for k, (labels, _) in outputs.items()} == expected_captions(llm_caption)
    assert list(outputs) == FUSABLE  # input order kept despite 3 concurrent calls
    provenance = outputs["face-0"][0]["fusion"]
    assert provenance == {"method": "llm", "model": "tiny-llm", "prompt_sha": FUSION_PROMPT_SHA}
    assert all("concat" not in json.dumps(labels) for labels, _ in outputs.values())

    assert fuse_shards(in_shards, str(tmp_path / "fused"), "llm", cfg, samples_per_shard=4)["already_done"]
    fresh = fuse_shards(in_shards, str(tmp_path / "fused2"), "llm", cfg, samples_per_shard=4)
    assert fresh["complete"] and fresh["cached"] == PAIRS and fresh["requests"] == 0
    assert len(fake_llm.requests) == PAIRS  # the cache answered everything
    assert read_samples(str(tmp_path / "fused2")).keys() == outputs.keys()


def test_resume_after_an_llm_outage_does_only_the_missing_work(in_shards, tmp_path, fake_llm):
    out = tmp_path / "fused"
    cfg = make_cfg(fake_llm.url, tmp_path, retries=1)
    fake_llm.fail_after = 4  # face-0, face-1 and face-2's two fusions succeed; then 500 for good
    first = fuse_shards(in_shards, str(out), "llm", cfg, samples_per_shard=2, workers=1)

    assert not first["complete"] and first["failed"] == 1 and "face-3" in first["errors"][-1]
    assert "HTTP 500" in first["errors"][-1] and first["shards"] == 1 and first["written"] == 2
    assert (out / PARTIAL_MANIFEST).exists() and not (out / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        read_manifest(str(out))
    finished = out / "shard-000000.tar"
    stamp = (finished.stat().st_mtime_ns, finished.read_bytes())

    fake_llm.fail_after = None
    before = len(fake_llm.requests)
    second = fuse_shards(in_shards, str(out), "llm", cfg, samples_per_shard=2, workers=1)
    assert second["complete"] and second["shards_resumed"] == 1 and second["written"] == 8
    assert second["cached"] == 4 and second["requests"] == PAIRS - 4 == len(fake_llm.requests) - before
    assert (finished.stat().st_mtime_ns, finished.read_bytes()) == stamp  # the finished shard was not rewritten
    outputs = read_samples(str(out))
    assert {k: labels["captions"] for k, (labels, _) in outputs.items()} == expected_captions(llm_caption)


def test_tolerated_failures_are_dropped_listed_and_never_templated(in_shards, tmp_path, fake_llm):
    fake_llm.fail_when = lambda body: 400 if "surprise" in body["messages"][0]["content"] else None
    out = tmp_path / "fused"
    stats = fuse_shards(in_shards, str(out), "llm", make_cfg(fake_llm.url, tmp_path), max_failures=2)

    assert stats["complete"] and stats["failed"] == 2 and stats["written"] == 6
    outputs = read_samples(str(out))
    assert "face-0" not in outputs and "face-8" not in outputs  # no concat stand-in for them
    dropped = json.loads((out / FAILURES_FILE).read_text())["dropped"]
    assert sorted(dropped) == ["face-0", "face-8"] and all("HTTP 400" in v for v in dropped.values())

    (out / MANIFEST).rename(out / PARTIAL_MANIFEST)  # as if killed before the manifest: a re-run resumes
    fake_llm.fail_when = lambda body: None
    again = fuse_shards(in_shards, str(out), "llm", make_cfg(fake_llm.url, tmp_path), max_failures=2)
    assert again["complete"] and again["dropped_earlier"] == 2 and again["requests"] == 0
    assert read_samples(str(out)).keys() == outputs.keys()


def test_fusion_setup_errors(in_shards, tmp_path, fake_llm):
    with pytest.raises(ValueError, match="method"):
        fuse_shards(in_shards, str(tmp_path / "x"), "mix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fusion.llm.url"):
        fuse_shards(in_shards, str(tmp_path / "x"), "llm")
    client = LLMClient(make_cfg(fake_llm.url, tmp_path))
    stats = fuse_shards(in_shards, str(tmp_path / "y"), "llm", client=client)
    assert stats["complete"] and client.requests == PAIRS
    with pytest.raises(ValueError, match="meta"):  # another model into the same directory
        fuse_shards(in_shards, str(tmp_path / "y"), "llm", make_cfg(fake_llm.url, tmp_path, model="other"))
