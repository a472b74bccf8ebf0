"""MpGI recipe loading and the checks on the LLM's captions (no model needed)."""
from __future__ import annotations

import re

import pytest

from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.mpgi.integrate import (
    Captions,
    Checker,
    Perspectives,
    brief_class,
    brief_cover,
    check_data,
    class_sentence,
    clean_captions,
    compose_captions,
    content_words,
    cover_named,
    integration_prompt,
    issue_category,
    lexicon_terms,
    names_class,
    repeats,
    rival_class,
    sentence_issue,
    sentences,
)
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
              "- Twelve buildings in the north of a neighbourhood with many green gardens and houses everywhere.")
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


# what the offline default recipe used to write (main before issue 17): metadata facts as captions
METADATA = ["The image covers about 127 m by 128 m of ground at 2.5 m per pixel.",
            "Its centre lies at 33.9994° S, 20.5064° E.",
            "It was acquired on 2021-03-04."]


def test_metadata_praise_and_unsupported_objects_are_dropped_with_their_reason():
    answer = ("DETAILED: The image is a stunning example of aerial photography, captured from a remote location. "
              "A residential area with houses and gardens beside a road. Its centre lies at 33.9994° S, 20.5064° E. "
              "Two airplanes wait beside the houses.\n"
              "- The image covers about 127 m by 128 m of ground.\n"
              "- The ground resolution is 2.5 m per pixel.\n"
              "- It was acquired on 2021-03-04.\n"
              "- This image shows a view of a town.\n"
              "- A tennis court next to the road.\n"
              "- Houses and gardens beside a road.\n")
    out = clean_captions(answer, INSTRUCTIONS, SOURCES + METADATA, [], 3, 40, 12)
    assert out.detailed == "A residential area with houses and gardens beside a road."
    reasons = {d.partition(". (")[0] + ".": d.partition(". (")[2][:-1] for d in out.dropped}
    assert reasons["The image is a stunning example of aerial photography, captured from a remote location."] \
        == "praise or boilerplate ('stunning')"
    assert reasons["Its centre lies at 33.9994° S, 20.5064° E."] == "gives coordinates"
    assert reasons["Two airplanes wait beside the houses."] == "names airplanes, which no source mentions"
    assert reasons["The image covers about 127 m by 128 m of ground."] == "states the ground size"
    assert reasons["The ground resolution is 2.5 m per pixel."] == "states the pixel size"
    assert reasons["It was acquired on 2021-03-04."] == "gives a date"
    assert reasons["This image shows a view of a town."].startswith("praise or boilerplate")
    assert reasons["A tennis court next to the road."] == "names tennis court, which no source mentions"
    assert out.short[0] == "Houses and gardens beside a road."
    # the numbers of the metadata are in the sources, so only the new checks can have caught them
    for caption in [out.detailed, *out.short]:
        assert not re.search(r"°|per pixel|\d+ m by|2021", caption), caption


def test_filled_captions_come_from_content_only():
    """The fill pool is the content texts: metadata facts never become a caption, even as filler."""
    content = SOURCES[:2]
    out = clean_captions("", INSTRUCTIONS, SOURCES + METADATA, [], 5, 40, 25, fill=content)
    assert out.short and set(out.short) <= {s for t in content for s in sentences(t)}
    # without a separate fill list the checks still keep metadata out
    out = clean_captions("", INSTRUCTIONS, METADATA + SOURCES, [], 5, 40, 25)
    assert out.short and not set(out.short) & set(METADATA) and out.detailed
    assert not any(m in out.detailed for m in METADATA)


def test_a_single_content_sentence_is_both_detailed_and_short():
    """Offline recipe on a bare RGB image: the caption model is the only content; metadata facts are
    not used, and the tile still gets a short caption."""
    caption = "many boats docked neatly at the harbor and the water is deep blue ."
    answer = "The image is a stunning example of aerial photography. It covers 78 m by 78 m of ground."
    out = clean_captions(answer, INSTRUCTIONS, METADATA + [caption], [], 5, 40, 25, fill=[caption])
    assert out.detailed == caption and out.short == [caption] and out.filled == 2
    assert len(out.dropped) == 2


