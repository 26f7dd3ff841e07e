"""Read facial Action Units (AUs) and emotions out of free caption text.

Generated captions are scored by parsing them back into labels (EXPBLIP.md, evaluation point 3):
AU numbers by regex, phrases by the tables below, negated clauses dropped. FACS names and the emotion
vocabulary come from the one AU table, ``expblip.data.facs``; the verb forms and paraphrases below add the
many ways a caption can say the same thing.

Parsing policy:
1. Recognised: AU numbers ("AU12", "AU 12", "AUs 1 and 2", "AU1+2", "action unit 4"), FACS names
   ("lip corner puller"), the paper's verb forms in any inflection and voice ("raises inner eyebrow",
   "raised inner brows", "inner brows are raised", "inner brow raise") and paraphrases ("smile" -> 12,
   "frown" -> 4, "parted lips" -> 25, "mouth wide open" -> 26, "raised eyebrows" with no inner/outer -> 1+2).
   A verb shared by two objects joined with "and"/"or" reaches both ("raised cheeks and lip corners" -> 6, 12).
2. Negation drops a clause: a cue (not, no, never, neither, nor, without, n't, lack(s/ing), absence of,
   free of, none) removes the text up to the next punctuation mark or clause word (and, but, with,
   while, whereas, although, though, yet, however, instead, rather). "or" does not end the scope,
   so "not raised or furrowed" and "neither A nor B" drop both.
3. Hedges count as present: "may be", "slightly", "possibly", "a little" do not weaken a mention, and
   "either A or B" counts A and B. Left/right/unilateral mentions count the AU ("raises left lip corner" -> 12).
4. Resting alternatives assert nothing: "closed or slightly open" / "open or closed" are removed before
   matching, so the paper's fixed no-AU caption ("The eyes may be open ... mouth closed or slightly open
   in a relaxed position ... not raised or furrowed.") parses to no AU.
5. Not mapped on purpose: forehead wrinkles (AU1, AU2 or AU4 - ambiguous), "pursed lips" (AU18, AU23 or
   AU24), a bare "pout", "smirk". Negation only reaches forward ("a smile is absent" still reads as a smile),
   and "neutral position/state" is not the neutral emotion.
"""

from __future__ import annotations

import re

from expblip.data.facs import AUS, EMOTIONS

# ---------------------------------------------------------------------------------------------------------------------
# Text clean-up: canonical spellings first, then resting alternatives and negated clauses are blanked with " | " so
# that no phrase pattern can bridge the gap.
# ---------------------------------------------------------------------------------------------------------------------

_DET = r"(?:(?:the|his|her|their|its|one's|a)\s+)?"
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"[\u2018\u2019`]"), "'"),
    (re.compile(r"(?<=\w)[-\u2010\u2011\u2013](?=\w)"), " "),  # wide-open -> wide open, lip-corner -> lip corner
    (re.compile(r"\beye\s+(brows?|lids?)\b"), r"eye\1"),
    (re.compile(rf"\bcorners?\s+of\s+{_DET}(?:mouth|lips?)\b"), "lip corners"),
    (re.compile(r"\bmouth\s+corners?\b"), "lip corners"),
    (re.compile(rf"\b(inner|outer)\s+(?:parts?|corners?|ends?|sections?)\s+of\s+{_DET}((?:eye)?brows?)\b"), r"\1 \2"),
    (re.compile(r"\s+"), " "),
]
_RESTING = re.compile(
    r"\b(?:closed|shut)\s+or\s+(?:slightly\s+|partly\s+|partially\s+|a\s+little\s+)?(?:open|opened|parted|apart)\b"
    r"|\b(?:open|parted)\s+or\s+(?:closed|shut)\b"
)
_NEG_CUE = r"(?:\b(?:not|no|never|neither|nor|without|none|cannot|lacks?|lacking|absence\s+of|free\s+of)\b|n't\b)"
_CLAUSE_END = r"(?:[,;:.!?()\[\]]|\b(?:and|but|with|while|whereas|although|though|yet|however|instead|rather)\b|$)"
_NEGATED = re.compile(rf"{_NEG_CUE}.*?(?={_CLAUSE_END})")


