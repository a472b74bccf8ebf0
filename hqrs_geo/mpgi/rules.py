"""Rules: turn :class:`~hqrs_geo.mpgi.facts.TileFacts` into plain sentences with ``str.format`` templates.

Each rule is a template keyed by the fact it states; a recipe can override any of them, and a
rule set to ``""`` drops its sentence. The fields each template may use:

============== ==============================================================================
size           ``width_m``, ``height_m``, ``gsd_m``
location       ``lat``, ``lon`` (unsigned), ``ns`` (N/S), ``ew`` (E/W), ``centre_lat``, ``centre_lon``
date           ``date`` (ISO)
vegetation     ``pct``, ``fraction``, ``threshold`` (NDVI; with a NIR band)
water          ``pct``, ``fraction``, ``threshold`` (NDWI; with a NIR band)
vegetation_rgb ``pct``, ``fraction``, ``threshold`` (excess green; the RGB estimate without NIR)
water_rgb      ``pct``, ``fraction`` (the RGB water rule without NIR)
polygons       ``label``, ``noun``, ``are``, ``count``, ``pct``, ``fraction``, ``region``
lines          ``label``, ``noun``, ``are``, ``count``, ``length`` (m), ``length_km``, ``density`` (m/km²), ``region``
points         ``label``, ``noun``, ``are``, ``count``, ``region``
absent         ``label`` (a layer with no feature in the tile)
classes        ``label``, ``noun``, ``count``, ``classes`` (e.g. ``house (60%) and shed (40%)``), ``top``, ``top_pct``
============== ==============================================================================

``noun`` is the label made singular when ``count`` is 1 (``buildings`` -> ``building``) and ``are``
is ``is`` or ``are`` to match. Counts are the exact integers; percentages are numbers for the
template to round. The first letter of every sentence is capitalised.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import OptionError
from .facts import UNKNOWN_CLASS, TileFacts, VectorFacts

DEFAULT_RULES: dict[str, str] = {
    "size": "The image covers about {width_m:.0f} m by {height_m:.0f} m of ground at {gsd_m:.2g} m per pixel.",
    "location": "Its centre lies at {lat:.4f}° {ns}, {lon:.4f}° {ew}.",
    "date": "It was acquired on {date}.",
    "vegetation": "About {pct:.0f}% of the area is vegetated (NDVI > {threshold}).",
    "water": "About {pct:.0f}% of the area looks like water (NDWI > {threshold}).",
    "vegetation_rgb": "Vegetation covers about {pct:.0f}% of the area (estimated from RGB colour).",
    "water_rgb": "Open water covers about {pct:.0f}% of the area (estimated from RGB colour and texture).",
    "polygons": "There {are} {count} {noun} covering about {pct:.0f}% of the image, mostly in the {region} part.",
    "lines": "{label} run for about {length:.0f} m through the image, mostly in the {region}.",
    "points": "There {are} {count} {noun} in the image, mostly in the {region} part.",
    "absent": "There are no {label} in the image.",
    "classes": "Most {label} are {classes}.",
}

# What each rule's sentence is about: "metadata" (where, when and how the image was taken: never
# training text, only context for the LLM) or "content" (what the tile shows: may become a caption).
RULE_KINDS: dict[str, str] = {
    "size": "metadata", "location": "metadata", "date": "metadata",
    "vegetation": "content", "water": "content", "vegetation_rgb": "content", "water_rgb": "content",
    "polygons": "content", "lines": "content",
    "points": "content", "absent": "content", "classes": "content",
}
FACT_KINDS = ("metadata", "content")

MAX_CLASSES = 3  # classes named in the ``classes`` sentence
MIN_CLASS_SHARE = 0.1  # smaller classes are left out of it (the first is always named)

_SAMPLE = {  # values every field may take, to check templates before they are used
    "width_m": 640.0, "height_m": 640.0, "gsd_m": 2.5, "lat": 34.0, "lon": 20.5, "ns": "S", "ew": "E",
    "centre_lat": -34.0, "centre_lon": 20.5, "date": "2024-01-31", "pct": 12.5, "fraction": 0.125,
    "threshold": 0.3, "label": "buildings", "noun": "buildings", "are": "are", "count": 2, "region": "north",
    "length": 100.0, "length_km": 0.1, "density": 250.0, "classes": "house (60%) and shed (40%)",
    "top": "house", "top_pct": 60.0,
}
_FIELDS = {
    "size": ("width_m", "height_m", "gsd_m"),
    "location": ("lat", "lon", "ns", "ew", "centre_lat", "centre_lon"),
    "date": ("date",),
    "vegetation": ("pct", "fraction", "threshold"),
    "water": ("pct", "fraction", "threshold"),
    "vegetation_rgb": ("pct", "fraction", "threshold"),
    "water_rgb": ("pct", "fraction"),
    "polygons": ("label", "noun", "are", "count", "pct", "fraction", "region"),
    "lines": ("label", "noun", "are", "count", "length", "length_km", "density", "region"),
    "points": ("label", "noun", "are", "count", "region"),
    "absent": ("label",),
    "classes": ("label", "noun", "count", "classes", "top", "top_pct"),
}
_KIND_RULE = {"polygon": "polygons", "line": "lines", "point": "points"}


def merge_rules(rules: Mapping[str, str] | None = None) -> dict[str, str]:
    """:data:`DEFAULT_RULES` with ``rules`` laid over them, every template checked.

    Raises :class:`OptionError` (one line) for an unknown rule name or a template that uses an
    unknown field or a format that does not fit the field.
    """
    merged = dict(DEFAULT_RULES)
    for key, template in (rules or {}).items():
        if key not in DEFAULT_RULES:
            raise OptionError(f"unknown rule {key!r}: use one of {', '.join(DEFAULT_RULES)}")
        if template is None:
            template = ""
        if not isinstance(template, str):
            raise OptionError(f"rule {key!r} must be a text template (or \"\" to leave the sentence out)")
        merged[key] = template
    for key, template in merged.items():
        if template:
            _format(key, template, {name: _SAMPLE[name] for name in _FIELDS[key]})
    return merged


def _format(key: str, template: str, values: Mapping[str, Any]) -> str:
    """Fill a template, turning format mistakes into one-line :class:`OptionError`; first letter capitalised."""
    try:
        text = template.format(**values)
    except KeyError as exc:
        raise OptionError(f"rule {key!r} uses unknown field {{{exc.args[0]}}}: "
                          f"use {', '.join('{' + f + '}' for f in _FIELDS[key])}") from None
    except (ValueError, IndexError, TypeError) as exc:
        raise OptionError(f"rule {key!r} has a bad template ({exc}): {template!r}") from None
    text = text.strip()
    return text[:1].upper() + text[1:]


def singular(label: str) -> str:
    """A naive English singular of a plural label's last word (``bus stops`` -> ``bus stop``)."""
    head, _, last = label.rpartition(" ")
    lower = last.lower()
    if lower.endswith("ies") and len(last) > 3:
        last = last[:-3] + "y"
    elif lower.endswith(("ches", "shes", "sses", "xes")):
        last = last[:-2]
    elif lower.endswith("s") and not lower.endswith(("ss", "us", "is")):
        last = last[:-1]
    return f"{head} {last}" if head else last


