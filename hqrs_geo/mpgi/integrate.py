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
  sentence of the detailed caption that repeats one before it or only its words (an answer cut
  off by the token limit: "The image is a straight");
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

NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
WORD = re.compile(r"[a-z0-9]+")
NEGATION = re.compile(r"\b(no|not|none|without|absent|lacks?)\b", re.IGNORECASE)
MARKERS = re.compile(r"^\s*(detailed( caption)?|short( captions?)?|captions?)\s*:\s*", re.IGNORECASE)
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


def _repeats(sentence: str, earlier: str) -> bool:
    """``sentence`` says nothing ``earlier`` did not: a near duplicate, or only its words (a fragment)."""
    words = set(_words(sentence))
    return _near_duplicate(sentence, earlier) or bool(words) and words <= set(_words(earlier))


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
        if any(_repeats(s, d) for d in detailed_sents):
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
    return Captions(detailed=detailed, short=short[:n_short], dropped=dropped, filled=filled)
