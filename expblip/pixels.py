"""Pixel normalisation shared by the data stream (what a model trains on) and the model's exports (what a reader
must feed it): one source for CLIP's mean and standard deviation, which BLIP-2's EVA ViT was trained with.

Neither ``expblip.model`` nor ``expblip.data`` owns this fact: both import it from here (DESIGN.md: the model takes
tensors and never imports the data package).
"""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def normalise(pixels, dtype=None, mean=CLIP_MEAN, std=CLIP_STD):
    """ByteTensor[B, 3, H, W] (the stream's pixels, on any device) → ((x / 255) - mean) / std in fp32, then `dtype`.

    Training normalises on the device the model computes on: the loader hands uint8 (a quarter of fp32's bytes
    through worker queues, pinned memory and the host-to-device copy) and the arithmetic runs where the model runs.
    The same operations in the same order on any device, so CPU and device pixels agree bit for bit.
    """
    import torch

    shift = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(std, device=pixels.device).view(1, 3, 1, 1) * 255.0)
    out = (pixels.float() - shift) * scale
    return out if dtype is None else out.to(dtype)


# ---------------------------------------------------------------- dynamic resolution (ragged batches)
# A family that reads images at their own size (Qwen2.5-VL) takes each image resized, aspect kept, to a multiple of
# `unit` px (its patch x merge) with min_pixels <= H x W <= max_pixels: its image processor's rule (smart_resize),
# so that what trains, what the evaluator and server feed and what stock transformers' processor makes agree. Such a
# batch is a list of [3, H_i, W_i] tensors; a batch of square images stays one [B, 3, S, S] tensor.


class AspectError(ValueError):
    """An image whose aspect the dynamic-resolution bounds cannot hold (the stream skips it, the server answers 400)."""


def dynamic_shape(height: int, width: int, bounds: tuple[int, int, int]) -> tuple[int, int]:
    """(H, W) an image of height x width px is resized to under ``bounds`` = (min_pixels, max_pixels, unit): the
    image processor's smart_resize. An aspect so extreme that its result leaves [min_pixels, max_pixels] (a side
    held at one unit) raises AspectError: such an image would break the token bound, and resizing its result again
    would give another size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    low, high, unit = bounds
    try:
        h, w = smart_resize(height, width, factor=unit, min_pixels=low, max_pixels=high)
    except ValueError as err:  # aspect above 200
        raise AspectError(f"a {width}x{height} px image: {err}") from None
    if not low <= h * w <= high:
        raise AspectError(f"a {width}x{height} px image cannot keep its aspect within min_pixels={low} and "
                          f"max_pixels={high} in multiples of {unit} px (it would be {w}x{h}); crop it nearer to a "
                          "square or widen the bounds")
    return h, w


def check_bounds(bounds: tuple[int, int, int], prefix: str) -> None:
    """Raise a ValueError naming the keys (``prefix`` + min_pixels / max_pixels) unless the bounds can hold an
    image."""
    low, high, unit = bounds
    if unit < 1 or low < 1 or high < low:
        raise ValueError(f"{prefix}min_pixels={low}, {prefix}max_pixels={high} must satisfy 1 <= min_pixels <= "
                         "max_pixels")
    if high < unit * unit:
        raise ValueError(f"{prefix}max_pixels={high} holds no {unit}x{unit}-px image (one merged patch); set "
                         f"{prefix}max_pixels >= {unit * unit}")


def image_sizes(pixels) -> list[tuple[int, int]]:
    """(H, W) of each image of a batch: a [B, 3, H, W] tensor or a list of [3, H_i, W_i] tensors."""
    return [tuple(p.shape[-2:]) for p in pixels]


def as_batch(images):
    """[3, H_i, W_i] tensors -> one [B, 3, H, W] tensor when they share a size, else the list (a ragged batch); a
    batch tensor is returned as it is (no copy)."""
    import torch

    if torch.is_tensor(images):
        return images
    images = list(images)
    return torch.stack(images) if len({tuple(p.shape) for p in images}) == 1 else images


def to_device(pixels, device, dtype=None, non_blocking: bool = False):
    """A batch (tensor or ragged list) on `device` (and in `dtype`)."""
    if isinstance(pixels, (list, tuple)):
        return [p.to(device, dtype, non_blocking=non_blocking) for p in pixels]
    return pixels.to(device, dtype, non_blocking=non_blocking)


def normalise_batch(pixels, dtype=None, mean=CLIP_MEAN, std=CLIP_STD):
    """normalise() of a batch: a uint8 [B, 3, H, W] tensor, or a ragged list of [3, H_i, W_i] (each alike)."""
    if isinstance(pixels, (list, tuple)):
        return [normalise(p[None], dtype, mean, std)[0] for p in pixels]
    return normalise(pixels, dtype, mean, std)
