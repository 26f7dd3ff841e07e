"""Instruction data and Hugging Face datasets → shards: ``make_shards llava`` (LLaVA and ShareGPT JSON, JSON arrays
streamed, JSONL) and ``make_shards hf`` (save_to_disk, imagefolder, parquet), each fixture written as the format's
own documentation writes it, on a few 4-px images in tmp_path."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
from conftest import launch_module, tiny_image, write_text

from expblip.data.shards import MANIFEST, read_manifest, resolve_shards
from expblip.data.sources import records
from expblip.data.sources.llava import FormatError, strip_image_token
from expblip.data.tasks import TasksConfig, TaskSpec, sample_text

# LLaVA's layout, as https://github.com/haotian-liu/LLaVA/blob/main/docs/Finetune_Custom_Data.md shows it (2-space
# indent, "<image>\n" before the question; the doc's example has a trailing comma, which no JSON reader accepts)
LLAVA_JSON = """[
  {
    "id": "997bb945-628d-4724-b370-b84de974a19f",
    "image": "part-000001/997bb945-628d-4724-b370-b84de974a19f.jpg",
    "conversations": [
      {
        "from": "human",
        "value": "<image>\\nWhich action units are active on this face?"
      },
      {
        "from": "gpt",
        "value": "Cheek raiser and lip corner puller: a smile."
      }
    ]
  },
  {
    "id": "5f1c2e3a",
    "image": "part-000001/5f1c2e3a.jpg",
    "conversations": [
      {
        "from": "human",
        "value": "What emotion does this person show?\\n<image>"
      },
      {
        "from": "gpt",
        "value": "Surprise."
      },
      {
        "from": "human",
        "value": "Which AUs give it away?"
      },
      {
        "from": "gpt",
        "value": "AU1, AU2 and AU26."
      }
    ]
  }
]
"""

# ShareGPT as LLaMA-Factory reads it: https://github.com/hiyouga/LLaMA-Factory/blob/main/data/README.md ("sharegpt"
# format, the "messages" + "images" layout of its data/mllm_demo.json: content before role, 2-space indent)
SHAREGPT_JSON = """[
  {
    "messages": [
      {
        "content": "<image>Describe the facial expression.",
        "role": "user"
      },
      {
        "content": "The person smiles with raised cheeks.",
        "role": "assistant"
      }
    ],
    "images": [
      "mllm_demo_data/1.jpg"
    ]
  },
  {
    "messages": [
      {
        "content": "<image>Is this person happy?",
        "role": "user"
      },
      {
        "content": "No, they look sad.",
        "role": "assistant"
      }
    ],
    "images": [
      "mllm_demo_data/2.jpg"
    ]
  }
]
"""


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp_path with the images both fixtures name."""
    for i, name in enumerate(("part-000001/997bb945-628d-4724-b370-b84de974a19f.jpg", "part-000001/5f1c2e3a.jpg",
                              "mllm_demo_data/1.jpg", "mllm_demo_data/2.jpg")):
        tiny_image(tmp_path / name, shade=i)
    return tmp_path


def make_shards(argv: list[str]) -> int:
    return launch_module("make_shards").main(argv)


def shard_samples(out: Path) -> list[dict]:
    """The JSON members of every shard at ``out``, in order."""
    found = []
    for url in resolve_shards(str(out))[0]:
        with tarfile.open(url.removeprefix("file://")) as tar:
            found += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return found


def one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


# ---------------------------------------------------------------- llava: records


def test_llava_json_becomes_prompt_answer_records(images):
    path = write_text(images / "faces.json", LLAVA_JSON)
    recs = list(records("llava", json=str(path), max_skipped=0.0))
    assert [r["key"] for r in recs] == ["llava-997bb945-628d-4724-b370-b84de974a19f", "llava-5f1c2e3a",
                                        "llava-5f1c2e3a-2"]
    assert [(r["labels"]["prompt"], r["captions"]) for r in recs] == [
        ("Which action units are active on this face?", ["Cheek raiser and lip corner puller: a smile."]),
        ("What emotion does this person show?", ["Surprise."]),  # <image> after the question: removed too
        ("Which AUs give it away?", ["AU1, AU2 and AU26."])]
    assert recs[1]["image"] == recs[2]["image"] == (images / "part-000001/5f1c2e3a.jpg").read_bytes()
    assert recs[2]["labels"] == {"aus": None, "emotions": None, "dataset": "llava", "subject": None, "frame": None,
                                 "image": "part-000001/5f1c2e3a.jpg", "id": "5f1c2e3a", "turn": 2,
                                 "prompt": "Which AUs give it away?"}


