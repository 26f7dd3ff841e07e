"""Pixel normalisation shared by the data stream (what a model trains on) and the model's exports (what a reader
must feed it): one source for CLIP's mean and standard deviation, which BLIP-2's EVA ViT was trained with.

Neither ``expblip.model`` nor ``expblip.data`` owns this fact: both import it from here (DESIGN.md: the model takes
tensors and never imports the data package).
"""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
