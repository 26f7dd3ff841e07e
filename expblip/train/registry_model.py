"""The registry's pyfunc model as code (MLflow's models-from-code): registry.py logs this file, and MLflow runs it
to load the model, so nothing is pickled and a model version loads under any Python that has the pinned libraries."""

import mlflow

from expblip.train.registry import CaptionerModel

mlflow.models.set_model(CaptionerModel())
