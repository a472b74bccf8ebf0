"""Recipes: one TOML file choosing the back end of each stage and holding the prompts,
perspectives, fact rules and output counts of the MpGI pipeline.

The package ships ``default_recipe.toml`` (documented in place); a user recipe overrides it
key by key (tables merged recursively, lists such as ``[[perspectives]]`` replaced whole). A
back-end table (``[vlm]``, ``[llm]``) that names another ``type`` than the default's starts
afresh: only the stage options every back end shares (:data:`STAGE_KEYS`) are kept from the
default, so ``[llm] type = "openai"`` with its ``base_url`` and ``model`` is a complete recipe.
Every value is checked for its type before anything runs (one-line errors naming the key).
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import tomllib

from ..errors import InputError, OptionError
from ..models.decoding_options import METHODS
from ..models.registry import default_caption_model, default_embed_model
from .backends import check_backend_config
from .integrate import DETAILED_PARTS
from .rules import merge_rules

DEFAULT_RECIPE = Path(__file__).with_name("default_recipe.toml")
BACKEND_TYPES = ("none", "openai", "transformers", "transformers-vlm")
#: Keys of a back-end table that belong to the stage, not to one back end type.
STAGE_KEYS = ("max_tokens", "temperature")
#: The order the lead caption is chosen in among the candidates: the zero-shot CLIP's image-text
#: cosine with the tile (closest first), or the caption model's (its consensus pick first).
LEADS = ("clip", "consensus")
TABLES = ("vlm", "llm", "caption_model", "zero_shot", "facts", "rules", "output", "prompts")
SECTIONS = (*TABLES, "perspectives")


@dataclass(frozen=True)
class Perspective:
    """One stage-1a prompt: a name (kept with the answer) and the question asked of the VLM."""

    name: str
    prompt: str


@dataclass
class Recipe:
    """A validated recipe (the merged TOML is kept in ``raw`` and fingerprinted)."""

    raw: dict
    source: str

    @property
    def vlm(self) -> dict:
        """Back-end table of the vision-language model (``type = "none"`` disables stages 1a/1b)."""
        return self.raw["vlm"]

    @property
    def llm(self) -> dict:
        """Back-end table of the integrating LLM."""
        return self.raw["llm"]

    @property
    def uses_vlm(self) -> bool:
        """Whether perspectives and relay run."""
        return self.vlm.get("type", "none") != "none"

    @property
    def caption_model(self) -> str | None:
        """Engine caption model used as one more perspective, or None."""
        name = self.raw.get("caption_model", {}).get("name", "")
        if not name:
            return None
        if name == "default":
            return default_caption_model()
        return name

    @property
    def zero_shot_model(self) -> str | None:
        """CLIP model of the zero-shot class perspective, or None."""
        name = self.raw.get("zero_shot", {}).get("model", "")
        if not name:
            return None
        return default_embed_model() if name == "default" else name

    @property
    def zero_shot(self) -> dict:
        """Zero-shot options: ``labels`` (empty: the default scene classes), ``min_probability``."""
        return dict(self.raw.get("zero_shot", {}))

    @property
    def perspectives(self) -> list[Perspective]:
        """Stage-1a prompts."""
        return [Perspective(p["name"], p["prompt"]) for p in self.raw.get("perspectives", [])]

    @property
    def prompts(self) -> dict:
        """``system``, ``relay`` and ``integration`` templates."""
        return self.raw["prompts"]

    @property
    def rules(self) -> dict:
        """Overrides of :data:`hqrs_geo.mpgi.rules.DEFAULT_RULES`."""
        return dict(self.raw.get("rules", {}))

    @property
    def facts(self) -> dict:
        """Fact options: thresholds, NIR band."""
        return dict(self.raw.get("facts", {}))

    @property
    def output(self) -> dict:
        """Counts and length limits of the final captions."""
        return self.raw["output"]

    def fingerprint(self) -> str:
        """Short hash of the merged recipe (recorded with the results)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]