def test_numbers_of_metadata_license_nothing_and_repeats_are_dropped():
    """Seen in the offline benchmark (SmolLM2-135M on UCM val): a size built from the centre's
    longitude and the tile's width, a sentence said three times, and a moral."""
    metadata = ["The image covers about 78 m by 78 m of ground at 0.3 m per pixel.",
                "Its centre lies at 34.3371° N, 117.9671° W."]
    caption = "lots of cars parked neatly in the parking lot ."
    answer = ("DETAILED: The image is a massive vehicle, with a length of 78 meters and a width of 117.9671 meters. "
              "Cars are parked in a parking lot. Cars are parked in a parking lot. cars are parked in a parking lot! "
              "The image is a perfect example of how technology can be used to enhance our understanding of the "
              "natural world. Cars are parked")  # cut off by the token limit
    out = clean_captions(answer, INSTRUCTIONS, metadata + [caption], [], 3, 60, 25, fill=[caption])
    assert out.detailed == "Cars are parked in a parking lot."
    reasons = " | ".join(out.dropped)
    assert "width of 117.9671 meters. (number 117.9671 is in no source)" in reasons
    assert reasons.count("repeats an earlier sentence") == 3
    assert "praise or boilerplate ('perfect example')" in reasons
    # a number stated by a content fact or a description is still allowed
    assert sentence_issue("There are 12 buildings.", SOURCES + metadata) == ""
    assert sentence_issue("A road of 78 m.", SOURCES + metadata) == "number 78 is in no source"


@pytest.mark.parametrize("sentence, reason", [
    ("Its centre lies at 33.9994° S, 20.5064° E.", "gives coordinates"),
    ("The latitude of the town is about 34 degrees south.", "gives coordinates"),
    ("The tile spans 640 m of houses.", "states the ground size"),
    ("A 128 x 128 m patch of farmland.", "states the ground size"),
    ("The image is a 78-meter-by-78-meter mobile home park.", "states the ground size"),
    ("The image covers a 78-m by 78-m area with a villa.", "states the ground size"),
    ("A stark reminder of the impact of climate change on the forest.", "praise or boilerplate ('reminder of')"),
    ("At a resolution of 0.3 m the roofs are sharp.", "states the pixel size"),
    ("Houses seen at 30 cm/px.", "states the pixel size"),
    ("Houses photographed in March 2019.", "gives a date"),
    ("It was acquired on 2019-03-02.", "gives a date"),
    ("A beautiful residential area.", "praise or boilerplate ('beautiful')"),
    ("The image captures a breathtaking view of houses.", "praise or boilerplate ('breathtaking')"),
    ("Ships are moored in the harbour.", "names ships, which no source mentions"),
    ("A swimming pool behind a house.", "names swimming pool, which no source mentions"),
    ("There are 40 houses.", "number 40 is in no source"),
    # synonyms of what a source names are supported; generic words are never flagged
    ("Homes with green lawns line a street.", ""),
    ("A dense neighbourhood of houses with plenty of vegetation.", ""),
    ("Roads run for about 450 m through the image, mostly in the centre.", ""),
    ("There are 12 buildings covering about 30% of the image, mostly in the north part.", ""),
])
def test_sentence_issue(sentence, reason):
    sources = SOURCES + ["Many buildings and green lawns are in a dense residential area."]
    assert sentence_issue(sentence, sources) == reason


def test_lexicon_terms_and_issue_categories():
    # longer terms win over the words inside them; plurals of every shape are found
    assert lexicon_terms("A tennis court, a car park, two lorries and ferries by a trailer park.") == [
        ("tennis court", "sport"), ("car park", "parking"), ("lorries", "vehicle"), ("ferries", "boat"),
        ("trailer park", "mobile_home")]
    assert lexicon_terms("Vegetation and plants in the area.") == []
    data = check_data()
    assert all(pattern.search(term) for term, _, pattern in data.terms)  # every term finds itself
    assert Checker("", ["A harbour."], []).supported == {"harbour"}
    assert [issue_category(sentence_issue(s, SOURCES)) for s in
            ("", "Two ships.", "There are 99 houses.", "A stunning town.", "Houses by a road.")] == [
        "empty", "unsupported content", "invented number", "praise or boilerplate", "clean"]
    assert issue_category(sentence_issue("There are no schools.", SOURCES, ["schools"])) == "clean"
    assert issue_category(sentence_issue("There are no schools.", SOURCES)) == "unsupported content"
    assert issue_category(sentence_issue("A school.", SOURCES, ["schools"])) == "contradicts the facts"


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
    ('[caption_model]\ndecoding = "nucleus"\n', "decoding must be one of"),
    ('[caption_model]\nlead = "longest"\n', r"lead must be one of clip, consensus"),
    ('[zero_shot]\nlabels = ["river"]\n', "two or more distinct class names"),
    ('[zero_shot]\nmin_probability = 1.5\n', "min_probability must be a number in 0..1"),
    ('[output]\ndetailed = ["lead", "poetry"]\n', "detailed must be a list of parts from class, vectors"),
    ('[facts]\nexg_threshold = "high"\n', "exg_threshold must be a number"),
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


