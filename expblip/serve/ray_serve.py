"""The captioner as a Ray Serve deployment, for clusters: replicas (autoscaled), ``@serve.batch``, a GPU per replica.

    serve run cluster/serve.yaml                                  # on this machine (--address local) or RAY_ADDRESS
    serve deploy cluster/serve.yaml --address http://HEAD:8265    # onto a running cluster (the dashboard address)
    curl -F image=@face.jpg http://HOST:8000/describe             # the same JSON as launch/serve.py's /describe

``build_app`` is the application builder that cluster/serve.yaml names (``import_path``); its ``args`` are
``CaptionerDeployment``'s (model, device, crop_face, beams, max_new_tokens, max_batch, max_wait_ms, max_upload_mb)
plus ``gpus_per_replica``. Replica count, autoscaling bounds and actor resources come from the config's
``deployments`` section. Each replica loads the export once and captions the images of concurrent requests together
(``@serve.batch``, up to ``max_batch`` images gathered for at most ``max_wait_ms``); uploads are checked and cropped
exactly as the single-machine app does (expblip.serve.app), so both answer the same caption for the same image.

Routes: POST /describe (multipart, file field ``image``), GET /health. Ray is imported here only (DESIGN.md, wall 2).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from expblip.infer.captioner import Captioner, resolve_export
from expblip.model.blip2 import GenerationConfig
from expblip.serve.app import MiB, UploadRejected, decode_upload, description, prepare_image

DEPLOYMENT = "ExpBlipCaptioner"


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class CaptionerDeployment:
    """One replica: a loaded export, the upload checks, and a batched caption call."""

    def __init__(self, model: str, device: str = "cpu", crop_face: bool = False, beams: int = 5,
                 max_new_tokens: int = 60, max_batch: int = 16, max_wait_ms: float = 10.0,
                 max_upload_mb: float = 5.0):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but this replica sees no GPU; set "
                               "ray_actor_options.num_gpus (gpus_per_replica) or device: cpu")
        self.captioner = Captioner.from_export(resolve_export(model), device=device)
        self.crop_face, self.max_upload_bytes = crop_face, int(max_upload_mb * MiB)
        self.gen = GenerationConfig(num_beams=beams, max_new_tokens=max_new_tokens)
        self.caption_batch.set_max_batch_size(max_batch)
        self.caption_batch.set_batch_wait_timeout_s(max_wait_ms / 1000)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def caption_batch(self, pixels: list[torch.Tensor]) -> list[str]:
        """Captions of the images of concurrent requests, in one generate call (off the replica's event loop)."""
        stacked = torch.stack(pixels)  # [B, 3, S, S]
        return await asyncio.to_thread(self.captioner.caption_pixels, stacked, self.gen)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/health"):
            return JSONResponse({"status": "ok", "image_size": self.captioner.image_size,
                                 "crop_face": self.crop_face, "device": str(self.captioner.device)})
        if request.method != "POST" or not path.endswith("/describe"):
            return JSONResponse({"error": "POST /describe (multipart field 'image') or GET /health"}, 404)
        try:
            return JSONResponse(await self.describe(request))
        except UploadRejected as err:
            return JSONResponse({"error": err.detail}, err.status_code)

    async def describe(self, request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_upload_bytes + 16 * 1024:
            raise UploadRejected(413, f"the upload is larger than the {self.max_upload_bytes / MiB:g} MiB limit")
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise UploadRejected(400, "send the image as multipart/form-data in the file field 'image'")
        data = await upload.read()
        if len(data) > self.max_upload_bytes:
            raise UploadRejected(413, f"{upload.filename}: above the {self.max_upload_bytes / MiB:g} MiB limit")
        name = Path(upload.filename or "upload").name
        prepared = await asyncio.to_thread(
            lambda: prepare_image(self.captioner, decode_upload(data, name), self.crop_face))
        return description(await self.caption_batch(prepared.pixels), prepared)


def build_app(args: dict) -> Application:
    """The application cluster/serve.yaml deploys: ``args`` as CaptionerDeployment's, plus ``gpus_per_replica``
    (0 by default; the config's ray_actor_options.num_gpus, when given, takes precedence)."""
    args = dict(args)
    gpus = float(args.pop("gpus_per_replica", 0))
    deployment = CaptionerDeployment.options(ray_actor_options={"num_cpus": 1, "num_gpus": gpus}) if gpus else \
        CaptionerDeployment
    return deployment.bind(**args)
