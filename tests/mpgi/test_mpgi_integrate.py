"""MpGI recipe loading and the checks on the LLM's captions (no model needed)."""
from __future__ import annotations

import pytest

from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.mpgi.integrate import clean_captions, integration_prompt, sentences
from hqrs_geo.mpgi.recipe import load_recipe

INSTRUCTIONS = ("Write one detailed caption of at most 40 words, then 3 short captions. "
                "Keep what the descriptions agree on, drop anything the facts contradict, never invent numbers.")
SOURCES = ["There are 12 buildings covering about 30% of the image, mostly in the north part.",
           "A residential area with houses and gardens beside a road.",
           "Roads run for about 450 m through the image, mostly in the centre."]


def _clean(answer: str, absent=("schools",), n_short: int = 3):
    return clean_captions(answer, INSTRUCTIONS, SOURCES, list(absent), n_short, 40, 12)


def test_well_formed_answer_is_kept_and_limited():
    answer = ("DETAILED: A residential area with 12 buildings along a road. Gardens surround the houses.\n"
              "- Houses and gardens beside a road.\n- A road crosses a residential area.\n"
              "- Twelve buildings in the north of a neighbourhood with many green gardens and trees everywhere.")
    out = _clean(answer)
    assert out.detailed == "A residential area with 12 buildings along a road. Gardens surround the houses."
    assert out.short[:2] == ["Houses and gardens beside a road.", "A road crosses a residential area."]
    assert len(out.short[2].split()) <= 12 and out.filled == 0 and out.dropped == []


def test_invented_counts_contradictions_and_echoes_are_dropped():
    answer = ("A town with 57 buildings. A school stands in the middle. "
              "Keep what the descriptions agree on, drop anything the facts contradict, never invent numbers.\n"
              "- There is no school here.\n- 3 tennis courts by the road.")
    out = _clean(answer)
    reasons = " | ".join(out.dropped)
    assert "57" in reasons and "school" in reasons and "echoes the prompt" in reasons and "number 3" in reasons
    assert "57" not in out.detailed and "school" not in out.detailed.lower()
    assert "There is no school here." in out.short  # a negation agrees with the facts


def test_missing_captions_are_filled_from_the_sources_without_duplicates():
    out = _clean("- Houses and gardens beside a road.\n- Houses and gardens beside a road!\n")
    assert out.detailed  # no detailed part: built from the sources
    assert len(out.short) == 3 and len({s.lower() for s in out.short}) == 3
    assert out.filled >= 2
    every = " ".join(SOURCES)
    assert all(set(s.lower().split()) & set(every.lower().split()) for s in out.short)


def test_garbage_answer_still_gives_grounded_captions():
    out = _clean("DETAILED:\n\n")
    assert out.detailed and all(s.rstrip(".") in " ".join(SOURCES) for s in sentences(out.detailed))


def test_integration_prompt_labels_sources():
    text = integration_prompt("{facts}|{descriptions}|{n_short}|{max_words_detailed}|{max_words_short}",
                              ["fact one."], [("scene", "a town."), ("relay", "")], 4, 50, 10)
    assert text == "- fact one.|[scene] a town.|4|50|10"


def test_default_recipe_and_overrides(tmp_path):
    import hqrs_geo as hg

    recipe = load_recipe()
    assert hg.load_recipe().fingerprint() == recipe.fingerprint() and callable(hg.run_mpgi)
    assert not recipe.uses_vlm and recipe.llm["model"] == "smollm2" and recipe.caption_model == "hqrs-mini-coca"
    assert [p.name for p in recipe.perspectives] == ["scene", "objects", "layout", "appearance", "activity"]
    user = tmp_path / "r.toml"
    user.write_text('[vlm]\ntype = "openai"\nmodel = "qwen"\nbase_url = "http://127.0.0.1:9/v1"\n'
                    '[output]\nshort_captions = 2\n[[perspectives]]\nname = "only"\nprompt = "Describe."\n')
    custom = load_recipe(str(user))
    assert custom.uses_vlm and custom.output["short_captions"] == 2 and custom.output["max_words_short"] == 25
    assert [p.name for p in custom.perspectives] == ["only"] and custom.fingerprint() != recipe.fingerprint()


@pytest.mark.parametrize("text, message", [
    ('[vlm]\ntype = "gpt"\n', "type must be one of"),
    ('[llm]\ntype = "openai"\nmodel = ""\n', r"\[llm\] needs a model"),
    ('[prompts]\nrelay = "{fact}"\n', "unknown placeholder"),
    ('[output]\nshort_captions = 0\n', "whole number in 1..10000"),
    ('[rules]\nnonsense = "x"\n', "nonsense"),
])
def test_bad_recipes_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(OptionError, match=message) as err:
        load_recipe(str(path))
    assert "\n" not in str(err.value)


def test_unreadable_recipe(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[vlm\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_recipe(str(path))
    with pytest.raises(InputError, match="not found"):
        load_recipe(str(tmp_path / "missing.toml"))
