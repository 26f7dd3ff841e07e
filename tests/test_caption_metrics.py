"""Caption text metrics: our numbers are pycocoevalcap's own, best-over-references is the max, embeddings behave."""

from __future__ import annotations

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from expblip.eval import caption_metrics
from expblip.eval.caption_metrics import caption_scores, embedding_similarity, regex_tokenize

# A dozen hand-written hypotheses with one to three references each (mixed case and punctuation on purpose).
PREDICTIONS = {
    "a": "It is a people who raises cheek and pulls lip corner.",
    "b": "The face shows happiness.",
    "c": "It is a people who lowers brow, tightens lids and presses lips.",
    "d": "The eyebrows are raised and the jaw drops; the face shows surprise.",
    "e": "It is a people who wrinkles nose.",
    "f": "The mouth is slightly open.",
    "g": "It is a people who depresses lip corner and raises chin.",
    "h": "The face shows sadness and fear.",
    "i": "It is a people who stretches lips, separates lips and drops jaw.",
    "j": "A smiling face with raised cheeks.",
    "k": "The person frowns.",
    "l": "It is a people who closes eyes.",
}
REFERENCES = {
    "a": ["It is a people who raises cheek and pulls lip corner.", "The cheeks are raised and the person smiles."],
    "b": ["The face shows happiness.", "A happy face."],
    "c": ["It is a people who lowers brow, tightens lids, tightens lips and presses lips."],
    "d": ["It is a people who raises inner eyebrow, raises outer eyebrow, raises upper lid and drops jaw.",
          "The face shows surprise.", "Brows up, eyes wide, jaw dropped."],
    "e": ["It is a people who wrinkles nose and raises upper lip.", "The nose is wrinkled in disgust."],
    "f": ["The eyes may be open and looking straight ahead, with the mouth closed or slightly open."],
    "g": ["It is a people who raises inner eyebrow, lowers brow and depresses lip corner.", "A sad face."],
    "h": ["The face shows fear.", "The face shows sadness."],
    "i": ["It is a people who stretches lips and separates lips.", "Lips stretched and apart, jaw down."],
    "j": ["It is a people who raises cheek and pulls lip corner."],
    "k": ["It is a people who lowers brow.", "The brows are pulled down and together."],
    "l": ["The eyes are closed.", "It is a people who closes eyes."],
}


