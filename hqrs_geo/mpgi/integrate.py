"""Stage 2 of MpGI: the integration prompt, and turning the LLM's answer into clean captions.

The LLM is asked for one detailed caption and N short ones. Whatever it returns, the output
is checked before it reaches the layer:

* training text only: sentences giving coordinates, the ground size, the pixel size or
  resolution, or a date are dropped (they are context for the LLM, not a description of the
  tile), and so is praise or boilerplate (the phrases in ``checks.toml``);
* instruction text echoed back is removed (sentences that occur in the prompt's own
  instructions, markers such as ``DETAILED:``);
* no invented counts: a sentence with a number that occurs in none of the content facts and
  descriptions is dropped (the numbers of metadata facts, coordinates and sizes, count for none:
  "a length of 78 meters" is not licensed by "covers about 78 m by 78 m");
* nothing the facts contradict: a sentence naming a vector layer the facts say is absent
  from the tile (``There are no buildings``) is dropped unless it is itself a negation;
* nothing the sources do not support: a sentence naming a visual object or land-cover term of
  the lexicon in ``checks.toml`` whose group (the term and its synonyms) occurs in none of the
  facts and descriptions is dropped (``names airplanes, which no source mentions``);
* length limits in words; duplicates (exact or near: token Jaccard >= 0.8) removed, also a
  sentence of the detailed caption that repeats one before it: only its words (an answer cut
  off by the token limit: "The image is a straight") or a paraphrase (most of its content words
  said before and no new object or cover kind; :func:`repeats`);
* when the LLM gives fewer captions than asked, the rest is filled with distinct sentences
  from the ``fill`` texts (the descriptions and the content facts: never metadata), and the
  record says how many were filled; a short caption repeats the detailed one only when the
  sources hold no other usable sentence (a tile never ends up without a short caption while
  there is content to draw on).

:func:`sentence_issue` is the same check for one sentence (benchmarks count with it).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import tomllib  # as recipe.py: Python 3.11+

from ..models.prompts import SCENE_CLASSES, class_phrases

NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
WORD = re.compile(r"[a-z0-9]+")
NEGATION = re.compile(r"\b(no|not|none|without|absent|lacks?)\b", re.IGNORECASE)
MARKERS = re.compile(r"^\s*(detailed( caption)?|short( captions?)?|captions?|summary)\s*:\s*", re.IGNORECASE)
BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
CHECKS_FILE = Path(__file__).with_name("checks.toml")

_UNIT = r"(?:m|km|metres?|meters?|kilometres?|kilometers?|ft|feet|miles?)"
_MONTH = (r"(?:january|february|march|april|may|june|july|august|september|october|november|december"
          r"|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)\.?")
# (reason, pattern): metadata a caption must not state, checked in this order
METADATA = (
    ("gives coordinates", re.compile(
        r"\d\s*°|\b(?:latitude|longitude|coordinates?|lat/lon)\b|\b\d{1,3}\.\d{3,}\s*[NSEW]\b", re.IGNORECASE)),
    ("states the ground size", re.compile(
        rf"\d[\d.,]*[\s-]*{_UNIT}?[\s-]*(?:by|x|×)[\s-]*\d[\d.,]*[\s-]*{_UNIT}\b|\bof ground\b"
        rf"|\b(?:image|tile|scene|picture|photo|it)\s+(?:covers|spans|measures|extends over)\b[^.]*?\d[\d.,]*\s*"
        rf"(?:{_UNIT}|ha|hectares?|acres?|square|km²|m²)\b|\b(?:ground|tile|image) (?:size|extent|footprint)\b",
        re.IGNORECASE)),
    ("states the pixel size", re.compile(
        r"\bper pixel\b|\bpixel (?:size|spacing)\b|\bresolution\b|\bground sample distance\b|\bgsd\b"
        r"|\b(?:cm|m)\s*/\s*px\b|\d\s*(?:px|pixels)\b", re.IGNORECASE)),
    ("gives a date", re.compile(
        rf"\b(?:19|20)\d\d[-/.]\d\d?[-/.]\d\d?\b|\b\d\d?[-/.]\d\d?[-/.](?:19|20)\d\d\b"
        rf"|\b{_MONTH}\s+(?:\d\d?(?:st|nd|rd|th)?,?\s+)?(?:19|20)\d\d\b|\b\d\d?(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}"
        rf"\s+(?:19|20)\d\d\b|\b(?:acquired|taken|captured|recorded|photographed|imaged)\s+(?:on|in)\b"
        rf"|\bin (?:the year )?(?:19|20)\d\d\b", re.IGNORECASE)),
)


@dataclass
class Captions:
    """The final captions of one tile and how they were obtained."""

    detailed: str
    short: list[str]
    dropped: list[str] = field(default_factory=list)  # sentences removed by the checks, with the reason
    filled: int = 0  # captions taken from the sources because the LLM gave too few
    verified: list[str] = field(default_factory=list)  # facts the detailed caption states that a check confirms
    detailed_filled: bool = False  # the detailed caption was taken from the sources (the LLM gave none)


def integration_prompt(template: str, facts: Sequence[str], descriptions: Sequence[tuple[str, str]], n_short: int,
                       max_words_detailed: int, max_words_short: int) -> str:
    """The stage-2 prompt: facts one per line, descriptions labelled by their source."""
    facts_text = "\n".join(f"- {f}" for f in facts) or "- (none)"
    described = "\n".join(f"[{source}] {text.strip()}" for source, text in descriptions if text.strip()) or "(none)"
    return template.format(facts=facts_text, descriptions=described, n_short=n_short,
                           max_words_detailed=max_words_detailed, max_words_short=max_words_short)


def sentences(text: str) -> list[str]:
    """Split text into sentences (on . ! ? followed by space, and on line breaks)."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p and p.strip()]


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _norm(text: str) -> str:
    return " ".join(_words(text))


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in NUMBER.findall(text)}


