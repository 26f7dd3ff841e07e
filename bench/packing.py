"""Packed rows vs padded rows: a tiny Qwen2.5-VL's training forward + backward on the same three-task batches (CPU).

    python bench/packing.py [--batches 8] [--batch-size 32] [--pack-tokens 512] [--rounds 5] [--threads 1]

The batches: synthetic faces (64 px, 16 image tokens each) with the three-task mixture the loop draws (describe
captions of up to ~30 tokens, AU lists, one-word emotions, each behind its chat-template prompt), built once as the
loop builds them (expblip.model.spec: text_inputs + pixel_inputs).
    padded  each sample one row, right-padded to the batch's longest (attention_mask)
    packed  expblip.model.qwen_vl.pack_inputs: samples end to end in rows of at most --pack-tokens tokens, each with
            its own positions and attention (data.pack_tokens); the packing itself is inside the timed work
Both compute the same loss and gradients (tests/test_qwen_vl_packing.py). Rounds alternate their order
(bench/rounds.py); printed: token slots per batch of each, per-round seconds, and last `ratio: <packed/padded
seconds>` (< 1: packing is faster). The attention of a packed row is a masked L x L product over the whole row in
SDPA on the CPU (no variable-length kernel), so what the padding saves can be spent there: the ratio says which wins.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rounds import alternating, median_ratio  # noqa: E402 - bench/rounds.py, beside this script


def make_batches(n: int, batch_size: int):
    """(model, caption unit, [(padded text inputs, pixel inputs, image sizes)]): the tiny model and n three-task
    batches."""
    import numpy as np
    import torch

    from expblip.data.synthetic import synthetic_records
    from expblip.data.tasks import TasksConfig, TaskSpec, sample_text, task_vocabulary
    from expblip.model import qwen_vl
    from expblip.pixels import normalise_batch

    tasks = TasksConfig(describe=TaskSpec(1.0), aus=TaskSpec(1.0), emotion=TaskSpec(1.0))
    records = list(synthetic_records(n * batch_size, seed=0))
    texts = [sample_text(tasks, r["labels"], r["key"], 0, 0, r["captions"][0]) for r in records]
    torch.manual_seed(0)
    tokenizer = qwen_vl.tiny_tokenizer([c for r in records for c in r["captions"]] + task_vocabulary(tasks), 512)
    processor = qwen_vl.make_processor(tokenizer)
    model = qwen_vl.build_model(tokenizer)
    batches = []
    for b in range(n):
        part = slice(b * batch_size, (b + 1) * batch_size)
        pixels = torch.stack([torch.from_numpy(np.array(r["image"])).permute(2, 0, 1)
                              for r in records[part]])
        prompts, answers = zip(*texts[part], strict=True)
        text = qwen_vl.spec_text_inputs(processor, model.config, answers, prompts, 64)
        batches.append((text, qwen_vl.spec_pixel_inputs(model.config, normalise_batch(pixels)),
                        [tuple(p.shape[-2:]) for p in pixels]))
    return model, qwen_vl.CaptionUnit(model), batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pack-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from expblip.model.qwen_vl import pack_inputs

    torch.set_num_threads(args.threads)
    model, unit, batches = make_batches(args.batches, args.batch_size)
    packed_once = [pack_inputs(model, text, sizes, args.pack_tokens) for text, _, sizes in batches]
    slots = {"padded": sum(text["input_ids"].numel() for text, _, _ in batches) / len(batches),
             "packed": sum(b["input_ids"].numel() for b in packed_once) / len(batches)}
    tokens = sum(int(text["attention_mask"].sum()) for text, _, _ in batches) / len(batches)
    rows = sum(b["input_ids"].shape[0] for b in packed_once) / len(batches)
    print(f"per batch of {args.batch_size}: {tokens:.0f} tokens; padded {slots['padded']:.0f} token slots in "
          f"{args.batch_size} rows, packed {slots['packed']:.0f} in {rows:.1f} rows of at most {args.pack_tokens}")

    def timed(pack: bool):
        def run() -> float:
            start = time.perf_counter()
            for text, pixels, sizes in batches:
                model.zero_grad()
                unit(**(pack_inputs(model, text, sizes, args.pack_tokens) if pack else text), **pixels).backward()
            return time.perf_counter() - start
        return run

    timed(False)(), timed(True)()  # warm-up
    seconds = alternating({"padded": timed(False), "packed": timed(True)}, args.rounds)
    for r in range(args.rounds):
        print(f"round {r}: padded {seconds['padded'][r]:.2f} s, packed {seconds['packed'][r]:.2f} s")
    print("per-round ratios: " + " ".join(f"{p / q:.3f}" for p, q in zip(seconds["packed"], seconds["padded"],
                                                                           strict=True)))
    print(f"ratio: {median_ratio(seconds, 'packed', 'padded'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
