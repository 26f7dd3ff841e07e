"""Export directory → captions, batched; plus image loading for the CLI and the HTTP app.

    captioner = Captioner.from_export("runs/stage2/export")           # or any launch/export.py --out
    images = [image for _, image in load_images(["faces/"])]          # files and directories
    captioner.describe(images)   # [{"caption": "...", "aus": [6, 12], "emotions": ["happiness"]}, ...]

Preprocessing is BLIP-2's evaluation transform written with PIL + numpy: RGB, bicubic resize of the whole image to
the export's square ``image_size`` (no crop), scale to [0, 1], normalise with the export's mean/std. It must match
the eval transform of ``expblip.data.stream`` so that a served image reads like a held-out shard sample.

Nothing here imports Ray or DeepSpeed (DESIGN.md, wall 2): only the export directory is needed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from expblip.infer.parse import parse_caption
from expblip.model.generation import GenerationConfig
from expblip.model.spec import ModelSpec, spec_for_config
from expblip.model.weights import load_export
from expblip.pixels import CLIP_MEAN, CLIP_STD, AspectError, as_batch, dynamic_shape, image_sizes, to_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype of the inference scripts


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' (or a torch dtype) -> torch dtype; ValueError naming the choices otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
PIL_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default, used when Image.MAX_IMAGE_PIXELS has been set to None


ImageErrorKind = Literal["not_image", "too_large", "corrupt"]


class ImageError(ValueError):
    """A path that is not a readable image (or is too large to decode safely); the message names it.

    ``kind`` says which, for callers that answer differently (the HTTP app: 415, 413, 422).
    """

    def __init__(self, path: str | Path, reason: str, kind: ImageErrorKind = "not_image"):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.kind = kind


# ---------------------------------------------------------------- images in


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (their jpg/jpeg/png/bmp/webp files, sorted, not recursive) into image paths.

    An explicitly named file is kept whatever its suffix, so that a non-image is reported by ``load_image`` rather
    than silently dropped; a directory holding no image is an error.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageError(path, f"directory holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or directory")
    return out


def _pixel_limit() -> int:
    """The decompression-bomb limit: PIL's MAX_IMAGE_PIXELS, or PIL's default if someone switched it off."""
    return Image.MAX_IMAGE_PIXELS or PIL_DEFAULT_MAX_PIXELS


def load_image(path: str | Path | IO[bytes], *, name: str | None = None, formats: Sequence[str] | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Open one image as RGB; ImageError naming the path when it is not an image or exceeds the pixel limit.

    The size is read from the header before any pixel is decoded, so a decompression bomb (a small file that
    expands to gigabytes) is refused without allocating it. ``path`` may also be a binary file object (an upload),
    named in errors by ``name``; ``formats`` restricts the PIL decoders tried (e.g. ``("PNG", "JPEG")``);
    ``max_pixels`` lowers the pixel limit below PIL's.
    """
    label = name if name is not None else path
    limit = min(_pixel_limit(), max_pixels) if max_pixels else _pixel_limit()
    try:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS; the check below refuses instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=list(formats) if formats else None)
        with img:
            width, height = img.size
            if width * height > limit:
                raise ImageError(label, f"{width}x{height} = {width * height} pixels is above the decompression-bomb "
                                        f"limit {limit} (PIL.Image.MAX_IMAGE_PIXELS); downscale it first", "too_large")
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError as err:  # PIL's own hard limit (2x MAX_IMAGE_PIXELS)
        raise ImageError(label, f"above the decompression-bomb limit ({err})", "too_large") from err
    except UnidentifiedImageError as err:
        what = f"one of {', '.join(formats)}" if formats else "an image"
        raise ImageError(label, f"not {what} (PIL cannot identify its format)", "not_image") from err
    except FileNotFoundError:
        raise
    except OSError as err:  # truncated or corrupt files
        raise ImageError(label, f"cannot decode image ({err})", "corrupt") from err


def load_images(paths: Iterable[str | Path]) -> list[tuple[Path, Image.Image]]:
    """(path, RGB image) for every image named by ``paths`` (files and directories, see ``list_images``)."""
    return [(path, load_image(path)) for path in list_images(paths)]