def _merge(base: dict, override: dict, top: bool = True) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if top and key in ("vlm", "llm") and isinstance(value, dict) and isinstance(out.get(key), dict) \
                and "type" in value and value["type"] != out[key].get("type"):
            # another back end type: its own defaults, only the stage options of the default kept
            out[key] = {k: v for k, v in out[key].items() if k in STAGE_KEYS}
            out[key].update(copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_toml(path: Path) -> dict:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the recipe's .toml file")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found; check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise InputError(f"{path}: not valid TOML ({reason}); fix the recipe") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the recipe ({exc.strerror or exc}); check the file") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


def _check_types(raw: dict, fail: Callable[[str], NoReturn]) -> None:
    """Every section and value of the merged recipe has the type the pipeline expects."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        fail(f"unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
    for name in TABLES:
        if not isinstance(raw.get(name, {}), dict):
            fail(f"{name} must be a table ([{name}]), not {type(raw[name]).__name__}")
    for stage in ("vlm", "llm"):
        table = raw.get(stage, {})
        if "max_tokens" in table and (not _is_int(table["max_tokens"]) or not 1 <= table["max_tokens"] <= 100_000):
            fail(f"[{stage}] max_tokens must be a whole number in 1..100000")
        if "temperature" in table and (not _is_number(table["temperature"]) or not 0 <= table["temperature"] <= 10):
            fail(f"[{stage}] temperature must be a number in 0..10")
        if "model" in table and not isinstance(table["model"], str):
            fail(f"[{stage}] model must be a string")
    perspectives = raw.get("perspectives", [])
    if not isinstance(perspectives, list) or not all(isinstance(p, dict) for p in perspectives):
        fail("perspectives must be a list of [[perspectives]] tables with a name and a prompt")
    for item in perspectives:
        if not isinstance(item.get("name"), str) or not isinstance(item.get("prompt"), str):
            fail("every [[perspectives]] entry needs a name and a prompt (strings)")
    for key, value in raw.get("prompts", {}).items():
        if not isinstance(value, str):
            fail(f"[prompts] {key} must be a string")
    for key in ("system", "relay", "integration"):
        if key not in raw.get("prompts", {}):
            fail(f"[prompts] needs {key}")
    caption = raw.get("caption_model", {})
    if not isinstance(caption.get("name", ""), str):
        fail("[caption_model] name must be a string (\"\" to skip, \"default\" for the shipped model)")
    if caption.get("decoding", "beam") not in METHODS:
        fail(f"[caption_model] decoding must be one of {', '.join(METHODS)}")
    if not isinstance(caption.get("candidates", False), bool):
        fail("[caption_model] candidates must be true or false")
    if caption.get("lead", "clip") not in LEADS:
        fail(f"[caption_model] lead must be one of {', '.join(LEADS)}")
    zero = raw.get("zero_shot", {})
    if not isinstance(zero.get("model", ""), str):
        fail("[zero_shot] model must be a string (\"\" to skip, \"default\" for the shipped CLIP model)")
    labels = zero.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels) \
            or len(labels) == 1 or len(set(labels)) != len(labels):
        fail("[zero_shot] labels must be a list of two or more distinct class names ([] for the default classes)")
    if "min_probability" in zero and (not _is_number(zero["min_probability"]) or not 0 <= zero["min_probability"] <= 1):
        fail("[zero_shot] min_probability must be a number in 0..1")
    out = raw.get("output", {})
    parts = out.get("detailed", [])
    if not isinstance(parts, list) or any(part not in DETAILED_PARTS for part in parts):
        fail(f"[output] detailed must be a list of parts from {', '.join(DETAILED_PARTS)}")
    if "min_cover" in out and (not _is_number(out["min_cover"]) or not 0 <= out["min_cover"] <= 1):
        fail("[output] min_cover must be a number in 0..1")
    if not isinstance(out.get("ensure_verified", True), bool):
        fail("[output] ensure_verified must be true or false")
    facts = raw.get("facts", {})
    for key in ("ndvi_threshold", "ndwi_threshold"):
        if key in facts and (not _is_number(facts[key]) or not -1 <= facts[key] <= 1):
            fail(f"[facts] {key} must be a number in -1..1")
    if "nir_band" in facts and (not _is_int(facts["nir_band"]) or facts["nir_band"] < 1):
        fail("[facts] nir_band must be a band number (1 or more)")
    if not isinstance(facts.get("rgb_cover", True), bool):
        fail("[facts] rgb_cover must be true or false")
    if "exg_threshold" in facts and (not _is_number(facts["exg_threshold"]) or not -1 <= facts["exg_threshold"] <= 1):
        fail("[facts] exg_threshold must be a number in -1..1")


def _check(raw: dict, source: str) -> None:
    def fail(what: str) -> NoReturn:
        raise OptionError(f"{source}: {what}; fix the recipe")

    _check_types(raw, fail)
    for stage in ("vlm", "llm"):
        kind = raw.get(stage, {}).get("type")
        if kind not in BACKEND_TYPES:
            fail(f"[{stage}] type must be one of {', '.join(BACKEND_TYPES)}, not {kind!r}")
        if kind != "none" and not raw[stage].get("model"):
            fail(f"[{stage}] needs a model")
    if raw["llm"]["type"] == "none":
        fail("[llm] type cannot be none: the integration stage needs an LLM")

    for stage in ("vlm", "llm"):
        table = {k: v for k, v in raw[stage].items() if k not in STAGE_KEYS}
        if table.get("type") != "none":
            try:
                check_backend_config(table)
            except OptionError as exc:
                fail(f"[{stage}] {str(exc).removesuffix('; fix it in the recipe')}")
    names = [p.get("name") for p in raw.get("perspectives", [])]
    if any(not n for n in names) or len(set(names)) != len(names):
        fail("every [[perspectives]] entry needs a distinct name")
    if any(not p.get("prompt") for p in raw.get("perspectives", [])):
        fail("every [[perspectives]] entry needs a prompt")
    out = raw.get("output", {})
    for key in ("short_captions", "max_words_detailed", "max_words_short"):
        if not _is_int(out.get(key)) or not 1 <= out[key] <= 10_000:
            fail(f"[output] {key} must be a whole number in 1..10000")
    prompts = raw.get("prompts", {})
    for key, fields in (("relay", ("facts",)),
                        ("integration", ("facts", "descriptions", "n_short", "max_words_detailed", "max_words_short"))):
        template = prompts.get(key, "")
        try:
            template.format(**{f: "" for f in fields})
        except (KeyError, IndexError, ValueError) as exc:
            fail(f"[prompts] {key} has an unknown placeholder or stray brace ({exc}); "
                 f"it may use {', '.join('{' + f + '}' for f in fields)}")

    try:
        merge_rules(raw.get("rules", {}))
    except OptionError as exc:
        fail(f"[rules] {exc}")


def load_recipe(path: str | None = None) -> Recipe:
    """The default recipe, overridden by the TOML file at ``path`` when given; validated."""
    raw = _read_toml(DEFAULT_RECIPE)
    source = "default recipe"
    if path:
        raw = _merge(raw, _read_toml(Path(path)))
        source = str(path)
    _check(raw, source)
    return Recipe(raw, source)