# --------------------------------------------------------------------------- repeats and the composed caption

RIVER = "The image is a river with black water and a road on one bank of the river."


def test_paraphrased_repeats_are_caught_and_new_objects_are_not():
    """The demo scene's repetition (SmolLM2 saying one sentence three ways) keeps one sentence;
    a sentence naming a new object kind is no repeat, however many words it shares."""
    answer = (f"{RIVER} It is a river with black water and a road on one side of the river. "
              "The image is a river with black water and a road on the other side of the river.")
    out = clean_captions(answer, INSTRUCTIONS, [RIVER], [], 3, 90, 25)
    assert out.detailed == RIVER
    assert sum("repeats an earlier sentence" in d for d in out.dropped) == 2
    assert content_words("It is a river with black water on one side.") == {"river", "black", "water"}
    assert repeats("Black water fills the river.", [RIVER])
    assert not repeats("Cars are parked near a row of trees.", ["Cars are parked in the parking lot."])
    assert not repeats("Houses with gardens line the street.", [RIVER])
    assert repeats("The river.", "A river with a road.")  # a fragment
    # a new number is news: the water share after the vegetation share, both "estimated from RGB colour"
    assert not repeats("Open water covers about 52% of the area (estimated from RGB colour).",
                       [RIVER, "Vegetation covers about 28% of the area (estimated from RGB colour)."])


def test_class_names_with_synonyms_and_spellings():
    assert names_class("many buildings are densely arranged in the dense residential area .", "dense residential")
    assert names_class("boats moored in the harbour", "harbor") and names_class("a ship in the harbor", "harbour")
    assert names_class("woodland with tall trees", "forest") and names_class("two tennis courts", "tennis court")
    assert not names_class("lots of green trees", "farmland") and not names_class("a parking lot", "park")
    # a plural class is named in the singular too ("storage tanks": "a small storage tank")
    assert names_class("a small storage tank is on the ground .", "storage tanks")
    assert names_class("a tall building", "buildings") and not names_class("a bus on the road", "storage tanks")
    assert class_sentence("river", 0.914) == "Zero-shot scene class: river (91% probability)."
    assert brief_class("river", 0.914) == "river (91%)."  # as the detailed caption says it


def _compose(candidates, classes, answer="", cover=(), vectors=(), parts=("class", "vectors", "cover", "llm"),
             max_words=60, ensure_verified=False):
    """As the pipeline does: the sources are the facts (with the confident class) and the caption
    model's own caption; the candidates are perspectives."""
    sure = [class_sentence(*classes[0])] if classes and classes[0][1] >= 0.5 else []
    sources = [*candidates[:1], *(c for c, _ in cover), *vectors, *sure]
    cleaned = clean_captions(answer, INSTRUCTIONS, sources, [], 3, 60, 25, fill=sources)
    return compose_captions(cleaned, Perspectives(list(candidates), list(classes), list(cover), list(vectors)),
                            INSTRUCTIONS, sources, [], max_words, 3, parts, min_probability=0.5, min_cover=0.1,
                            ensure_verified=ensure_verified)


