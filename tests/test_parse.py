"""Caption text -> AUs and emotions: a written table of captions and the labels they must parse to."""

import random

import pytest

from expblip.data.captions import au_caption
from expblip.data.facs import AUS, EMOTIONS, third_person
from expblip.infer.parse import parse_aus, parse_caption, parse_emotions

NO_AU_CAPTION = (
    "The eyes may be open and looking straight ahead, with the mouth closed or slightly open in a relaxed position. "
    "The forehead may be relatively smooth with minimal wrinkles or creases. "
    "The eyebrows may be in a natural position, not raised or furrowed."
)

# (caption, AUs, emotions)
CASES: list[tuple[str, set[int], set[str]]] = [
    # The paper's own captions.
    (
        "It is a people who raises upper lip, tightens lip corner, raises chin and presses lips.",
        {10, 14, 17, 24},
        set(),
    ),
    (
        "The face shows the outer eyebrows raised, forehead wrinkles, a wrinkled nose, a stretched lip, "
        "and either parted lips or a dropped jaw.",
        {2, 9, 20, 25, 26},
        set(),
    ),
    (NO_AU_CAPTION, set(), set()),
    ("The face shows happiness and surprise.", set(), {"happiness", "surprise"}),
    # AU numbers.
    ("AU12 and AU 6 are active.", {6, 12}, set()),
    ("au12", {12}, set()),
    ("AUs 1 and 2 are present", {1, 2}, set()),
    ("AU1+2+4", {1, 2, 4}, set()),
    ("Action units 6, 12 and 25.", {6, 12, 25}, set()),
    ("AU L12 with AU25", {12, 25}, set()),
    ("There is no AU12 but AU4.", {4}, set()),
    # FACS names.
    ("A lip corner puller and a cheek raiser.", {6, 12}, set()),
    ("Brow lowerer, jaw drop.", {4, 26}, set()),
    ("inner eyebrow raiser and outer brow raiser", {1, 2}, set()),
    ("nose wrinkler, upper lip raiser, lower lip depressor", {9, 10, 16}, set()),
    ("Dimpler, lip tightener and lip pressor.", {14, 23, 24}, set()),
    # The paper's verb forms, inflected.
    ("It is a people who raises inner eyebrow.", {1}, set()),
    ("She is raising the inner eyebrows.", {1}, set()),
    ("raised inner brows", {1}, set()),
    ("The inner brows are raised.", {1}, set()),
    ("He pulls lip corner and raises cheek.", {6, 12}, set()),
    ("The person drops jaw and separates lips.", {25, 26}, set()),
    ("closes eyes", {43}, set()),
    ("It is a people who lowers brow, tightens lids and wrinkles nose.", {4, 7, 9}, set()),
    ("deepens nasolabial, depresses lip corner, depresses lower lip", {11, 15, 16}, set()),
    ("puckers lips, sticks tongue out, tightens neck", {18, 19, 21}, set()),
    ("shows lip funneler, sucks lips, stretches mouth", {22, 27, 28}, set()),
    ("pulls lips toward each other", {8}, set()),
    ("raises upper lid", {5}, set()),
    # Paraphrases.
    ("A broad smile.", {12}, set()),
    ("She is smiling warmly and looks happy.", {12}, {"happiness"}),
    ("A frown and a furrowed brow.", {4}, set()),
    ("The brows are drawn together.", {4}, set()),
    ("The inner corners of the eyebrows are raised and drawn together.", {1, 4}, set()),
    ("A wrinkled nose.", {9}, set()),
    ("The mouth is slightly open.", {25}, set()),
    ("Parted lips.", {25}, set()),
    ("The lips are slightly apart.", {25}, set()),
    ("The jaw dropped and the mouth is wide open.", {26}, set()),
    ("A wide-open mouth.", {26}, set()),
    ("Eyes closed.", {43}, set()),
    ("With closed eyes.", {43}, set()),
    ("Wide eyes.", {5}, set()),
    ("The eyes are widened.", {5}, set()),
    ("The corners of the mouth turned down.", {15}, set()),
    ("He pulls the lip corners down.", {15}, set()),
    ("Stretched lips.", {20}, set()),
    ("Raised cheeks and narrowed eyes.", {6, 7}, set()),
    ("Raised eyebrows.", {1, 2}, set()),
    ("The inner and outer eyebrows are raised.", {1, 2}, set()),
    ("The corners of the lips are pulled up.", {12}, set()),
    ("The lips are pressed tightly together.", {24}, set()),
    ("The tongue is sticking out.", {19}, set()),
    # Negations.
    ("The person does not raise the brows.", set(), set()),
    ("No smile.", set(), set()),
    ("Without parted lips.", set(), set()),
    ("The brows are not furrowed.", set(), set()),
    ("Neither a smile nor a frown.", set(), set()),
    ("The lips are not pressed, and the cheeks are raised.", {6}, set()),
    ("She doesn't smile but frowns.", {4}, set()),
    ("The mouth is not open.", set(), set()),
    # Hedges.
    ("The lips may be slightly parted.", {25}, set()),
    ("Possibly a slight smile.", {12}, set()),
    ("The upper lip may be raised slightly.", {10}, set()),
    ("Either pressed lips or tightened lips.", {23, 24}, set()),
    # Left / right / unilateral.
    ("raises left lip corner", {12}, set()),
    ("The right lip corner is pulled up unilaterally.", {12}, set()),
    ("tightens the left lip corner", {14}, set()),
    # Collisions.
    ("tightens lips", {23}, set()),
    ("tightens lip corners", {14}, set()),
    ("stretches lips", {20}, set()),
    ("stretches mouth", {27}, set()),
    ("raises upper lip", {10}, set()),
    ("raises upper lids", {5}, set()),
    ("depresses lip corners", {15}, set()),
    ("depresses lower lip", {16}, set()),
    ("It is a people who tightens lip corner and depresses lower lip.", {14, 16}, set()),
    ("lowered brows and a lowered lower lip", {4, 16}, set()),
    ("The lower jaw is relaxed.", set(), set()),
    # A verb shared by coordinated objects.
    ("The raised cheeks and lip corners indicate happiness.", {6, 12}, {"happiness"}),
    ("The cheeks and the lip corners are raised.", {6, 12}, set()),
    ("Raised brows and lip corners pulled down.", {1, 2, 15}, set()),
    # Emotions.
    ("The face shows a neutral expression.", set(), {"neutral"}),
    ("The brows rest in a neutral position.", set(), set()),
    ("He looks happy and full of joy.", set(), {"happiness"}),
    ("She seems sad.", set(), {"sadness"}),
    ("A surprised, slightly afraid face.", set(), {"surprise", "fear"}),
    ("scared and fearful", set(), {"fear"}),
    ("The person appears disgusted.", set(), {"disgust"}),
    ("An angry face with lowered brows.", {4}, {"anger"}),
    ("A contemptuous sneer.", set(), {"contempt"}),
    ("Happily surprised.", set(), {"happiness", "surprise"}),
    ("The face is not happy but sad.", set(), {"sadness"}),
    ("She looks unhappy.", set(), {"sadness"}),
    ("Neither angry nor disgusted.", set(), set()),
    (
        "The raised cheeks and pulled lip corners suggest happiness, while the dropped jaw signals surprise.",
        {6, 12, 26},
        {"happiness", "surprise"},
    ),
]


