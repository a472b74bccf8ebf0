"""hqrs_geo.change on two embedded dates of a real scene (the shipped hqrs-mini-clip): a global
colour/brightness shift is absorbed by the per-scene calibration while the tiles given new
content rank first; the scores against independent numpy / scipy computations from the raw
embeddings; texts the tiles became or stopped being; zero-shot classes against classify; few-shot
change from marked pairs; pairs that are not compared; one-line errors."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from change_scenes import FOREST, PASTED, TILE, tile_id, write_dates
from scipy import stats

import hqrs_geo as hg
from hqrs_geo import read_embeddings, read_runs, read_tiles
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.errors import InputError, OptionError

CLASSES = ["river", "buildings", "trees", "road"]
MODEL = "hqrs-mini-clip"


@pytest.fixture(scope="module")
def dates(tmp_path_factory):
    """``before.gpkg`` and ``after.gpkg`` (64 tiles each, hqrs-mini-clip embeddings), each tiled
    on its own (ids differ: the tiles pair by footprint). Read-only: copy to change them."""
    folder = tmp_path_factory.mktemp("dates")
    before, after = write_dates(folder)
    config = hg.TileConfig(tile_size=TILE)
    for raster in (before, after):
        hg.run(raster, raster.with_suffix(".gpkg"), embed_models=[MODEL], tiling=config, device="cpu",
               options=RunOptions(workers=0, embedding_dtype="float32"))
    return folder / "before.gpkg", folder / "after.gpkg"


@pytest.fixture(scope="module")
def layer(dates, tmp_path_factory):
    """The change layer of the two dates with classes, a text and marked pairs."""
    out = tmp_path_factory.mktemp("change") / "change.gpkg"
    positive = [tile_id("before", *FOREST[0]), tile_id("before", *FOREST[1])]
    negative = [tile_id("before", 0, 1), tile_id("before", 4, 4)]
    frame = hg.change(*dates, out, captions=False, classes=CLASSES, became="trees", positive=positive,
                      negative=negative, device="cpu")
    return out, frame


def _pasted(frame):
    return frame.tile_id.isin([tile_id("before", r, c) for r, c in PASTED])


def test_global_shift_is_absorbed_and_changed_tiles_rank_first(layer):
    _, frame = layer
    assert len(frame) == 64 and frame.compared.all()
    pasted = _pasted(frame)
    ranked = frame.sort_values("change_rank")
    assert pasted[ranked.index[:len(PASTED)]].all()  # the five changed tiles first
    # the shift moved every tile (a fixed cut on 1 - cos would flag part of the scene) ...
    unchanged = frame[~pasted]
    assert unchanged.change_cosine.median() > 0.05
    assert (unchanged.change_cosine > 0.2).sum() >= 5
    # ... but the calibrated score flags few of them, and the changed ones
    assert unchanged.changed.sum() <= 2
    assert frame[pasted].changed.all()
    assert (frame.changed == (frame.change_score >= 3.0)).all()
    assert frame.change_rank.min() == 1 and frame.change_rank.max() == 64


def test_scores_equal_an_independent_computation(dates, layer):
    out, frame = layer
    tiles = {}
    for name, path in zip(("before", "after"), dates):
        data = read_tiles(path)
        present, matrix = read_embeddings(data)
        assert present.all()
        tiles[name] = {(r, c): v for r, c, v in zip(data.row, data.col, np.asarray(matrix, np.float64))}
    d = {}
    for (r, c), b in tiles["before"].items():
        a = tiles["after"][(r, c)]
        d[tile_id("before", r, c)] = 1 - b @ a / np.linalg.norm(a) / np.linalg.norm(b)
    expected = frame.tile_id.map(d).to_numpy()
    assert np.abs(frame.change_cosine.to_numpy() - expected).max() < 1e-5
    median = np.median(expected)
    mad = np.median(np.abs(expected - median))
    assert np.allclose(frame.change_score, (expected - median) / (1.4826 * mad), atol=1e-4)
    assert np.allclose(frame.change_pct, [stats.percentileofscore(expected, v, kind="weak") for v in expected])
    order = np.argsort(-expected, kind="stable")
    assert (frame.change_rank.to_numpy()[order] == np.arange(1, 65)).all()
    assert frame.after_tile_id.tolist() == [t.replace("before", "after") for t in frame.tile_id]
    run = read_runs(out)[-1]
    assert run["command"] == "change"
    params = run["params"]
    assert params["threshold"] == 3.0 and params["min_overlap"] == 0.5 and params["model"] == MODEL
    (source, median_recorded), = params["median"].items()
    assert source.endswith("before.tif") and median_recorded == pytest.approx(median, abs=1e-5)
    assert params["mad"][source] == pytest.approx(mad, abs=1e-5)
    assert params["counts"] == {"tiles": 64, "paired": 64, "compared": 64, "changed": int(frame.changed.sum())}
    assert read_tiles(out).tile_id.tolist() == frame.tile_id.tolist()  # what was returned is what was written


def test_tiles_that_became_and_stopped_being_trees(dates, layer, tmp_path):
    _, frame = layer
    forests = [tile_id("before", r, c) for r, c in FOREST]
    top = frame.sort_values("became_rank").tile_id[:5].tolist()
    assert set(forests) <= set(top)
    assert frame.set_index("tile_id").loc[forests, "became_score"].min() > 0.2
    # the same pair the other way round: the forests stopped being trees
    back = hg.change(dates[1], dates[0], tmp_path / "back.gpkg", captions=False, stopped="trees", became="trees",
                     device="cpu")
    assert set(back.sort_values("stopped_rank").tile_id[:5]) >= {tile_id("after", r, c) for r, c in FOREST}
    assert np.allclose(back.stopped_score, -back.became_score)
    assert np.allclose(back.change_cosine, frame.change_cosine)  # the distance is symmetric


def test_classes_of_both_dates_are_those_of_classify(dates, layer):
    _, frame = layer
    before = hg.classify(str(dates[0]), CLASSES, model=MODEL).set_index("tile_id").label
    after = hg.classify(str(dates[1]), CLASSES, model=MODEL).set_index("tile_id").label
    assert frame.class_before.tolist() == before.loc[frame.tile_id].tolist()
    assert frame.class_after.tolist() == after.loc[frame.after_tile_id].tolist()
    for row in frame.itertuples():
        assert row.class_change == ("" if row.class_before == row.class_after
                                    else f"{row.class_before} → {row.class_after}")
    forests = frame.tile_id.isin([tile_id("before", r, c) for r, c in FOREST])
    assert (frame[forests].class_after == "trees").all()


def test_marked_changed_pairs_find_the_other_changed_pairs(layer):
    _, frame = layer
    held_out = tile_id("before", *FOREST[2])
    prob = frame.set_index("tile_id").change_prob
    unchanged = prob[~_pasted(frame).to_numpy()]
    assert prob[held_out] > 0.5 and prob[held_out] > unchanged.max()
    assert (unchanged < 0.5).mean() > 0.9


def test_pairs_not_compared(dates, tmp_path):
    """AFTER tiles missing or with too little valid area: kept as rows, not compared, no scores."""
    after = hg.read_tiles(dates[1])
    gone = [tile_id("after", 0, 0), tile_id("after", 7, 7)]
    low = tile_id("after", 4, 4)
    after = after[~after.tile_id.isin(gone)].copy()
    after.loc[after.tile_id == low, "valid_fraction"] = 0.3
    path = tmp_path / "after.gpkg"
    shutil.copy(dates[1], path)
    hg.write_tiles(path, after, replace_all=True)
    frame = hg.change(dates[0], path, tmp_path / "c.gpkg", captions=False, device="cpu").set_index("tile_id")
    missing = [tile_id("before", 0, 0), tile_id("before", 7, 7)]
    assert frame.loc[missing, "after_tile_id"].isna().all() and (frame.loc[missing, "overlap"] == 0).all()
    assert frame.loc[tile_id("before", 4, 4), "overlap"] == pytest.approx(0.3)
    skipped = missing + [tile_id("before", 4, 4)]
    assert not frame.loc[skipped, "compared"].any() and not frame.loc[skipped, "changed"].any()
    for column in ("change_cosine", "change_score", "change_pct", "change_rank"):
        assert frame.loc[skipped, column].isna().all()
    assert frame.compared.sum() == 61 and frame.change_rank.max() == 61
    both = hg.change(dates[0], path, tmp_path / "c2.gpkg", captions=False, min_overlap=0.25, device="cpu")
    assert both.compared.sum() == 62


def test_dates_of_different_models_are_refused(dates, tmp_path, tiny_clip_checkpoint):
    from tiny_models import TINY_CLIP

    other = tmp_path / "after.gpkg"
    hg.tile(dates[1].with_suffix(".tif"), other, hg.TileConfig(tile_size=TILE))
    hg.embed(other, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu",
             options=RunOptions(workers=0))
    with pytest.raises(OptionError, match="by hqrs-mini-clip.*by hqrs-test-tiny-clip.*same model"):
        hg.change(dates[0], other, tmp_path / "c.gpkg", captions=False, device="cpu")
    assert not (tmp_path / "c.gpkg").exists()


def test_bad_arguments_are_one_line_errors(dates, tmp_path):
    out = tmp_path / "c.gpkg"
    cases = [
        (dict(threshold=float("nan")), OptionError, "threshold"),
        (dict(min_overlap=1.5), OptionError, "min_overlap"),
        (dict(became="  "), OptionError, "empty"),
        (dict(negative=[tile_id("before", 0, 1)]), OptionError, "positive"),
        (dict(positive=["nope"]), OptionError, "unknown tile id 'nope'"),
        (dict(positive=["x"], negative=["x"]), OptionError, "both changed and unchanged"),
        (dict(classes=["trees"]), OptionError, "at least two labels"),
    ]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text) as caught:
            hg.change(*dates, out, captions=False, device="cpu", **kwargs)
        assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="not found"):
        hg.change(dates[0], tmp_path / "missing.gpkg", out, captions=False)
    with pytest.raises(OptionError, match="both dates"):
        hg.change(dates[0], dates[0], out, captions=False)
    with pytest.raises(OptionError, match="is a date layer"):  # never written over a date
        hg.change(*dates, dates[1], captions=False)
    with pytest.raises(hg.OutputError, match="does not exist"):
        hg.change(*dates, tmp_path / "no" / "c.gpkg", captions=False)
    assert not out.exists()
