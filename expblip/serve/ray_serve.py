"""The captioner as a Ray Serve deployment, for clusters: replicas (autoscaled), a GPU per replica, and the very
routes of the single-machine server.

    serve run cluster/serve.yaml                                  # on this machine (--address local) or RAY_ADDRESS
    serve deploy cluster/serve.yaml --address http://HEAD:8265    # onto a running cluster (the dashboard address)
    curl -F image=@face.jpg http://HOST:8000/describe             # the same JSON as launch/serve.py's /describe

``build_app`` is the application builder that cluster/serve.yaml names (``import_path``); its ``args`` are
``CaptionerReplica``'s (launch/serve.py's options) plus ``gpus_per_replica``. Replica count, autoscaling bounds and actor resources come from
the config's ``deployments`` section.

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

import torch
from ray import serve
from ray.serve import Application

from expblip.infer.captioner import Captioner, resolve_export
from expblip.infer.video import VideoLimits
from expblip.model.blip2 import GenerationConfig
from expblip.serve import API_KEY_ENV
from expblip.serve import app as http
from expblip.serve.batching import DEFAULT_MAX_WAIT_MS

DEPLOYMENT = "ExpBlipCaptioner"


class CaptionerReplica:
    """One replica: a loaded export behind create_app's routes and batching queue (CaptionerDeployment wraps it)."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "fp32", crop_face: bool = False,
                 beams: int = 5, max_new_tokens: int = 60, max_batch: int = 16,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_queue: int = 256, request_timeout_s: float = 120.0,
                 max_upload_mb: float = 5.0, max_video_mb: float = 50.0, video_fps: float = 2.0,
                 max_frames: int = 240, max_seconds: float = 600.0, model_name: str = ""):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but this replica sees no GPU; set "
                               "ray_actor_options.num_gpus (gpus_per_replica) or device: cpu")
        captioner = Captioner.from_export(resolve_export(model), device=device, dtype=dtype)
        self.http_app = http.create_app(
            captioner, max_upload_bytes=int(max_upload_mb * http.MiB), crop_face=crop_face,
            gen=GenerationConfig(num_beams=beams, max_new_tokens=max_new_tokens), max_batch=max_batch,
            max_wait_ms=max_wait_ms, max_queue=max_queue, request_timeout_s=request_timeout_s,
            api_key=os.environ.get(API_KEY_ENV) or None, model_name=model_name or http.model_name(model),
            max_video_bytes=int(max_video_mb * http.MiB), video_fps=video_fps,
            video_limits=VideoLimits(max_frames, max_seconds))

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
