"""The MLflow Model Registry against a real MLflow server: launch/export.py --register logs an export as a pyfunc
model with a signature, registers a version tagged with its training run's eval.* metrics, and
mlflow.pyfunc.load_model("models:/NAME/1").predict(images) returns the captions."""

from __future__ import annotations

import io
import json

import pytest
from conftest import launch_module, make_tiny_export
from test_serve import GEN

from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner

pytestmark = pytest.mark.slow  # a real MLflow server (~5-15 s) and model logging

NAME = "expblip-faces"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run_dir(mlflow_server, tmp_path_factory):
    """A run directory as training leaves it: export/ and mlflow_run.json naming a run with eval.* metrics."""
    from mlflow import MlflowClient

    run = tmp_path_factory.mktemp("run")
    make_tiny_export(run / "export")
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment("expblip-train")).info.run_id
    for key, value in {"eval.au_f1": 0.84, "eval.emotion_accuracy": 0.876, "train.loss": 1.5}.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    (run / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": mlflow_server}))
    return run


def test_registered_export_predicts_the_captions(run_dir, mlflow_server, monkeypatch, capsys):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.types import DataType

    main = launch_module("export").main
    assert main(["--export", str(run_dir), "--register", NAME, "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert f"models:/{NAME}/1" in out and "eval.au_f1=0.84" in out

    client = MlflowClient(mlflow_server)
    version = client.get_model_version(NAME, "1")
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert version.run_id == run_id  # logged into the training run
    assert version.tags["eval.au_f1"] == "0.84" and version.tags["eval.emotion_accuracy"] == "0.876"
    assert "train.loss" not in version.tags

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert [c.type for c in model.metadata.get_input_schema().inputs] == [DataType.binary]
    flavor = model.metadata.flavors["python_function"]
    assert flavor.get("model_code_path", "").endswith("registry_model.py")  # logged as code: nothing unpickled
    assert "python_model" not in flavor, flavor  # no python_model.pkl
    images = [r["image"] for r in synthetic_records(3, seed=4)]
    params = {"num_beams": GEN.num_beams, "max_new_tokens": GEN.max_new_tokens}
    captions = model.predict(pd.DataFrame({"image": [png(i) for i in images]}), params=params)
    expected = Captioner.from_export(run_dir / "export").caption(images, GEN)
    assert list(captions) == expected and all(expected)
    assert list(model.predict([png(images[0])], params=params)) == expected[:1]

    assert main(["--export", str(run_dir / "export"), "--register", NAME]) == 0  # the URI from the env: version 2
    assert f"models:/{NAME}/2" in capsys.readouterr().out


def test_register_refuses_a_trainable_only_export_and_names_a_missing_uri(tmp_path, capsys):
    main = launch_module("export").main
    make_tiny_export(tmp_path / "export")
    assert main(["--export", str(tmp_path / "export"), "--register", NAME]) == 2
    assert "no MLflow tracking URI" in capsys.readouterr().err
    meta = json.loads((tmp_path / "export" / "expblip.json").read_text())
    (tmp_path / "export" / "expblip.json").write_text(json.dumps({**meta, "format": "trainable-only"}))
    assert main(["--export", str(tmp_path / "export"), "--register", NAME, "--tracking-uri", "sqlite:///x.db"]) == 2
    assert "merge it onto its towers first" in capsys.readouterr().err