def _limit(text: str, max_words: int) -> str:
    words = text.split()
    if len(words) <= max_words:
        return text
    return " ".join(words[:max_words]).rstrip(",;:") + "."


def _near_duplicate(a: str, b: str) -> bool:
    wa, wb = set(_words(a)), set(_words(b))
    if not wa or not wb:
        return False
    return len(wa & wb) / len(wa | wb) >= 0.8


#: Words that carry no content of their own for the repeat check (function words, the caption
#: habits "the image is", "there are", "on one side", counts and colours' helpers).
FUNCTION_WORDS = frozenset("""
a an the and or but of in on at to from by with without into onto over under near next beside along across
through around between among above below behind front is are was were be been being it its this that these
those there here which who what where while as also very much many some several few lot lots plenty number
one two both each other another side part parts image picture scene view photo area areas can see seen
shows show showing looks look like appears appear kind sort type large small big little
""".split())


def content_words(text: str) -> set[str]:
    """The content words of ``text`` (lower case, without :data:`FUNCTION_WORDS`, a plural ``s``
    dropped): what the repeat check compares."""
    words = set()
    for word in _words(text):
        if word in FUNCTION_WORDS or word.isdigit():
            continue
        words.add(word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word)
    return words


#: Share of a sentence's content words already said before at which it counts as a repeat.
REPEAT_OVERLAP = 0.5


def repeats(sentence: str, earlier: Sequence[str] | str, data: CheckData | None = None) -> bool:
    """``sentence`` says nothing the ``earlier`` sentences did not: a near duplicate of one of them,
    a fragment (only their words), or a paraphrase: at least :data:`REPEAT_OVERLAP` of its content
    words (:func:`content_words`) said before, no number they do not state and no object or cover
    kind of the lexicon (``checks.toml``) that they do not name. "It is a river with black water and a road on one
    side of the river." repeats "The image is a river with black water and a road on one bank of
    the river."; "Cars are parked near a row of trees." does not repeat "Cars are parked in the
    parking lot." (trees are new)."""
    texts = [earlier] if isinstance(earlier, str) else list(earlier)
    if not texts:
        return False
    words = set(_words(sentence))
    if any(_near_duplicate(sentence, e) or bool(words) and words <= set(_words(e)) for e in texts):
        return True
    if _numbers(sentence) - set().union(*(_numbers(e) for e in texts)):
        return False  # a new quantity is news
    mine = content_words(sentence)
    if not mine:
        return True
    said = set().union(*(content_words(e) for e in texts))
    if len(mine & said) / len(mine) < REPEAT_OVERLAP:
        return False
    groups = {g for e in texts for _, g in lexicon_terms(e, data)}
    return all(g in groups for _, g in lexicon_terms(sentence, data))