def test_sharegpt_json_and_jsonl_give_the_same_records(images):
    array = write_text(images / "mllm.json", SHAREGPT_JSON)
    lines = write_text(images / "mllm.jsonl", "".join(json.dumps(r) + "\n" for r in json.loads(SHAREGPT_JSON)))
    from_array, from_lines = (list(records("llava", json=str(p), max_skipped=0.0)) for p in (array, lines))
    assert [(r["key"], r["labels"], r["captions"], r["image"]) for r in from_array] == \
        [(r["key"], r["labels"], r["captions"], r["image"]) for r in from_lines]
    assert [r["key"] for r in from_array] == ["llava-1", "llava-2"]  # no id: the record's number
    assert from_array[0]["labels"]["prompt"] == "Describe the facial expression."
    assert from_array[1]["captions"] == ["No, they look sad."]


def test_sharegpt_variants_read_alike(images):
    """LLaMA-Factory's default sharegpt tags (conversations from human/gpt + images, a system turn) and OpenAI-style
    content parts give the same exchange."""
    variants = [
        {"conversations": [{"from": "system", "value": "You are a FACS coder."},
                           {"from": "human", "value": "<image>Name the emotion."},
                           {"from": "gpt", "value": "Happiness."}], "images": ["mllm_demo_data/1.jpg"]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name the emotion."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Happiness."}]}],
         "images": ["mllm_demo_data/1.jpg"]},
    ]
    for i, item in enumerate(variants):
        path = write_text(images / f"v{i}.json", json.dumps([item]))
        (rec,) = records("llava", json=str(path), max_skipped=0.0)
        assert (rec["labels"]["prompt"], rec["captions"], rec["labels"]["image"]) == (
            "Name the emotion.", ["Happiness."], "mllm_demo_data/1.jpg")


def test_a_large_json_array_is_streamed_not_loaded(tmp_path):
    """A 5 MB array is read record by record: the peak of Python allocations stays far below the file's size."""
    import tracemalloc

    import ijson  # noqa: F401  (imported before tracing: a first import allocates too)

    from expblip.data.sources.llava import open_items

    record = json.loads(LLAVA_JSON)[0]
    path = tmp_path / "big.json"
    with open(path, "w") as f:  # json.dump's own layout for a list, one record after another
        f.write("[" + ", ".join(json.dumps({**record, "id": str(i)}) for i in range(20_000)) + "]")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _ in open_items(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 20_000 and size > 5_000_000 and peak < size / 5, (peak, size)  # json.load: ~5x the size


def test_the_image_token_is_removed_wherever_it_stands():
    assert strip_image_token("<image>\nWhat is shown?") == "What is shown?"
    assert strip_image_token("What is shown?\n<image>") == "What is shown?"
    assert strip_image_token("Look at <image> and answer.") == "Look at and answer."
    assert strip_image_token("<image>") == ""


def test_records_carry_their_own_prompt_into_training():
    tasks = TasksConfig()  # the paper's captioning: no instruction
    own = {"aus": None, "emotions": None, "prompt": "Which AUs are active?"}
    assert sample_text(tasks, own, "k", seed=0, step=3, caption="AU6 and AU12.") == ("Which AUs are active?",
                                                                                     "AU6 and AU12.")
    assert sample_text(tasks, {"aus": [12]}, "k", seed=0, step=3, caption="a smile") == ("", "a smile")
    aus_only = TasksConfig(describe=TaskSpec(0.0), aus=TaskSpec(1.0))  # a drawn task for the others
    assert sample_text(aus_only, {"aus": [12]}, "k", 0, 0, "c") == ("List the active action units.",
                                                                    "lip corner puller")
    assert sample_text(aus_only, own, "k", 0, 0, "AU6.") == ("Which AUs are active?", "AU6.")


def test_llava_shards_train_on_their_own_prompt(images):
    """Shards → the tokenizer's text (answers and prompts) → the loop's LM inputs: the record's instruction after the
    image tokens, masked; only the answer scored."""
    from types import SimpleNamespace

    from expblip.data.stream import StreamConfig, read_captions
    from expblip.model.tokenizer import train_caption_tokenizer
    from expblip.train.loop import model_inputs

    out = images / "shards"
    assert make_shards(["llava", "--json", str(write_text(images / "faces.json", LLAVA_JSON)), "--out", str(out)]) == 0
    samples = shard_samples(out)
    text = read_captions(StreamConfig(shards=str(out), lowercase=False))
    assert "Which AUs give it away?" in text and "AU1, AU2 and AU26." in text
    tokenizer = train_caption_tokenizer(text, 300)
    cfg = SimpleNamespace(train=SimpleNamespace(stage="lm", seed=0), tasks=TasksConfig(),
                          data=SimpleNamespace(max_text_tokens=32), model=SimpleNamespace(preset="tiny"))
    run = SimpleNamespace(cfg=cfg, tokenizer=tokenizer, blip2_config=SimpleNamespace(num_query_tokens=4),
                          engine=SimpleNamespace(device="cpu"), step=0)
    batch = {"labels": samples, "keys": [f"k{i}" for i in range(3)], "captions": [s["captions"][0] for s in samples]}
    inputs = model_inputs(run, batch)
    for i, sample in enumerate(samples):
        ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()]
        scored = inputs["labels"][i][inputs["labels"][i] != -100]
        assert tokenizer.decode(ids[4:]).startswith(f"</s>{sample['prompt']}{sample['captions'][0]}")
        assert tokenizer.decode(scored) == sample["captions"][0] + "\n"  # the answer and OPT's end token


