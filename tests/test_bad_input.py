"""Bad input: a clear error naming the thing, a non-zero exit, nothing written over an existing run."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import launch_module

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture()
def existing_run(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("precious: true\n")
    return run


def _snapshot(path: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("launcher", ["finetune", "pretrain"])
@pytest.mark.parametrize(
    "override, named",
    [
        ("data.train.shards={missing}", "missing-shards"),
        ("optim.lerning_rate=1e-4", "optim.lerning_rate"),
        ("train.max_steps=many", "train.max_steps"),
        ("model.preset=vit-huge-opt175b", "vit-huge-opt175b"),
        ("train.ds_config=ds_configs/zero9.json", "zero9.json"),
    ],
)
def test_bad_input_fails_naming_the_thing(launcher, override, named, existing_run, tmp_path, capsys, tiny_shards):
    before = _snapshot(existing_run)
    args = [f"data.train.shards={tiny_shards['train']}", f"train.run_dir={existing_run}",
            override.format(missing=tmp_path / "missing-shards")]
    code = launch_module(launcher).main(args)
    assert code != 0
    assert named in capsys.readouterr().err
    assert _snapshot(existing_run) == before