def test_the_lead_is_a_candidate_naming_the_confident_class():
    """The caption model's own caption calls the river a runway; its second candidate names the
    river CLIP is sure of: that one leads, and the class counts as a verified fact."""
    candidates = ["a straight runway with some marks on it .", "a river with green trees on both banks ."]
    out = _compose(candidates, [("river", 0.83), ("runway", 0.1)])
    assert out.detailed.startswith("a river with green trees on both banks .")
    assert out.verified == ["class river (0.83): named by the caption, zero-shot probability >= 0.5"]
    assert out.short[0] == candidates[1]
    # no sure class, but the tile is mostly water: the first candidate naming water leads
    land = ["it is a piece of farmland .", "a winding river is shown here ."]
    wet = compose_captions(Captions("", []), Perspectives(land, [("lake", 0.34)], water=0.88), INSTRUCTIONS,
                           land[:1], [], 60, 3, ())
    assert wet.detailed == land[1]
    # the passed-over caption licenses nothing: the LLM repeating its farmland goes
    wet = compose_captions(Captions("It is farmland beside the river.", []), Perspectives(land, [], water=0.88),
                           INSTRUCTIONS, land[:1], [], 60, 3, ("llm",))
    assert wet.detailed == land[1] and "names farmland, which no source mentions" in " ".join(wet.dropped)
    filled = compose_captions(Captions("", [land[0], "Water covers most of it."]), Perspectives(land, [], water=0.88),
                              INSTRUCTIONS, land[:1], [], 60, 3, ())
    assert filled.short == [land[1], "Water covers most of it."]  # the overruled caption is no short caption
    dry = compose_captions(Captions("", []), Perspectives(land, [("lake", 0.34)], water=0.2), INSTRUCTIONS,
                           land[:1], [], 60, 3, ())
    assert dry.detailed == land[0]
    # a candidate's boilerplate sentence goes, its other sentence can lead
    tidy = _compose(["an aerial image of a port . many boats are moored in the harbor ."], [("harbor", 0.7)])
    assert tidy.detailed == "many boats are moored in the harbor ." and tidy.verified[0].startswith("class harbor")
    # an unsure class changes nothing and is not stated
    unsure = _compose(candidates, [("river", 0.41), ("runway", 0.3)])
    assert unsure.detailed == candidates[0] and unsure.verified == []
    # a sure class that no candidate names is stated after the caption, as its own sentence ...
    plain = ["some white marks on grey ground ."]  # names no class
    other = _compose(plain, [("river", 0.83)])
    assert other.detailed == f"{plain[0]} river (83%)."
    assert other.verified == ["class river (0.83): zero-shot probability >= 0.5"]
    # ... but not when the caption names another class: the two models disagree, no check confirms it
    rival = _compose(candidates[:1], [("river", 0.83)], ensure_verified=True, cover=[(
        "Vegetation covers about 2% of the area (estimated from RGB colour).", 0.02)])
    assert rival.detailed == f"{candidates[0]} Vegetation covers about 2% of the area (estimated from RGB colour)."
    assert any("the caption names runway" in d for d in rival.dropped)
    assert [v.split(":")[0] for v in rival.verified] == ["cover"]
    assert rival_class("a straight runway .", "river") == "runway"
    assert rival_class("houses in the dense residential area", "residential") is None  # the same class, finer
    # no class or water to guide the choice: the candidates' consensus pick leads
    pick = compose_captions(Captions("", []), Perspectives(land, [("lake", 0.3)], consensus=land[1]), INSTRUCTIONS,
                            land[:1], [], 60, 3, ())
    assert pick.detailed == land[1] and pick.short[0] == land[1]