def clean(text: str) -> str:
    """Lower-case, canonicalise spellings, and blank resting alternatives and negated clauses."""
    text = text.lower()
    for pattern, repl in _REWRITES:
        text = pattern.sub(repl, text)
    text = _RESTING.sub(" | ", text)
    return _NEGATED.sub(" | ", text)


# ---------------------------------------------------------------------------------------------------------------------
# Phrase building blocks. _FILL sits between a verb and its object ("raises [the left] lip corner"), _LINK between an
# object and a trailing verb ("lips [are slightly] parted", "brow raise").
# ---------------------------------------------------------------------------------------------------------------------

_FILL = (
    r"(?:\s+(?:the|a|an|his|her|their|its|both|one|each|left\s+and\s+right|left|right|slightly|somewhat|strongly"
    r"|a\s+bit|a\s+little|of|up|upward|upwards|\w+'s)){0,4}?\s+"
)
_LINK = (
    r"(?:\s+(?:is|are|was|were|be|being|been|appear|appears|seem|seems|look|looks|get|gets|become|becomes|may|might"
    r"|can|could|will|slightly|somewhat|a\s+bit|a\s+little|partly|partially|strongly|tightly|firmly|visibly"
    r"|noticeably|clearly|both|also|all|unilaterally|asymmetrically)){0,5}?\s+"
)
_AND_BEFORE = rf"(?:\w+\s+){{0,2}}?\w+,?\s+(?:and|or)\s+{_DET}"  # "cheeks and " in "raised cheeks and lip corners"
_AND_AFTER = rf",?\s+(?:and|or)\s+{_DET}(?:\w+\s+)?\w+"  # " and lip corners" in "cheeks and lip corners raised"
# A trailing verb followed by a face part starts a new clause: "... lip corner and depresses lower lip" is no AU15.
_NO_OBJECT = r"(?!\s+(?:upper\s+|lower\s+)?(?:lips?|jaw|(?:eye)?lids?|(?:eye)?brows?|cheeks?|chin|nose|mouth|neck)\b)"
_IRREGULAR = {
    "drop": ["drop", "drops", "dropped", "dropping"],
    "knit": ["knit", "knits", "knitted", "knitting"],
    "shut": ["shut", "shuts", "shutting"],
    "stick": ["stick", "sticks", "sticking", "stuck"],
    "thin": ["thin", "thins", "thinned", "thinning"],
}


def _inflect(base: str) -> list[str]:
    """All inflections of a regular English verb: raise -> raise, raises, raised, raising."""
    if base in _IRREGULAR:
        return _IRREGULAR[base]
    if base.endswith("e"):
        return [base, base + "s", base + "d", base[:-1] + "ing"]
    if base.endswith(("s", "sh", "ch", "x", "z")):
        return [base, base + "es", base + "ed", base + "ing"]
    return [base, base + "s", base + "ed", base + "ing"]


def _verb(*bases: str) -> str:
    """A regex alternation over every inflection of the given verbs, longest first."""
    forms = sorted({form for base in bases for form in _inflect(base)}, key=len, reverse=True)
    return "(?:" + "|".join(forms) + ")"


def _acts(verbs: tuple[str, ...], obj: str) -> list[str]:
    """Verb-object patterns in both orders: "raises the cheeks"/"raised cheeks" and "cheeks raised"/"cheek raise".

    A verb shared by two coordinated objects reaches both: "raised cheeks and lip corners", "cheeks and lip
    corners raised".
    """
    v = _verb(*verbs)
    return [rf"\b{v}{_FILL}(?:{_AND_BEFORE})?{obj}", rf"\b{obj}(?:{_AND_AFTER})?{_LINK}{v}\b{_NO_OBJECT}"]


