"""Recipes: one TOML file choosing the back end of each stage and holding the prompts,
perspectives, fact rules and output counts of the MpGI pipeline.

The package ships ``default_recipe.toml`` (documented in place); a user recipe overrides it
key by key (tables merged recursively, lists such as ``[[perspectives]]`` replaced whole).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, OptionError

DEFAULT_RECIPE = Path(__file__).with_name("default_recipe.toml")
BACKEND_TYPES = ("none", "openai", "transformers", "transformers-vlm")


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
            from ..models.registry import default_caption_model

            return default_caption_model()
        return name

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


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_toml(path: Path) -> dict:
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix the recipe") from None


def _check(raw: dict, source: str) -> None:
    def fail(what: str) -> None:
        raise OptionError(f"{source}: {what}")

    for stage in ("vlm", "llm"):
        kind = raw.get(stage, {}).get("type")
        if kind not in BACKEND_TYPES:
            fail(f"[{stage}] type must be one of {', '.join(BACKEND_TYPES)}, not {kind!r}")
        if kind != "none" and not raw[stage].get("model"):
            fail(f"[{stage}] needs a model")
    if raw["llm"]["type"] == "none":
        fail("[llm] type cannot be none: the integration stage needs an LLM")
    names = [p.get("name") for p in raw.get("perspectives", [])]
    if any(not n for n in names) or len(set(names)) != len(names):
        fail("every [[perspectives]] entry needs a distinct name")
    if any(not p.get("prompt") for p in raw.get("perspectives", [])):
        fail("every [[perspectives]] entry needs a prompt")
    out = raw.get("output", {})
    for key in ("short_captions", "max_words_detailed", "max_words_short"):
        if not isinstance(out.get(key), int) or out[key] < 1:
            fail(f"[output] {key} must be a positive integer")
    prompts = raw.get("prompts", {})
    for key, fields in (("relay", ("facts",)),
                        ("integration", ("facts", "descriptions", "n_short", "max_words_detailed", "max_words_short"))):
        template = prompts.get(key, "")
        try:
            template.format(**{f: "" for f in fields})
        except (KeyError, IndexError, ValueError) as exc:
            fail(f"[prompts] {key} has an unknown placeholder or stray brace ({exc}); "
                 f"it may use {', '.join('{' + f + '}' for f in fields)}")
    from .rules import merge_rules

    merge_rules(raw.get("rules", {}))


def load_recipe(path: str | None = None) -> Recipe:
    """The default recipe, overridden by the TOML file at ``path`` when given; validated."""
    raw = _read_toml(DEFAULT_RECIPE)
    source = "default recipe"
    if path:
        raw = _merge(raw, _read_toml(Path(path)))
        source = str(path)
    _check(raw, source)
    return Recipe(raw, source)
