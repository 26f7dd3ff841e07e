"""The vocabulary tables and the rule-based captions built from them."""

import pytest

from expblip.data.captions import (
    NEUTRAL_CAPTION,
    NO_AU_CAPTION,
    CaptionConfig,
    au_caption,
    captions_for,
    concat_fusion,
    emotion_caption,
)
from expblip.data.facs import (
    AUS,
    DATASET_AUS,
    DATASET_EMOTIONS,
    EMOTION_PROTOTYPES,
    EMOTIONS,
    code_from_emotion,
    emotion_from_code,
    third_person,
    validate_aus,
)


def test_au_table_matches_the_paper():
    expected = [1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 43]
    assert sorted(AUS) == expected
    assert AUS[12].name == "lip corner puller" and AUS[12].verb == "pull lip corner"
    assert AUS[14].verb == "tighten lip corner" and AUS[43].verb == "close eyes"
    assert all(au.number == n for n, au in AUS.items())


@pytest.mark.parametrize(
    "base, third",
    [
        ("raise upper lip", "raises upper lip"),
        ("press lips", "presses lips"),
        ("stretch lips", "stretches lips"),
        ("close eyes", "closes eyes"),
        ("pucker lips", "puckers lips"),
        ("pull lips toward each other", "pulls lips toward each other"),
        ("depress lip corner", "depresses lip corner"),
        ("suck lips", "sucks lips"),
        ("drop jaw", "drops jaw"),
        ("wrinkle nose", "wrinkles nose"),
    ],
)
def test_third_person_conjugates_only_the_first_word(base, third):
    assert third_person(base) == third


def test_paper_example_caption_exactly():
    expected = "It is a people who raises upper lip, tightens lip corner, raises chin and presses lips."
    assert au_caption([24, 17, 10, 14]) == expected  # order of the input does not matter


def test_au_caption_single_and_empty():
    assert au_caption([6]) == "It is a people who raises cheek."
    assert au_caption([6, 12]) == "It is a people who raises cheek and pulls lip corner."
    assert au_caption([]) is None


def test_validate_aus_sorts_dedupes_and_names_unknown():
    assert validate_aus([12, 6, 12]) == [6, 12]
    with pytest.raises(ValueError, match=r"\[3\]"):
        validate_aus([1, 3])
    with pytest.raises(ValueError, match="unknown AU"):
        au_caption([99])


def test_emotion_codes_follow_each_dataset_order():
    assert EMOTIONS[0] == "neutral" and len(EMOTIONS) == 8
    assert [emotion_from_code("affectnet", c) for c in range(8)] == list(EMOTIONS)
    assert emotion_from_code("rafdb_basic", 1) == "surprise"  # RAF-DB codes start at 1
    assert emotion_from_code("rafdb_basic", 4) == "happiness"
    assert emotion_from_code("rafdb_basic", 7) == "neutral"
    assert code_from_emotion("rafdb_basic", "anger") == 6
    assert code_from_emotion("affectnet", "anger") == 6
    assert set(DATASET_EMOTIONS["synthetic"]) == set(EMOTIONS)


def test_unknown_emotion_code_names_dataset_and_code():
    with pytest.raises(ValueError, match=r"code 0 .*rafdb_basic.*1\.\.7"):
        emotion_from_code("rafdb_basic", 0)
    with pytest.raises(ValueError, match=r"code 8 .*affectnet"):
        emotion_from_code("affectnet", 8)
    with pytest.raises(ValueError, match="'ckplus'"):
        emotion_from_code("ckplus", 1)


def test_dataset_au_subsets():
    sizes = {"bp4d": 12, "disfa": 12, "disfa8": 8, "gft": 10, "raf_au": 13, "emotionet": 11, "synthetic": 12,
             "openface": 17, "pyfeat": 20}
    assert {k: len(v) for k, v in DATASET_AUS.items()} == sizes
    for aus in DATASET_AUS.values():
        assert list(aus) == validate_aus(aus)
    assert set(DATASET_AUS["disfa8"]) <= set(DATASET_AUS["disfa"])
    assert all(set(p) <= set(AUS) for p in EMOTION_PROTOTYPES.values())


def test_emotion_caption():
    assert emotion_caption(["happiness", "surprise"]) == "The face shows happiness and surprise."
    assert emotion_caption(["anger", "disgust", "fear"]) == "The face shows anger, disgust and fear."
    assert emotion_caption(["neutral"]) == NEUTRAL_CAPTION
    assert emotion_caption([]) is None


def test_no_au_caption_is_verbatim():
    assert NO_AU_CAPTION.startswith("The eyes may be open and looking straight ahead, with the mouth closed")
    assert NO_AU_CAPTION.endswith("The eyebrows may be in a natural position, not raised or furrowed.")
    assert "  " not in NO_AU_CAPTION


def test_concat_fusion():
    au, emo = au_caption([6, 12]), emotion_caption(["happiness"])
    assert concat_fusion(au, emo) == f"{au} {emo}"
    assert concat_fusion(None, emo) == emo and concat_fusion(au, None) == au
    with pytest.raises(ValueError):
        concat_fusion(None, None)


def test_captions_for_each_style():
    au_only = {"aus": [6, 12], "emotions": None}
    emo_only = {"aus": None, "emotions": ["happiness"]}
    blank = {"aus": [], "emotions": None}
    au_cfg, emo_cfg, cat_cfg = CaptionConfig("au"), CaptionConfig("emotion"), CaptionConfig("concat")
    assert captions_for(au_only, au_cfg) == [au_caption([6, 12])]
    assert captions_for(emo_only, au_cfg) == []  # no AU labels: nothing to say in AU style
    assert captions_for(blank, au_cfg) == [NO_AU_CAPTION]
    assert captions_for(blank, CaptionConfig("au", no_au_caption=False)) == []
    assert captions_for(au_only, emo_cfg) == []
    assert captions_for(emo_only, emo_cfg) == ["The face shows happiness."]
    both = {"aus": [6, 12], "emotions": ["happiness"]}
    assert captions_for(both, cat_cfg) == [f"{au_caption([6, 12])} The face shows happiness."]
    assert captions_for(emo_only, cat_cfg) == ["The face shows happiness."]


def test_caption_config_rejects_unknown_style():
    with pytest.raises(ValueError, match="style"):
        CaptionConfig(style="llm")  # type: ignore[arg-type]
