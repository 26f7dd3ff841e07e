"""What held-out shards are, as their manifest says (expblip.data.sources.convert records it), and the checks that
keep real-data numbers honest: which AUs to score, and whether shards may stand in a fold of a protocol.

    info = shard_info("shards/bp4d/fold1/test")   # ShardInfo(manifest=".../manifest.json", meta={...}, ...)
    key, why = resolve_aus("", "shards/bp4d/fold1/test")   # ("bp4d", "from the manifest: ... bp4d")
    check_fold_shards("shards/bp4d/fold1/test", "test", "bp4d", fold=1, folds=3)   # ValueError naming the fix

A manifest records ``source`` (the make_shards source: a dataset or ``synthetic``), ``split``, ``fold``/``folds``
and ``subsample`` (video datasets). Shards without a manifest, or whose ``source`` is not a make_shards source (the
pipeline's world and fused shards), name no dataset: their AUs default to the synthetic world's.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from expblip.data.shards import MANIFEST, absolute_url, join_url, parent_url, read_manifest, resolve_shards
from expblip.data.sources import SOURCES

# The AU sets (keys of expblip.data.facs.DATASET_AUS) that score a source's labels, the default first; each names
# only AUs the source labels. DISFA defaults to the field's usual 8 (as --protocol disfa-3fold); OpenFace and py-feat
# shards are scored on the AUs their tool writes. Emotion datasets label no AU, so no AU set contradicts them.
SOURCE_AU_SETS: dict[str, tuple[str, ...]] = {
    "synthetic": ("synthetic",), "bp4d": ("bp4d",), "disfa": ("disfa8", "disfa"), "gft": ("gft",),
    "raf_au": ("raf_au",), "emotionet": ("emotionet",), "openface": ("openface",), "pyfeat": ("pyfeat",),
}
# Your own labels (a table, a datasets folder) name AUs of no fixed set: any --aus fits them.
OWN_LABEL_SOURCES = ("table", "hf")
DEFAULT_AUS = "synthetic"  # shards that name no dataset: the embedded synthetic world


@dataclass(frozen=True)
class ShardInfo:
    """A shard spec's manifest: where it is, its meta, its shard names, and the names the spec selects."""

    manifest: str  # the manifest's URL
    meta: dict
    listed: tuple[str, ...]  # shard file names the manifest lists
    selected: tuple[str, ...]  # shard file names the spec names (a brace pattern may name fewer)

    @property
    def dataset(self) -> str | None:
        """The make_shards source the shards come from, or None when the manifest names none."""
        source = self.meta.get("source")
        return source if isinstance(source, str) and source in SOURCES else None


def _manifest_url(spec: str, urls: list[str]) -> str:
    """The manifest beside a shard spec: the spec itself (``…/manifest.json``), its directory, or the folder of
    the shards a brace pattern / ``.tar`` URL names."""
    if spec.endswith(".json"):
        return absolute_url(spec)
    if "{" in spec or spec.endswith((".tar", ".tar.gz", ".tgz")):
        return join_url(parent_url(urls[0]), MANIFEST)
    return join_url(absolute_url(spec), MANIFEST)


def shard_info(spec: str) -> ShardInfo | None:
    """The manifest of a shard spec, or None when there is none beside the shards."""
    urls, _ = resolve_shards(spec)
    url = _manifest_url(spec, urls)
    try:
        manifest = read_manifest(url)
    except (FileNotFoundError, ValueError):
        return None
    listed = tuple(posixpath.basename(s["url"]) for s in manifest["shards"])
    return ShardInfo(url, manifest.get("meta") or {}, listed, tuple(posixpath.basename(u) for u in urls))


# ---------------------------------------------------------------- which AUs are scored


