"""Stage 2 of MpGI: the integration prompt, and turning the LLM's answer into clean captions.

The LLM is asked for one detailed caption and N short ones. Whatever it returns, the output
is checked before it reaches the layer:

* instruction text echoed back is removed (sentences that occur in the prompt's own
  instructions, markers such as ``DETAILED:``);
* no invented counts: a sentence with a number that occurs in none of the facts and
  descriptions is dropped;
* nothing the facts contradict: a sentence naming a vector layer the facts say is absent
  from the tile (``There are no buildings``) is dropped unless it is itself a negation;
* length limits in words; duplicates (exact or near: token Jaccard >= 0.8) removed;
* when the LLM gives fewer captions than asked, the rest is filled with distinct sentences
  from the descriptions and facts, and the record says how many were filled.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
WORD = re.compile(r"[a-z0-9]+")
NEGATION = re.compile(r"\b(no|not|none|without|absent|lacks?)\b", re.IGNORECASE)
MARKERS = re.compile(r"^\s*(detailed( caption)?|short( captions?)?|captions?)\s*:\s*", re.IGNORECASE)
BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


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


def _singular(label: str) -> str:
    return label[:-1] if label.endswith("s") else label


class Checker:
    """The checks every candidate sentence goes through (see the module docstring)."""

    def __init__(self, prompt_instructions: str, sources: Sequence[str], absent: Sequence[str]):
        self.instructions = _norm(prompt_instructions)
        self.allowed_numbers = set().union(*(_numbers(s) for s in sources)) if sources else set()
        self.absent = [a.lower() for a in absent]

    def problem(self, sentence: str) -> str:
        """Why ``sentence`` must go ("" when it may stay)."""
        norm = _norm(sentence)
        if not norm:
            return "empty"
        if len(norm) > 12 and norm in self.instructions:
            return "echoes the prompt"
        invented = _numbers(sentence) - self.allowed_numbers
        if invented:
            return f"number {sorted(invented)[0]} is in no source"
        if not NEGATION.search(sentence):
            for label in self.absent:
                if re.search(rf"\b({re.escape(label)}|{re.escape(_singular(label))})\b", sentence, re.IGNORECASE):
                    return f"mentions {label}, which the facts say are absent"
        return ""


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
                   n_short: int, max_words_detailed: int, max_words_short: int) -> Captions:
    """Parse and check an LLM answer into :class:`Captions` (see the module docstring)."""
    checker = Checker(prompt_instructions, sources, absent)
    dropped: list[str] = []

    def keep(sentence: str) -> bool:
        reason = checker.problem(sentence)
        if reason:
            dropped.append(f"{sentence} ({reason})")
        return not reason

    detailed_lines, bullets = _candidates(answer)
    detailed_sents = [s for line in detailed_lines for s in sentences(line) if keep(s)]
    detailed = _limit(" ".join(detailed_sents), max_words_detailed)
    short: list[str] = []
    for line in bullets:
        kept = [s for s in sentences(line) if keep(s)]
        candidate = _limit(" ".join(kept), max_words_short)
        if candidate and not any(_near_duplicate(candidate, s) for s in short + [detailed]):
            short.append(candidate)
    filled = 0
    pool = [s for text in sources for s in sentences(text)]
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
    return Captions(detailed=detailed, short=short[:n_short], dropped=dropped, filled=filled)