def test_multi_turn_split_or_refused(images, capsys):
    path = write_text(images / "faces.json", LLAVA_JSON)
    out = images / "refused"
    assert make_shards(["llava", "--json", str(path), "--multi-turn", "refuse", "--out", str(out)]) == 2
    assert re.match(r"error: \S+faces.json record 2 \(id 5f1c2e3a\): 2 exchanges; pass --multi-turn split",
                    one_error(capsys))
    assert not (out / MANIFEST).exists()
    out = images / "split"
    assert make_shards(["llava", "--json", str(path), "--out", str(out)]) == 0  # split is the default
    samples = shard_samples(out)
    assert [(s["prompt"], s["captions"], s["turn"]) for s in samples] == [
        ("Which action units are active on this face?", ["Cheek raiser and lip corner puller: a smile."], 1),
        ("What emotion does this person show?", ["Surprise."], 1), ("Which AUs give it away?", ["AU1, AU2 and AU26."], 2)]
    manifest = read_manifest(str(out))
    assert manifest["total_samples"] == 3 and manifest["meta"]["multi_turn"] == "split"


def test_text_only_and_missing_images_are_counted(images, caplog):
    items = json.loads(LLAVA_JSON)
    items.append({"id": "text-only", "conversations": items[0]["conversations"]})  # a ShareGPT chat in a LLaVA mix
    items.append({"id": "gone", "image": "part-000001/gone.jpg", "conversations": items[0]["conversations"]})
    path = write_text(images / "mix.json", json.dumps(items))
    with caplog.at_level("INFO", logger="expblip.data.sources"):
        assert len(list(records("llava", json=str(path), max_skipped=0.5))) == 3
    assert "1 missing image, 1 no image (by rule)" in caplog.text
    out = images / "out"
    assert make_shards(["llava", "--json", str(path), "--out", str(out)]) == 2  # 1 of 4 bad > 1%
    assert not (out / MANIFEST).exists()
    assert make_shards(["llava", "--json", str(path), "--out", str(out), "--max-skipped", "0.5"]) == 0
    assert read_manifest(str(out))["total_samples"] == 3