def test_composed_caption_adds_facts_and_new_llm_content_but_no_repeats():
    caption = "a river with black water and a road on one bank ."
    cover = [("Open water covers about 48% of the area (estimated from RGB colour and texture).", 0.48),
             ("Vegetation covers about 4% of the area (estimated from RGB colour).", 0.04)]
    vectors = ["There are 3 buildings covering about 12% of the image, mostly in the north part."]
    answer = (f"DETAILED: {RIVER} It is a river with black water and a road on one side of the river. "
              "Houses stand on the other bank. Trees grow on the other bank. The buildings have flat grey"
              "\n- A river beside a road.")
    sources_answer = _compose([caption, "trees grow along a river ."], [("river", 0.9)], answer, cover, vectors)
    said = sentences(sources_answer.detailed)
    assert said[0] == caption
    assert "Houses stand on the other bank." in said  # the LLM's new content (houses: the buildings) stays
    # trees: only a candidate that did not lead names them, and a rejected candidate licenses nothing
    assert "Trees grow on the other bank. (names trees, which no source mentions)" in sources_answer.dropped
    assert not any("one side of the river" in s for s in said)  # its paraphrases go
    assert "The buildings have flat grey (cut off by the token limit)" in sources_answer.dropped
    assert cover[0][0] in said and cover[1][0] not in said  # shares under min_cover are not stated
    assert vectors[0] in said
    kinds = [v.split(" ", 1)[0] for v in sources_answer.verified]
    assert kinds == ["class", "vectors:", "cover:"]
    assert said.index(vectors[0]) < said.index(cover[0][0]) < said.index("Houses stand on the other bank.")
    # a sentence that does not fit the word limit is left out whole; the next one that fits is kept
    short = _compose([caption], [("river", 0.9)], answer, cover, vectors, max_words=26)
    assert short.detailed == f"{caption} {cover[0][0]}"
    assert any("over the 26-word limit" in d for d in short.dropped)
    # the lead alone: no other part asked for
    alone = _compose([caption], [("river", 0.9)], answer, cover, vectors, parts=())
    assert alone.detailed == caption
    # the lead alone, but one checked fact per tile: the class when it is sure, else a vector fact, else a share
    road = "a road beside black water ."  # names no class
    assert _compose([road], [("river", 0.9)], answer, cover, vectors, parts=(), ensure_verified=True).detailed \
        == f"{road} {brief_class('river', 0.9)}"
    assert _compose([road], [("river", 0.3)], answer, cover, vectors, parts=(), ensure_verified=True).detailed \
        == f"{road} {vectors[0]}"
    assert _compose([road], [], answer, cover, (), parts=(), ensure_verified=True).detailed == f"{road} {cover[0][0]}"
    small = _compose([road], [], answer, cover[1:], (), parts=(), ensure_verified=True)  # 4%: under min_cover
    assert small.detailed == f"{road} {cover[1][0]}" and small.verified == [f"cover: {cover[1][0]}"]
    # said briefly when the pipeline gives the brief form (the number is the fact sentence's own); the
    # verified record names the fact sentence, with how the share was measured
    brief = [(brief_cover("vegetation", 0.04, "rgb_exg"), 0.04, cover[1][0]),
             (brief_cover("water", 0.48, "rgb_water"), 0.48, cover[0][0])]
    assert brief[0][0] == "4% vegetation." and brief_cover("water", 0.4, "ndwi") == "40% water."
    sources = [road, *(c for c, _ in cover)]
    said = compose_captions(Captions("", []), Perspectives([road], [], cover, [], brief=brief), INSTRUCTIONS,
                            sources, [], 60, 3, (), ensure_verified=True)
    assert said.detailed == f"{road} 48% open water." and said.verified == [f"cover: {cover[0][0]}"]
    named = _compose(["a river beside a road ."], [("river", 0.9)], parts=(), ensure_verified=True)
    assert named.detailed == "a river beside a road ." and named.verified[0].startswith("class river")
    # without candidates the LLM's first sentence leads
    no_model = _compose([], [], "DETAILED: Houses stand in rows. Houses stand in long rows.", vectors=vectors,
                        parts=("llm",))
    assert no_model.detailed == "Houses stand in rows." and no_model.verified == []
    with pytest.raises(ValueError, match="unknown detailed part"):
        compose_captions(Captions("x", []), Perspectives(), "", [], [], 10, 1, ["poetry"])


def test_cover_words_of_a_caption():
    assert cover_named("many houses with plants surrounded in the medium residential area .", "vegetation") == "plants"
    assert cover_named("a villa is surrounded by trees and lawn .", "vegetation") == "trees"
    assert cover_named("a river goes through a dense forest .", "water") == "river"
    assert cover_named("a river goes through the desert .", "vegetation") == ""
    # a negated sentence claims no cover: "no vegetation" is not vegetation
    assert cover_named("there is no vegetation in the desert . this is a sandy desert .", "vegetation") == ""
    assert cover_named("no trees here . a lawn with a pool .", "vegetation") == "lawn"


VEG = "Vegetation covers about 30% of the area (estimated from RGB colour)."


