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
