"""Partitioned tile datasets as the dock lists them, read from their manifest alone.

A dataset is a folder of GeoParquet parts and ``_manifest.json``, written by ``hqrs-geo run
SOURCES -o DATASET/`` (docs/layers.md). The dock never loads one into QGIS: it reads the
manifest (plain JSON: no hqrs_geo, no GDAL Parquet driver needed) for the dataset's tile count,
CRS and embedding models, and searches it through a ``serve-search DATASET`` session. Manifests
are cached by their size and modification time, so refreshing the layer list is cheap even for a
dataset of thousands of parts.

The datasets opened in a project are remembered in the project (entry ``hqrs_geo/datasets``),
like its layers.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from qgis.core import QgsProject

from .tile_layers import EmbeddingSet

MANIFEST = "_manifest.json"
FORMAT = "hqrs_geo.dataset"
PROJECT_SCOPE, PROJECT_KEY = "hqrs_geo", "datasets"
EMBEDDING_PREFIX = "emb_"


class DatasetError(ValueError):
    """A folder that is not a usable dataset (one line: what is wrong; what to do)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the manifest of a dataset says (parts as (bounds, tiles) for area estimates)."""

    path: str
    name: str
    crs: str
    tiles: int
    scenes: int
    failed: int
    embeddings: tuple[EmbeddingSet, ...]
    part_bounds: tuple[tuple[tuple[float, float, float, float] | None, int], ...]

    @property
    def parts(self) -> int:
        """Parts with tiles."""
        return len(self.part_bounds)

    def summary(self) -> str:
        """``768 tiles in 6 parts, 3 scenes, EPSG:28992`` (and the failed scenes)."""
        text = f"{self.tiles:,} tiles in {self.parts:,} parts, {self.scenes:,} scenes, {self.crs or 'CRS unknown'}"
        return text + (f"; {self.failed} scene(s) failed in its last job" if self.failed else "")

    def tiles_in(self, bbox: Sequence[float]) -> tuple[int, int]:
        """(tiles, parts) of the parts whose bounds overlap ``bbox`` (in the dataset's CRS): an upper
        bound of the tiles a merge of that area writes."""
        x0, y0, x1, y1 = bbox
        tiles = parts = 0
        for bounds, count in self.part_bounds:
            if bounds is None or not (bounds[0] > x1 or bounds[2] < x0 or bounds[1] > y1 or bounds[3] < y0):
                tiles += count
                parts += 1
        return tiles, parts


def normalise(path: str) -> str:
    """An absolute folder path without a trailing separator."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(path))))


def is_dataset(path: str) -> bool:
    """True when ``path`` is a folder with a dataset manifest."""
    return os.path.isfile(os.path.join(str(path), MANIFEST))


_cache: dict[str, tuple[tuple[int, int], DatasetInfo]] = {}


def read_dataset(path: str) -> DatasetInfo:
    """The dataset at ``path`` (cached until its manifest changes); DatasetError when it is not one."""
    folder = normalise(path)
    manifest = os.path.join(folder, MANIFEST)
    try:
        stat = os.stat(manifest)
    except OSError:
        if os.path.isfile(os.path.join(os.path.dirname(folder), MANIFEST)):
            raise DatasetError(f"{folder}: is a folder inside a dataset; choose its parent "
                               f"{os.path.dirname(folder)}") from None
        raise DatasetError(f"{folder}: not a dataset (no {MANIFEST}); choose a dataset folder written by the "
                           "HQRS engine (GeoParquet parts with their manifest)") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(folder)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(manifest, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{manifest}: cannot read the dataset manifest ({exc}); was it changed outside "
                           "hqrs_geo?") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetError(f"{manifest}: not an hqrs_geo dataset manifest; choose another folder")
    info = _info(folder, data)
    _cache[folder] = (stamp, info)
    return info


def _info(folder: str, data: dict) -> DatasetInfo:
    parts = data.get("parts") or {}
    bounds: list[tuple[tuple[float, float, float, float] | None, int]] = []
    for name in sorted(parts):
        part = parts[name] if isinstance(parts[name], dict) else {}
        count = int(part.get("tiles") or 0)
        if count > 0:
            box = part.get("bounds")
            if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
                bounds.append(((float(box[0]), float(box[1]), float(box[2]), float(box[3])), count))
            else:
                bounds.append((None, count))
    models: dict[str, str] = {}
    for run in data.get("runs") or []:
        for task in ((run or {}).get("params") or {}).get("tasks") or []:
            column = str((task or {}).get("field") or "")
            if column.startswith(EMBEDDING_PREFIX):
                models[column[len(EMBEDDING_PREFIX):]] = str(task.get("name") or column)
    return DatasetInfo(
        path=folder, name=os.path.basename(folder), crs=str(data.get("crs") or ""),
        tiles=sum(count for _, count in bounds), scenes=len(data.get("scenes") or {}),
        failed=len(data.get("failed") or {}),
        embeddings=tuple(EmbeddingSet(key, model) for key, model in models.items()),
        part_bounds=tuple(bounds))


def project_datasets() -> list[str]:
    """The dataset folders opened in the current project (in the order they were opened)."""
    paths, _ok = QgsProject.instance().readListEntry(PROJECT_SCOPE, PROJECT_KEY)
    return [p for p in dict.fromkeys(paths or []) if p]


def remember(path: str) -> None:
    """Remember ``path`` in the current project (once)."""
    paths = project_datasets()
    if path not in paths:
        QgsProject.instance().writeEntry(PROJECT_SCOPE, PROJECT_KEY, [*paths, path])


def forget(path: str) -> None:
    """Take ``path`` out of the project's datasets."""
    paths = project_datasets()
    if path in paths:
        paths.remove(path)
        if paths:
            QgsProject.instance().writeEntry(PROJECT_SCOPE, PROJECT_KEY, paths)
        else:
            QgsProject.instance().removeEntry(PROJECT_SCOPE, PROJECT_KEY)
