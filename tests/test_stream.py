"""Shards → batches: exact epochs across ranks and workers, seeded order, mid-epoch resume, bad data, transforms."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import tarfile
import zlib
from itertools import islice

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from expblip.data.shards import write_shards
from expblip.data.stream import (
    Cursor,
    ShardSlice,
    StorageOutage,
    StreamConfig,
    StreamError,
    count_samples,
    iterate_once,
    make_loader,
    plan_finite,
    read_captions,
    swap_left_right,
)
from expblip.pixels import CLIP_MEAN, CLIP_STD


def _png(i: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _records(n: int, prefix: str = "s") -> list[dict]:
    return [
        {
            "key": f"{prefix}{i:03d}",
            "image": _png(i),
            "labels": {"aus": [i % 7], "dataset": "tiny"},
            "captions": [f"Sample {i}"],
        }
        for i in range(n)
    ]


@pytest.fixture
def shards(tmp_path) -> str:
    """8 shards x 6 samples: 2 ranks x 2 workers read 2 whole shards (12 samples) each per epoch."""
    write_shards(_records(48), str(tmp_path / "ds"), samples_per_shard=6, progress=False)
    return str(tmp_path / "ds")


def _cfg(shards: str, **kw) -> StreamConfig:
    return StreamConfig(
        **{"shards": shards, "batch_size": 4, "num_workers": 2, "shuffle_buffer": 8, "image_size": 8, **kw}
    )


def _take(loader, n: int) -> list[dict]:
    return list(islice(iter(loader), n))


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def _sequence(shards: str, world: int, workers: int, steps: int, cursor=None, **kw) -> list[str]:
    """The keys the ranks of a world consume, step by step in rank order (what training takes from the order)."""
    loaders = [iter(make_loader(_cfg(shards, num_workers=workers, **kw), r, world, cursor=cursor)) for r in range(world)]
    return [k for _ in range(steps) for it in loaders for k in next(it)["keys"]]


def test_the_order_is_the_same_at_any_world_size_and_number_of_workers(shards):
    reference = _sequence(shards, world=1, workers=0, steps=24)  # 96 positions: epochs 0 and 1
    assert sorted(reference[:48]) == [f"s{i:03d}" for i in range(48)]  # every sample once per epoch
    assert sorted(reference[48:]) == [f"s{i:03d}" for i in range(48)] and reference[48:] != reference[:48]
    for world, workers in ((2, 2), (3, 1), (4, 0), (2, 3)):
        assert _sequence(shards, world, workers, steps=24 // world) == reference, (world, workers)
    assert _sequence(shards, 1, 0, steps=12, seed=1) != reference[:48]  # another seed, another order

    batches = _take(make_loader(_cfg(shards), rank=1, world_size=2), 3)
    assert [b["cursor"]["position"] for b in batches] == [8, 16, 24]  # every rank's batch of that index consumed
    assert [b["cursor"]["worker"] for b in batches] == [0, 1, 0]
    b = batches[0]
    # training batches carry uint8 pixels (a quarter of fp32's bytes to the device), normalised there by the loop
    assert b["pixel_values"].shape == (4, 3, 8, 8) and b["pixel_values"].dtype == torch.uint8
    assert all(c == c.lower() and c.startswith("sample") for c in b["captions"]) and b["errors"] == {}
    again = _take(make_loader(_cfg(shards, num_workers=0), rank=1, world_size=2), 1)[0]
    assert again["keys"] == b["keys"] and torch.equal(again["pixel_values"], b["pixel_values"])  # same augmentation


def test_a_batch_is_one_lane_and_readers_dividing_the_lanes_open_each_shard_once(shards, monkeypatch):
    import expblip.data.stream as stream

    opened, real = [], stream.open_shard
    monkeypatch.setattr(stream, "open_shard", lambda url: opened.append(url) or real(url))
    by_rank = {}
    for rank in (0, 1):  # 8 shards of 6 in 8 lanes, batches of 2 (no tails): 2 readers, each owning 4 lanes
        opened.clear()
        _take(make_loader(_cfg(shards, lanes=8, batch_size=2, num_workers=0), rank, 2), 12)  # epoch 0
        by_rank[rank] = list(opened)
    assert sorted(by_rank[0] + by_rank[1]) == sorted({*by_rank[0], *by_rank[1]})  # no shard opened twice
    assert len(by_rank[0]) + len(by_rank[1]) == 8
    for world in (3, 5):  # readers that do not divide the lanes still deliver the same sequence
        assert _sequence(shards, world, 0, steps=2) == _sequence(shards, 1, 0, steps=2 * world)


@pytest.mark.parametrize("world_after, workers_after", [(1, 0), (3, 1), (2, 2)])
def test_a_cursor_resumes_at_its_global_position_at_any_world_size(shards, world_after, workers_after):
    reference = _sequence(shards, world=1, workers=0, steps=24)
    cursor = Cursor()
    loaders = [iter(make_loader(_cfg(shards), r, 2)) for r in (0, 1)]  # 2 ranks x 2 workers, stopped mid-epoch
    consumed = []
    for _ in range(5):
        batches = [next(it) for it in loaders]
        consumed += [k for b in batches for k in b["keys"]]
        cursor.update(batches[0]["cursor"])
    state = json.loads(json.dumps(cursor.state_dict()))  # as stored in a checkpoint
    assert state["position"] == 40 and state["epoch"] == 0 and state["epoch_sample"] == 40
    assert consumed == reference[:40]
    steps = (96 - 40) // (4 * world_after)
    resumed = _sequence(shards, world_after, workers_after, steps, cursor=state)
    assert resumed == reference[40 : 40 + len(resumed)]  # nothing repeated, nothing skipped, the same order
    epoch0 = consumed + resumed[:8]
    assert sorted(epoch0) == [f"s{i:03d}" for i in range(48)]  # the epoch's remaining samples, each once


def test_a_cursor_of_another_order_is_refused_and_an_old_cursor_restarts_its_epoch(shards):
    cursor = Cursor()
    cursor.update(_take(make_loader(_cfg(shards), 0, 1), 1)[0]["cursor"])
    for changed in ({"batch_size": 6}, {"seed": 3}, {"lanes": 2}, {"shuffle_buffer": 4}):
        with pytest.raises(ValueError, match=f"another sample order \\({next(iter(changed))}"):
            make_loader(_cfg(shards, **changed), 0, 1, cursor=cursor.state_dict())
    old = {"epoch_index": {"0": [1, 12], "1": [1, 8]}, "num_workers": 2, "world_size": 1, "rank": 0, "epoch": 1}
    restarted = _sequence(shards, 1, 0, steps=12, cursor=old)
    assert restarted == _sequence(shards, 1, 0, steps=24)[48:]  # epoch 1 from its beginning


def test_uneven_shards_still_give_every_rank_whole_batches(tmp_path):
    write_shards(_records(15), str(tmp_path), samples_per_shard=6, progress=False)  # shards of 6, 6, 3
    seq = _sequence(str(tmp_path), world=2, workers=0, steps=4, batch_size=2)  # 16 positions: epoch 0 + one more
    assert sorted(seq[:15]) == [f"s{i:03d}" for i in range(15)]
    assert seq == _sequence(str(tmp_path), world=1, workers=0, steps=8, batch_size=2)
    for rank in (0, 1):
        assert all(len(b["keys"]) == 2 for b in _take(make_loader(_cfg(str(tmp_path), batch_size=2), rank, 2), 9))


def test_fewer_shards_than_workers_interleaves_samples(tmp_path):
    write_shards(_records(6), str(tmp_path), samples_per_shard=6, progress=False)  # one shard
    plans = [plan_finite([f"{tmp_path}/x.tar"], rank=0, world=2, worker=w, workers=2) for w in (0, 1)]
    assert plans == [[ShardSlice(f"{tmp_path}/x.tar", 4, 0)], [ShardSlice(f"{tmp_path}/x.tar", 4, 2)]]
    halves = [_keys(list(iterate_once(_cfg(str(tmp_path), num_workers=0), rank=r, world_size=2))) for r in (0, 1)]
    assert halves == [["s000", "s002", "s004"], ["s001", "s003", "s005"]]
    seq = _sequence(str(tmp_path), world=2, workers=2, steps=3, batch_size=2)  # training: 4 readers share the shard
    assert sorted(seq[:6]) == [f"s{i:03d}" for i in range(6)]


def test_iterate_once_and_count(shards):
    batches = list(iterate_once(_cfg(shards, batch_size=5, num_workers=0)))
    assert _keys(batches) == [f"s{i:03d}" for i in range(48)]  # in order, once, last batch smaller
    assert [len(b["keys"]) for b in batches][-1] == 3
    assert count_samples(shards) == 48
    assert count_samples([f"{shards}/shard-000000.tar", f"{shards}/shard-000001.tar"]) == 12  # read, no manifest


# ---------------------------------------------------------------- bad data


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data is allocated anywhere)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _sample(key: str, i: int, **members: bytes) -> dict:
    good = {
        "__key__": key,
        "png": _png(i),
        "json": json.dumps({"captions": [f"good {key}"]}).encode(),
        "txt": f"good {key}".encode(),
    }
    return {k: v for k, v in {**good, **members}.items() if v is not None}


def _write_tar(path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for s in samples:
            writer.write(s)


def _bad_data_shards(tmp_path) -> str:
    mixed, cut, good = tmp_path / "mixed.tar", tmp_path / "cut.tar", tmp_path / "good.tar"
    _write_tar(
        mixed,
        [
            _sample("ok0", 0),
            _sample("corrupt", 1, png=_png(1)[:40]),  # header intact, pixel data cut
            _sample("badutf8", 2, json=b'{"captions": ["\xff\xfe"]}'),
            _sample("badjson", 3, json=b'{"captions": [oops'),
            _sample("nocaption", 4, json=b'{"aus": [1]}', txt=None),
            _sample("bomb", 5, png=_png_header(20000, 20000)),
            _sample("noimage", 6, png=None),
            _sample("ok1", 7),
        ],
    )
    _write_tar(cut, [_sample(f"cut{i}", 10 + i, png=_png(10 + i, size=32)) for i in range(3)])
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 5 // 6])  # ends inside the last sample
    _write_tar(good, [_sample(f"tail{i}", 20 + i) for i in range(3)])
    return f"{tmp_path}/{{mixed,cut,missing,good}}.tar"  # braceexpand lists; no manifest, so no counts


def test_bad_data_is_skipped_and_counted(tmp_path):
    spec = _bad_data_shards(tmp_path)
    cfg = StreamConfig(shards=spec, batch_size=2, image_size=8, max_error_rate=1.0)
    batches = list(iterate_once(cfg))
    keys = _keys(batches)
    assert keys[:2] == ["ok0", "ok1"] and keys[-3:] == ["tail0", "tail1", "tail2"]
    assert {"cut0", "cut1"} <= set(keys) and "cut2" not in keys  # the sample cut in half is dropped
    assert batches[-1]["errors"] == {
        "bad_image": 1,
        "bad_json": 2,
        "missing_caption": 1,
        "too_many_pixels": 1,
        "missing_image": 1,
        "truncated_tar": 1,
        "shard_unreadable": 1,
    }


def test_tar_cut_at_a_member_boundary_is_counted(tmp_path):
    path = tmp_path / "cut.tar"
    _write_tar(path, [_sample(f"k{i}", i) for i in range(3)])
    offsets = [info.offset for info in tarfile.open(path)]  # 3 members per sample
    path.write_bytes(path.read_bytes()[: offsets[6]])  # ends exactly where k2 starts: tarfile itself is silent
    batches = list(iterate_once(StreamConfig(shards=str(path), batch_size=1, image_size=8, max_error_rate=1.0)))
    assert _keys(batches) == ["k0"]  # k1 may be incomplete: it is dropped with the cut-off tar
    assert batches[-1]["errors"] == {"truncated_tar": 1}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_too_much_bad_data_raises_naming_counts(tmp_path, num_workers):
    bad = {"png": b"not a png"}
    _write_tar(tmp_path / "bad.tar", [_sample(f"k{i:02d}", i, **(bad if i % 6 == 0 else {})) for i in range(60)])
    cfg = StreamConfig(shards=str(tmp_path / "bad.tar"), batch_size=4, image_size=8, num_workers=num_workers)
    with pytest.raises(StreamError, match=r"skipped of 50 read .*'bad_image': \d+.*bad\.tar.*max_error_rate") as exn:
        _take(make_loader(cfg, 0, 1), 20)
    assert str(exn.value).startswith("too much bad data")  # raised as itself, also from a worker process
    cfg = StreamConfig(shards=str(tmp_path / "bad.tar"), batch_size=4, image_size=8, max_errors=2, shuffle_buffer=0)
    with pytest.raises(StreamError, match="3 skipped of 13 read"):
        _take(make_loader(cfg, 0, 1), 20)


def test_streams_without_samples_stop(tmp_path):
    missing = StreamConfig(shards=str(tmp_path / "none-{0..1}.tar"))
    with pytest.raises(StreamError, match=r"none-0\.tar.*hold no readable samples"):
        _take(make_loader(missing, 0, 1), 1)
    tarfile.open(tmp_path / "empty.tar", "w").close()
    with pytest.raises(StreamError, match="hold no readable samples"):
        _take(make_loader(StreamConfig(shards=str(tmp_path / "empty.tar")), 0, 1), 1)


def test_storage_failures_are_retried_through_an_outage_and_end_it_past_the_limit(tmp_path, monkeypatch):
    import expblip.data.stream as stream

    write_shards(_records(3), str(tmp_path), progress=False)
    real, failures, calls = stream.url_to_fs, [5], []

    def flaky(url):
        calls.append(url)
        if failures[0] > 0:
            failures[0] -= 1
            raise ConnectionError("connection refused")
        return real(url)

    monkeypatch.setattr(stream, "url_to_fs", flaky)
    monkeypatch.setattr(stream, "OPEN_BACKOFF_S", 0.0)
    cfg = StreamConfig(shards=str(tmp_path), batch_size=3, image_size=8, max_error_rate=1.0)
    batches = list(iterate_once(cfg))  # five failures in a row, then the storage answers again: nothing is lost
    assert len(calls) == 6 and batches[-1]["keys"] == ["s000", "s001", "s002"] and batches[-1]["errors"] == {}
    assert _keys(_take(make_loader(cfg, 0, 1), 1)) and failures == [0]
    failures[0] = 10**9  # storage gone for good: past max_outage_s the stream ends with StorageOutage
    with pytest.raises(StorageOutage, match=r"storage unreachable .*shard-000000\.tar.*data\.max_outage_s=0\.2"):
        list(iterate_once(cfg, max_outage_s=0.2))
    with pytest.raises(StorageOutage, match="data.max_outage_s=0.2"):
        _take(make_loader(cfg, 0, 1, max_outage_s=0.2), 1)


def test_a_dropped_connection_mid_shard_resumes_at_the_sample_where_it_stopped(tmp_path, monkeypatch):
    import expblip.data.stream as stream

    write_shards(_records(12), str(tmp_path), samples_per_shard=12, progress=False)
    real, drops = stream.open_shard, [2]

    class Dropping(io.RawIOBase):  # a stream whose connection drops after some bytes, twice
        def __init__(self, inner):
            self.inner, self.left = inner, 9000

        def readable(self):
            return True

        def readinto(self, buf):
            if drops[0] > 0 and self.left <= 0:
                drops[0] -= 1
                raise ConnectionResetError("connection reset by peer")
            data = self.inner.read(min(len(buf), max(self.left, 1) if drops[0] else len(buf)))
            self.left -= len(data)
            buf[: len(data)] = data
            return len(data)

    def dropping(url):
        f, size = real(url)
        return io.BufferedReader(Dropping(f)), size

    monkeypatch.setattr(stream, "open_shard", dropping)
    monkeypatch.setattr(stream, "OPEN_BACKOFF_S", 0.0)
    cfg = _cfg(str(tmp_path), num_workers=0, shuffle_buffer=0, batch_size=12)
    keys = _keys(_take(make_loader(cfg, 0, 1), 1))
    assert drops == [0] and keys == [f"s{i:03d}" for i in range(12)]  # each sample once, in order


def test_a_bad_samples_slot_takes_a_copy_so_batches_stay_whole(tmp_path):
    _write_tar(tmp_path / "mixed.tar", [_sample(f"k{i}", i, **({"png": b"broken"} if i == 2 else {})) for i in range(8)])
    cfg = StreamConfig(shards=str(tmp_path / "mixed.tar"), batch_size=4, image_size=8, max_error_rate=1.0,
                       shuffle_buffer=0)
    first, second = _take(make_loader(cfg, 0, 1), 2)
    assert len(first["keys"]) == 4 and first["keys"][:2] == ["k0", "k1"] and "k2" not in first["keys"]
    assert first["keys"][2:] == ["k3", "k0"] and first["errors"] == {"bad_image": 1}
    assert second["keys"] == ["k4", "k5", "k6", "k7"]


def test_resampled_stream_is_seeded(shards):
    cfg = _cfg(shards, resampled=True, num_workers=0)
    first = _keys(_take(make_loader(cfg, 0, 1), 30))
    assert first == _keys(_take(make_loader(cfg, 0, 1), 30)) and len(set(first)) < len(first)  # with replacement


# ---------------------------------------------------------------- transforms


def test_swap_left_right_words_only():
    assert (
        swap_left_right("Left brow up, RIGHT eye shut; leftover rights")
        == "Right brow up, LEFT eye shut; leftover rights"
    )


def test_flip_swaps_left_and_right_in_the_caption(tmp_path):
    half = np.zeros((16, 16, 3), dtype=np.uint8)
    half[:, :8, 0] = 255  # red on the image's left
    half[:, 8:, 2] = 255  # blue on its right
    records = [
        {"key": f"r{i:02d}", "image": Image.fromarray(half), "labels": {}, "captions": ["red on the left"]}
        for i in range(16)
    ]
    write_shards(records, str(tmp_path), progress=False)
    cfg = StreamConfig(shards=str(tmp_path), batch_size=16, image_size=8, shuffle_buffer=0)
    batch = _take(make_loader(cfg, 0, 1), 1)[0]
    pixels = batch["pixel_values"].float()
    red_minus_blue = (pixels[:, 0] - pixels[:, 2])[:, :, :2].mean(dim=(1, 2))
    red_left = [bool(x > 0) for x in red_minus_blue]
    assert red_left == [c == "red on the left" for c in batch["captions"]]
    assert 0 < sum(red_left) < 16  # both flipped and unflipped samples occur


def test_crop_scale_one_and_flip_off_give_the_whole_image_unflipped(tmp_path):
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))  # brightness grows to the right
    records = [{"key": f"r{i:02d}", "image": Image.fromarray(ramp), "labels": {}, "captions": ["x"]} for i in range(8)]
    write_shards(records, str(tmp_path), progress=False)
    whole = StreamConfig(shards=str(tmp_path), batch_size=8, image_size=16, shuffle_buffer=0, crop_scale=1.0, flip=False)
    pixels = _take(make_loader(whole, 0, 1), 1)[0]["pixel_values"]
    assert torch.equal(pixels, pixels[:1].expand_as(pixels))  # no sample was cropped or flipped
    assert bool((pixels[0, 0, :, 1:] >= pixels[0, 0, :, :-1] - 1e-6).all())  # left to right, as stored
    cropped = _take(make_loader(dataclasses.replace(whole, crop_scale=0.5), 0, 1), 1)[0]["pixel_values"]
    assert not torch.equal(cropped, cropped[:1].expand_as(cropped))  # crops differ per sample
    with pytest.raises(ValueError, match="crop_scale"):
        StreamConfig(crop_scale=0.0)


def test_eval_transform_resizes_and_normalises(tmp_path):
    grey = Image.new("RGB", (20, 12), (128, 64, 32))
    write_shards([{"key": "g", "image": grey, "labels": {}, "captions": ["Grey"]}], str(tmp_path), progress=False)
    batch = next(iterate_once(StreamConfig(shards=str(tmp_path), image_size=8)))
    expected = [(v / 255 - m) / s for v, m, s in zip((128, 64, 32), CLIP_MEAN, CLIP_STD, strict=True)]
    assert batch["pixel_values"].shape == (1, 3, 8, 8) and batch["captions"] == ["grey"]
    assert torch.allclose(batch["pixel_values"][0].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)


def test_read_captions_gives_every_caption_of_every_readable_sample_without_decoding(tmp_path):
    records = [{**r, "captions": [f"Sample {i} Left", f"second {i}"]} for i, r in enumerate(_records(5))]
    records[2]["image"] = records[2]["image"][:40]  # a PNG cut short: never decoded, so its captions still count
    write_shards(records, str(tmp_path / "ds"), samples_per_shard=2, progress=False)
    captions = read_captions(StreamConfig(shards=str(tmp_path / "ds")))
    assert captions == [c for i in range(5) for c in (f"sample {i} left", f"second {i}")]
    assert read_captions(StreamConfig(shards=str(tmp_path / "ds"), lowercase=False))[0] == "Sample 0 Left"
    # broken JSON and caption-less samples are left out, bad images are not looked at, a cut-off shard gives what it
    # held and a missing one nothing
    keys = ["ok0", "corrupt", "bomb", "noimage", "ok1", "cut0", "cut1", "tail0", "tail1", "tail2"]
    assert read_captions(StreamConfig(shards=_bad_data_shards(tmp_path))) == [f"good {k}" for k in keys]


def test_training_pixels_normalised_by_the_loop_equal_the_eval_pass_bit_for_bit(tmp_path):
    """uint8 through the loader, normalised where the model runs (expblip.pixels.normalise): the same numbers as
    the CPU normalisation of the finite pass, for any dtype the engine asks."""
    from expblip.pixels import normalise

    rng = np.random.default_rng(0)
    records = [{"key": f"r{i}", "image": Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
                "labels": {}, "captions": ["x"]} for i in range(4)]
    write_shards(records, str(tmp_path), progress=False)
    cfg = StreamConfig(shards=str(tmp_path), batch_size=4, image_size=8, shuffle_buffer=0, train=False)
    trained = _take(make_loader(cfg, 0, 1), 1)[0]
    evaluated = next(iterate_once(cfg))
    order = [evaluated["keys"].index(k) for k in trained["keys"]]
    assert torch.equal(normalise(trained["pixel_values"]), evaluated["pixel_values"][order])
    assert normalise(trained["pixel_values"], torch.bfloat16).dtype == torch.bfloat16


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_dct_scale_no_smaller_than_the_model_needs():
    from expblip.data.stream import load_image

    raw = {"jpg": _jpeg(640, 480)}
    assert load_image(raw, 10**8, 224).size == (320, 240)  # libjpeg's 1/2 scale: 240 >= 224 on the short side
    assert load_image(raw, 10**8, 241).size == (640, 480)  # half would fall short of 241
    assert load_image(raw, 10**8, 0).size == (640, 480)  # no draft asked: full size
    assert load_image(raw, 10**8, 100).size == (160, 120)  # 1/4 keeps >= 100
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    assert load_image({"png": buf.getvalue()}, 10**8, 16).size == (64, 64)  # only JPEG has DCT scales


def test_shards_written_with_resize_hold_images_at_that_short_side(tmp_path):
    from expblip.data.shards import JPEG_QUALITY, read_manifest

    records = [{"key": "big", "image": _jpeg(640, 480), "labels": {}, "captions": ["x"]},
               {"key": "small", "image": _jpeg(100, 80), "labels": {}, "captions": ["x"]},
               {"key": "png", "image": Image.new("RGB", (300, 600)), "labels": {}, "captions": ["x"]}]
    write_shards(records, str(tmp_path), progress=False, resize=224)
    sizes = {s["__key__"]: Image.open(io.BytesIO(s.get("jpg") or s["png"])).size
             for s in wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)}
    assert sizes == {"big": (299, 224), "small": (100, 80), "png": (224, 448)}  # never enlarged; PNG stays PNG
    assert read_manifest(str(tmp_path))["meta"] == {"resize": 224, "jpeg_quality": JPEG_QUALITY}
