"""What a served model is given: launch/serve.py's options and the Ray Serve deployment's args (cluster/serve.yaml),
one set of names and defaults for both. The API key is not one of them: each server reads it from its environment.
"""

from __future__ import annotations

from dataclasses import dataclass

from expblip.serve.batching import DEFAULT_MAX_WAIT_MS


@dataclass
class ServeOptions:
    model: str  # an export directory, or a run directory holding export/
    device: str = "cpu"
    dtype: str = "fp32"  # bf16 halves the weights' memory; the Q-Former stays fp32
    crop_face: bool = False  # describe the square around the largest face (the centre square if none)
    beams: int = 5
    max_new_tokens: int = 60
    max_batch: int = 16  # images captioned together in one generate call
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS  # only under load or while requests are being read
    max_queue: int = 256  # images that may wait; beyond that 503 + Retry-After
    request_timeout_s: float = 120.0  # then 504
    max_upload_mb: float = 5.0
    max_video_mb: float = 50.0
    video_fps: float = 2.0  # video frames sampled per second
    max_frames: int = 240
    max_seconds: float = 600.0
    model_name: str = ""  # the id of /v1/models; default: the directory's name (app.model_name)
