"""The tile reader interface the model engine consumes, in real DataLoader worker processes."""
from __future__ import annotations

import pickle

import numpy as np
import rasterio
import torch
from conftest import EXAMPLE_SCENE, NAIP_SCENE
from rasterio.windows import Window
from torch.utils.data import DataLoader

from hqrs_geo import TileConfig, TileDataset, collate_tiles, read_tiles, tile_rasters, write_tiles
from hqrs_geo.layer.runs import new_run


def test_dataloader_workers_preserve_order_and_pixels():
    ds = TileDataset.from_rasters([EXAMPLE_SCENE, NAIP_SCENE],
                                  TileConfig(tile_size=128, overlap=32, edge="drop"))
    assert len(ds) > 50
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate_tiles,
                        multiprocessing_context="spawn")
    seen = []
    for records, batch in loader:
        assert batch.dtype == torch.uint8 and batch.shape[1:] == (128, 128, 3)
        seen.extend(zip(records, batch.numpy()))
    assert [r.tile_id for r, _ in seen] == [r.tile_id for r in ds.records]
    for rec, pixels in seen[::7]:
        with rasterio.open(rec.source) as src:
            ref = src.read([1, 2, 3], window=Window(rec.x_off, rec.y_off, 128, 128))
            valid = src.dataset_mask(window=Window(rec.x_off, rec.y_off, 128, 128)) > 0
        assert np.array_equal(pixels, np.where(valid[..., None], np.moveaxis(ref, 0, -1), 0)), rec.tile_id


def test_reader_pickles_without_open_handles():
    ds = TileDataset.from_rasters(EXAMPLE_SCENE, TileConfig(tile_size=250))
    _ = ds[0]
    assert ds.reader._open  # opened in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._open == {}
    assert np.array_equal(clone[3][1], ds[3][1])


def test_dataset_from_layer_matches_dataset_from_rasters(tmp_path):
    config = TileConfig(tile_size=96, gsd=0.5, stretch="auto")
    tiles, scenes = tile_rasters(EXAMPLE_SCENE, config)
    layer = tmp_path / "t.gpkg"
    write_tiles(layer, tiles, new_run("tile", "tiles", {"scenes": [s.as_dict() for s in scenes]}))
    direct = TileDataset.from_rasters(EXAMPLE_SCENE, config)
    from_layer = TileDataset.from_layer(layer)
    assert len(direct) == len(from_layer) == len(read_tiles(layer)) == 36  # 192 native px per tile, shifted edges
    for i in (0, 7, 35):
        assert direct[i][0].tile_id == from_layer[i][0].tile_id
        assert np.array_equal(direct[i][1], from_layer[i][1])
        assert direct[i][1].shape == (96, 96, 3)
