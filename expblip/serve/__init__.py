"""Serving an export on one machine: the HTTP API and the browser page (no Ray, no DeepSpeed); the captioner it
serves lives in ``expblip.infer``."""