def _repeats(sentence: str, earlier: str) -> bool:
    """``sentence`` says nothing ``earlier`` did not (see :func:`repeats`)."""
    return repeats(sentence, earlier)


def _metadata_reason(sentence: str) -> str:
    """The :data:`METADATA` reason ``sentence`` matches first ("" when none)."""
    for reason, pattern in METADATA:
        if pattern.search(sentence):
            return reason
    return ""


def _singular(label: str) -> str:
    return label[:-1] if label.endswith("s") else label


def _term_pattern(term: str) -> str:
    """Regex for a lexicon term as whole words, its last word singular or plural."""
    words = term.lower().split()
    last = re.escape(words[-1])
    if len(words[-1]) > 2 and words[-1].endswith("y") and words[-1][-2] not in "aeiou":
        last = re.escape(words[-1][:-1]) + r"(?:y|ies)"
    else:
        last += r"(?:s|es)?"
    return r"\b" + r"[\s-]+".join([re.escape(w) for w in words[:-1]] + [last]) + r"\b"


@dataclass(frozen=True)
class CheckData:
    """The data of the checks (``checks.toml``): boilerplate phrases and the lexicon of visual terms."""

    boilerplate: re.Pattern
    terms: tuple[tuple[str, str, re.Pattern], ...]  # (term, group, pattern), longest terms first


