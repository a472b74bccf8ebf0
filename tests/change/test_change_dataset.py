"""Change between two partitioned datasets, part by part: the same layer as between the merged
GeoPackages, embeddings the AFTER dataset lacks computed part by part, and no dataset ever read whole."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from change_scenes import PASTED, TILE, tile_id, write_dates
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo.compare.dates import DateLayer
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.engine.partitioned import ScaleOptions

CONFIG = hg.TileConfig(tile_size=TILE)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tiny_clip_checkpoint):
    """BEFORE: a dataset of 4 parts with tiny-CLIP embeddings; AFTER: 4 parts, tiles only."""
    folder = tmp_path_factory.mktemp("datasets")
    before, after = write_dates(folder)
    hg.run(before, f"{folder}/before/", embed_models=[TINY_CLIP], embed_checkpoints=[str(tiny_clip_checkpoint)],
           tiling=CONFIG, device="cpu", options=RunOptions(workers=0), scale=ScaleOptions(block_tiles=16))
    hg.tile(after, f"{folder}/after/", CONFIG, scale=ScaleOptions(block_tiles=16))
    return folder / "before", folder / "after"


def test_datasets_are_compared_part_by_part(datasets, tmp_path, tiny_clip_checkpoint, monkeypatch):
    import hqrs_geo.layer.dataset as dataset_module
    import hqrs_geo.layer.io as io_module

    def guarded(function):
        def read(path, *args, **kwargs):  # the engine may read what it wrote; the change step never reads whole
            if dataset_module.is_dataset(path) and "hqrs_geo/compare/" in sys._getframe(1).f_code.co_filename:
                raise AssertionError(f"the change step read the whole dataset {path}")
            return function(path, *args, **kwargs)
        return read

    monkeypatch.setattr(io_module, "read_tiles", guarded(io_module.read_tiles))
    monkeypatch.setattr(dataset_module, "read_dataset_tiles", guarded(dataset_module.read_dataset_tiles))
    monkeypatch.setattr(io_module, "read_dataset_tiles", guarded(io_module.read_dataset_tiles))
    marked = dict(positive=[tile_id("before", r, c) for r, c in list(PASTED)[:2]], negative=[tile_id("before", 0, 0)])
    frame = hg.change(*datasets, tmp_path / "c.gpkg", model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint),
                      captions=False, became="a forest", device="cpu", options=RunOptions(workers=0), **marked)
    monkeypatch.undo()
    assert len(frame) == 64 and frame.compared.all()  # AFTER's embeddings were computed, part by part
    blocks = list(DateLayer(str(datasets[0])).blocks())
    assert len(blocks) == 4 and all(len(b.frame) == 16 for b in blocks)
    after = DateLayer(str(datasets[1]))
    near = after.blocks_over(tuple(blocks[0].frame.total_bounds), blocks[0].frame.crs)
    assert 1 <= len(near) <= 2  # the AFTER part of the same rows (and the one touching it), not all four

    merged = [hg.merge_dataset(d, tmp_path / f"{d.name}.gpkg").path for d in datasets]
    reference = hg.change(*merged, tmp_path / "ref.gpkg", captions=False, became="a forest", device="cpu", **marked)
    by_id = frame.set_index("tile_id")
    expected = reference.set_index("tile_id").loc[by_id.index]
    for column in ("change_cosine", "change_score", "change_pct", "became_score", "change_prob"):
        assert np.allclose(by_id[column], expected[column], atol=1e-6), column
    for column in ("change_rank", "became_rank", "changed", "after_tile_id", "overlap"):
        assert by_id[column].tolist() == expected[column].tolist(), column
    assert frame.tile_id.str.startswith("before_").all() and frame.after_tile_id.str.startswith("after_").all()


def test_the_change_of_a_dataset_can_be_a_dataset(datasets, tmp_path, tiny_clip_checkpoint):
    """Written part by part (one part per BEFORE part, the BEFORE scenes' readings kept): the same
    rows as the change layer file; a rerun replaces it; a folder output needs a BEFORE dataset."""
    models = dict(model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), captions=False, device="cpu")
    layer = hg.change(*datasets, tmp_path / "c.gpkg", **models)
    summary = hg.change(*datasets, f"{tmp_path}/changes/", **models)
    assert summary == {"output": str(tmp_path / "changes"), "parts": 4, "tiles": 64, "paired": 64, "compared": 64,
                       "changed": int(layer.changed.sum())}
    parts = sorted(p.name for p in (tmp_path / "changes").glob("*.parquet"))
    assert parts == sorted(p.name for p in datasets[0].glob("*.parquet"))
    written = hg.read_tiles(tmp_path / "changes")
    assert written.tile_id.tolist() == layer.tile_id.tolist()
    for column in ("change_cosine", "change_score", "change_pct"):
        assert np.allclose(written[column], layer[column]), column
    assert written.change_rank.tolist() == layer.change_rank.tolist()
    runs = hg.read_runs(tmp_path / "changes")
    assert runs[-1]["command"] == "change" and set(runs.scenes()) == set(hg.read_runs(datasets[0]).scenes())
    merged = hg.merge_dataset(tmp_path / "changes", tmp_path / "m.gpkg").frame  # a tile dataset like any
    assert merged.change_rank.tolist() == layer.change_rank.tolist()
    again = hg.change(*datasets, f"{tmp_path}/changes/", **models)
    assert again["parts"] == 4 and len(hg.read_runs(tmp_path / "changes")) == 2
    hg.tile(datasets[1].parent / "after.tif", f"{tmp_path}/tiles/", CONFIG)
    with pytest.raises(hg.OptionError, match="not written by change"):  # a tile dataset is never overwritten
        hg.change(*datasets, f"{tmp_path}/tiles/", **models)
    with pytest.raises(hg.OptionError, match="needs a dataset as before"):
        hg.change(tmp_path / "m.gpkg", datasets[1], f"{tmp_path}/other/", **models)
    assert not (tmp_path / "other").exists()


def test_after_rasters_are_tiled_like_a_before_dataset(datasets, tmp_path):
    """AFTER rasters against a BEFORE dataset: tiled like it into the dataset ``<stem>-after/``,
    embedded by the model BEFORE's embeddings were made with (its checkpoint from the run record)."""
    frame = hg.change(datasets[0], datasets[0].parent / "after.tif", tmp_path / "c.gpkg", captions=False,
                      device="cpu", options=RunOptions(workers=0))
    assert (tmp_path / "c-after" / "_manifest.json").is_file()
    assert len(frame) == 64 and frame.compared.all() and (frame.after_tile_id == frame.tile_id).all()
    assert len(list((tmp_path / "c-after").glob("*.parquet"))) == 4
