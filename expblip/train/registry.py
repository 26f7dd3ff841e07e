"""An export into the MLflow Model Registry: a pyfunc model over the Captioner, with a signature, registered as a new
version of a named model and tagged with the evaluation metrics of the training run that produced it.

    info = register_export("runs/stage2/export", "expblip-faces", tracking_uri="http://127.0.0.1:5000")
    model = mlflow.pyfunc.load_model("models:/expblip-faces/1")          # with MLFLOW_TRACKING_URI set
    model.predict([png_bytes, "face.jpg"])                               # ["The person raises ...", ...]
    model.predict(images, params={"num_beams": 1, "max_new_tokens": 30, "crop_face": True})

The model is logged as code (registry_model.py, MLflow's models-from-code: nothing is pickled), its artefacts are
the export directory itself and the expblip package (``code_paths``), so loading needs the pinned libraries (torch,
transformers, ...) but no checkout and no particular Python. The export's training run is found from
``mlflow_run.json`` beside it (RUN_DIR/export) or in the run directory its ``expblip.json`` names as source; the
model is logged into that run when it lives on the same tracking server, and its ``eval.*`` metrics (from
launch/evaluate.py --mlflow) become tags of the model version. Without a training run the model goes into a new run
of the ``expblip-registry`` experiment and carries no metric tags.

MLflow is imported here, in the training package (tracking's room), never by expblip.infer or expblip.serve.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from expblip.credentials import unredact_uri
from expblip.train.tracking import RUN_FILE

EXPERIMENT = "expblip-registry"
MODEL_CODE = Path(__file__).with_name("registry_model.py")  # models-from-code: the pyfunc is this file, not a pickle
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "pillow", "numpy", "scikit-image", "mlflow")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary)]),  # encoded image bytes (PNG, JPEG, WebP, BMP): a list, or one column
    outputs=Schema([ColSpec(DataType.string)]),  # one caption per image
    params=ParamSchema([ParamSpec("num_beams", DataType.long, 5), ParamSpec("max_new_tokens", DataType.long, 60),
                        ParamSpec("crop_face", DataType.boolean, False), ParamSpec("batch_size", DataType.long, 16)]),
)


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """pyfunc over expblip's Captioner: images in (bytes, paths, PIL images, or a DataFrame column ``image``),
    captions out, one per image."""

    def load_context(self, context) -> None:
        from expblip.infer.captioner import Captioner

        self.captioner = Captioner.from_export(context.artifacts["export"])

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from expblip.infer.captioner import load_image
        from expblip.model.generation import GenerationConfig

        params = {**{p.name: p.default for p in SIGNATURE.params.params}, **(params or {})}
        images = [load_image(io.BytesIO(item) if isinstance(item, bytes | bytearray) else item)
                  if not hasattr(item, "convert") else item.convert("RGB") for item in _items(model_input)]
        if params["crop_face"]:
            from expblip.infer.face import crop_face

            images = [crop_face(image).image for image in images]
        gen = GenerationConfig(num_beams=int(params["num_beams"]), max_new_tokens=int(params["max_new_tokens"]))
        return self.captioner.caption(images, gen, batch_size=int(params["batch_size"]))


def _items(model_input) -> list:
    """The images of a pyfunc input: a list, a pandas Series, or a DataFrame (its ``image`` column, else its first)."""
    if hasattr(model_input, "columns"):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if hasattr(model_input, "tolist"):
        return list(model_input.tolist())
    return list(model_input) if isinstance(model_input, list | tuple) else [model_input]


@dataclass
class Registered:
    """What register_export did: the model version, the run it was logged into, and the tags it was given."""

    name: str
    version: str
    run_id: str
    model_uri: str
    tags: dict[str, str] = field(default_factory=dict)


def training_run(export: str | Path) -> dict | None:
    """{"run_id", "tracking_uri"} of the training run behind an export, else None (see the module docstring)."""
    export = Path(export)
    candidates = [export / RUN_FILE, export.parent / RUN_FILE]
    meta_file = export / "expblip.json"
    if meta_file.is_file():
        source = json.loads(meta_file.read_text()).get("source") or {}
        if source.get("checkpoint"):  # RUN_DIR/checkpoints/stepNNNNNNNN
            candidates.append(Path(source["checkpoint"]).parent.parent / RUN_FILE)
    for candidate in candidates:
        if candidate.is_file():
            info = json.loads(candidate.read_text())  # the URI is stored redacted: $MLFLOW_TRACKING_URI restores it
            return {"run_id": info["run_id"], "tracking_uri": unredact_uri(info["tracking_uri"])}
    return None


def requirements() -> list[str]:
    """Exact pins of what loading the model needs, read from this environment."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


@contextlib.contextmanager
def _tracking(uri: str):
    """MLflow's fluent API pointed at ``uri`` for the block, then restored (its env var included)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # no public way to restore the old URI

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def register_export(export: str | Path, name: str, tracking_uri: str = "",
                    experiment: str = EXPERIMENT) -> Registered:
    """Log ``export`` as a pyfunc model, register it as a new version of ``name``, tag it with its run's eval.*."""
    from expblip.infer.captioner import resolve_export

    export = resolve_export(export)
    meta = json.loads((export / "expblip.json").read_text()) if (export / "expblip.json").is_file() else {}
    if meta.get("format") == "trainable-only":
        raise ValueError(f"{export} is a trainable-only export; merge it onto its towers first "
                         "(launch/export.py --merge) and register the merged export")
    run = training_run(export)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or (run["tracking_uri"] if run else "")
    if not uri:
        raise ValueError(f"no MLflow tracking URI for {export}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    run_id = run["run_id"] if run and run["tracking_uri"] == uri else None
    with _tracking(uri):
        info = _log_model(export, name, run_id, experiment)
        tags = _tag_version(name, info.registered_model_version, info.run_id, export, run_id is not None)
    return Registered(name, str(info.registered_model_version), info.run_id, f"models:/{name}/"
                      f"{info.registered_model_version}", tags)


def _log_model(export: Path, name: str, run_id: str | None, experiment: str):
    import expblip

    if run_id is None:
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"register {name}"):
        return mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts={"export": str(export)},
                                       signature=SIGNATURE, pip_requirements=requirements(),
                                       code_paths=[str(Path(expblip.__file__).parent)],
                                       registered_model_name=name)


def _tag_version(name: str, version, run_id: str, export: Path, from_training: bool) -> dict[str, str]:
    """The training run's eval.* metrics, and where the export came from, as tags of the model version."""
    client = mlflow.MlflowClient()
    metrics = client.get_run(run_id).data.metrics if from_training else {}
    tags = {key: f"{value:.6g}" for key, value in sorted(metrics.items()) if key.startswith("eval.")}
    tags.update({"expblip.export": str(export.resolve()), "expblip.training_run": run_id if from_training else ""})
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return tags
