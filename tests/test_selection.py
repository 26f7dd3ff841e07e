"""Selection on validation only (issue 21): held-out evaluation during training chooses eval.best_step (and the
export with train.keep=best), so the shards it reads must not be the test faces. Fast: the refusal happens in the
launchers' preflight, before any process group. The runs themselves: tests/test_train.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from expblip.config import ConfigError, load_config
from expblip.data.shards import write_shards
from expblip.data.synthetic import synthetic_records
from expblip.train.heldout import selection_split
from expblip.train.loop import preflight


def shards(root: Path, split: str, meta: bool = True) -> Path:
    out = root / split
    write_shards(synthetic_records(4, seed=1, split="val" if split == "val" else "test"), str(out),
                 samples_per_shard=4, progress=False, meta={"source": "synthetic", "split": split} if meta else None)
    if not meta:
        (out / "manifest.json").unlink()
    return out


def config(train: Path, held_out: Path, *extra: str):
    return load_config(None, [f"data.train.shards={train}", f"data.eval.shards={held_out}", "train.eval_every=5",
                              *extra])


@pytest.mark.parametrize("split", ["test", "all", "train"])
def test_held_out_evaluation_refuses_shards_a_number_is_reported_on(tmp_path, split):
    cfg = config(shards(tmp_path, "val"), shards(tmp_path, split))
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    message = str(err.value)
    assert f"data.eval.shards={tmp_path / split}" in message and f"split={split}" in message
    assert "--split val" in message and "train.eval_on_test=true" in message  # the fixes, named


def test_validation_shards_select_and_an_explicit_override_tags_test(tmp_path):
    val, test = shards(tmp_path, "val"), shards(tmp_path, "test")
    preflight(config(val, val))
    assert selection_split(config(val, val)) == "val"
    assert selection_split(config(val, test, "train.eval_on_test=true")) == "test"  # allowed, and says so


def test_shards_without_a_manifest_are_recorded_as_unknown(tmp_path):
    mine = shards(tmp_path, "mine", meta=False) / "shard-{000000..000000}.tar"  # hand-made shards: no manifest
    assert selection_split(config(shards(tmp_path, "val"), mine)) == "unknown"


def test_no_evaluation_means_no_check_and_keep_best_needs_one(tmp_path):
    test = shards(tmp_path, "test")
    preflight(load_config(None, [f"data.train.shards={test}", f"data.eval.shards={test}"]))  # eval_every=0: unread
    with pytest.raises(ConfigError, match="train.keep=best .* set train.eval_every"):
        load_config(None, ["train.keep=best"])