def preprocess_images(images: Sequence[Image.Image], image_size: int, mean: Sequence[float],
                      std: Sequence[float], bounds: tuple[int, ...] = ()) -> torch.Tensor | list[torch.Tensor]:
    """RGB → bicubic resize to image_size² → [0, 1] → (x - mean) / std. Returns float32 [B, 3, S, S]; with
    ``bounds`` (min_pixels, max_pixels, unit: dynamic resolution) each image keeps its aspect at its own size
    (expblip.pixels.dynamic_shape) and a list of [3, H_i, W_i] comes back."""
    if not images:
        raise ValueError("preprocess_images() got no images")
    rgb = [img.convert("RGB") for img in images]
    sizes = [dynamic_shape(img.height, img.width, bounds)[::-1] if bounds else (image_size, image_size) for img in rgb]
    arrays = [np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
              for img, size in zip(rgb, sizes, strict=True)]
    shift, scale = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    out = [torch.from_numpy(np.ascontiguousarray(((a / 255.0 - shift) / scale).transpose(2, 0, 1))) for a in arrays]
    return out if bounds else torch.stack(out)


# ---------------------------------------------------------------- the captioner


def resolve_export(path: str | Path) -> Path:
    """An export directory given itself or the run directory holding it (RUN_DIR/export)."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory; pass a run directory or an export directory")
    raise FileNotFoundError(f"{path}: not an expblip export (no config.json in it or in {path / 'export'}); "
                            "pass RUN_DIR, RUN_DIR/export or the --out of launch/export.py")


@dataclass
class Captioner:
    """A loaded export: model (eval mode), tokenizer and the preprocessing it was trained with."""

    model: torch.nn.Module  # the family's HF model (Blip2ForConditionalGeneration, ...)
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    tasks: dict = field(default_factory=lambda: {"describe": ""})  # task -> prompt the model was trained with
    spec: ModelSpec | None = None  # the model's family (expblip.model.spec); None: read from model.config
    # (min_pixels, max_pixels, unit) of a model trained at dynamic resolution, from its config; () = square images
    bounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = spec_for_config(self.model.config)

    @classmethod
    def from_export(cls, path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32) -> Captioner:
        """Load an export directory (config.json + model.safetensors + tokenizer + expblip.json) in `dtype`
        ('bf16', 'fp16', 'fp32' or a torch dtype): each tensor is cast as it is read, straight onto `device`."""
        device = torch.device(device)
        model, tokenizer, meta = load_export(path, dtype=parse_dtype(dtype), device=device)
        spec = spec_for_config(model.config)
        image_size = int(meta.get("image_size", spec.image_size(model.config)))
        mean = tuple(float(x) for x in meta.get("mean", CLIP_MEAN))
        std = tuple(float(x) for x in meta.get("std", CLIP_STD))
        tasks = dict(meta.get("tasks") or {"describe": ""})
        return cls(model.to(device), tokenizer, image_size, mean, std, device, tasks, spec,  # type: ignore[arg-type]
                   tuple(spec.bounds(model.config)))

    def task_prompt(self, task: str) -> str:
        """The prompt of one of the tasks the export was trained on (expblip.json "tasks")."""
        if task not in self.tasks:
            raise ValueError(f"task {task!r}: this model was trained on {sorted(self.tasks)}")
        return self.tasks[task]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor | list[torch.Tensor]:
        """Images → normalised pixel values [B, 3, S, S] (float32, on the CPU); at dynamic resolution a list of
        [3, H_i, W_i]."""
        return preprocess_images(images, self.image_size, self.mean, self.std, self.bounds)

    def caption_pixels(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], gen: GenerationConfig | None = None,
                       prompt: str = "", with_lengths: bool = False) -> list:
        """Captions for one batch of already preprocessed pixel values: [B, 3, S, S], or [3, H_i, W_i] tensors
        (``prompt``: text after </s>, as the export's chat template places a user's text; empty for the paper's
        captions). ``with_lengths``: ``Generated(text, tokens, stopped)`` tuples instead of strings."""
        self._check_sizes(image_sizes(pixel_values))
        dtype = next(self.model.parameters()).dtype
        pixels = to_device(pixel_values if self.bounds else as_batch(pixel_values), self.device, dtype)
        # inference_mode, not only no_grad: no autograd bookkeeping on any tensor the decoding loop makes. Only here,
        # where the model is an export that never trains (under ZeRO-3, gathered parameters must stay normal tensors)
        with torch.inference_mode():
            images = self.spec.pixel_inputs(self.model.config, pixels)
            return self.spec.generate(self.model, self.tokenizer, images, gen, prompt, with_lengths)

    def _check_sizes(self, sizes: Sequence[tuple[int, int]]) -> None:
        """Raise unless every (H, W) is what this export's preprocessing makes (square, or kept at its bounds)."""
        for h, w in sizes:
            want = dynamic_shape(h, w, self.bounds) if self.bounds else (self.image_size, self.image_size)
            if (h, w) != tuple(want):
                how = (f"min_pixels {self.bounds[0]}, max_pixels {self.bounds[1]}" if self.bounds
                       else "this export's image_size")
                raise ValueError(f"pixel_values are {h}x{w} but the export expects {want[0]}x{want[1]}; preprocess "
                                 f"with {how} (Captioner.preprocess)")

    def caption(self, images: Sequence[Image.Image], gen: GenerationConfig | None = None,
                batch_size: int = 16, prompt: str = "") -> list[str]:
        """One caption per image, generated ``batch_size`` images at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            captions.extend(self.caption_pixels(self.preprocess(images[start : start + batch_size]), gen, prompt))
        return captions

    def describe(self, images: Sequence[Image.Image], gen: GenerationConfig | None = None,
                 batch_size: int = 16, prompt: str = "") -> list[dict]:
        """{"caption", "aus" (sorted AU numbers), "emotions" (sorted names)} per image, parsed from the caption."""
        return [{"caption": c, **parse_caption(c)} for c in self.caption(images, gen, batch_size, prompt)]

    def prompt_length(self, prompt: str = "", image_size: tuple[int, int] | None = None) -> int:
        """Tokens the model reads before it answers (BLIP-2: query tokens, BOS and the prompt in the family's turn
        layout); at dynamic resolution, for a preprocessed image of ``image_size`` (H, W) (None: the most)."""
        sized = {"image_size": image_size} if self.bounds and image_size is not None else {}
        return self.spec.prompt_length(self.model.config, self.tokenizer, prompt, **sized)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the export's tokenizer (no special tokens): the OpenAI API's usage counts."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


# ---------------------------------------------------------------- files → descriptions (the describe CLI)


def describe_files(captioner: Captioner, paths: Iterable[str | Path], gen: GenerationConfig | None = None,
                   batch_size: int = 16, crop_face: bool = False, prompt: str = "") -> Iterator[tuple[Path, dict]]:
    """(path, description) for every image named by ``paths``, loading only ``batch_size`` images at a time.

    All paths are listed (and missing ones reported) before the first image is captioned. With ``crop_face`` each
    image is cut to the square around its largest face (expblip.infer.face) and the description gains
    ``"face"``: the box in the image's pixels, or None when none was found and the centre square was described.
    """
    files = list_images(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [load_image(p) for p in chunk]
        faces: list[dict | None] = []
        if crop_face:
            from expblip.infer.face import crop_face as crop

            crops = [crop(image) for image in images]
            images = [c.image for c in crops]
            faces = [c.face.as_dict() if c.face else None for c in crops]
        for path, image in zip(chunk, images, strict=True):  # name the file an aspect error comes from
            _check_aspect(captioner, path, image)
        described = captioner.describe(images, gen, batch_size, prompt)
        if crop_face:
            described = [{**d, "face": f} for d, f in zip(described, faces, strict=True)]
        yield from zip(chunk, described, strict=True)


def _check_aspect(captioner: Captioner, path: Path, image: Image.Image) -> None:
    """At dynamic resolution, an ImageError naming the file whose aspect the export's bounds cannot hold."""
    if captioner.bounds:
        try:
            dynamic_shape(image.height, image.width, captioner.bounds)
        except AspectError as err:
            raise ImageError(path, str(err)) from None


def format_description(path: str | Path, description: dict, as_json: bool = False) -> str:
    """One output line: ``path: caption  [AUs: 1, 2, 12] [emotion: happiness]``, or a JSON object.

    A description from ``describe_files(crop_face=True)`` adds ``[face: 171,64 106x106]`` or
    ``[face: none found, centre square]``.
    """
    if as_json:
        return json.dumps({"path": str(path), **description}, ensure_ascii=False)
    aus = ", ".join(str(au) for au in description["aus"]) or "none"
    emotions = ", ".join(description["emotions"]) or "none"
    line = f"{path}: {description['caption']}  [AUs: {aus}] [emotion: {emotions}]"
    if "face" in description:
        face = description["face"]
        line += (f" [face: {face['x']},{face['y']} {face['width']}x{face['height']}]" if face
                 else " [face: none found, centre square]")
    return line