_BROW = r"(?:eye)?brows?\b"
_INNER_BROW = rf"inner(?:\s+and\s+outer)?\s+{_BROW}"
_OUTER_BROW = rf"(?:inner\s+and\s+)?outer\s+{_BROW}"
_PLAIN_BROW = rf"(?<!inner\s)(?<!outer\s){_BROW}"  # neither inner nor outer named: both move
_ANY_BROW = rf"(?:(?:inner|outer)\s+)?{_BROW}"
_LIP_CORNER = r"lip\s+corners?\b"
_LIPS = r"(?<!upper\s)(?<!lower\s)lips?\b(?!\s+corners?)"  # "tighten lips" (23) is not "tighten lip corner" (14)
_UPPER_LIP = r"upper\s+lip\b(?!\s+corners?)"
_LOWER_LIP = r"lower\s+lip\b"
_UPPER_LID = r"upper\s+(?:eye)?lids?\b"
_LIDS = r"(?:(?:upper|lower)\s+)?(?:eye)?lids?\b"
_EYES = r"(?:eyes?|eyelids?)\b"
_JAW = r"(?:lower\s+)?jaw\b"
_NOT_DOWN = r"(?!\s+(?:\w+\s+)?down(?:ward|wards)?\b)"
_UP = r"\s+up(?:ward|wards)?\b"
_DOWN = r"\s+down(?:ward|wards)?\b"
_PULL_UP = _verb("pull", "raise", "lift", "draw")

