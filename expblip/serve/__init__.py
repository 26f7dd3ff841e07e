"""Serving from an export directory on one machine: captions, parsed AUs and emotions (no Ray, no DeepSpeed)."""

from expblip.serve.captioner import (
    Captioner,
    ImageError,
    describe_files,
    format_description,
    list_images,
    load_image,
    load_images,
    resolve_export,
)

__all__ = ["Captioner", "ImageError", "describe_files", "format_description", "list_images", "load_image",
           "load_images", "resolve_export"]
