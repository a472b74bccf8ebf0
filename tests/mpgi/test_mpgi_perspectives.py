"""MpGI's offline perspectives in the pipeline: the zero-shot class stage on real tiles with the shipped
CLIP, against the probabilities computed one tile at a time; the class fact only when it is sure."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_SCENE

from hqrs_geo import TileConfig, tile_rasters, write_tiles
from hqrs_geo.layer.runs import new_run
from hqrs_geo.models.encode import image_batch_vectors
from hqrs_geo.models.loader import load_model
from hqrs_geo.models.zeroshot import zero_shot
from hqrs_geo.mpgi.integrate import class_sentence
from hqrs_geo.mpgi.pipeline import MpgiRun, _TilePixels
from hqrs_geo.mpgi.recipe import load_recipe

LABELS = ["river", "parking lot", "industrial", "forest", "dense residential"]


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """Four 250-px tiles of the example scene (the river, the factory, and two others)."""
    tiles, scenes = tile_rasters(EXAMPLE_SCENE, TileConfig(tile_size=250))
    path = tmp_path_factory.mktemp("classes") / "tiles.gpkg"
    write_tiles(path, tiles.iloc[[4, 5, 8, 15]].reset_index(drop=True),
                new_run("tile", "tiles", {"scenes": [s.as_dict() for s in scenes]}))
    return path


def _run(layer, tmp_path, floor: float) -> tuple[MpgiRun, list[str]]:
    recipe = tmp_path / f"r{floor}.toml"
    recipe.write_text(f'[zero_shot]\nlabels = {LABELS!r}\nmin_probability = {floor}\n'.replace("'", '"'))
    run = MpgiRun(str(layer), load_recipe(str(recipe)), str(tmp_path / f"out{floor}.gpkg"), device="cpu")
    pixels = _TilePixels(str(layer))
    ids = list(pixels.index)
    try:
        run._class_stage(pixels, ids)
    finally:
        pixels.close()
    return run, ids


def test_zero_shot_classes_match_one_tile_at_a_time_and_are_recorded(layer, tmp_path):
    run, ids = _run(layer, tmp_path, 0.5)
    loaded = load_model("hqrs-mini-clip", device="cpu")
    labeller = zero_shot(loaded, LABELS)
    pixels = _TilePixels(str(layer))
    try:
        for tile_id in ids:
            image = torch.from_numpy(np.ascontiguousarray(pixels.pixels(tile_id))).permute(2, 0, 1)[None]
            probs = labeller.probabilities(image_batch_vectors(loaded, image))[0]
            ranked = run.classes[tile_id]
            assert [label for label, _ in ranked] == [LABELS[j] for j in np.argsort(-probs, kind="stable")[:3]]
            assert [p for _, p in ranked] == pytest.approx(sorted(probs, reverse=True)[:3], abs=1e-4)
            recorded = [c for c in run.calls[tile_id] if c.stage == "classes"]
            assert len(recorded) == 1 and recorded[0].text.startswith(f"{ranked[0][0]}:")
    finally:
        pixels.close()


def test_the_class_is_a_fact_only_when_sure(layer, tmp_path):
    for floor in (0.0, 1.0):
        run, ids = _run(layer, tmp_path, floor)
        facts = {t: (None, ["a metadata fact."], []) for t in ids}
        run.class_facts(facts)
        for tile_id in ids:
            label, p = run.classes[tile_id][0]
            expected = [class_sentence(label, p)] if floor == 0.0 else []
            assert facts[tile_id][1] == ["a metadata fact.", *expected] and facts[tile_id][2] == expected