def resolve_aus(aus: str, spec: str) -> tuple[str, str]:
    """(DATASET_AUS key, why): ``aus`` when given and consistent with the shards' dataset, else the dataset's own
    AU set from the manifest, else the synthetic world's. ValueError naming both when ``aus`` contradicts it."""
    info = shard_info(spec)
    dataset = info.dataset if info else None
    if dataset is None:
        return (aus, "--aus") if aus else (DEFAULT_AUS, f"{DEFAULT_AUS} (the shards' manifest names no dataset; "
                                                         "pass --aus to choose)")
    if dataset in OWN_LABEL_SOURCES:
        if aus:
            return aus, f"--aus ({info.manifest} says {dataset}: your own labels)"
        return DEFAULT_AUS, f"{info.manifest} says {dataset}: your own labels, of no fixed AU set; pass --aus to choose"
    allowed = SOURCE_AU_SETS.get(dataset)
    if allowed is None:  # an emotion dataset: no AU is labelled, none is scored
        return aus or DEFAULT_AUS, f"none scored ({info.manifest} says {dataset}, which labels no AU)"
    if aus and aus not in allowed:
        raise ValueError(f"--aus {aus} contradicts {info.manifest}: its shards come from {dataset}, whose labels "
                         f"the AU set(s) {', '.join(allowed)} score; drop --aus (the manifest decides) or pass "
                         f"--aus {allowed[0]}")
    if aus:
        return aus, f"--aus (consistent with {dataset} in {info.manifest})"
    return allowed[0], f"from the manifest: {info.manifest} says {dataset}"


# ---------------------------------------------------------------- shards standing in a protocol's fold


def remake_command(dataset: str, split: str, fold: int, folds: int) -> str:
    """The make_shards command that writes one fold's split as a protocol wants it."""
    every = " --no-subsample" if split == "test" else ""
    return (f"python launch/make_shards.py {dataset} --root ROOT --out DIR --split {split} --fold {fold} "
            f"--folds {folds}{every}")


def _required(spec: str, role: str, fold: int) -> ShardInfo:
    info = shard_info(spec)
    if info is None:
        raise ValueError(f"{role} {spec} of fold {fold} have no {MANIFEST} beside them: the protocol reads it to "
                         "know their dataset, split, fold and subsampling; make them with launch/make_shards.py")
    return info


def _fold_problem(meta: dict, split: str, dataset: str, fold: int, folds: int) -> str | None:
    """What a manifest's meta says that does not fit this fold's split (None when it fits), most basic first."""
    source = meta.get("source")
    if source != dataset:
        return f"says the shards come from {source!r}, not {dataset}"
    if meta.get("split") != split:
        return f"holds the {meta.get('split')!r} split, not the {split} split of fold {fold}"
    if (meta.get("fold"), meta.get("folds")) != (fold, folds):
        held = (f"fold {meta['fold']} of {meta.get('folds')}" if meta.get("fold") is not None
                else "no fold (made without --fold/--folds)")
        return f"holds {held}, not fold {fold} of {folds}"
    if split == "test" and meta.get("subsample") is not False:
        return (f"says subsample={meta.get('subsample')!r} (every 10th frame plus label changes), while the "
                "protocol scores every frame of the test split")
    return None


def check_fold_shards(spec: str, split: str, dataset: str, fold: int, folds: int, role: str = "--shards") -> None:
    """ValueError naming the manifest, what it says and the fix, unless ``spec`` holds ``split`` of fold ``fold``
    of ``folds`` of ``dataset`` (a test split: every frame, and every shard its manifest lists)."""
    info = _required(spec, role, fold)
    problem = _fold_problem(info.meta, split, dataset, fold, folds)
    if problem:
        raise ValueError(f"{role}: {info.manifest} {problem}; re-make them: "
                         f"{remake_command(dataset, split, fold, folds)}")
    if split == "test" and set(info.selected) != set(info.listed):
        raise ValueError(f"{role} {spec} names {len(set(info.selected))} of the {len(info.listed)} shards "
                         f"{info.manifest} lists; the protocol scores each fold's whole test split: pass the "
                         f"directory {parent_url(info.manifest)}")
