"""Tiles marked by hand as examples: the positive and negative tile ids of few-shot detection
(:mod:`hqrs_geo.search.fewshot`) and of few-shot change (:mod:`hqrs_geo.compare`), checked in one
place. Each caller names what its marks are (tiles, or pairs of two dates) in the one-line errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import OptionError


@dataclass(frozen=True)
class MarkWording:
    """What the one-line errors of :func:`marked_ids` say: ``not_ids`` (with ``{name}``: positive
    or negative), ``no_positive`` and ``both`` (with ``{tile}``: the id marked both ways)."""

    not_ids: str
    no_positive: str
    both: str


#: Few-shot detection: tiles of one layer.
TILES = MarkWording("{name} tiles must be a list of tile ids",
                    "no positive tile; mark at least one tile as an example of what to find",
                    "tile {tile} is both positive and negative; keep it in one list")
#: Few-shot change: pairs of two dates, named by their BEFORE tile.
PAIRS = MarkWording("{name} pairs must be a list of BEFORE tile ids",
                    "no changed pair marked; give «positive» BEFORE tile ids of pairs that changed",
                    "tile {tile} is marked both changed and unchanged; keep it in one list")


def marked_ids(positive: Any, negative: Any, wording: MarkWording = TILES, required: bool = True,
               limit: int | None = None) -> tuple[list[str], list[str]]:
    """The marked tile ids as two lists without repeats (order kept), with a one-line
    :class:`~hqrs_geo.errors.OptionError` when either is not a list of strings, when no positive is
    marked (``required``; otherwise only when negatives are marked without a positive), when a tile
    is marked both ways, or when more than ``limit`` tiles are marked."""
    for name, values in (("positive", positive), ("negative", negative)):
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise OptionError(wording.not_ids.format(name=name), option=name)
    positive, negative = list(dict.fromkeys(positive)), list(dict.fromkeys(negative))
    if not positive and (required or negative):
        raise OptionError(wording.no_positive, option="positive")
    both = set(positive) & set(negative)
    if both:
        raise OptionError(wording.both.format(tile=repr(sorted(both)[0])), option="negative")
    if limit is not None and len(positive) + len(negative) > limit:
        raise OptionError(f"{len(positive) + len(negative)} labelled tiles; at most {limit}", option="positive")
    return positive, negative


__all__ = ["PAIRS", "TILES", "MarkWording", "marked_ids"]
