"""Records → tar shards + manifest: round trip, limits, resumable writing, helpful errors, and S3 on the local SeaweedFS server."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from expblip.data.shards import (
    MANIFEST,
    PARTIAL_MANIFEST,
    read_manifest,
    resolve_shards,
    write_shards,
)


def _image(i: int, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="JPEG")
    return buf.getvalue()


def make_records(n: int, start: int = 0) -> list[dict]:
    """Tiny records; every third carries already-encoded JPEG bytes."""
    return [
        {
            "key": f"face-{i:04d}",
            "image": _jpeg(i) if i % 3 == 2 else _image(i),
            "labels": {"aus": [1, 2 + i % 5], "emotions": None, "dataset": "tiny", "subject": f"s{i % 2}"},
            "captions": [f"Caption {i} with the LEFT brow raised", f"another {i}"],
        }
        for i in range(start, start + n)
    ]


def test_write_then_read_back_equal(tmp_path):
    records = make_records(10)
    manifest = write_shards(records, str(tmp_path), samples_per_shard=4, meta={"seed": 3}, progress=False)

    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["total_samples"] == 10 and manifest["meta"] == {"seed": 3} and manifest["complete"]
    assert read_manifest(str(tmp_path)) == manifest == read_manifest(str(tmp_path / MANIFEST))
    for entry in manifest["shards"]:
        data = (tmp_path / entry["url"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert not (tmp_path / PARTIAL_MANIFEST).exists()

    urls, counts = resolve_shards(str(tmp_path))
    assert counts == [4, 4, 2] and all(os.path.isabs(u) for u in urls)
    assert resolve_shards(f"file://{tmp_path}/shard-{{000000..000002}}.tar") == (urls, counts)
    assert resolve_shards(urls) == (urls, None)

    # Any plain WebDataset reader opens the shards.
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in records]
    for sample, record in zip(samples, records, strict=True):
        labels = json.loads(sample["json"])
        assert labels.pop("captions") == record["captions"] and labels == record["labels"]
        assert sample["txt"].decode() == record["captions"][0]
        if isinstance(record["image"], bytes):
            assert sample["jpg"] == record["image"]
        else:
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), np.asarray(record["image"]))


def test_byte_limit_splits_shards(tmp_path):
    manifest = write_shards(make_records(6), str(tmp_path), max_shard_bytes=5000, progress=False)
    assert manifest["total_samples"] == 6 and len(manifest["shards"]) >= 3
    # An 8x8 sample is ~4 KiB with headers: each shard holds what fits (at least one sample).
    assert all(s["samples"] >= 1 for s in manifest["shards"])


def _crashing(records: list[dict], after: int):
    for i, record in enumerate(records):
        if i == after:
            raise RuntimeError("simulated crash")
        yield record


def test_resume_writing_skips_finished_shards(tmp_path):
    records = make_records(10)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(_crashing(records, after=6), out, samples_per_shard=4, progress=False)
    partial = json.loads((tmp_path / "out" / PARTIAL_MANIFEST).read_text())
    assert [s["url"] for s in partial["shards"]] == ["shard-000000.tar"]  # shard 1 was cut mid-way: not counted
    with pytest.raises(FileNotFoundError, match="interrupted"):
        read_manifest(out)

    first_mtime = os.stat(tmp_path / "out" / "shard-000000.tar").st_mtime_ns
    resumed = write_shards(records, out, samples_per_shard=4, progress=False)
    fresh = write_shards(records, str(tmp_path / "fresh"), samples_per_shard=4, progress=False)
    assert resumed == fresh  # byte-identical shards (fixed mtime): same checksums
    assert os.stat(tmp_path / "out" / "shard-000000.tar").st_mtime_ns == first_mtime  # not rewritten

    with pytest.raises(ValueError, match="records differ"):
        write_shards(make_records(10, start=50), out, samples_per_shard=4, progress=False)
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(records, out, samples_per_shard=5, progress=False)


def test_missing_inputs_name_url_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*make_shards.py synthetic --out"):
        resolve_shards(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        resolve_shards([])
    with pytest.raises(ValueError, match="no shards given"):
        resolve_shards("")
    with pytest.raises(ValueError, match="without '.'"):
        write_shards([dict(make_records(1)[0], key="a.b")], str(tmp_path), progress=False)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """The session's SeaweedFS S3 server, the AWS env pointing at it, and an empty bucket of this test's own."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = "shards-" + request.node.name.replace("_", "-")[:40].lower()
    s3_server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def test_s3_round_trip_and_stream(s3_bucket):
    from expblip.data.stream import StreamConfig, iterate_once, make_loader

    records = make_records(9)
    out = f"{s3_bucket}/tiny/train"
    manifest = write_shards(records, out, samples_per_shard=4, progress=False)
    assert read_manifest(out) == manifest
    urls, counts = resolve_shards(f"{out}/manifest.json")
    assert urls[0] == f"{out}/shard-000000.tar" and counts == [4, 4, 1]

    # webdataset itself reads s3:// through the registered fsspec opener ...
    assert [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)] == [r["key"] for r in records]
    # ... and so does our stream.
    loader = iter(make_loader(StreamConfig(shards=out, batch_size=3, image_size=8), rank=0, world_size=1))
    keys = [k for _ in range(3) for k in next(loader)["keys"]]
    assert sorted(keys) == [r["key"] for r in records]
    # Forked DataLoader workers open S3 too (fsspec drops its cached clients after a fork).
    batches = list(iterate_once(StreamConfig(shards=out, batch_size=3, image_size=8, num_workers=2)))
    assert sorted(k for b in batches for k in b["keys"]) == [r["key"] for r in records]


def test_make_shards_resize_writes_smaller_images_and_records_it(tmp_path):
    """launch/make_shards.py --resize S: the images at S px on their short side, the manifest says so."""
    from conftest import launch_module

    from expblip.data.shards import read_manifest

    out = tmp_path / "small"
    assert launch_module("make_shards").main(["synthetic", "--out", str(out), "--samples", "4", "--image-size", "96",
                                              "--resize", "48"]) == 0
    sizes = {Image.open(io.BytesIO(s["png"])).size for s in wds.WebDataset(str(out / "shard-000000.tar"),
                                                                           shardshuffle=False)}
    assert sizes == {(48, 48)}
    assert read_manifest(str(out))["meta"]["resize"] == 48
    with pytest.raises(SystemExit):
        launch_module("make_shards").parser().parse_args(["synthetic", "--out", "x", "--resize", "big"])