def _shared(candidates, veg, pool=None, classes=(), vectors=()):
    """Compose as the pipeline does for a tile of no water whose only stated share is vegetation."""
    share = (VEG.replace("30%", f"{veg * 100:.0f}%"), veg)
    sources = [candidates[0], share[0], *vectors]
    perspectives = Perspectives(list(candidates), list(classes), [share], list(vectors), water=0.0,
                                brief=[(brief_cover("vegetation", veg, "rgb"), veg, share[0])],
                                consensus=(pool or candidates)[0],
                                shares={"vegetation": (veg, share[0]), "water": (0.0, "Open water covers about 0%.")},
                                pool=list(pool or candidates))
    cleaned = clean_captions("", INSTRUCTIONS, sources, [], 3, 60, 25, fill=sources)
    return compose_captions(cleaned, perspectives, INSTRUCTIONS, sources, [], 60, 3, ("class", "vectors"),
                            min_probability=0.5, min_cover=0.1, ensure_verified=True)


def test_a_lead_whose_own_words_a_share_confirms_needs_no_appended_fact():
    """The lead says plants and 30 % of the tile is measured vegetation: that is the checked fact,
    and nothing is appended. Under min_cover, "plants" confirms nothing and the share is appended."""
    lead = "many houses with plants surrounded in the medium residential area ."
    confirmed = _shared([lead], 0.3)
    assert confirmed.detailed == lead and confirmed.short[0] == lead
    assert confirmed.verified == [f"cover: the caption names plants; {VEG}"]
    thin = _shared([lead], 0.03)
    assert thin.detailed == f"{lead} 3% vegetation." and thin.verified[0].startswith("cover: Vegetation covers")


def test_a_near_consensus_candidate_with_a_confirmed_cover_leads_the_detailed_caption():
    """The consensus pick names no cover; the pool's second candidate says plants and the tile is 28 %
    vegetation: it leads the detailed caption (its words are the fact), the short captions keep the
    consensus pick first. A fourth candidate is too far down the pool; a class or vector fact to state
    keeps the consensus lead."""
    pool = ["a road go across another one diagonally with some cars on the roads .",
            "an overpass with a road go across another one diagonally with some plants beside the roads .",
            "a road go across another one with many cars on the roads ."]
    swapped = _shared(pool, 0.28)
    assert swapped.detailed == pool[1] and swapped.short[0] == pool[0]
    assert swapped.verified == [f"cover: the caption names plants; {VEG.replace('30%', '28%')}"]
    # a candidate whose other words the measurements contradict does not lead: no river on dry land
    wet_words = [pool[0], "a river with dense forest on both banks of the river .", pool[1]]
    assert _shared(wet_words, 0.28).detailed == pool[1]
    far = [pool[0], pool[2], "a road go across another one .", pool[1]]
    assert _shared(far, 0.28).detailed == f"{pool[0]} 28% vegetation."
    with_class = _shared(pool, 0.28, classes=[("overpass", 0.9)])
    assert with_class.detailed.startswith(pool[1])  # the confident class leads, as before
    assert with_class.verified[0].startswith("class overpass (0.90): named by the caption")
    vector = "There are 3 buildings covering about 12% of the image, mostly in the north part."
    assert _shared(pool, 0.28, vectors=[vector]).detailed == f"{pool[0]} {vector}"


def test_the_clips_order_chooses_the_lead():
    """With the CLIP's order of the pool (``judged``), the closest candidate leads when no class
    guides the choice, and among the candidates naming the confident class the closest one leads."""
    pool = ["it is a piece of farmland .", "here is a piece of farmland .", "a river with trees on both banks ."]
    plain = compose_captions(Captions("", []), Perspectives(pool, [("lake", 0.3)], consensus=pool[0], pool=pool,
                                                            judged=[pool[1], pool[0], pool[2]]),
                             INSTRUCTIONS, pool[:1], [], 60, 3, ())
    assert plain.detailed == pool[1] and plain.short[0] == pool[1]
    # both farmland captions name the sure class: the CLIP's closer one leads, not the first
    sure = compose_captions(Captions("", []), Perspectives(pool, [("farmland", 0.8)], consensus=pool[0], pool=pool,
                                                           judged=[pool[2], pool[1], pool[0]]),
                            INSTRUCTIONS, pool[:1], [], 60, 3, ())
    assert sure.detailed == pool[1] and sure.verified[0].startswith("class farmland (0.80): named by the caption")
    # without the CLIP's order, the consensus pick and the first naming the class lead, as before
    assert compose_captions(Captions("", []), Perspectives(pool, [("farmland", 0.8)], consensus=pool[0], pool=pool),
                            INSTRUCTIONS, pool[:1], [], 60, 3, ()).detailed == pool[0]
