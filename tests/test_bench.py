"""The benchmark scripts run end to end at tiny sizes and keep their contract: alternating rounds, the median of the
rounds' ratios on the last line (``ratio: <float>``), and, for generation, the same captions as plain transformers.

No speed is asserted (these run on shared CPUs).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/rounds.py
RATIO = re.compile(r"ratio: (\d+\.\d+)")


def _bench(name: str):
    return bench_module(name)


def _ratio(out: str) -> float:
    last = out.strip().splitlines()[-1]
    match = RATIO.fullmatch(last)
    assert match, f"last line is not 'ratio: <float>': {last!r}"
    return float(match.group(1))


def _rounds(out: str) -> list[float]:
    line = next(ln for ln in out.splitlines() if ln.startswith("per-round ratios: "))
    return [float(x) for x in line.removeprefix("per-round ratios: ").split()]


@pytest.mark.parametrize("workers", [0, 1])
def test_data_throughput_reports_the_median_of_alternating_rounds(workers, capsys):
    code = _bench("data_throughput").main(["--samples", "64", "--batch-size", "16", "--rounds", "3",
                                           "--workers", str(workers)])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"bare WebDataset\+PIL: \d+ samples/s   expblip loader: \d+ samples/s   \(medians of 3 "
                     r"alternating rounds of 64 samples", out), out
    rounds = _rounds(out)
    assert len(rounds) == 3 and _ratio(out) == pytest.approx(statistics.median(rounds), abs=1e-3)


def test_rounds_alternate_their_order_and_take_the_median():
    from rounds import alternating, median_ratio

    calls = []
    seconds = alternating({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    seconds["a"][0] = 100.0  # one disturbed round does not move the median
    assert median_ratio(seconds, "a", "b") == 0.5


def test_generate_matches_plain_transformers_batch_for_batch(tiny_run_dir, capsys):
    code = _bench("generate").main(["--model", str(tiny_run_dir), "--images", "4", "--batch-size", "3", "--beams",
                                    "2", "--max-new-tokens", "4", "--rounds", "3"])  # a full batch and a partial one
    out = capsys.readouterr().out
    assert code == 0
    # a random export never emits its end token: every caption runs to the limit (the bench says so)
    assert "captions matching hf batched: 4/4   ended before the token limit: 0/4" in out, out
    assert re.search(r"hf batched: \d+\.\d captions/s   expblip: \d+\.\d captions/s   \(medians of 3 alternating "
                     r"rounds of 4 images, cpu clock", out), out
    rounds = _rounds(out)
    assert len(rounds) == 3 and _ratio(out) == pytest.approx(statistics.median(rounds), abs=1e-3)


@pytest.mark.slow
def test_packing_times_packed_rows_against_padded_ones_on_the_same_batches(capsys):
    code = _bench("packing").main(["--batches", "1", "--batch-size", "6", "--pack-tokens", "300", "--rounds", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    found = re.search(r"padded (\d+) token slots in 6 rows, packed (\d+) in (\d+\.\d) rows of at most 300", out)
    assert found and int(found[2]) < int(found[1]) and float(found[3]) < 6, out  # it packed: fewer slots and rows
    rounds = _rounds(out)
    assert len(rounds) == 2 and _ratio(out) == pytest.approx(statistics.median(rounds), abs=1e-3)


def test_step_overhead_times_the_loops_real_step_against_bare_deepspeed(capsys):
    code = _bench("step_overhead").main(["--steps", "4", "--rounds", "3", "--log-every", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"bare DeepSpeed step: [\d.]+ ms   expblip step: [\d.]+ ms   \(medians of 3 alternating rounds "
                     r"of 4 steps, world 2, log every 2\)", out), out
    rounds = _rounds(out)
    assert len(rounds) == 3 and _ratio(out) == pytest.approx(statistics.median(rounds), abs=1e-3)


def test_serve_load_batches_concurrent_clients_and_prints_a_ratio(tiny_run_dir, capsys):
    code = _bench("serve_load").main(["--model", str(tiny_run_dir), "--clients", "8", "--requests", "16", "--lone", "2", "--beams", "1",
                                      "--max-new-tokens", "3", "--rounds", "1", "--max-wait-ms", "50"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"batching: +\d+\.\d+ req/s +under load p50 +\d+ ms +p99 +\d+ ms +lone client p50", out), out
    assert re.search(r"one-at-a-time: +\d+\.\d+ req/s", out), out
    sizes = re.search(r"batch sizes under load \(batching, round 1\): (.*)", out).group(1)
    counts = dict(part.split(": ") for part in sizes.split("  "))
    assert sum(int(n) for label, n in counts.items() if label != "1") > 0, out  # some batch held several images
    rates = {side: float(re.search(rf"{side}: +(\d+\.\d+) req/s", out).group(1))
             for side in ("batching", "one-at-a-time")}
    assert _ratio(out) == pytest.approx(rates["batching"] / rates["one-at-a-time"], rel=0.01)  # what the line says


@pytest.mark.slow
def test_gpu_smoke_dry_run_walks_every_part_through_the_real_entry_points(tmp_path, capsys):
    """bench/gpu_smoke.py --dry-run: the deepspeed launcher's stop and exact resume, the paper recipe through
    loop.setup / loop.step (tiny preset, gloo), and the loader on 640x480 JPEGs, with every figure labelled as a CPU
    one. On a GPU machine the same script measures MFU, idle share and memory instead."""
    smoke = _bench("gpu_smoke")
    assert smoke.main(["--dry-run", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    tiny = results["tiny"]
    assert tiny["ok"] and tiny["resumed_at"] == 10 and tiny["digest_saved"] == tiny["digest_restored"]
    assert sorted(int(step) for step in tiny["eval_loss"]) == [10, 20]  # held-out at the stop and at the end
    full = results["full"]
    assert full["preset"] == "tiny" and full["samples_per_s"] > 0 and full["model_flop_per_step"] > 0
    assert full["precision"] == "fp32" and "mfu" not in full  # never a GPU figure from a CPU
    assert results["loader"]["samples_per_s_per_worker"] > 0 and "workers_per_gpu" in results["loader"]
    assert "CPU dry run (tiny, gloo): not GPU figures" in out and "not measured (no GPU)" in out
    print(out)  # shown by pytest -rP



def test_convert_times_two_workers_against_one_process(capsys):
    """bench/convert.py at toy sizes: both sides convert the same table to the same bytes (the script checks and
    exits otherwise), and the last line is the median of the rounds' ratios."""
    code = _bench("convert").main(["--rows", "40", "--size", "32", "--resize", "16", "--faces", "4", "--rounds", "3",
                                   "--rss-rows", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"one process: \d+ samples/s   workers 2: \d+ samples/s   \(medians of 3 alternating rounds of "
                     r"40 rows, 32-px JPEG, --resize 16", out), out
    assert "CPU seconds per 1000 rows" in out and "peak RSS" not in out
    rounds = _rounds(out)
    assert len(rounds) == 3 and _ratio(out) == pytest.approx(statistics.median(rounds), abs=1e-3)


def test_convert_measures_peak_memory_of_a_small_and_a_large_table(capsys):
    """The memory part: one child conversion per table size and worker count, each reporting its peak RSS and its
    workers' (polled from /proc)."""
    code = _bench("convert").main(["--rows", "20", "--size", "32", "--resize", "16", "--faces", "4", "--rounds", "1",
                                   "--rss-rows", "30,60", "--rss-workers", "1,2", "--rss-size", "16",
                                   "--rss-resize", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"peak RSS, 60 rows, workers 2: main \d+ MiB, workers [1-9]\d* MiB", out), out
    assert re.search(r"rss ratio, workers 2: 60 rows / 30 rows: main \d+\.\d+, workers \d+\.\d+", out), out
    _ratio(out)


def test_lora_parity_chooses_its_setting_on_validation_faces_only(tmp_path, monkeypatch):
    """bench/lora_parity.py --lora: each setting's own Qwen stage 2 is scored on the validation faces, never the
    test faces, and the best on validation is chosen (the first listed on a tie); a malformed list names the fix.
    Training is replaced by a record of what would train: the protocol, not the model, is under test."""
    import argparse

    parity = _bench("lora_parity")
    assert parity.lora_settings("4:16, 5:256") == [(4, 16), (5, 256)]
    for bad in ("4", "4:x", "0:16", ""):
        with pytest.raises(SystemExit, match="R:ALPHA pairs.*--lora 4:16,5:256"):
            parity.lora_settings(bad)
    trained, scored = [], []
    monkeypatch.setattr(parity, "in_pairs", lambda jobs, times: trained.extend(jobs))
    val_f1 = {"stage2-r4a16": 0.70, "stage2-r5a64": 0.78, "stage2-r5a128": 0.78}
    test_f1 = {"stage2-r4a16": 0.99, "stage2-r5a64": 0.10, "stage2-r5a128": 0.10}  # would choose r4 if it were read

    def score(run_dir, shards, split, train, beams):
        scored.append((run_dir.name, split))
        return {"model": {"mean_au_f1": (val_f1 if split == "val" else test_f1)[run_dir.name]}}

    monkeypatch.setattr(parity, "score", score)
    monkeypatch.setattr("expblip.eval.evaluate.training_text", lambda shards: [])
    shards = {"train": "tr", "val": "va", "test": "te"}
    settings = [(4, 16), (5, 64), (5, 128)]
    best = parity.choose_lora(tmp_path, shards, argparse.Namespace(steps_scale=1.0, beams=1), settings)
    assert best == (5, 64)  # the best on validation, the first of the tie
    assert {split for _, split in scored} == {"val"} and len(scored) == 3
    assert [job[0] for job in trained] == ["opt", "qwen", "qwen", "qwen"]
    assert [job[5] for job in trained[1:]] == settings and all(job[4] == 0 for job in trained)  # seed 0
    assert {parity.stage_dir(tmp_path, "qwen", "stage2", s).name for s in settings} == set(val_f1)
    assert parity.stage_dir(tmp_path, "qwen", "lm", (5, 64)).name == "lm"  # the towers are shared


def test_side_by_side_runs_two_at_a_time_in_order_and_raises_a_failure():
    from chains import side_by_side

    ran = []
    side_by_side([lambda i=i: ran.append(i) for i in range(5)])
    assert sorted(ran[:2]) == [0, 1] and sorted(ran[2:4]) == [2, 3] and ran[4] == 4

    def broken():
        raise RuntimeError("stage 2 failed")

    later = []
    with pytest.raises(RuntimeError, match="stage 2 failed"):  # a training thread's error reaches the bench
        side_by_side([broken, lambda: None, lambda: later.append(1)])
    assert later == []  # the group after a failure does not start
