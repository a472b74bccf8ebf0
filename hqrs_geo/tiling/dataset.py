"""Tiles as a map-style dataset of ``(TileRecord, HxWx3 uint8 array)`` for model engines.

The tile plan (records) is small and made once; pixels are read on access. Works directly
with ``torch.utils.data.DataLoader`` (any number of worker processes; order preserved):

    ds = TileDataset.from_rasters("scene.tif", TileConfig(tile_size=224))
    loader = DataLoader(ds, batch_size=64, num_workers=4, collate_fn=collate_tiles)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..layer.io import TileLayer, open_layer
from ..raster.grid import MAX_TILE_SIDE
from .config import TileConfig
from .plan import plan_tiles, prepare_scenes
from .reader import TileReader
from .records import TileRecord


class TileDataset:
    """Random access to tile pixels; pickles without open file handles (DataLoader-safe)."""

    def __init__(self, records: Sequence[TileRecord], reader: TileReader):
        self.records = list(records)
        self.reader = reader

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[TileRecord, np.ndarray]:
        rec = self.records[index]
        rgb, _ = self.reader.read(rec)
        return rec, rgb

    @classmethod
    def from_rasters(
        cls, inputs: str | os.PathLike | Sequence[str | os.PathLike], config: TileConfig | None = None
    ) -> TileDataset:
        """Tile rasters (valid fractions measured, sparse tiles skipped) and serve their pixels."""
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        config = (config or TileConfig()).validated()
        scenes = prepare_scenes(list(inputs), config)
        reader = TileReader(scenes)
        records = list(plan_tiles(scenes, reader, config.min_valid))
        return cls(records, reader)

    @classmethod
    def from_layer(cls, layer: str | os.PathLike | TileLayer) -> TileDataset:
        """Serve the pixels of the tiles of a tile layer (a path, or a :class:`TileLayer` already
        read), as the layer's run records say each scene is read."""
        opened = layer if isinstance(layer, TileLayer) else open_layer(layer)
        return cls.from_frame(opened.frame, opened.scenes(), where=opened.path)

    @classmethod
    def from_frame(cls, frame: Any, scenes: dict, where: str = "layer") -> TileDataset:
        """Serve the tiles of a tile-layer GeoDataFrame read with ``scenes`` (``{source: SceneReading}``)."""
        missing = sorted(set(frame["source"]) - set(scenes))
        if missing:
            raise InputError(f"{where}: no tiling record for source {missing[0]}; tile that scene again")

        fields = TileRecord.__dataclass_fields__
        records = [
            TileRecord(**{k: v for k, v in row.items() if k in fields})
            for row in frame.drop(columns=frame.geometry.name).to_dict("records")
        ]
        for rec in records:  # a layer is a file anyone can edit: bound what a tile may ask to read
            sizes = (rec.out_width, rec.out_height, rec.width, rec.height)
            if not all(isinstance(v, (int, np.integer)) and v >= 1 for v in sizes) \
                    or max(rec.out_width, rec.out_height) > MAX_TILE_SIDE:
                raise InputError(f"{where}: tile {str(rec.tile_id)[:80]!r} has an unusable size "
                                 f"({rec.out_width} x {rec.out_height} px, at most {MAX_TILE_SIDE} a side); "
                                 "tile the scene again")
        return cls(records, TileReader(scenes.values()))


def collate_tiles(batch: Sequence[tuple[TileRecord, np.ndarray]]):
    """DataLoader ``collate_fn``: ``(list of records, uint8 tensor [B, H, W, 3])``.

    The tensor is a channel-last view of contiguous ``[B, 3, H, W]`` memory (what models
    consume): ``tensor.permute(0, 3, 1, 2)`` is contiguous and costs nothing.
    """
    import torch

    records = [rec for rec, _ in batch]
    shapes = {arr.shape for _, arr in batch}
    if len(shapes) > 1:
        raise InputError(f"tiles of different sizes in one batch ({sorted(shapes)}); use one tile size per run")
    planar = np.stack([arr.transpose(2, 0, 1) for _, arr in batch])  # a plain copy for band-sequential tiles
    return records, torch.from_numpy(planar).permute(0, 2, 3, 1)