@pytest.mark.parametrize(("caption", "aus", "emotions"), CASES, ids=[c[0][:40] for c in CASES])
def test_caption_parses(caption: str, aus: set[int], emotions: set[str]) -> None:
    assert parse_aus(caption) == aus
    assert parse_emotions(caption) == emotions


def test_parse_caption_returns_sorted_lists() -> None:
    parsed = parse_caption("AU25, AU4 and AU12; the person looks surprised and happy.")
    assert parsed == {"aus": [4, 12, 25], "emotions": ["happiness", "surprise"]}


def test_canonical_emotion_names() -> None:
    assert EMOTIONS == ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
    for name in EMOTIONS:
        assert parse_emotions(f"The face shows {name}.") == {name}


# The AU table lives once, in expblip.data.facs; the parser must read every row of it back out of text.
AU_TABLE = [(n, au.name, au.verb) for n, au in AUS.items()]


@pytest.mark.parametrize(("au", "name", "verb_form"), AU_TABLE, ids=[str(row[0]) for row in AU_TABLE])
def test_every_au_by_name_verb_and_number(au: int, name: str, verb_form: str) -> None:
    assert parse_aus(f"A {name}.") == {au}
    assert parse_aus(f"It is a people who {third_person(verb_form)}.") == {au}
    assert parse_aus(f"It is a people who does not {verb_form}.") == set()
    assert parse_aus(f"AU{au}") == {au}


def _rule_caption(rows: list[tuple[int, str, str]]) -> str:
    """The paper's rule caption for these AU table rows, as the caption synthesis writes it."""
    return au_caption([au for au, _, _ in rows])


def test_rule_caption_of_all_aus_parses_back() -> None:
    assert parse_aus(_rule_caption(AU_TABLE)) == {au for au, _, _ in AU_TABLE}


def test_random_rule_captions_parse_back() -> None:
    rng = random.Random(0)
    for _ in range(500):
        rows = sorted(rng.sample(AU_TABLE, rng.randint(1, 8)))
        assert parse_aus(_rule_caption(rows)) == {au for au, _, _ in rows}, _rule_caption(rows)
