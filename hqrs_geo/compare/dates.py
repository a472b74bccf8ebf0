"""One date of a comparison: a tile layer (:class:`~hqrs_geo.layer.source.TileSource`: a file or
a dataset folder) read block by block.

A :class:`Block` is what the change step works on at once: the tiles of one part of the layer (a
layer file is one part, a dataset one per part file), without their embedding columns, and the
rows of their embeddings in the memory-mapped caches the search session keeps
(:meth:`~hqrs_geo.search.session.BaseSession.part_vectors`). So a dataset is compared part by
part and its vectors are never all in memory.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layer.columns import EMBEDDING_PREFIX
from ..layer.crs import box_in
from ..layer.source import TilePart, TileSource, open_source
from ..search.sessions import open_session

#: After-date parts kept read while BEFORE parts are compared (a part usually meets few others).
PART_CACHE = 8
#: Layers of one part read whole by :func:`read_tiles`: ``{path: ((mtime_ns, size), tiles)}``.
_KEPT: dict[str, tuple[tuple[int, int], Any]] = {}


def read_tiles(layer: TileSource, columns: list[str]) -> Iterator[Any]:
    """The tiles of each part of ``layer`` (GeoDataFrames with the footprints), one part at a
    time, with those of ``columns`` the part has. A layer of one part (a layer file) is read whole
    once and kept while its file is unchanged, so the checks before a comparison read it once
    (:func:`forget` drops it); the parts of a larger layer are read as asked, never kept."""
    parts = layer.parts()
    if len(parts) != 1:
        for part in parts:
            names = part.columns()
            yield part.read(columns=[c for c in columns if c in names])
        return
    path = os.path.abspath(parts[0].path)
    stat = os.stat(path)
    state = (stat.st_mtime_ns, stat.st_size)
    kept = _KEPT.get(path)
    if kept is None or kept[0] != state:
        kept = _KEPT[path] = (state, parts[0].read())
    tiles = kept[1]
    yield tiles[[*dict.fromkeys([*(c for c in columns if c in tiles.columns), tiles.geometry.name])]]


def forget() -> None:
    """Drop the layers kept by :func:`read_tiles` (once the checks of a comparison are done)."""
    _KEPT.clear()


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


class DateLayer:
    """The tiles and embeddings of one date, part by part (:meth:`TileSource.parts
    <hqrs_geo.layer.source.TileSource.parts>`: a layer file is one part), through a search session
    on it (which also gives the embeddings' own model for texts and zero-shot classes)."""

    def __init__(self, layer: TileSource | str, model: str | None = None, device: str = "cpu"):
        self.layer = open_source(layer) if isinstance(layer, str) else layer
        self.path = self.layer.path
        self.session = open_session(self.path, model=model, device=device)
        self.source = self.session.source
        self._listed: list[TilePart] | None = None
        self._parts: OrderedDict[str, Block] = OrderedDict()
        self._last: Block | None = None
        self._part_bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def crs(self) -> Any:
        """The CRS of the blocks' footprints."""
        return self.layer.crs()

    def scenes(self) -> list[dict]:
        """The readings of the date's scenes (for the change layer's run record)."""
        return [reading.as_dict() for reading in self.layer.runs().scenes().values()]

    def parts(self) -> list[TilePart]:
        """The parts with tiles, ordered by name (listed once)."""
        if self._listed is None:
            self._listed = self.layer.parts()
        return self._listed

    def part_names(self) -> list[str]:
        """The names of the parts with tiles."""
        return [part.name for part in self.parts()]

    def blocks(self) -> Iterator[Block]:
        """Every block, one per part (read one at a time; the last one read is kept, so the passes
        over a layer of one part read it once)."""
        for part in self.parts():
            if self._last is None or self._last.name != part.name:
                self._last = self.part_block(part)
            yield self._last

    def part_block(self, part: TilePart) -> Block:
        """Part ``part`` as a block (footprints in the layer's CRS), with its embeddings' rows."""
        frame = part.read(columns=[c for c in part.columns() if not c.startswith(EMBEDDING_PREFIX)
                                   and c != "geometry"])
        matrix, rows = self.session.part_vectors(part.name)
        vec_row = np.full(len(frame), -1, dtype=np.int64)
        vec_row[np.asarray(rows)] = np.arange(len(rows))
        return Block(part.name, frame, matrix, vec_row)

    def blocks_over(self, bounds: tuple[float, float, float, float], crs: Any) -> list[Block]:
        """The blocks whose tiles may meet ``bounds`` (in ``crs``): those of the parts whose
        recorded bounds meet them, or have none recorded (a few kept read)."""
        found = []
        by_name = {part.name: part for part in self.parts()}
        for name in self._parts_meeting(bounds, crs):
            if name in self._parts:
                self._parts.move_to_end(name)
            else:
                self._parts[name] = self.part_block(by_name[name])
                while len(self._parts) > PART_CACHE:
                    self._parts.popitem(last=False)
            found.append(self._parts[name])
        return found

    def _parts_meeting(self, bounds: tuple[float, float, float, float], crs: Any) -> list[str]:
        """The parts whose recorded bounds (each in its part's CRS) meet ``bounds``: one vectorised
        test per CRS, so a BEFORE part costs the same whatever the number of parts."""
        if self._part_bounds is None:
            listed = self.parts()
            bounds_of = np.full((len(listed), 4), np.nan)
            for i, part in enumerate(listed):
                if part.bounds is not None:
                    bounds_of[i] = part.bounds
            crs_of = [part.crs for part in listed]
            self._part_bounds = (np.asarray([p.name for p in listed], dtype=object), bounds_of,
                                 np.asarray(crs_of, dtype=object))
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


def _bounds_in(bounds: tuple[float, float, float, float], crs: Any, target: Any
               ) -> tuple[float, float, float, float] | None:
    """``bounds`` (in ``crs``) as bounds in ``target`` (None when they cannot be carried over)."""
    try:
        box = box_in(bounds, crs, target)
    except Exception:  # pyproj raises several types for bounds outside a projection: test every part
        return None
    return (box[0], box[1], box[2], box[3])


__all__ = ["Block", "DateLayer", "forget", "read_tiles"]