def test_check_reads_llava_and_shows_prompts(images, capsys):
    path = write_text(images / "mllm.json", SHAREGPT_JSON)
    assert make_shards(["llava", "--json", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "check of llava (all rows, nothing written): 2 usable of 2 rows read" in out
    assert '"prompt": "Describe the facial expression."' in out and "caption='No, they look sad.'" in out
    assert not (images / "out").exists()


def test_two_workers_write_the_same_shards(images, tmp_path):
    saved = hf_faces(tmp_path / "hf")
    path = write_text(images / "faces.json", LLAVA_JSON)
    for source, given in (("llava", ["--json", str(path)]), ("hf", ["--dataset", str(saved)])):
        outs = [images / f"{source}{n}" for n in (1, 2)]
        for n, out in zip((1, 2), outs, strict=True):
            assert make_shards([source, *given, "--out", str(out), "--workers", str(n)]) == 0
        one, two = ((out / "shard-000000.tar").read_bytes() for out in outs)
        assert one == two, source


# ---------------------------------------------------------------- llava: refusals


@pytest.mark.parametrize("case, text, expected", [
    ("empty", "", r"error: llava: \S+empty.json is empty; expected a LLaVA JSON"),
    ("nofield", '[{"id": "a1", "image": "x.jpg", "conversation": []}]',
     r"error: \S+nofield.json record 1: no 'conversations' \(LLaVA\) or 'messages' \(ShareGPT\) list of turns, found "
     r"the keys \['conversation', 'id', 'image'\]"),
    ("noturnfield", '[{"id": "a1", "image": "x.jpg", "conversations": [{"from": "human"}]}]',
     r"error: \S+noturnfield.json record 1: turn 1 needs 'from' \(human/gpt\) and 'value'"),
    ("order", '[{"id": "a1", "image": "x.jpg", "conversations": [{"from": "human", "value": "q"}]}]',
     r"error: \S+order.json record 1: turns must alternate human/user then gpt/assistant, ending with an answer"),
    ("broken", '[{"id": "a1", "image": ', r"error: llava: \S+broken.json: broken JSON after record 0"),
    ("missing", None, r"error: llava: \S+missing.json does not exist; pass --json"),
    ("noimage", '[{"id": "a1", "image": "gone.jpg", "conversations": [{"from": "human", "value": "<image>q"}, '
     '{"from": "gpt", "value": "a"}]}]', r"error: llava: no samples to write .*gone.jpg \(missing image\)"),
])
def test_bad_llava_files_fail_with_one_line(images, capsys, case, text, expected):
    path = images / f"{case}.json"
    if text is not None:
        path.write_text(text)
    out = images / "out"
    assert make_shards(["llava", "--json", str(path), "--out", str(out)]) == 2
    assert re.match(expected, one_error(capsys))
    assert not (out / MANIFEST).exists()


def test_llava_options_belong_to_llava(images, capsys):
    with pytest.raises(SystemExit):
        make_shards(["llava", "--out", str(images / "out")])
    assert "the llava source needs --json FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_shards(["synthetic", "--json", "x.json", "--out", str(images / "out")])
    assert "--json and --multi-turn apply only to the llava source" in capsys.readouterr().err
    with pytest.raises(FormatError, match="turns must alternate"):
        list(records("llava", json=str(write_text(images / "o.jsonl", '{"messages": [{"role": "assistant", '
                                                                     '"content": "a"}], "images": ["x.jpg"]}\n'))))


# ---------------------------------------------------------------- hf


def hf_faces(tmp_path: Path) -> Path:
    """A datasets Dataset of three faces (Image column, ClassLabel 'label', AU lists) saved with save_to_disk, as
    https://huggingface.co/docs/datasets/process#save and the Image feature's docs describe."""
    from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value

    paths = [tmp_path / "src" / f"{n}.jpg" for n in "abc"]
    for i, path in enumerate(paths):
        tiny_image(path, shade=i)
    features = Features({"image": Image(), "label": ClassLabel(names=["angry", "happy", "sad"]),
                         "aus": Sequence(Value("int32")), "subject": Value("string")})
    ds = Dataset.from_dict({"image": [str(p) for p in paths], "label": [1, 2, 0], "aus": [[6, 12], [1, 4, 15], [4, 5]],
                            "subject": ["S1", "S1", "S2"]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_hf_save_to_disk_folder_converts_through_the_table_logic(tmp_path):
    saved = hf_faces(tmp_path)
    assert sorted(p.name for p in saved.iterdir())[-2:] == ["dataset_info.json", "state.json"]
    recs = list(records("hf", dataset=str(saved), max_skipped=0.0))
    assert [r["key"] for r in recs] == ["hf-a", "hf-b", "hf-c"]  # the image's name as the dataset stored it
    assert [(r["labels"]["aus"], r["labels"]["emotions"], r["labels"]["subject"]) for r in recs] == [
        ([6, 12], ["happiness"], "S1"), ([1, 4, 15], ["sadness"], "S1"), ([4, 5], ["anger"], "S2")]
    assert recs[0]["image"] == (tmp_path / "src/a.jpg").read_bytes()  # the bytes stored in the dataset
    assert recs[0]["captions"] and all(isinstance(c, str) for c in recs[0]["captions"])
    out = tmp_path / "out"
    assert make_shards(["hf", "--dataset", str(saved), "--out", str(out)]) == 0
    assert read_manifest(str(out))["total_samples"] == 3 and read_manifest(str(out))["meta"]["name"] == "hf"


def test_hf_imagefolder_and_parquet(tmp_path, monkeypatch):
    # imagefolder: https://huggingface.co/docs/datasets/image_dataset#imagefolder (metadata.jsonl with file_name)
    folder = tmp_path / "faces"
    for i, n in enumerate(("a", "b")):
        tiny_image(folder / "train" / f"{n}.jpg", shade=i)
    write_text(folder / "train" / "metadata.jsonl", '{"file_name": "a.jpg", "emotion": "happy", "text": "a smile"}\n'
               '{"file_name": "b.jpg", "emotion": "sad", "text": "a frown"}\n')
    monkeypatch.chdir(tmp_path)  # a relative --dataset: keys from the paths inside it all the same
    recs = list(records("hf", dataset="faces", max_skipped=0.0))
    assert [(r["key"], r["labels"]["emotions"], r["captions"]) for r in recs] == [
        ("hf-train_a", ["happiness"], ["a smile"]), ("hf-train_b", ["sadness"], ["a frown"])]
    # parquet with a column of image paths (relative to the file's folder), as datasets' to_parquet writes one
    from datasets import Dataset

    Dataset.from_dict({"file_name": ["train/a.jpg", "train/b.jpg"], "aus": ["1,2", "12"]}).to_parquet(
        str(folder / "labels.parquet"))
    recs = list(records("hf", dataset=str(folder / "labels.parquet"), max_skipped=0.0))
    assert [(r["key"], r["labels"]["aus"]) for r in recs] == [("hf-train_a", [1, 2]), ("hf-train_b", [12])]
    # parquet with the images inside, as the hub's parquet files hold an Image column ({"bytes", "path"} structs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [{"bytes": (folder / "train" / f"{n}.jpg").read_bytes(), "path": f"{n}.jpg"} for n in "ab"]
    pq.write_table(pa.table({"image": cells, "emotion": ["happy", "sad"]}), tmp_path / "embedded.parquet")
    recs = list(records("hf", dataset=str(tmp_path / "embedded.parquet"), max_skipped=0.0))
    assert [(r["key"], r["labels"]["emotions"], r["image"]) for r in recs] == [
        ("hf-a", ["happiness"], cells[0]["bytes"]), ("hf-b", ["sadness"], cells[1]["bytes"])]


def test_hf_check_counts_and_writes_nothing(tmp_path, capsys):
    saved = hf_faces(tmp_path)
    assert make_shards(["hf", "--dataset", str(saved), "--check", "2"]) == 0
    out = capsys.readouterr().out
    assert "check of hf (first 2 rows, nothing written): 2 usable of 2 rows read" in out
    assert 'key=hf-a labels={"aus": [6, 12], "dataset": "hf", "emotions": ["happiness"]' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "src"]


def test_hf_dataset_dict_splits(tmp_path):
    from datasets import DatasetDict, load_from_disk

    saved = hf_faces(tmp_path)
    ds = load_from_disk(str(saved))
    DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])}).save_to_disk(str(tmp_path / "dict"))
    train = list(records("hf", dataset=str(tmp_path / "dict"), split="train", max_skipped=0.0))
    test = list(records("hf", dataset=str(tmp_path / "dict"), split="test", max_skipped=0.0))
    assert [r["key"] for r in train] == ["hf-a", "hf-b"] and [r["key"] for r in test] == ["hf-c"]
    with pytest.raises(ValueError, match="has its own splits"):
        records("hf", dataset=str(tmp_path / "dict"), test_fraction=0.2)


