"""One date of a comparison: a tile layer (file or dataset folder) read block by block.

A :class:`Block` is what the change step works on at once: the tiles of a layer file, or of one
part of a dataset, without their embedding columns, and the rows of their embeddings in the
memory-mapped caches the search session keeps (:mod:`hqrs_geo.search.cache`, and the per-part
caches of :mod:`hqrs_geo.search.partitioned`). So a dataset is compared part by part and its
vectors are never all in memory.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
from pyproj import Transformer

from ..layer.columns import EMBEDDING_PREFIX
from ..layer.dataset import is_dataset, read_dataset_runs, same_crs, verified_part
from ..search.partitioned import open_session

#: After-date parts kept read while BEFORE parts are compared (a part usually meets few others).
PART_CACHE = 8


@dataclass
class Block:
    """Tiles (no embedding columns) with the row of each one's embedding in ``matrix`` (-1: none)."""

    name: str | None
    frame: Any
    matrix: np.ndarray
    vec_row: np.ndarray

    @property
    def has_vector(self) -> np.ndarray:
        """Rows with an embedding."""
        return self.vec_row >= 0

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of frame rows ``rows`` (each must have one)."""
        if len(rows) == 0:
            return np.zeros((0, self.matrix.shape[1] if self.matrix.ndim == 2 else 0), dtype=np.float32)
        return np.asarray(self.matrix[self.vec_row[rows]], dtype=np.float32)


def _without_embeddings(frame: Any) -> Any:
    return frame.drop(columns=[c for c in frame.columns if str(c).startswith(EMBEDDING_PREFIX)])


class DateLayer:
    """The tiles and embeddings of one date, through a search session on it (which also gives
    the embeddings' own model for texts and zero-shot classes)."""

    def __init__(self, path: str, model: str | None = None, device: str = "cpu"):
        self.path = str(path)
        self.dataset = is_dataset(self.path)
        self.session = open_session(self.path, model=model, device=device)
        self.source = self.session.source
        self._parts: OrderedDict[str, Block] = OrderedDict()
        self._part_bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def crs(self) -> Any:
        """The CRS of the blocks' footprints."""
        return self.session.index.manifest.crs if self.dataset else self.session.frame.crs

    def scenes(self) -> list[dict]:
        """The readings of the date's scenes (for the change layer's run record)."""
        runs = self.session.opened.runs if not self.dataset else _dataset_runs(self.path)
        return [reading.as_dict() for reading in runs.scenes().values()]

    def part_names(self) -> list[str]:
        """The dataset's parts with tiles (empty for a layer file)."""
        if not self.dataset:
            return []
        manifest = self.session.index.manifest
        return [name for name in sorted(manifest.parts) if manifest.parts[name].get("tiles", 0) > 0]

    def blocks(self) -> Iterator[Block]:
        """Every block: the layer file's one, or one per dataset part (read one at a time)."""
        if not self.dataset:
            yield self.layer_block()
            return
        for name in self.part_names():
            yield self.part_block(name)

    def layer_block(self) -> Block:
        """The whole layer file as one block."""
        session = self.session
        frame = _without_embeddings(session.frame)
        vec_row = np.full(len(frame), -1, dtype=np.int64)
        vec_row[session.rows] = np.arange(len(session.rows))
        return Block(None, frame, session.index.matrix, vec_row)

    def part_block(self, name: str) -> Block:
        """Part ``name`` of the dataset as a block (footprints in the dataset's CRS)."""
        index = self.session.index
        path = verified_part(index.manifest, name)
        names = [c for c in pq.read_schema(path).names if not c.startswith(EMBEDDING_PREFIX)]
        frame = gpd.read_parquet(path, columns=names)
        crs = index.manifest.crs
        if crs is not None and frame.crs is not None and not same_crs(frame.crs, crs):
            frame = frame.to_crs(crs)
        vectors = index.by_name.get(name)
        vec_row = np.full(len(frame), -1, dtype=np.int64)
        if vectors is None:
            return Block(name, frame, np.zeros((0, index.dim), dtype=np.float32), vec_row)
        vec_row[np.asarray(vectors.rows)] = np.arange(len(vectors.rows))
        return Block(name, frame, vectors.matrix, vec_row)

    def blocks_over(self, bounds: tuple[float, float, float, float], crs: Any) -> list[Block]:
        """The blocks whose tiles may meet ``bounds`` (in ``crs``): the layer file's one, or the
        dataset's parts whose bounds in the manifest meet them (a few kept read)."""
        if not self.dataset:
            if "layer" not in self._parts:
                self._parts["layer"] = self.layer_block()
            return [self._parts["layer"]]
        found = []
        for name in self._parts_meeting(bounds, crs):
            if name in self._parts:
                self._parts.move_to_end(name)
            else:
                self._parts[name] = self.part_block(name)
                while len(self._parts) > PART_CACHE:
                    self._parts.popitem(last=False)
            found.append(self._parts[name])
        return found

    def _parts_meeting(self, bounds: tuple[float, float, float, float], crs: Any) -> list[str]:
        """The dataset's parts whose bounds (in the manifest, in each part's CRS) meet ``bounds``:
        one vectorised test per CRS, so a BEFORE part costs the same whatever the number of parts."""
        if self._part_bounds is None:
            manifest = self.session.index.manifest
            listed = self.part_names()
            bounds_of = np.full((len(listed), 4), np.nan)
            for i, name in enumerate(listed):
                if manifest.parts[name].get("bounds") is not None:
                    bounds_of[i] = manifest.parts[name]["bounds"]
            crs_of = [manifest.parts[n].get("crs") or manifest.crs for n in listed]
            self._part_bounds = (np.asarray(listed, dtype=object), bounds_of, np.asarray(crs_of, dtype=object))
        names, table, crss = self._part_bounds
        keep = np.zeros(len(names), dtype=bool)
        for target in dict.fromkeys(crss.tolist()):
            rows = crss == target
            box = _bounds_in(bounds, crs, target)
            if box is None:  # cannot be carried over: test every part of that CRS
                keep |= rows
                continue
            t = table[rows]
            meets = ~((t[:, 0] > box[2]) | (t[:, 2] < box[0]) | (t[:, 1] > box[3]) | (t[:, 3] < box[1]))
            keep[rows] = meets | np.isnan(t).any(axis=1)  # no recorded bounds: read it
        return [str(n) for n in names[keep]]


def _dataset_runs(path: str) -> Any:
    return read_dataset_runs(path)


def _bounds_in(bounds: tuple[float, float, float, float], crs: Any, target: Any
               ) -> tuple[float, float, float, float] | None:
    """``bounds`` (in ``crs``) as bounds in ``target`` (None when they cannot be carried over)."""
    if crs is None or target is None or same_crs(crs, target):
        return bounds

    try:
        out = Transformer.from_crs(crs, target, always_xy=True).transform_bounds(*bounds, densify_pts=21)
    except Exception:  # pyproj raises several types for bounds outside a projection: test every part
        return None
    return tuple(float(v) for v in out)  # type: ignore[return-value]


__all__ = ["Block", "DateLayer"]
