"""make_shards --workers N: the same shard files and manifest as one process, byte for byte, for the synthetic world
and for a table with --resize; the same skip counts, examples and log lines with missing, truncated and unlabelled
rows; the same one-line errors (a bad label in the source, a record a worker refuses, too many skips) with no
manifest left; and a bounded number of records in flight. Tiny images in tmp_path; a few seconds in all."""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import pytest
from conftest import launch_module
from PIL import Image

from expblip.data.shards import MANIFEST, PARTIAL_MANIFEST, write_shards
from expblip.data.sources import parallel
from expblip.data.sources._common import ConversionError, Skips, deferred_skips, watch_skips
from expblip.data.sources.convert import ConvertRequest, convert
from expblip.data.sources.table import TableOptions

LOGGER = "expblip.data.sources"


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def face(path: Path, i: int, size: int = 24, fmt: str = "JPEG") -> None:
    """A small noisy image (so JPEG and resize have real work), different per ``i``."""
    rng = random.Random(i)
    img = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "aus", "emotion"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """90 rows: JPEG, PNG and BMP faces (24 px), with 5 missing, 3 truncated (a fourth lies among, the unlabelled), a run of 8 unlabelled rows and a
    duplicate scattered among them (17 bad rows of 91)."""
    rows = []
    for i in range(90):
        fmt = ("JPEG", "PNG", "BMP")[i % 3] if i % 7 else "JPEG"
        name = f"faces/{i:03d}.{fmt.lower()}"
        if i % 17 == 5:
            name = f"faces/gone{i}.jpg"  # missing
        elif i % 19 == 3:
            face(tmp_path / name, i)
            cut = (tmp_path / name).read_bytes()
            (tmp_path / name).write_bytes(cut[: len(cut) // 2])  # truncated
        else:
            face(tmp_path / name, i, fmt=fmt)
        unlabelled = 40 <= i < 48
        rows.append({"image": name, "aus": "" if unlabelled else f"{(1, 2, 4, 6, 25)[i % 5]},12", "emotion": ""})
    rows.insert(60, dict(rows[10]))  # a duplicate entry
    return write_csv(tmp_path / "faces.csv", rows)


def table_request(table: Path, out: Path, workers: int, **kw) -> ConvertRequest:
    kw = {"resize": 12, "samples_per_shard": 13, "max_skipped": 0.5, "progress": False, **kw}
    return ConvertRequest("table", out=str(out), table_options=TableOptions(table=str(table)), workers=workers, **kw)


def converted(request: ConvertRequest, caplog) -> tuple[dict, list, list]:
    """(manifest, the Skips' counts/examples, the source's log lines) of one conversion."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER), watch_skips() as found:
        manifest = convert(request)
    skips = [(s.counts, s.dropped, s.examples) for s in found]
    return manifest, skips, [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER)]


def test_synthetic_with_two_workers_writes_the_same_bytes(tmp_path):
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        convert(ConvertRequest("synthetic", out=str(outs[workers]), samples=70, image_size=16, samples_per_shard=16,
                               progress=False, workers=workers))
    one, two = files(outs[1]), files(outs[2])
    assert list(one) == [MANIFEST] + [f"shard-00000{i}.tar" for i in range(5)]
    assert one == two


def test_table_with_resize_gives_the_same_shards_skips_and_log_lines(table, tmp_path, caplog):
    got = {w: converted(table_request(table, tmp_path / f"w{w}", w), caplog) for w in (1, 2, 3)}
    manifest, skips, log_lines = got[1]
    assert manifest["meta"]["resize"] == 12 and manifest["total_samples"] == 91 - 17
    counts = skips[0][0]
    assert counts == {"missing image": 5, "unreadable image": 3, "no label": 8, "duplicate entry": 1}
    assert any("unreadable image" in e for e in skips[0][2]) and len(skips[0][2]) == 5
    for workers in (2, 3):
        assert got[workers][1] == skips and got[workers][2] == log_lines  # counts, examples, logged lines, in order
        assert files(tmp_path / f"w{workers}") == files(tmp_path / "w1")  # every shard and the manifest


def test_too_many_skips_fail_with_the_same_error_and_no_manifest(table, tmp_path):
    errors = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        with pytest.raises(ConversionError) as err:
            convert(table_request(table, out, workers, max_skipped=0.1))
        errors[workers] = str(err.value)
        assert not (out / MANIFEST).exists() and not (out / PARTIAL_MANIFEST).exists()
    assert errors[1] == errors[2] and "17 of 91 rows skipped" in errors[1]


def test_a_bad_label_fails_with_one_line_as_in_one_process(table, tmp_path, capsys):
    rows = list(csv.DictReader(open(table)))
    rows[50]["aus"] = "1,99"
    bad = write_csv(tmp_path / "bad.csv", rows)
    lines, written = {}, {}
    for workers in ("1", "2"):
        out = tmp_path / f"bad{workers}"
        code = launch_module("make_shards").main(["table", "--table", str(bad), "--out", str(out), "--resize", "12",
                                                  "--samples-per-shard", "13", "--max-skipped", "0.5",
                                                  "--workers", workers])
        assert code == 2
        lines[workers] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert not (out / MANIFEST).exists() and not (out / PARTIAL_MANIFEST).exists()
        written[workers] = files(out)
    assert len(lines["1"]) == 1 and "bad.csv row 52: AU 99 in column 'aus'" in lines["1"][0]
    assert lines["2"] == lines["1"]
    assert written["2"] == written["1"]  # the shards before the bad row, as one process leaves them


def test_a_record_a_worker_refuses_raises_there(tmp_path):
    def records():
        for i in range(40):
            image = b"GIF89a not a shard image" if i == 30 else Image.new("RGB", (4, 4), (i, 0, 0))
            yield {"key": f"r{i}", "image": image, "labels": {}, "captions": ["x"]}

    messages = []
    for workers in (1, 2):
        with parallel.parallel_encoder(workers) as encoder, pytest.raises(ValueError) as err:
            write_shards(records(), str(tmp_path / f"w{workers}"), samples_per_shard=8, progress=False,
                         encoder=encoder)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "record 'r30'" in messages[0]
    assert files(tmp_path / "w1") == files(tmp_path / "w2")  # shards 0-2 finished, the partial manifest beside them


def test_records_in_flight_stay_bounded(monkeypatch):
    monkeypatch.setattr(parallel, "CHUNK", 4)
    pulled = 0

    def records():
        nonlocal pulled
        for i in range(200):
            pulled += 1
            yield {"key": f"r{i}", "image": Image.new("RGB", (2, 2)), "labels": {}, "captions": []}

    ahead = []
    with parallel.parallel_encoder(2) as encoder:
        for n, sample in enumerate(encoder(records()), 1):
            assert sample["__key__"] == f"r{n - 1}"
            ahead.append(pulled - n)
    assert n == 200 and max(ahead) <= (2 * parallel.IN_FLIGHT + 1) * 4


def test_deferred_skips_replay_as_counted_directly(caplog):
    """A long random run of skips and drops, queued and replayed, leaves the counts, examples and log lines that
    counting them directly leaves (runs of one reason are kept as counts once their details no longer show)."""
    rng = random.Random(0)
    calls = [(rng.choice(["add", "add", "drop"]), rng.choice("abc"), f"row {i}") for i in range(300)]

    def run(deferred: bool):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            if deferred:
                with deferred_skips() as deferral:
                    skips = Skips("d", max_skipped=0.9)
                for kind, reason, detail in calls:
                    getattr(skips, kind)(reason, detail)
                skips.finish(1000)
                events = deferral.take()
                assert len(events) < 40  # bounded: the details no longer needed are counts
                for event in events:
                    deferral.replay(event)
            else:
                skips = Skips("d", max_skipped=0.9)
                for kind, reason, detail in calls:
                    getattr(skips, kind)(reason, detail)
                skips.finish(1000)
        return skips.counts, skips.dropped, skips.examples, [r.getMessage() for r in caplog.records]

    assert run(True) == run(False)



def test_an_interrupted_conversion_resumes_with_workers(tmp_path):
    """A run stopped after two shards (one process) is finished by a run with 2 workers: the same files as a clean
    run, the written shards checked by key and kept."""
    from expblip.data.synthetic import synthetic_records

    def faces(stop: int | None = None):
        for i, record in enumerate(synthetic_records(40, seed=1, image_size=8)):
            if i == stop:
                raise KeyboardInterrupt
            yield record

    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    write_shards(faces(), str(clean), samples_per_shard=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_shards(faces(stop=20), str(resumed), samples_per_shard=8, progress=False)
    assert (resumed / PARTIAL_MANIFEST).exists() and not (resumed / MANIFEST).exists()
    first = (resumed / "shard-000000.tar").stat().st_mtime_ns
    with parallel.parallel_encoder(2) as encoder:
        write_shards(faces(), str(resumed), samples_per_shard=8, progress=False, encoder=encoder)
    assert files(resumed) == files(clean)
    assert (resumed / "shard-000000.tar").stat().st_mtime_ns == first  # kept, not rewritten


def test_llava_turns_sharing_one_missing_image_count_one_skip(tmp_path, caplog):
    """A multi-turn LLaVA record split into one sample per exchange: its turns share one image, which a worker
    finds missing for each of them; it is one skipped row, as in one process."""
    import json

    items = []
    for i in range(30):
        name = f"img/{i}.jpg" if i % 10 != 4 else f"img/gone{i}.jpg"
        if i % 10 != 4:
            face(tmp_path / name, i)
        turns = [{"from": "human", "value": "<image>\nWhat does the face show?"}, {"from": "gpt", "value": f"a{i}"},
                 {"from": "human", "value": "And the brows?"}, {"from": "gpt", "value": f"b{i}"}]
        items.append({"id": str(i), "image": name, "conversations": turns})
    (tmp_path / "chat.json").write_text(json.dumps(items))
    got = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER), watch_skips() as found:
            code = launch_module("make_shards").main(["llava", "--json", str(tmp_path / "chat.json"), "--root",
                                                      str(tmp_path), "--multi-turn", "split", "--out", str(out),
                                                      "--max-skipped", "0.2", "--workers", workers])
        assert code == 0
        got[workers] = ([(s.counts, s.examples) for s in found], [r.getMessage() for r in caplog.records], files(out))
    assert got["1"][0][0][0] == {"missing image": 3}
    assert got["2"] == got["1"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_carved_validation_split_counts_the_other_parts_bad_images_too(table, tmp_path, caplog, split):
    """--val-fraction drops the other part's records after the source, which in one process has already read
    (and counted) their images: with workers the dropped records' images are still read, so the counts agree."""
    got = {w: converted(table_request(table, tmp_path / f"w{w}", w, split=split, val_fraction=0.3), caplog)
           for w in (1, 2)}
    assert got[1][1][0][0]["missing image"] == 5  # both parts' missing images, whichever part is written
    assert got[2][1:] == got[1][1:]
    assert files(tmp_path / "w2") == files(tmp_path / "w1")
