"""The captioner as a Ray Serve deployment, for clusters: replicas (autoscaled), a GPU per replica, and the very
routes of the single-machine server.

    serve run cluster/serve.yaml                                  # on this machine (--address local) or RAY_ADDRESS
    serve deploy cluster/serve.yaml --address http://HEAD:8265    # onto a running cluster (the dashboard address)
    curl -F image=@face.jpg http://HOST:8000/describe             # the same JSON as launch/serve.py's /describe

``build_app`` is the application builder that cluster/serve.yaml names (``import_path``); its ``args`` are the
fields of ``expblip.serve.options.ServeOptions`` (launch/serve.py's options) plus ``gpus_per_replica``. Replica
count, autoscaling bounds and actor resources come from the config's ``deployments`` section.

Each replica loads the export once and serves ``expblip.serve.app.create_app`` over it (``@serve.ingress``): the page,
/health, /vocabulary, /metrics (that replica's), /describe, /describe/video and the OpenAI-compatible /v1 routes,
with the app's own batching queue (the images of concurrent requests share one ``generate``), 503 + Retry-After when
the queue is full and 504 on timeout. Both servers therefore answer the same caption for the same image.

The API key is read from ``$EXPBLIP_API_KEY`` in the replica's environment (export it on each node before
``ray start``): never put it in serve.yaml or a runtime_env, which the cluster stores and its dashboard shows.
Ray is imported here only (DESIGN.md, wall 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from ray import serve
from ray.serve import Application

from expblip.serve import API_KEY_ENV
from expblip.serve import app as http
from expblip.serve.options import ServeOptions

DEPLOYMENT = "ExpBlipCaptioner"


@dataclass(eq=False)
class CaptionerReplica(ServeOptions):
    """One replica: a loaded export behind create_app's routes and batching queue (CaptionerDeployment wraps it).
    Its arguments are ServeOptions' (launch/serve.py's options)."""

    def __post_init__(self):
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} asked for, but this replica sees no GPU; set "
                               "ray_actor_options.num_gpus (gpus_per_replica) or device: cpu")
        self.http_app = http.app_for_export(self, api_key=os.environ.get(API_KEY_ENV) or None)

    def __serve_build_asgi_app__(self):
        """The ASGI app this replica serves (Ray calls it once, after __init__)."""
        return self.http_app


CaptionerDeployment = serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})(
    serve.ingress()(CaptionerReplica))


def build_app(args: dict) -> Application:
    """The application cluster/serve.yaml deploys: ``args`` as CaptionerReplica's, plus ``gpus_per_replica``
    (0 by default; the config's ray_actor_options.num_gpus, when given, takes precedence)."""
    args = dict(args)
    gpus = float(args.pop("gpus_per_replica", 0))
    deployment = CaptionerDeployment.options(ray_actor_options={"num_cpus": 1, "num_gpus": gpus}) if gpus else \
        CaptionerDeployment
    return deployment.bind(**args)