def _ptb(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


@pytest.fixture(scope="module")
def tokenized() -> tuple[dict, dict]:
    """(references, hypotheses) through pycocoevalcap's PTB tokenizer, as COCOEvalCap does it."""
    return _ptb(REFERENCES), _ptb({k: [p] for k, p in PREDICTIONS.items()})


@pytest.fixture(scope="module")
def ours_fast() -> dict:
    return caption_scores(PREDICTIONS, REFERENCES, meteor=False, embedding=False, per_image=True)


def test_bleu_rouge_cider_equal_pycocoevalcap(ours_fast, tokenized):
    gts, res = tokenized
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours_fast[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours_fast["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert ours_fast["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert ours_fast["tokenizer"] == "ptb" and ours_fast["images"] == 12 and ours_fast["references"] == 22
    assert ours_fast["meteor"] is None and "meteor" in ours_fast["skipped"]
    assert ours_fast["embedding_similarity"] is None and "embedding_similarity" in ours_fast["skipped"]


def test_rouge_best_over_references_is_the_max_of_single_reference_scores(ours_fast, tokenized):
    gts, res = tokenized
    rouge = Rouge()
    for key in PREDICTIONS:
        singles = [rouge.calc_score(res[key], [ref]) for ref in gts[key]]
        best = ours_fast["per_image"][key]["rouge_l_best"]
        assert best == pytest.approx(max(singles), abs=1e-12)
        assert best >= singles[0]  # never below the first (single) reference alone
    mean_best = sum(v["rouge_l_best"] for v in ours_fast["per_image"].values()) / 12
    assert ours_fast["rouge_l_best"] == pytest.approx(mean_best)
    assert ours_fast["per_image"]["a"]["rouge_l_best"] == pytest.approx(1.0)  # identical to a reference


def test_rouge_best_differs_from_coco_multi_reference_rouge():
    # COCO's ROUGE-L combines the best precision (short reference) and the best recall (long reference) into 1.0;
    # the paper's best over references scores each reference alone, so neither reaches 1.
    scores = caption_scores({"x": "brows up eyes wide"}, {"x": ["brows up", "brows up eyes wide jaw down mouth open"]},
                            meteor=False, embedding=False)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["rouge_l_best"] == pytest.approx(max(Rouge().calc_score(["brows up eyes wide"], [ref])
                                                       for ref in ["brows up", "brows up eyes wide jaw down mouth open"]))
    assert scores["rouge_l_best"] < 0.8


@pytest.mark.slow  # two METEOR JVMs (~7-20 s each, loading the paraphrase tables)
def test_meteor_equals_pycocoevalcap_corpus_and_best_over_references(tokenized):
    from pycocoevalcap.meteor.meteor import Meteor

    ours = caption_scores(PREDICTIONS, REFERENCES, embedding=False, per_image=True)
    gts, res = tokenized
    direct = Meteor()  # a JVM of its own: nothing shared with the scorer under test
    assert ours["meteor"] == pytest.approx(direct.compute_score(gts, res)[0], abs=1e-9)
    for key in PREDICTIONS:
        singles = [direct.compute_score({0: [ref]}, {0: res[key]})[0] for ref in gts[key]]
        assert ours["per_image"][key]["meteor_best"] == pytest.approx(max(singles), abs=1e-9)
        assert ours["per_image"][key]["meteor_best"] >= singles[0]
    mean_best = sum(v["meteor_best"] for v in ours["per_image"].values()) / 12
    assert ours["meteor_best"] == pytest.approx(mean_best)
    assert "meteor" not in ours["skipped"]


def test_caption_scores_embedding_similarity():
    ours = caption_scores(PREDICTIONS, REFERENCES, meteor=False, per_image=True)
    sims = [v["embedding_similarity"] for v in ours["per_image"].values()]
    assert ours["embedding_similarity"] == pytest.approx(sum(sims) / 12)
    assert ours["per_image"]["a"]["embedding_similarity"] == pytest.approx(1.0, abs=1e-5)  # equals a reference
    assert all(0.0 < s <= 1.0 for s in sims) and "all-MiniLM-L6-v2" in ours["embedding_model"]


def test_embedding_similarity_identical_related_unrelated():
    sims = embedding_similarity(
        {"same": "The face shows happiness.", "related": "The face shows happiness.",
         "unrelated": "The face shows happiness."},
        {"same": ["The face shows happiness."], "related": ["A smiling, happy person."],
         "unrelated": ["Quarterly revenue of the shipping company fell."]})
    assert sims["same"] == pytest.approx(1.0, abs=1e-5)
    assert sims["unrelated"] < sims["related"] < sims["same"]
    two_refs = embedding_similarity({"x": "A smiling, happy person."},
                                    {"x": ["Quarterly revenue fell.", "The face shows happiness."]})
    assert two_refs["x"] == pytest.approx(sims["related"], abs=1e-5)  # the max over references


def test_without_java_meteor_is_skipped_and_tokenizer_falls_back(monkeypatch):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    scores = caption_scores(PREDICTIONS, REFERENCES, embedding=False)
    assert scores["meteor"] is None and scores["meteor_best"] is None
    assert "java not found" in scores["skipped"]["meteor"] and scores["tokenizer"].startswith("regex")
    assert 0.0 < scores["bleu_4"] <= 1.0 and 0.0 < scores["rouge_l_best"] <= 1.0 and scores["cider"] > 0.0


def test_regex_tokenizer_approximates_ptb():
    assert regex_tokenize("It is a people who lowers brow, tightens lids.") == "it is a people who lowers brow tightens lids"
    assert regex_tokenize("Brows up; jaw DROPPED!") == "brows up jaw dropped"


def test_inputs_must_match():
    with pytest.raises(ValueError, match="one side only"):
        caption_scores({"a": "x"}, {"b": ["x"]}, meteor=False, embedding=False)
    with pytest.raises(ValueError, match="no reference caption for"):
        caption_scores({"a": "x"}, {"a": ["  "]}, meteor=False, embedding=False)
