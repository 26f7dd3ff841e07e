"""Serving an export: the HTTP API and the browser page on one machine (no Ray, no DeepSpeed), and the same app as a
Ray Serve deployment (ray_serve.py, the one module here that imports Ray); the captioner it serves lives in
``expblip.infer``."""

API_KEY_ENV = "EXPBLIP_API_KEY"  # the bearer key both servers read from their environment (never from a config)
