"""The benchmark scripts run end to end at tiny sizes and print their contract: ``ratio: <float>`` as the last line.

No speed is asserted (these run on shared CPUs); only that each bench measures both sides and, for generation,
that our captions and plain transformers' are the same strings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"ratio: (\d+\.\d+)")


def _bench(name: str):
    return bench_module(name)


def _ratio(out: str) -> float:
    last = out.strip().splitlines()[-1]
    match = RATIO.fullmatch(last)
    assert match, f"last line is not 'ratio: <float>': {last!r}"
    return float(match.group(1))


@pytest.mark.parametrize("workers", [0, 1])
def test_data_throughput_prints_both_rates_and_a_ratio(workers, capsys):
    code = _bench("data_throughput").main(["--samples", "64", "--batch-size", "16", "--rounds", "1",
                                           "--workers", str(workers)])
    out = capsys.readouterr().out
    assert code == 0
    rates = re.search(r"bare WebDataset\+PIL: (\d+) samples/s   expblip loader: (\d+) samples/s   \(64 samples each",
                      out)
    assert rates and all(int(r) > 0 for r in rates.groups()), out
    assert _ratio(out) > 0


def test_generate_matches_plain_transformers_and_prints_a_ratio(capsys):
    code = _bench("generate").main(["--images", "4", "--batch-size", "3", "--beams", "2", "--max-new-tokens", "4",
                                    "--rounds", "1"])  # batch 3 of 4 images: a full batch and a partial one
    out = capsys.readouterr().out
    assert code == 0
    assert "captions matching hf per-image: 4/4   matching hf batched: 4/4" in out, out
    assert re.search(r"hf per-image: \d+\.\d captions/s   expblip batched: \d+\.\d captions/s", out), out
    assert _ratio(out) > 0


def test_serve_load_batches_concurrent_clients_and_prints_a_ratio(capsys):
    code = _bench("serve_load").main(["--clients", "8", "--requests", "16", "--lone", "2", "--beams", "1",
                                      "--max-new-tokens", "3", "--rounds", "1", "--max-wait-ms", "50"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"batching: +\d+\.\d+ req/s +under load p50 +\d+ ms +p99 +\d+ ms +lone client p50", out), out
    assert re.search(r"one-at-a-time: +\d+\.\d+ req/s", out), out
    sizes = re.search(r"batch sizes under load \(batching, round 1\): (.*)", out).group(1)
    counts = dict(part.split(": ") for part in sizes.split("  "))
    assert sum(int(n) for label, n in counts.items() if label != "1") > 0, out  # some batch held several images
    assert _ratio(out) > 0