# (AUs, patterns). A pattern may name several AUs: "raised eyebrows" with no inner/outer means AU1 and AU2.
_AU_PHRASES: list[tuple[tuple[int, ...], list[str]]] = [
    ((1,), _acts(("raise", "lift"), _INNER_BROW)),
    ((2,), _acts(("raise", "lift"), _OUTER_BROW)),
    ((1, 2), _acts(("raise", "lift", "arch"), _PLAIN_BROW)),
    (
        (4,),
        [
            *_acts(("lower", "furrow", "knit"), _ANY_BROW),
            r"\bfrown(?:s|ed|ing)?\b",
            r"\bscowl(?:s|ed|ing)?\b",
            rf"\b{_ANY_BROW}{_LINK}(?:\w+\s+and\s+)?(?:drawn|pulled|knitted|pushed)\s+(?:together|down)\b",
            rf"\b{_verb('draw', 'pull', 'knit')}{_FILL}{_ANY_BROW}\s+(?:together|down)\b",
        ],
    ),
    (
        (5,),
        [
            *_acts(("raise", "lift"), _UPPER_LID),
            r"\bwiden(?:s|ed|ing)?(?:\s+open)?\s+eyes\b",
            rf"\bwiden(?:s|ed|ing)?{_FILL}eyes\b",
            r"\bwide(?:\s+open)?\s+eyes\b",
            rf"\beyes{_LINK}wide",
            r"\bwide\s+eyed\b",
        ],
    ),
    ((6,), _acts(("raise", "lift"), r"cheeks?\b")),
    ((7,), [*_acts(("tighten",), _LIDS), *_acts(("narrow",), _EYES), r"\bsquint(?:s|ed|ing)?\b"]),
    ((8,), [r"\blips?\s+(?:\w+\s+){0,2}?towards?\s+each\s+other\b"]),
    ((9,), [*_acts(("wrinkle", "scrunch", "crinkle"), r"nose\b")]),
    ((10,), _acts(("raise", "lift", "curl"), _UPPER_LIP)),
    (
        (11,),
        [
            *_acts(("deepen",), r"nasolabial(?:\s+(?:folds?|furrows?|lines?|creases?))?\b"),
            r"\bdeep(?:er)?\s+nasolabial\b",
        ],
    ),
    (
        (12,),
        [
            rf"\b{_PULL_UP}{_FILL}(?:{_AND_BEFORE})?{_LIP_CORNER}{_NOT_DOWN}",
            rf"\b{_LIP_CORNER}(?:{_AND_AFTER})?{_LINK}{_PULL_UP}\b{_NOT_DOWN}",
            rf"\bturn(?:s|ed|ing)?{_FILL}{_LIP_CORNER}{_UP}",
            rf"\b{_LIP_CORNER}{_LINK}turn(?:s|ed|ing)?{_UP}",
            rf"\bupturned\s+{_LIP_CORNER}",
            r"\bsmil(?:e|es|ed|ing)\b",
            r"\bgrin(?:s|ned|ning)?\b",
        ],
    ),
    ((14,), [*_acts(("tighten",), _LIP_CORNER), r"\bdimpl(?:e|es|ed|er|ing)\b"]),
    (
        (15,),
        [
            *_acts(("depress", "lower"), _LIP_CORNER),
            rf"\b{_verb('pull', 'turn', 'draw')}{_FILL}{_LIP_CORNER}{_DOWN}",
            rf"\b{_LIP_CORNER}{_LINK}{_verb('pull', 'turn', 'draw')}{_DOWN}",
            rf"\b(?:downturned|down\s+turned|turned\s+down)\s+(?:{_LIP_CORNER}|mouth\b)",
        ],
    ),
    (
        (16,),
        [
            *_acts(("depress", "lower"), _LOWER_LIP),
            rf"\b{_verb('pull', 'draw')}{_FILL}{_LOWER_LIP}{_DOWN}",
            rf"\b{_LOWER_LIP}{_LINK}{_verb('pull', 'draw')}{_DOWN}",
        ],
    ),
    (
        (17,),
        [
            *_acts(("raise", "lift"), r"chin(?:\s+boss)?\b"),
            r"\bchin{_LINK}(?:pushed|pulled)\s+up\b",
            r"\bwrinkled\s+chin\b",
        ],
    ),
    ((18,), [r"\bpucker(?:s|ed|ing|er)?\b"]),
    (
        (19,),
        [
            r"\btongue\s+(?:\w+\s+){0,2}?out\b",
            rf"\b{_verb('stick', 'put', 'poke')}\s+out\s+{_DET}tongue\b",
            r"\btongue\s+show(?:s|n|ing)?\b",
            rf"\b{_verb('show')}{_FILL}tongue\b",
            r"\bprotruding\s+tongue\b",
        ],
    ),
    ((20,), _acts(("stretch",), _LIPS)),
    ((21,), [*_acts(("tighten", "tense"), r"neck\b"), r"\btense\s+neck\b"]),
    ((22,), [r"\bfunnel(?:l)?(?:s|ed|ing|er)?\b"]),
    ((23,), [*_acts(("tighten",), _LIPS), rf"\btight\s+{_LIPS}", rf"\b{_LIPS}{_LINK}tight\b"]),
    ((24,), _acts(("press", "compress"), _LIPS)),
    (
        (25,),
        [
            *_acts(("separate", "part"), _LIPS),
            rf"\b{_LIPS}{_LINK}apart\b",
            rf"\bmouth{_LINK}(?:open|opened|parted|ajar)\b(?!\s+wide)",
            r"\bparted\s+mouth\b",
            rf"\b(?<!wide\s)open(?:s|ed|ing)?{_FILL}mouth\b(?!\s+wide)",
        ],
    ),
    (
        (26,),
        [
            *_acts(("drop",), _JAW),
            rf"\blower(?:s|ed|ing){_FILL}{_JAW}",
            rf"\b{_JAW}{_LINK}lowered\b",
            rf"\bmouth{_LINK}(?:wide\s+open|open(?:ed)?\s+wide|agape|gaping)\b",
            r"\b(?:wide\s+open|gaping)\s+mouth\b",
            rf"\bopen(?:s|ed|ing)?{_FILL}mouth\s+wide\b",
            rf"\b{_JAW}{_LINK}(?:hanging|hangs|hung)\s+open\b",
        ],
    ),
    ((27,), _acts(("stretch",), r"mouth\b")),
    ((28,), [*_acts(("suck",), _LIPS), rf"\bsuck(?:s|ed|ing)?\s+in\s+{_DET}lips\b"]),
    ((43,), _acts(("close", "shut"), _EYES)),
]

