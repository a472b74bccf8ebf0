"""hqrs_geo.change and ``hqrs-geo change`` on rasters: BEFORE tiled, AFTER tiled on BEFORE's tiles
(tile_like), both embedded and captioned (tiny open_clip models) into layers beside the output,
reused by a rerun; the command line's summary, printed tiles and one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from change_scenes import TILE, write_dates
from fork_runner import run_cli
from tiny_models import TINY_CLIP, TINY_COCA

import hqrs_geo as hg
from hqrs_geo.engine.options import RunOptions


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    return write_dates(tmp_path_factory.mktemp("rasters"))


def _models(clip, coca) -> dict:
    return dict(model=TINY_CLIP, checkpoint=str(clip), caption_model=TINY_COCA, caption_checkpoint=str(coca),
                decoding=hg.DecodingConfig(method="greedy", min_length=1, max_length=4), device="cpu",
                options=RunOptions(workers=0))


@pytest.fixture(scope="module")
def compared(rasters, tmp_path_factory, tiny_clip_checkpoint, tiny_coca_checkpoint):
    out = tmp_path_factory.mktemp("out") / "change.gpkg"
    frame = hg.change(*rasters, out, tiling=hg.TileConfig(tile_size=TILE),
                      **_models(tiny_clip_checkpoint, tiny_coca_checkpoint))
    return out, frame


def test_rasters_are_tiled_alike_embedded_and_captioned_beside_the_output(compared):
    out, frame = compared
    before, after = out.with_name("change-before.gpkg"), out.with_name("change-after.gpkg")
    b, a = hg.read_tiles(before), hg.read_tiles(after)
    assert len(b) == len(a) == len(frame) == 64
    assert (frame.after_tile_id == frame.tile_id).all()  # tiled on BEFORE's tiles: the same ids
    assert a.geometry.geom_equals_exact(b.geometry, 1e-6).all()
    assert frame.compared.all() and (frame.overlap == 1.0).all()
    captions = {"before": b.set_index("tile_id").caption, "after": a.set_index("tile_id").caption}
    assert frame.caption_before.tolist() == captions["before"].loc[frame.tile_id].tolist()
    assert frame.caption_after.tolist() == captions["after"].loc[frame.tile_id].tolist()
    assert all(isinstance(c, str) and c for c in frame.caption_after)
    assert hg.read_runs(out)[-1]["params"]["after"] == str(after)


def test_a_rerun_reuses_the_date_layers(compared, rasters, tiny_clip_checkpoint, tiny_coca_checkpoint):
    out, frame = compared
    before, after = out.with_name("change-before.gpkg"), out.with_name("change-after.gpkg")
    model_runs = [sum(bool(r["params"].get("tasks")) for r in hg.read_runs(p)) for p in (before, after)]
    again = hg.change(*rasters, out, tiling=hg.TileConfig(tile_size=TILE),
                      **_models(tiny_clip_checkpoint, tiny_coca_checkpoint))
    assert [sum(bool(r["params"].get("tasks")) for r in hg.read_runs(p)) for p in (before, after)] == model_runs
    assert np.array_equal(again.change_cosine, frame.change_cosine)
    assert again.caption_after.tolist() == frame.caption_after.tolist()
    assert [r["command"] for r in hg.read_runs(out)][-2:] == ["change", "change"]


def test_cli_prints_the_most_changed_tiles_and_a_summary(compared, tmp_path, tiny_clip_checkpoint):
    out, frame = compared
    before, after = out.with_name("change-before.gpkg"), out.with_name("change-after.gpkg")
    result = run_cli("change", before, after, "-o", tmp_path / "c.gpkg", "--labels", "water,trees,houses",
                     "--model", TINY_CLIP, "--checkpoint", tiny_clip_checkpoint, "--device", "cpu", "-k", "3",
                     "--json", "--progress", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    printed = next(line for line in lines if "ranking" in line)
    done = lines[-1]
    assert done["stage"] == "done" and done["compared"] == 64 and done["output"] == str(tmp_path / "c.gpkg")
    assert done["threshold"] == 3.0 and done["changed"] == int(frame.changed.sum())
    best = frame.sort_values("change_rank").head(3)
    assert [r["tile_id"] for r in printed["results"]] == best.tile_id.tolist()
    first = printed["results"][0]
    assert first["caption_before"] == best.caption_before.iloc[0] and first["caption_after"]
    assert first["class_change"] in ("", f"{first['class_before']} → {first['class_after']}")
    plain = run_cli("change", before, after, "-o", tmp_path / "c.gpkg", "--no-captions", "--model", TINY_CLIP,
                    "--checkpoint", tiny_clip_checkpoint, "--device", "cpu", "-k", "2")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[1].split()[2] == best.tile_id.iloc[0]
    assert "64 of 64 tile pairs compared" in plain.stderr and "caption" not in hg.read_tiles(tmp_path / "c.gpkg")


def test_cli_errors_are_one_line(compared, rasters, tmp_path, tiny_clip_checkpoint):
    out, _ = compared
    before, after = out.with_name("change-before.gpkg"), out.with_name("change-after.gpkg")
    far = write_dates(tmp_path, {}, offset=(20000.0, 0.0))[1]
    hg.tile(far, tmp_path / "far.gpkg", hg.TileConfig(tile_size=TILE))
    other = tmp_path / "other.gpkg"  # the AFTER date embedded by another model
    hg.tile(rasters[1], other, hg.TileConfig(tile_size=TILE))
    hg.embed(other, model="hqrs-mini-clip", device="cpu", options=RunOptions(workers=0))
    cases = [
        (["change", before, tmp_path / "far.gpkg", "-o", tmp_path / "c.gpkg"], "does not overlap"),
        (["change", before, other, "-o", tmp_path / "c.gpkg", "--no-captions"], "same model"),
        (["change", before, after, "-o", tmp_path / "c.gpkg", "--threshold", "lots"], "--threshold"),
        (["change", before, after, "-o", tmp_path / "none" / "c.gpkg"], "does not exist"),
        (["change", before, after, "-o", tmp_path / "c.txt"], "unsupported layer format"),
        (["change", before, tmp_path / "gone.gpkg", "-o", tmp_path / "c.gpkg"], "not found"),
        (["change", before, after, "-o", tmp_path / "c.gpkg", "--no-captions", "--pos", "nope", "--model", TINY_CLIP,
          "--checkpoint", tiny_clip_checkpoint, "--device", "cpu"], "unknown tile id 'nope'"),
    ]
    for args, text in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "c.gpkg").exists()


def test_layers_on_other_grids_are_refused_before_any_model_runs(rasters, tmp_path):
    """AFTER tiled on its own grid, half a tile off BEFORE's: they overlap but no footprint pairs."""
    after = write_dates(tmp_path, {}, offset=(TILE * 0.25 / 2, 0.0))[1]  # half a tile (0.25 m pixels)
    layers = [tmp_path / "b.gpkg", tmp_path / "a.gpkg"]
    for raster, layer in zip((rasters[0], after), layers):
        hg.tile(raster, layer, hg.TileConfig(tile_size=TILE))
    with pytest.raises(hg.InputError, match="no tile has the footprint of a tile of"):
        hg.change(*layers, tmp_path / "c.gpkg", captions=False)
    assert all(not c.startswith("emb_") for layer in layers for c in hg.read_tiles(layer).columns)
