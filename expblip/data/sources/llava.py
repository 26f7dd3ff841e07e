"""Instruction data → task-prompt records: LLaVA JSON and ShareGPT JSON (``make_shards llava --json FILE``).

Two layouts, as their projects document them, in a JSON array (``.json``, streamed item by item with ijson: a
665k-record LLaVA mix is never held in memory) or one record per line (``.jsonl``)::

    LLaVA (docs/Finetune_Custom_Data.md), also FABA-Instruct and FaceInstruct:
      {"id": "0001", "image": "faces/a.jpg",
       "conversations": [{"from": "human", "value": "<image>\\nWhich AUs are active?"},
                         {"from": "gpt", "value": "AU6 and AU12."}]}
    ShareGPT as LLaMA-Factory reads it (data/README.md; its mllm_demo.json):
      {"messages": [{"role": "user", "content": "<image>Which AUs are active?"},
                    {"role": "assistant", "content": "AU6 and AU12."}],
       "images": ["faces/a.jpg"]}

(``conversations`` with ``from``/``value`` and ``messages`` with ``role``/``content`` are read in either layout;
``system`` turns are passed over: BLIP-2 has no system turn.) Each human/gpt exchange becomes one task-prompt record:
the human turn is its instruction (``labels["prompt"]``), the answer its caption. ``<image>`` is removed from both:
BLIP-2 always sees the image first, as the query tokens before the instruction (expblip.model.family), wherever the
JSON put the placeholder. A record of several exchanges becomes one record per exchange on the same image
(``multi_turn="split"``: later ones without the earlier turns as context), or stops the conversion naming its id
(``"refuse"``).

Skipped and counted (expblip.data.sources._common.Skips): a missing or unreadable image, an empty answer, a
duplicate id (bad data, against --max-skipped); left out by rule: a text-only record (LLaVA's mixes hold ShareGPT
chats without images) and one with several images (BLIP-2 sees one). A record without a conversation, with a turn
missing its fields or with turns out of order stops the conversion (:class:`FormatError`; counted by --check).

Labels: ``aus`` and ``emotions`` None, ``prompt``, ``id``, ``turn`` (1-based exchange), ``image`` (the reference).
Keys: ``NAME-ID`` (``NAME-ID-N`` for exchange N >= 2; ID is the record's number in the file when it has no id).
Split: every record is train unless ``test_fraction`` > 0 holds images out by ``sha256(seed:image)``.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from itertools import islice
from typing import IO, Any, Literal

from PIL import Image

from expblip.data.captions import CaptionConfig
from expblip.data.sources._common import ConversionError, Skips, check_split, image_in_test, record_key
from expblip.data.sources.table import image_location, read_image

DATASET = "llava"
IMAGE_TOKEN = "<image>"  # LLaVA's and LLaMA-Factory's placeholder; BLIP-2 places the image itself
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}
FORMATS = ("a LLaVA JSON ([{'id', 'image', 'conversations': [{'from': 'human', 'value': ...}, {'from': 'gpt', "
           "'value': ...}]}]) or ShareGPT JSON ([{'messages': [{'role': 'user', 'content': ...}, {'role': "
           "'assistant', 'content': ...}], 'images': [...]}]), as a .json array or .jsonl lines "
           "(docs/datasets.md, 'Instruction data')")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class FormatError(ConversionError):
    """A record that is not LLaVA / ShareGPT: the conversion stops; ``reason`` is how a check counts it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class LlavaOptions:
    """The llava source's options (make_shards --json, --multi-turn, --name)."""

    json: str = ""  # the LLaVA / ShareGPT file: .json (an array) or .jsonl (local path or fsspec URL)
    multi_turn: Literal["split", "refuse"] = "split"  # a record of several exchanges: one record each, or stop
    name: str = DATASET  # labels["dataset"] and the record keys' prefix

    def __post_init__(self) -> None:
        if self.multi_turn not in ("split", "refuse"):
            raise ValueError(f"--multi-turn must be split or refuse, got {self.multi_turn!r}")
        if not _NAME.match(self.name):
            raise ValueError(f"--name must be letters, digits, _ or -, got {self.name!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LlavaOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


def check_request(source: str, options: LlavaOptions | None) -> None:
    """A conversion's llava options: the llava source needs --json; the others take none."""
    if source == "llava" and (options is None or not options.json):
        raise ValueError(f"the llava source needs --json FILE: {FORMATS}")
    if source != "llava" and options is not None:
        raise ValueError(f"--json and --multi-turn apply only to the llava source, not {source!r}")


# ---------------------------------------------------------------- reading the file


def open_items(path: str) -> Iterator[tuple[str, Any]]:
    """("FILE record N", item) for each record of a JSON array or JSONL file, streamed; FileNotFoundError or
    FormatError (empty, not JSON) naming the file."""
    from expblip.data.shards import url_to_fs

    fs, inner = url_to_fs(path)
    if not fs.isfile(inner):
        raise FileNotFoundError(f"llava: {path} does not exist; pass --json with {FORMATS}")
    f = fs.open(inner, "rb")
    try:
        first = _first_byte(f)
    except BaseException:
        f.close()
        raise
    if first is None:
        f.close()
        raise FormatError("empty file", f"llava: {path} is empty; expected {FORMATS}")
    if first not in (b"[", b"{"):
        f.close()
        raise FormatError("not JSON", f"llava: {path} does not start with '[' or '{{'; expected {FORMATS}")
    return _closing(_array_items(f, path) if first == b"[" else _line_items(f, path), f)


def _first_byte(f: IO[bytes]) -> bytes | None:
    """The first byte that is not whitespace (or a UTF-8 BOM); the file is rewound."""
    head = f.read(4096)
    while head:
        text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
        if text:
            f.seek(0)
            return text[:1]
        head = f.read(4096)
    return None


def _closing(items: Iterator[tuple[str, Any]], f: IO[bytes]) -> Iterator[tuple[str, Any]]:
    try:
        yield from items
    finally:
        f.close()


def _array_items(f: IO[bytes], path: str) -> Iterator[tuple[str, Any]]:
    import ijson

    number = 0
    try:
        for number, item in enumerate(ijson.items(f, "item", use_float=True), 1):  # noqa: B007
            yield f"{path} record {number}", item
    except ijson.JSONError as exn:
        raise FormatError("not JSON", f"llava: {path}: broken JSON after record {number} ({exn}); expected "
                          f"{FORMATS}") from None


def _line_items(f: IO[bytes], path: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8-sig"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exn:
            raise FormatError("not JSON", f"llava: {path}:{lineno}: not one JSON record per line ({exn}); a .json "
                              f"file holds an array [...] of records, a .jsonl file one record per line") from None
        yield f"{path} line {lineno}", item


# ---------------------------------------------------------------- one record


def strip_image_token(text: str) -> str:
    """The turn without ``<image>`` (and the blank it leaves): BLIP-2 puts the image before the prompt."""
    text = re.sub(r"[ \t]*" + re.escape(IMAGE_TOKEN) + r"[ \t]*(\r?\n)?", " ", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def _turn_text(value: Any) -> str | None:
    """A turn's text: a string, or OpenAI-style content parts ([{"type": "text", "text": ...}, {"type": "image"}])."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return " ".join(str(p.get("text", "")) for p in value if p.get("type") == "text")
    return None


def exchanges(item: Any, where: str) -> list[tuple[str, str]]:
    """[(prompt, answer)] of one record, ``<image>`` removed; FormatError naming the record and the fix."""
    if not isinstance(item, dict):
        raise FormatError("not a record", f"{where}: expected a JSON object, got {type(item).__name__}; expected "
                          f"{FORMATS}")
    turns = item.get("conversations", item.get("messages"))
    if not isinstance(turns, list) or not turns:
        found = "an empty list" if turns == [] else f"the keys {sorted(item)}"
        raise FormatError("missing field", f"{where}: no 'conversations' (LLaVA) or 'messages' (ShareGPT) list of "
                          f"turns, found {found}; expected {FORMATS}")
    roles, texts = [], []
    for number, turn in enumerate(turns, 1):
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower()) if isinstance(turn, dict) else None
        text = _turn_text(turn.get("value", turn.get("content"))) if isinstance(turn, dict) else None
        if role is None or text is None:
            raise FormatError("missing field", f"{where}: turn {number} needs 'from' (human/gpt) and 'value' "
                              f"(LLaVA) or 'role' (user/assistant) and 'content' (ShareGPT), got {turn!r:.120}")
        if role != "system":
            roles.append(role)
            texts.append(strip_image_token(text))
    if len(roles) % 2 or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise FormatError("bad turn order", f"{where}: turns must alternate human/user then gpt/assistant, ending "
                          f"with an answer; got {roles}")
    return list(zip(texts[::2], texts[1::2], strict=True))


def image_ref(item: dict) -> list[str]:
    """The record's image references: LLaVA's "image" (a path) or ShareGPT's "images" (a list)."""
    value = item.get("image", item.get("images"))
    values = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


# ---------------------------------------------------------------- records


@dataclass
class InstructReader:
    """One pass over an instruction file: each exchange becomes a record, or is skipped and counted."""

    items: Iterator[tuple[str, Any]]
    opts: LlavaOptions
    root: str  # the base of relative image paths: --root, else the file's folder
    skips: Skips
    split: str = "train"
    test_fraction: float = 0.0
    split_seed: int = 0
    limit: int | None = None  # read at most this many records (make_shards --check N)
    lenient: bool = False  # count bad records (Skips.fail) instead of stopping

    def __iter__(self) -> Iterator[dict]:
        kept, seen = 0, set()
        for where, item in islice(self.items, self.limit):
            try:
                out = self.records(where, item, seen)
            except FormatError as err:
                if not self.lenient:
                    raise
                self.skips.fail(err.reason, str(err))
                continue
            kept += len(out)
            yield from out
        self.skips.finish(kept)

    def records(self, where: str, item: Any, seen: set[str]) -> list[dict]:
        """The record's exchanges as records ([] when it is outside the split, or skipped and counted)."""
        pairs = exchanges(item, where)
        ident = str(item["id"]) if item.get("id") not in (None, "") else where.rsplit(" ", 1)[-1]
        if len(pairs) > 1 and self.opts.multi_turn == "refuse":
            raise FormatError("multi-turn record", f"{where} (id {ident}): {len(pairs)} exchanges; pass "
                              "--multi-turn split to make one sample of each, or remove the record")
        refs = image_ref(item)
        if len(refs) != 1:
            self.skips.drop("no image" if not refs else "several images", f"{where} (id {ident})")
            return []
        if not self.in_split(refs[0]):
            return []
        key = record_key(self.opts.name, ident)
        if key in seen:
            self.skips.add("duplicate id", f"{where}: id {ident}")
            return []
        seen.add(key)
        if any(not answer for _, answer in pairs):
            self.skips.add("empty answer", f"{where} (id {ident})")
            return []
        image = read_image(image_location(self.root, refs[0]), self.skips, where)
        if image is None:
            return []
        return [self.record(key, image, refs[0], ident, turn, prompt, answer)
                for turn, (prompt, answer) in enumerate(pairs, 1)]

    def record(self, key: str, image: bytes | Image.Image, ref: str, ident: str, turn: int, prompt: str,
               answer: str) -> dict:
        labels = {"aus": None, "emotions": None, "dataset": self.opts.name, "subject": None, "frame": None,
                  "image": ref, "id": ident, "turn": turn, "prompt": prompt}
        return {"key": key if turn == 1 else f"{key}-{turn}", "image": image, "labels": labels, "captions": [answer]}

    def in_split(self, ref: str) -> bool:
        if self.split == "all":
            return True
        is_test = self.test_fraction > 0 and image_in_test(ref, self.test_fraction, self.split_seed)
        return (self.split == "test") == is_test


def records(root: str = "", split: str = "train", caption: CaptionConfig | None = None, subsample: bool = True, *,
            test_fraction: float = 0.0, split_seed: int = 0, max_skipped: float | None = None,
            limit: int | None = None, lenient: bool = False, **options: Any) -> Iterator[dict]:
    """The exchanges of a LLaVA / ShareGPT file as task-prompt records (``options``: LlavaOptions' fields;
    ``caption`` and ``subsample`` have no effect: the answers are the captions)."""
    from expblip.data.shards import parent_url

    check_split(split, DATASET)
    opts = LlavaOptions.from_options(options)
    if root and "://" not in root and not os.path.isdir(os.path.expanduser(root)):
        raise FileNotFoundError(f"llava: image root {root} is not a directory; pass --root with the folder the "
                                f"images' paths start from, and --json with {FORMATS}")
    if not opts.json:
        raise FileNotFoundError(f"llava: no file given (--json FILE) for the images under {root or '--root'}; "
                                f"expected {FORMATS}")
    if split == "test" and not test_fraction:
        raise ValueError(f"llava: split 'test' is empty: {opts.json} has no split; pass --test-fraction (e.g. 0.1) "
                         "to hold images out, or convert a separate test file with --split train")
    reader = InstructReader(open_items(opts.json), opts, root=root or parent_url(opts.json),
                            skips=Skips(opts.name, max_skipped), split=split, test_fraction=test_fraction,
                            split_seed=split_seed, limit=limit, lenient=lenient)
    return iter(reader)
