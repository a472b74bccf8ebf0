"""Prompt wording: class names, synonyms and the ensemble vectors built from them."""
from __future__ import annotations

import numpy as np
import pytest

from hqrs_geo.models.prompts import (CLASS_SYNONYMS, SCENE_CLASSES, ZERO_SHOT_TEMPLATES, class_phrases,
                                     class_prompt_name, query_phrases, synonym_key)


@pytest.mark.parametrize("label, words", [
    ("parking_lot", "parking lot"), ("ParkingLot", "parking lot"), ("BareLand", "bare land"),
    ("river-lake", "river lake"), ("  Sea  Lake ", "sea lake"), ("idle_land", "idle land"),
    ("denseresidential", "denseresidential")])
def test_class_names_become_words(label, words):
    assert class_prompt_name(label) == words


@pytest.mark.parametrize("label, key", [
    ("idle_land", "idle land"), ("BareLand", "bare land"), ("denseresidential", "dense residential"),
    ("baseballdiamond", "baseball diamond"), ("storagetanks", "storage tanks"), ("SeaLake", "sea lake"),
    ("spaceport", None)])
def test_any_spelling_finds_its_synonyms(label, key):
    assert synonym_key(label) == key


def test_phrases_start_with_the_name_and_never_share_a_synonym():
    labels = ["meadow", "grass", "pasture", "unknown thing"]
    phrases = class_phrases(labels)
    assert [p[0] for p in phrases] == ["meadow", "grass", "pasture", "unknown thing"]
    # "grassland" and "a meadow" are claimed by both meadow and grass: dropped for both
    flat = [p for group in phrases for p in group[1:]]
    assert len(flat) == len(set(flat)) and "grassland" not in flat and "a meadow" not in flat
    assert phrases[3] == ["unknown thing"]
    # a synonym that is another label's own name is dropped as well
    assert "a meadow" not in class_phrases(["meadow", "a meadow"])[0][1:]
    assert class_phrases(["meadow", "grass"], synonyms=False) == [["meadow"], ["grass"]]


def test_queries_take_synonyms_only_for_a_whole_class_name():
    assert query_phrases("idle land")[:2] == ["idle land", "bare land"]
    assert query_phrases("a red car near trees") == ["a red car near trees"]


def test_vocabulary_is_consistent():
    assert all("{}" in t for t in ZERO_SHOT_TEMPLATES) and len(set(ZERO_SHOT_TEMPLATES)) == len(ZERO_SHOT_TEMPLATES)
    assert len(set(SCENE_CLASSES)) == len(SCENE_CLASSES)
    for key, synonyms in CLASS_SYNONYMS.items():
        assert key == class_prompt_name(key) and key not in synonyms


def test_ensemble_vectors_equal_a_plain_computation(model_environment):
    """The ensemble against plain open_clip: every prompt embedded and normalised, averaged per
    phrase, normalised, averaged over the phrases, normalised."""
    import torch
    from tiny_models import TINY_CLIP, build_tiny

    from hqrs_geo.models.encode import ensemble_vectors

    model, _, tokenizer = build_tiny(TINY_CLIP)
    labels, templates = ["pond", "harbor"], ["a photo of {}.", "{} from above."]
    got = ensemble_vectors(model, tokenizer, labels, templates, torch.device("cpu"))
    want = []
    for label in labels:
        per_phrase = []
        for phrase in [label, *CLASS_SYNONYMS[label]]:
            with torch.no_grad():
                e = model.encode_text(tokenizer([t.format(phrase) for t in templates])).float()
            e = torch.nn.functional.normalize(e, dim=-1).mean(0)
            per_phrase.append(torch.nn.functional.normalize(e, dim=0))
        want.append(torch.nn.functional.normalize(torch.stack(per_phrase).mean(0), dim=0).numpy())
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
