"""The field's subject-exclusive folds for BP4D and DISFA, and the paper's reconstructable test split.

AU detection on BP4D (12 AUs) and DISFA (8 AUs) is reported as per-AU F1 under subject-exclusive 3-fold
cross-validation, averaged over the folds. Nearly every paper since JAA-Net uses the same three subject lists
("parts"); they are copied here, in the published order, from:

* JAA-Net (Shao et al., ECCV 2018): ``ZhiwenShao/PyTorch-JAANet`` ``data/list/BP4D_part{1,2,3}_path.txt`` and
  ``DISFA_part{1,2,3}_path.txt`` (frame lists whose subject folders, in order, are the lists below);
* ME-GraphAU (Luo et al., IJCAI 2022): ``CVI-SZU/ME-GraphAU`` ``tool/BP4D_image_label_process.py`` and
  ``tool/DISFA_image_label_process.py`` (the same parts, as ``BP4D_Sequence_split`` and ``part1..3``).

Fold numbering follows ME-GraphAU's ``--fold`` (its comment: "fold1: train part1+part2 test part3; fold2: train
part1+part3 test part2; fold3: train part2+part3 test part1"): fold K tests part 4-K. Fold 1 of BP4D therefore
tests JAA-Net's part 3 — 13 subjects, 45,809 frames in JAA-Net's list — which is the paper's BP4D test set
(EXPBLIP.md: 45,805 images of 13 subjects; the only 13-subject part). DISFA's paper test set (14,535 images = 3
subjects x 4,845 frames) names no subjects and cannot be reconstructed.

For other datasets, or another number of folds, :func:`fold_test_subjects` partitions the subjects with a seeded
hash rule (expblip's own, not a published protocol).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from expblip.data.sources._common import _rank, test_subject_set

log = logging.getLogger("expblip.data.sources")

BP4D_PARTS: tuple[tuple[str, ...], ...] = (
    ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016", "M014", "F023", "M008"),
    ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020", "F011", "M013", "M005"),
    ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017", "M015", "F014"),
)
DISFA_PARTS: tuple[tuple[str, ...], ...] = (
    ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
    ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
    ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
)
PUBLISHED_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {"bp4d": BP4D_PARTS, "disfa": DISFA_PARTS}
SOURCES_CITED = "JAA-Net (PyTorch-JAANet data/list/*_part*_path.txt) and ME-GraphAU (tool/*_image_label_process.py)"

# The paper's own test subjects where they can be reconstructed (see the module docstring).
PAPER_TEST_SUBJECTS: dict[str, tuple[str, ...]] = {"bp4d": BP4D_PARTS[2]}
PAPER_SPLIT_NOTES: dict[str, str] = {
    "disfa": "the paper's DISFA test set (14,535 images = 3 subjects x 4,845 frames) names no subjects",
    "gft": "the paper's GFT split (4,034 test images) names no subjects",
}


def published_fold(dataset: str, fold: int) -> tuple[str, ...]:
    """The test subjects of ME-GraphAU's fold ``fold`` (1-3): part 4 - fold."""
    return PUBLISHED_PARTS[dataset][3 - fold]


def _check(dataset: str, fold: int, folds: int) -> None:
    if folds < 2 or not 1 <= fold <= folds:
        raise ValueError(f"{dataset}: --fold must be in 1..--folds and --folds >= 2, got fold {fold} of {folds}")


def fold_test_subjects(dataset: str, fold: int, folds: int, subjects: Iterable[str], seed: int = 0) -> set[str]:
    """The test subjects of fold ``fold`` of ``folds`` among ``subjects`` (the dataset's, as found on disk).

    BP4D and DISFA with 3 folds: the published parts; a subject on disk that no part lists is an error, a listed
    subject missing on disk is logged (a partial copy). Otherwise: subjects ranked by sha256(f"{seed}:{subject}")
    and dealt round-robin, rank i to fold i % folds + 1.
    """
    _check(dataset, fold, folds)
    subjects = sorted(set(subjects))
    if dataset in PUBLISHED_PARTS and folds == 3:
        listed = {s for part in PUBLISHED_PARTS[dataset] for s in part}
        unknown = sorted(set(subjects) - listed)
        if unknown:
            raise ValueError(f"{dataset}: subject(s) {unknown} are in no published fold ({SOURCES_CITED}); "
                             "remove them or use --test-subjects")
        missing = sorted(listed - set(subjects))
        if missing:
            log.warning("%s: %d subject(s) of the published folds are not in this copy: %s", dataset, len(missing),
                        ", ".join(missing))
        return set(published_fold(dataset, fold)) & set(subjects)
    ranked = sorted(subjects, key=lambda s: _rank(seed, s))
    return {s for i, s in enumerate(ranked) if i % folds == fold - 1}


def paper_test_subjects(dataset: str) -> tuple[str, ...]:
    """The paper's test subjects of ``dataset``; ValueError saying why when they cannot be reconstructed."""
    if dataset in PAPER_TEST_SUBJECTS:
        return PAPER_TEST_SUBJECTS[dataset]
    why = PAPER_SPLIT_NOTES.get(dataset, f"{dataset} has no subject split to reconstruct")
    raise ValueError(f"--paper-split: {why}; pass --test-subjects or --fold/--folds instead (docs/datasets.md)")


def choose_test_subjects(dataset: str, subjects: Iterable[str], test_fraction: float, seed: int,
                         test_subjects: str | Iterable[str] | None, fold: int | None = None,
                         folds: int | None = None) -> set[str]:
    """A video dataset's test subjects: fold ``fold`` of ``folds``, an explicit list, or the subject-split rule."""
    if fold is None and folds is None:
        return test_subject_set(dataset, subjects, test_fraction, seed, test_subjects)
    if fold is None or folds is None:
        raise ValueError(f"{dataset}: --fold and --folds go together (e.g. --fold 1 --folds 3)")
    if test_subjects is not None:
        raise ValueError(f"{dataset}: pass either --test-subjects or --fold/--folds, not both")
    return fold_test_subjects(dataset, fold, folds, subjects, seed)