@pytest.mark.parametrize("case, expected", [
    ("missing", r"error: hf: \S+nothing does not exist; pass --dataset with a datasets save_to_disk folder"),
    ("empty", r"error: hf: \S+empty cannot be read by datasets"),
    ("column", r"error: table \S+saved: no column 'expression' \(--emotion-column\); the columns are \['image', "
               r"'label', 'aus', 'subject'\]"),
    ("au99", r"error: \S+saved99 \[train\] row 1: AU 99 in column 'aus' is not an AU expblip knows"),
])
def test_bad_hf_datasets_fail_with_one_line(tmp_path, capsys, case, expected):
    extra: list[str] = []
    if case == "missing":
        path = tmp_path / "nothing"
    elif case == "empty":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        path = hf_faces(tmp_path)
        extra = ["--emotion-column", "expression"] if case == "column" else []
        if case == "au99":
            from datasets import load_from_disk

            path = tmp_path / "saved99"
            load_from_disk(str(tmp_path / "saved")).map(lambda r: {"aus": [1, 99]}).save_to_disk(str(path))
    out = tmp_path / "out"
    assert make_shards(["hf", "--dataset", str(path), "--out", str(out), *extra]) == 2
    assert re.match(expected, one_error(capsys))
    assert not (out / MANIFEST).exists()