def _name_pattern(name: str) -> str:
    r"""FACS name to regex: inner brow raiser -> \binner\s+(?:eye)?brow\s+raisers?\b."""
    return r"\b" + r"\s+".join(name.split()).replace("brow", "(?:eye)?brow") + r"s?\b"


_AU_RULES: list[tuple[tuple[int, ...], re.Pattern[str]]] = [
    (aus, re.compile("|".join(f"(?:{p})" for p in patterns))) for aus, patterns in _AU_PHRASES
] + [((number,), re.compile(_name_pattern(au.name))) for number, au in AUS.items()]

# "AU12", "au 12", "AUs 1 and 2", "AU1+2", "action units 6, 12", RAF-AU side prefixes "AU L12", intensity "AU12B".
_AU_NUMBERS = re.compile(
    r"\b(?:aus?|action\s+units?)\s*[lrtb]?\d+(?:\s*(?:\+|,|/|&|and|or)\s*(?:(?:aus?|action\s+units?)\s*)?[lrtb]?\d+)*"
)
_DIGITS = re.compile(r"\d+")

_EMOTION_WORDS = {
    "neutral": r"neutral(?:ity)?(?!\s+(?:position|state|posture|resting))|expressionless|impassive"
    r"|blank\s+expression|poker\s+face",
    "happiness": r"happiness|happy|happily|joy|joyful|joyous|glad|cheerful|delighted|pleased|amused|amusement|elated",
    "sadness": r"sadness|sad|sadly|sorrow|sorrowful|unhappy|unhappiness|grief|grieving|melancholy|dejected|gloomy",
    "surprise": r"surprise|surprised|astonished|astonishment|amazed|amazement|shocked|shock|startled",
    "fear": r"fear|fearful|fearfully|afraid|scared|frightened|fright|terrified|terror|anxious|anxiety|horrified",
    "disgust": r"disgust|disgusted|revulsion|repulsed|revolted|distaste",
    "anger": r"anger|angry|angrily|rage|furious|fury|irritated|irritation|annoyed|annoyance|hostile|hostility",
    "contempt": r"contempt|contemptuous|scorn|scornful|disdain|disdainful|sneer|sneers|sneering",
}
if set(_EMOTION_WORDS) != set(EMOTIONS):  # the vocabulary lives in expblip.data.facs; this table only adds words
    raise ImportError(f"parse.py's emotion words {sorted(_EMOTION_WORDS)} differ from facs.EMOTIONS {sorted(EMOTIONS)}")
_EMOTIONS: dict[str, re.Pattern[str]] = {
    name: re.compile(rf"\b(?:{_EMOTION_WORDS[name]})\b") for name in EMOTIONS
}


def _au_numbers(text: str) -> set[int]:
    """AU numbers written out in (already cleaned) text."""
    return {int(d) for match in _AU_NUMBERS.finditer(text) for d in _DIGITS.findall(match.group())}


def parse_aus(text: str) -> set[int]:
    """The AUs a caption asserts: numbers, FACS names, verb forms and paraphrases, minus negated clauses."""
    cleaned = clean(text)
    found = _au_numbers(cleaned)
    for aus, pattern in _AU_RULES:
        if pattern.search(cleaned):
            found.update(aus)
    return found


def parse_emotions(text: str) -> set[str]:
    """The canonical emotion names (see EMOTIONS) a caption asserts, minus negated clauses."""
    cleaned = clean(text)
    return {name for name, pattern in _EMOTIONS.items() if pattern.search(cleaned)}


def parse_caption(text: str) -> dict[str, list]:
    """{"aus": sorted AU numbers, "emotions": sorted emotion names} read from one caption."""
    return {"aus": sorted(parse_aus(text)), "emotions": sorted(parse_emotions(text))}