def _classes_text(pairs: list[tuple[str, float]]) -> str:
    """``a (60%), b (30%) and c (10%)``: the largest classes, at most :data:`MAX_CLASSES`."""
    named = [p for i, p in enumerate(pairs[:MAX_CLASSES]) if i == 0 or p[1] >= MIN_CLASS_SHARE]
    parts = [f"{name} ({share * 100:.0f}%)" for name, share in named]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _vector_sentences(v: VectorFacts, rules: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (rule, sentence) pairs about one vector layer in one tile."""
    if v.count == 0:
        return [("absent", _format("absent", rules["absent"], {"label": v.label}))] if rules["absent"] else []
    noun = singular(v.label) if v.count == 1 else v.label
    common = {"label": v.label, "noun": noun, "are": "is" if v.count == 1 else "are", "count": v.count,
              "region": v.main_region or "centre"}
    key = _KIND_RULE[v.kind]
    values: dict[str, Any] = {name: value for name, value in common.items() if name in _FIELDS[key]}
    if v.kind == "polygon":
        values.update(pct=(v.area_fraction or 0.0) * 100, fraction=v.area_fraction or 0.0)
    elif v.kind == "line":
        length = v.length_m or 0.0
        values.update(length=length, length_km=length / 1000, density=v.length_per_km2 or 0.0)
    out = [(key, _format(key, rules[key], values))] if rules[key] else []
    known = [p for p in v.classes if p[0] != UNKNOWN_CLASS]
    if rules["classes"] and known:
        out.append(("classes", _format("classes", rules["classes"], {
            "label": v.label, "noun": noun, "count": v.count, "classes": _classes_text(v.classes),
            "top": v.classes[0][0], "top_pct": v.classes[0][1] * 100,
        })))
    return out


def rule_sentences(facts: TileFacts, rules: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``(rule, sentence)`` pairs stating the facts of one tile, in a fixed order (size, place, date,
    cover, layers); :data:`RULE_KINDS` says whether a rule's sentence is metadata or content. Cover
    shares estimated from RGB (no NIR band) use the ``vegetation_rgb`` / ``water_rgb`` rules.

    ``rules`` overrides :data:`DEFAULT_RULES` per key; ``""`` leaves that sentence out. Facts that
    are unknown (no date, no NIR band) give no sentence.
    """
    rules = merge_rules(rules)
    out: list[tuple[str, str]] = []
    if rules["size"]:
        out.append(("size", _format("size", rules["size"], {
            "width_m": facts.width_m, "height_m": facts.height_m,
            "gsd_m": facts.gsd_m if facts.gsd_m is not None else float("nan")})))
    if rules["location"]:
        out.append(("location", _format("location", rules["location"], {
            "lat": abs(facts.centre_lat), "lon": abs(facts.centre_lon),
            "ns": "N" if facts.centre_lat >= 0 else "S", "ew": "E" if facts.centre_lon >= 0 else "W",
            "centre_lat": facts.centre_lat, "centre_lon": facts.centre_lon})))
    if rules["date"] and facts.acquired:
        out.append(("date", _format("date", rules["date"], {"date": facts.acquired})))
    for key, fraction, source, threshold in (
            ("vegetation", facts.vegetation_fraction, facts.vegetation_source, facts.ndvi_threshold),
            ("water", facts.water_fraction, facts.water_source, facts.ndwi_threshold)):
        if str(source or "").startswith("rgb"):
            key, threshold = f"{key}_rgb", facts.exg_threshold
        if rules[key] and fraction is not None:
            values = {"pct": fraction * 100, "fraction": fraction, "threshold": threshold}
            out.append((key, _format(key, rules[key], {k: values[k] for k in _FIELDS[key]})))
    for vector in facts.vectors:
        out.extend(_vector_sentences(vector, rules))
    return out


def fact_sentences(facts: TileFacts, rules: Mapping[str, str] | None = None, kind: str | None = None) -> list[str]:
    """The sentences of :func:`rule_sentences`; with ``kind`` ("metadata" or "content") only that kind's."""
    if kind is not None and kind not in FACT_KINDS:
        raise ValueError(f"unknown fact kind {kind!r}: use one of {', '.join(FACT_KINDS)}")
    return [text for key, text in rule_sentences(facts, rules) if kind is None or RULE_KINDS[key] == kind]


def facts_block(facts: TileFacts, rules: Mapping[str, str] | None = None) -> str:
    """The fact sentences of one tile, one per line (for prompts)."""
    return "\n".join(fact_sentences(facts, rules))