@cache
def check_data(path: str | None = None) -> CheckData:
    """Load ``checks.toml`` (or another file of the same shape) once."""
    with open(path or CHECKS_FILE, "rb") as f:
        data = tomllib.load(f)
    phrases = sorted(data["boilerplate"]["phrases"], key=len, reverse=True)
    boilerplate = re.compile("|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in phrases), re.IGNORECASE)
    terms = [(str(term).lower(), group) for group, members in data["lexicon"].items() for term in members]
    terms.sort(key=lambda t: (-len(t[0].split()), -len(t[0])))  # "parking lot" before "lot", "car park" before "car"
    return CheckData(boilerplate, tuple((t, g, re.compile(_term_pattern(t), re.IGNORECASE)) for t, g in terms))


def lexicon_terms(text: str, data: CheckData | None = None) -> list[tuple[str, str]]:
    """The ``(words as written, group)`` of every lexicon term named in ``text``, in text order;
    words taken by a longer term ("tennis court") are not counted again ("court")."""
    data = data or check_data()
    rest, found = text, []
    for _, group, pattern in data.terms:
        for match in pattern.finditer(rest):
            found.append((match.start(), match.group(0).lower(), group))
        rest = pattern.sub(lambda m: " " * len(m.group(0)), rest)
    return [(words, group) for _, words, group in sorted(found)]


class Checker:
    """The checks every candidate sentence goes through (see the module docstring).

    ``sources`` are the texts the captions may draw on (fact sentences and descriptions): they
    bound the numbers and the lexicon terms a sentence may use; ``absent`` are the vector layer
    labels the facts say have no feature in the tile (named only in a negation).
    """

    def __init__(self, prompt_instructions: str, sources: Sequence[str], absent: Sequence[str],
                 data: CheckData | None = None):
        self.data = data or check_data()
        self.instructions = _norm(prompt_instructions)
        # numbers of metadata sentences (coordinates, ground size...) license no number in a caption
        content = [s for text in sources for s in sentences(text) if not _metadata_reason(s)]
        self.allowed_numbers = set().union(*(_numbers(s) for s in content)) if content else set()
        self.absent = [a.lower() for a in absent]
        self.supported = {group for text in [*sources, *absent] for _, group in lexicon_terms(text, self.data)}

    def problem(self, sentence: str) -> str:
        """Why ``sentence`` must go ("" when it may stay)."""
        norm = _norm(sentence)
        if not norm:
            return "empty"
        if len(norm) > 12 and norm in self.instructions:
            return "echoes the prompt"
        reason = _metadata_reason(sentence)
        if reason:
            return reason
        praise = self.data.boilerplate.search(sentence)
        if praise:
            return f"praise or boilerplate ({praise.group(0).lower()!r})"
        invented = _numbers(sentence) - self.allowed_numbers
        if invented:
            return f"number {sorted(invented)[0]} is in no source"
        if not NEGATION.search(sentence):
            for label in self.absent:
                if re.search(rf"\b({re.escape(label)}|{re.escape(_singular(label))})\b", sentence, re.IGNORECASE):
                    return f"mentions {label}, which the facts say are absent"
        for words, group in lexicon_terms(sentence, self.data):
            if group not in self.supported:
                return f"names {words}, which no source mentions"
        return ""


def sentence_issue(sentence: str, sources: Sequence[str] = (), absent: Sequence[str] = (),
                   prompt_instructions: str = "") -> str:
    """Why the checks of :func:`clean_captions` would drop ``sentence`` ("" when it may stay).

    ``sources``: the facts and descriptions the caption may draw on; ``absent``: vector layer labels
    with no feature in the tile; ``prompt_instructions``: the prompt text an answer must not echo.
    Reasons, in the order checked: ``echoes the prompt``, ``gives coordinates``, ``states the ground
    size``, ``states the pixel size``, ``gives a date``, ``praise or boilerplate ('...')``, ``number N
    is in no source``, ``mentions X, which the facts say are absent``, ``names X, which no source mentions``.
    """
    return Checker(prompt_instructions, sources, absent).problem(sentence)


def issue_category(reason: str) -> str:
    """A reason of :func:`sentence_issue` without its particulars (for counting): ``names airplanes,
    which no source mentions`` -> ``unsupported content``; ``""`` -> ``clean``."""
    if not reason:
        return "clean"
    for prefix, category in (("names ", "unsupported content"), ("number ", "invented number"),
                             ("mentions ", "contradicts the facts"), ("praise", "praise or boilerplate")):
        if reason.startswith(prefix):
            return category
    return reason


def _candidates(answer: str) -> tuple[list[str], list[str]]:
    """(detailed-part lines, bullet lines) of an LLM answer."""
    detailed, bullets = [], []
    for line in answer.splitlines():
        line = MARKERS.sub("", line).strip()
        if not line:
            continue
        if BULLET.match(line):
            bullets.append(BULLET.sub("", line).strip())
        elif not bullets:
            detailed.append(line)
        else:
            bullets.append(line)  # a continuation after the list: treat as one more caption
    return detailed, bullets


def clean_captions(answer: str, prompt_instructions: str, sources: Sequence[str], absent: Sequence[str],
                   n_short: int, max_words_detailed: int, max_words_short: int,
                   fill: Sequence[str] | None = None) -> Captions:
    """Parse and check an LLM answer into :class:`Captions` (see the module docstring).

    ``sources`` (all fact sentences and descriptions) bound what a caption may say; ``fill`` are the
    texts missing captions are taken from (default: ``sources``): pass the descriptions and the
    content facts only, so metadata never becomes a caption.
    """
    checker = Checker(prompt_instructions, sources, absent)
    dropped: list[str] = []

    def keep(sentence: str) -> bool:
        reason = checker.problem(sentence)
        if reason:
            dropped.append(f"{sentence} ({reason})")
        return not reason

    detailed_lines, bullets = _candidates(answer)
    detailed_sents: list[str] = []
    for s in (s for line in detailed_lines for s in sentences(line)):
        if not keep(s):
            continue
        if repeats(s, detailed_sents, checker.data):
            dropped.append(f"{s} (repeats an earlier sentence)")
        else:
            detailed_sents.append(s)
    detailed = _limit(" ".join(detailed_sents), max_words_detailed)
    short: list[str] = []
    for line in bullets:
        kept = [s for s in sentences(line) if keep(s)]
        candidate = _limit(" ".join(kept), max_words_short)
        if candidate and not any(_near_duplicate(candidate, s) for s in short + [detailed]):
            short.append(candidate)
    filled = 0
    pool = [s for text in (sources if fill is None else fill) for s in sentences(text)]
    if not detailed:
        chosen: list[str] = []
        for s in pool:
            if not checker.problem(s) and not any(_near_duplicate(s, c) for c in chosen):
                chosen.append(s)
            if len(" ".join(chosen).split()) >= max_words_detailed // 2:
                break
        detailed = _limit(" ".join(chosen), max_words_detailed)
        filled += 1 if detailed else 0
        detailed_filled = bool(detailed)
    else:
        detailed_filled = False
    for s in pool:
        if len(short) >= n_short:
            break
        candidate = _limit(s, max_words_short)
        if checker.problem(candidate) or any(_near_duplicate(candidate, c) for c in short + [detailed]):
            continue
        short.append(candidate)
        filled += 1
    if not short and n_short > 0:
        # the only content there is went into the filled detailed caption: repeat it rather than
        # leave the tile without a short caption
        usable = [c for c in (_limit(s, max_words_short) for s in pool) if not checker.problem(c)]
        if usable:
            short.append(usable[0])
            filled += 1
    return Captions(detailed=detailed, short=short[:n_short], dropped=dropped, filled=filled,
                    detailed_filled=detailed_filled)


# --------------------------------------------------------------------------- composing the detailed caption

#: What the detailed caption may hold after its lead sentence (``[output] detailed`` lists them in
#: the order wanted): ``class`` the zero-shot class when the lead does not name it; ``vectors`` the
#: vector-layer facts; ``cover`` the cover shares (NDVI/NDWI or RGB estimates) of at least
#: ``min_cover``; ``llm`` the integrating LLM's sentences that add something. A sentence that would
#: take the caption over its word limit is left out whole (later, shorter ones may still fit).
DETAILED_PARTS = ("class", "vectors", "cover", "llm")


def _article_free(phrase: str) -> str:
    return re.sub(r"^(?:a|an|the)\s+", "", phrase.strip().lower())


def _singular_phrase(phrase: str) -> str:
    """``phrase`` with its last word singular when it is a plain plural ("storage tanks" -> "storage
    tank"; "grass" and "bus" stay); :func:`_term_pattern` then matches both numbers."""
    head, _, last = phrase.rpartition(" ")
    if len(last) > 3 and last.endswith("s") and not last.endswith(("ss", "us", "is")):
        last = last[:-3] + "y" if last.endswith("ies") else last[:-1]
    return f"{head} {last}".strip()


@cache
def _class_pattern(label: str) -> re.Pattern:
    """Whole-word pattern of a class's name and synonyms (last word singular or plural)."""
    names = {_article_free(p) for p in class_phrases([label])[0]}
    names |= {_singular_phrase(p) for p in names}  # "storage tanks" is named by "a small storage tank"
    names |= {re.sub(r"(?<=[a-z])(our|or)\b", lambda m: "or" if m.group(1) == "our" else "our", p) for p in names}
    return re.compile("|".join(_term_pattern(p) for p in sorted(names, key=len, reverse=True) if p), re.IGNORECASE)


def names_class(text: str, label: str) -> bool:
    """Whether ``text`` names the scene class ``label`` (its name or a synonym of
    :data:`hqrs_geo.models.prompts.CLASS_SYNONYMS`, without articles, in British or American
    spelling of -our / -or words; plural allowed)."""
    return bool(_class_pattern(label).search(text))


def brief_cover(kind: str, share: float, source: str | None) -> str:
    """A cover share in as few words as it can be said (the fact a detailed caption gets when it
    states none: each word costs a short caption its precision): ``12% vegetation.``, ``40% open
    water.`` (RGB estimate), ``40% water.`` (NDWI). How it was measured stays in the tile's
    ``verified`` record, which names the full fact sentence."""
    noun = "vegetation" if kind == "vegetation" else "open water" if str(source).startswith("rgb") else "water"
    return f"{share * 100:.0f}% {noun}."


def brief_class(label: str, probability: float) -> str:
    """A zero-shot class in as few words as it can be said, as the detailed caption states it
    (``river (90%).``): the fact sentence of :func:`class_sentence` is what the LLM and the
    sources table get. On 42 unseen UCM val images the brief form scored 2.8 CIDEr points above
    the sentence (docs/mpgi.md)."""
    return f"{label} ({probability * 100:.0f}%)."


def class_sentence(label: str, probability: float) -> str:
    """The sentence stating a zero-shot class and its calibrated probability."""
    return f"Zero-shot scene class: {label} ({probability * 100:.0f}% probability)."


def rival_class(text: str, label: str, labels: Sequence[str] = SCENE_CLASSES) -> str | None:
    """The first class of ``labels`` other than ``label`` that ``text`` names (see
    :func:`names_class`), or None. On UCM val, a zero-shot class the caption model contradicts
    this way was right 60 % of the time (p >= 0.5), against 85 % when the caption names no class
    (docs/mpgi.md): a contradicted class is no checked fact."""
    def related(other: str) -> bool:  # "dense residential" is no rival of "residential", nor the reverse
        return names_class(label, other) or names_class(other, label)

    return next((other for other in labels if other != label and names_class(text, other) and not related(other)),
                None)


@dataclass
class Perspectives:
    """What the offline perspectives say about one tile besides the LLM.

    ``candidates``: the caption model's captions, its decoding's caption first, then the other
    candidates by consensus; ``classes``: ``(label, calibrated probability)`` of the zero-shot
    classes, most probable first; ``cover`` / ``vectors``: the content fact sentences of the
    cover shares (with the share) and of the vector layers; ``water``: the water share;
    ``brief``: ``(brief text, share, fact sentence)`` of the cover shares in a few words
    (:func:`brief_cover`), used for the one fact a caption gets when it states none (the fact
    sentence, with how the share was measured, goes to the ``verified`` record); ``consensus``: the
    candidate the caption model's decodings agree on most (the pool's consensus pick), the lead
    when no class or water guides the choice and no ``judged`` candidate is given; ``labels``:
    the zero-shot label set (default :data:`~hqrs_geo.models.prompts.SCENE_CLASSES`), for telling
    when the lead names another class;
    ``shares``: ``kind -> (share, fact sentence)`` of the measured cover (``vegetation``, ``water``),
    for confirming what the lead itself says (:func:`cover_named`); ``pool``: the caption model's
    candidate pool in consensus order (its first is ``consensus``); ``judged``: the pool ordered by
    the zero-shot CLIP's image-text cosine with the tile, closest first; when given, it orders every
    choice of the lead (:func:`compose_captions`) and its first replaces ``consensus``.
    """

    candidates: list[str] = field(default_factory=list)
    classes: list[tuple[str, float]] = field(default_factory=list)
    cover: list[tuple[str, float]] = field(default_factory=list)
    vectors: list[str] = field(default_factory=list)
    water: float | None = None  # the tile's water share (NDWI or the RGB rule), when measured
    brief: list[tuple[str, float, str]] = field(default_factory=list)  # (brief_cover text, share, fact sentence)
    consensus: str = ""
    labels: list[str] = field(default_factory=list)
    shares: dict[str, tuple[float, str]] = field(default_factory=dict)
    pool: list[str] = field(default_factory=list)
    judged: list[str] = field(default_factory=list)


#: Lexicon groups (``checks.toml``) that name each measured cover kind, and the words outside the
#: lexicon that do ("plants" is no object of its own for the content check, but it is vegetation).
COVER_GROUPS = {"vegetation": ("tree", "shrub", "grass"), "water": ("water",)}
COVER_WORDS = {"vegetation": re.compile(r"\b(?:plants?|vegetation|greenery|greenbelts?)\b", re.IGNORECASE)}


def cover_named(text: str, kind: str, data: CheckData | None = None) -> str:
    """The first words of ``text`` that name the cover ``kind`` (``vegetation``: trees, shrubs,
    grass, plants; ``water``: the lexicon's water group) outside a negated sentence, or "".
    """
    groups = COVER_GROUPS.get(kind, ())
    for sentence in sentences(text):
        if NEGATION.search(sentence):  # "there is no vegetation in the desert" claims none
            continue
        found = next((words for words, group in lexicon_terms(sentence, data) if group in groups), "")
        match = COVER_WORDS[kind].search(sentence) if not found and kind in COVER_WORDS else None
        if found or match:
            return found or (match.group(0).lower() if match else "")
    return ""


def _clean_candidate(candidate: str, checker: Checker) -> str:
    """A candidate caption without its sentences that fail the checks ("an aerial image of a port ."
    goes, the sentence after it stays)."""
    return " ".join(x for x in sentences(candidate) if not checker.problem(x))


#: How many of the pool's first candidates (consensus order) may lead a detailed caption in place of
#: a lead with no checked fact, when their own words state a cover a share confirms.
FACT_LEAD_POOL = 3

#: A tile whose measured water share is at least this should have a lead that names water.
MOSTLY_WATER = 0.5


def choose_lead(candidates: Sequence[str], confident: str | None, checker: Checker,
                mostly_water: bool = False, preferred: str = "") -> tuple[str, bool]:
    """The lead sentence(s) of the detailed caption and whether they name the ``confident`` class:
    the first candidate (its sentences that pass the checks) naming that class; else, on a tile
    that is ``mostly_water``, the first naming water (a term of the lexicon's water group: river,
    lake, sea …); else ``preferred`` (the candidate the CLIP rates closest to the tile, or the
    decodings' consensus pick) when a sentence of it passes;
    else the first candidate with a sentence that passes."""
    usable = [text for text in (_clean_candidate(c, checker) for c in candidates) if text]
    if confident:
        for candidate in usable:
            if names_class(candidate, confident):
                return candidate, True
    if mostly_water:
        for candidate in usable:
            if any(group == "water" for _, group in lexicon_terms(candidate, checker.data)):
                return candidate, False
    chosen = _clean_candidate(preferred, checker) if preferred else ""
    if chosen:
        return chosen, False
    return (usable[0], False) if usable else ("", False)


def compose_captions(cleaned: Captions, perspectives: Perspectives, instructions: str, sources: Sequence[str],
                     absent: Sequence[str], max_words_detailed: int, n_short: int,
                     parts: Sequence[str] = DETAILED_PARTS, min_probability: float = 0.5,
                     min_cover: float = 0.1, ensure_verified: bool = True) -> Captions:
    """The detailed caption built from verified perspectives, the LLM's additions after them.

    Lead: a caption of the caption model (:func:`choose_lead` over the candidates in the CLIP's
    order when ``perspectives.judged`` gives one, checked against ``sources`` and the candidates
    themselves; the class is confident when its calibrated probability is at least
    ``min_probability``; a tile with a water share of at least :data:`MOSTLY_WATER` prefers a
    caption naming water); then, as ``parts`` say (see :data:`DETAILED_PARTS`), sentences that pass
    the checks against ``sources`` and the lead (a candidate passed over licenses nothing, even
    when it is the caption model's own caption among the sources) and do not repeat what is
    already said (:func:`repeats`). The LLM's part is
    its own detailed caption, not one filled from the sources. Without candidates the LLM's
    cleaned detailed caption leads. With ``ensure_verified``, a caption whose parts state no fact a
    check confirms gets one: the confident class, else the first vector fact, else the largest
    cover share, said briefly (``perspectives.brief``) and even under ``min_cover``: "3% vegetation."
    is a fact. A confident class that the lead contradicts (it names another class,
    :func:`rival_class`) is not stated and goes to ``dropped``. The short captions stay the
    LLM's (and the filled ones) but for the candidates passed over, with the lead moved or put
    first. ``verified`` lists the stated facts a check confirms: the class when the lead names it
    or it is stated, the cover the lead's own words name when a measured share of at least
    ``min_cover`` confirms it ("plants" on 30 % vegetation: :func:`cover_named`), each cover share
    and vector fact stated. A tile with no class, vector or such cover fact to state would get an
    appended share; when one of the pool's first :data:`FACT_LEAD_POOL` candidates (consensus order)
    names a cover a share confirms and none a share contradicts, that candidate leads the detailed
    caption instead (the short captions keep the first lead).
    """
    unknown = [p for p in parts if p not in DETAILED_PARTS]
    if unknown:
        raise ValueError(f"unknown detailed part {unknown[0]!r}: use {', '.join(DETAILED_PARTS)}")
    top = perspectives.classes[0] if perspectives.classes else None
    confident = top[0] if top and top[1] >= min_probability else None
    checker_all = Checker(instructions, [*sources, *perspectives.candidates], absent)
    wet = (perspectives.water or 0.0) >= MOSTLY_WATER
    rank = {text: i for i, text in enumerate(perspectives.judged)}  # the CLIP's order; the others after, as given
    ordered = sorted(perspectives.candidates, key=lambda text: rank.get(text, len(rank)))
    lead, named = choose_lead(ordered, confident, checker_all, wet,
                              perspectives.judged[0] if perspectives.judged else perspectives.consensus)
    labels = perspectives.labels or SCENE_CLASSES

    def cover_facts(text: str) -> list[str]:
        """What ``text`` says of the cover that a measured share of at least ``min_cover`` confirms."""
        return [f"cover: the caption names {words}; {sentence}"
                for kind, (share, sentence) in perspectives.shares.items()
                if share >= min_cover and (words := cover_named(text, kind, checker_all.data))]

    def contradicted(text: str) -> bool:
        """``text`` names a cover kind whose measured share is under ``min_cover`` ("a river …" on 1 % water)."""
        return any(share < min_cover and cover_named(text, kind, checker_all.data)
                   for kind, (share, _) in perspectives.shares.items())

    short_lead = lead
    class_fact = bool(confident and not named and not rival_class(lead, confident, labels))
    if ensure_verified and not named and not class_fact and not perspectives.vectors and not cover_facts(lead):
        # no fact to state but an appended share: a near-consensus candidate whose own words a share confirms
        lead = next((text for text in (_clean_candidate(c, checker_all) for c in perspectives.pool[:FACT_LEAD_POOL])
                     if text and cover_facts(text) and not contradicted(text)), lead)
    # a candidate that did not lead licenses nothing, the caption model's own caption included
    passed_over = {c for c in perspectives.candidates if c != lead and _clean_candidate(c, checker_all) != lead}
    checker = Checker(instructions, [*(s for s in sources if s not in passed_over), lead], absent)
    verified: list[str] = []
    if named and top:
        verified.append(f"class {top[0]} ({top[1]:.2f}): named by the caption, zero-shot probability "
                        f">= {min_probability}")
    verified += cover_facts(lead)
    said: list[str] = [lead] if lead else []
    llm = sentences(cleaned.detailed) if cleaned.detailed and not cleaned.detailed_filled else []
    if not lead and cleaned.detailed:
        said, llm = [sentences(cleaned.detailed)[0]], sentences(cleaned.detailed)[1:]
    dropped = list(cleaned.dropped)
    rival = rival_class(lead, confident, labels) if confident and not named else None

    def add(sentence: str, why: str = "") -> bool:
        reason = checker.problem(sentence)
        if not reason and repeats(sentence, said, checker.data):
            reason = "repeats an earlier sentence"
        if not reason and len(" ".join([*said, sentence]).split()) > max_words_detailed:
            reason = f"over the {max_words_detailed}-word limit of the detailed caption"
        if reason:
            dropped.append(f"{sentence} ({reason})")
            return False
        said.append(sentence)
        if why:
            verified.append(why)
        return True

    def add_facts(part: str, facts: Sequence[str], first_only: bool) -> None:
        for sentence in facts:
            if add(sentence, f"{part}: {sentence}") and first_only:
                return

    def add_part(part: str, fallback: bool = False) -> None:
        """Add one part's sentences; as the ``fallback`` fact, only its first that is kept (a cover
        share however small, the largest first)."""
        if part == "class" and confident and not named and top:
            sentence = class_sentence(*top)
            if not rival:
                add(brief_class(*top), f"class {top[0]} ({top[1]:.2f}): zero-shot probability >= {min_probability}")
            elif not any(d.startswith(sentence) for d in dropped):
                dropped.append(f"{sentence} (the caption names {rival}: the caption model and the zero-shot class "
                               "disagree, so the class is no checked fact)")
        elif part == "llm":
            for i, sentence in enumerate(llm):
                if i == len(llm) - 1 and not sentence.rstrip().endswith((".", "!", "?")):
                    dropped.append(f"{sentence} (cut off by the token limit)")
                else:
                    add(sentence)
        elif part == "vectors":
            add_facts(part, perspectives.vectors, fallback)
        elif part == "cover" and fallback:
            shares = perspectives.brief or [(text, share, text) for text, share in perspectives.cover]
            for text, _, sentence in sorted(shares, key=lambda item: -item[1]):
                if add(text, f"cover: {sentence}"):
                    return
        elif part == "cover":
            add_facts(part, [text for text, share in perspectives.cover if share >= min_cover], False)

    for part in parts:
        add_part(part)
    if ensure_verified and not verified:  # one fact a check confirms, when the parts gave none
        for part in ("class", "vectors", "cover"):
            add_part(part, fallback=True)
            if verified:
                break
    detailed = (_limit(" ".join(said), max_words_detailed) if said  # the lead alone may be longer
                else cleaned.detailed)
    short = list(cleaned.short)
    if short_lead:
        others = (s for s in short if not _near_duplicate(short_lead, s) and s not in passed_over)
        short = [short_lead, *others][:max(n_short, 1)]
    return Captions(detailed=detailed, short=short, dropped=dropped, filled=cleaned.filled, verified=verified)
