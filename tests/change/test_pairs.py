"""Pairing tiles of two dates by footprint, and the calibration's arithmetic (no models)."""
from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from hqrs_geo.compare.pairs import pair_tiles
from hqrs_geo.compare.scores import MIN_SCALE, Calibration, competition_rank, cosine_distance, text_change

SIDE = 64.0  # metres


def grid(prefix: str, dx: float = 0.0, dy: float = 0.0, n: int = 4, crs: str = "EPSG:32633",
         overlap: float = 0.0) -> gpd.GeoDataFrame:
    step = SIDE * (1 - overlap)
    cells = [(r, c) for r in range(n) for c in range(n)]
    boxes = [shapely.box(500000 + c * step + dx, 4000000 - r * step - SIDE + dy, 500000 + c * step + SIDE + dx,
                         4000000 - r * step + dy) for r, c in cells]
    return gpd.GeoDataFrame({"tile_id": [f"{prefix}_r{r:04d}_c{c:04d}" for r, c in cells],
                             "valid_fraction": 1.0}, geometry=boxes, crs=crs)


def test_footprints_within_one_percent_pair_others_do_not():
    before = grid("a")
    assert (pair_tiles(before, grid("b", dx=0.5, dy=-0.4)).after_row == np.arange(16)).all()  # < 1 % of 64 m
    assert (pair_tiles(before, grid("b", dx=1.0)).after_row == -1).all()  # 1.6 %
    assert (pair_tiles(before, grid("a", dx=SIDE / 2)).after_row == -1).all()  # same ids, other places
    shifted = pair_tiles(before, grid("b", dx=SIDE))  # one column over: 12 tiles meet a tile of the other grid
    assert (shifted.after_row >= 0).sum() == 12
    rows = shifted.after_row[shifted.after_row >= 0]
    assert (grid("b", dx=SIDE).geometry.values[rows].centroid.x
            == before.geometry.values[shifted.after_row >= 0].centroid.x).all()


def test_overlapping_tiles_pair_with_their_own_footprint_and_ids_break_ties():
    before = grid("a", overlap=0.5, n=6)
    after = grid("b", overlap=0.5, n=6).sample(frac=1.0, random_state=3).reset_index(drop=True)
    rows = pair_tiles(before, after).after_row
    assert (after.tile_id.to_numpy()[rows] == before.tile_id.str.replace("a_", "b_").to_numpy()).all()
    # two tiles per footprint: the one with the same id wins
    twice = gpd.GeoDataFrame(pd.concat([grid("x"), grid("a")], ignore_index=True), crs="EPSG:32633")
    rows = pair_tiles(grid("a"), twice).after_row
    assert (twice.tile_id.to_numpy()[rows] == grid("a").tile_id.to_numpy()).all()


def test_after_tiles_in_another_crs_are_reprojected_before_pairing():
    before = grid("a")
    after = grid("b").to_crs("EPSG:4326")
    assert (pair_tiles(before, after).after_row == np.arange(16)).all()
    assert (pair_tiles(before, after.iloc[:0]).after_row == -1).all()


def test_calibration_is_robust_and_guarded():
    rng = np.random.default_rng(1)
    d = np.concatenate([0.2 + 0.01 * rng.standard_normal(200), [0.9, 0.8]])
    c = Calibration.of(d)
    assert c.median == pytest.approx(np.median(d)) and c.mad == pytest.approx(np.median(np.abs(d - np.median(d))))
    assert c.scale == pytest.approx(1.4826 * c.mad)
    z = c.z(d)
    assert z[-2] > 30 and z[-1] > 25 and np.abs(z[:200]).max() < 5
    assert (c.z(d + 0.3) == pytest.approx(c.z(d) + 0.3 / c.scale))  # a shift of the whole scene: same order
    shifted = Calibration.of(d + 0.3)
    assert np.allclose(shifted.z(d + 0.3), z)  # ...and the same scores once calibrated on the shifted scene
    assert c.percentile(np.array([d.max(), d.min(), -1.0])).tolist() == [100.0, 100.0 / len(d), 0.0]
    same = Calibration.of(np.zeros(10))  # every pair identical: MAD 0, no division by zero
    assert same.scale == MIN_SCALE and (same.z(np.zeros(10)) == 0).all()
    most = Calibration.of(np.array([0.0] * 8 + [0.5, 0.6]))  # MAD 0: the mean deviation still sees the two
    assert most.scale == pytest.approx(1.2533 * 0.11) and most.z(np.array([0.6]))[0] == pytest.approx(0.6 / most.scale)


def test_ranks_and_text_scores():
    pool = np.sort(np.array([3.0, 1.0, 2.0, 2.0]))
    assert competition_rank(np.array([3.0, 2.0, 1.0]), pool).tolist() == [1, 2, 4]
    b = np.array([[1.0, 0.0], [0.0, 2.0]])
    a = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert cosine_distance(b, a).tolist() == pytest.approx([1.0, 0.0])
    assert text_change(np.array([0.0, 1.0]), b, a).tolist() == pytest.approx([1.0, 0.0])


def test_marked_pairs_and_marked_tiles_are_checked_by_one_helper_in_their_own_words():
    from hqrs_geo.errors import OptionError
    from hqrs_geo.search.marked import PAIRS, TILES, marked_ids

    assert marked_ids(["a", "b", "a"], ["c", "c"], PAIRS, required=False) == (["a", "b"], ["c"])
    assert marked_ids([], [], PAIRS, required=False) == ([], [])  # change without few-shot marks
    cases = [
        (("a", [], PAIRS, False), "positive pairs must be a list of BEFORE tile ids", "positive"),
        ((["a"], [1], PAIRS, False), "negative pairs must be a list of BEFORE tile ids", "negative"),
        (([], ["a"], PAIRS, False), "no changed pair marked; give «positive» BEFORE tile ids", "positive"),
        ((["b", "a"], ["a", "b"], PAIRS, False), "tile 'a' is marked both changed and unchanged", "negative"),
        (("a", [], TILES, True), "positive tiles must be a list of tile ids", "positive"),
        (([], [], TILES, True), "no positive tile; mark at least one tile", "positive"),
        ((["a"], ["a"], TILES, True), "tile 'a' is both positive and negative", "negative"),
    ]
    for (positive, negative, wording, required), text, option in cases:
        with pytest.raises(OptionError) as caught:
            marked_ids(positive, negative, wording, required=required)
        assert caught.value.message.startswith(text) and caught.value.option == option
    with pytest.raises(OptionError, match="3 labelled tiles; at most 2"):
        marked_ids(["a", "b"], ["c"], TILES, limit=2)
