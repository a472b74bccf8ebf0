"""Search results on disk: a result layer, a score column on the tiles, a score raster.

Nothing here overwrites data hqrs_geo did not write as a search result: a result layer may
replace only a layer an earlier search wrote under that name (never the tile layer being
searched, its run records or another table), a score column only a column an earlier search
wrote (never the tiles' own columns, embeddings or captions). Every file is written atomically
and checked (:mod:`hqrs_geo.atomic`); score rasters are read back and compared.
"""
from __future__ import annotations

import errno
import math
import os
import re
from functools import reduce
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
from affine import Affine
from rasterio.errors import RasterioError

from ..atomic import atomic_path
from ..errors import OptionError, OutputError
from ..layer.gpkg import RUNS_TABLE
from ..layer.io import TILES_LAYER, layer_format, read_runs, read_tiles, write_tiles
from ..layer.runs import new_run

#: What a search writes, as its run records say (``command``).
RESULT_COMMAND = "search"
SCORE_COMMAND = "score"


def result_layer_name(query: str) -> str:
    """A GeoPackage layer name from a query (``search_river_with_a_bridge``)."""
    slug = re.sub(r"[^0-9a-z]+", "_", query.lower()).strip("_")[:40]
    return f"search_{slug or 'results'}"


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_result_target(layer: str, target: str | os.PathLike, name: str) -> None:
    """Refuse (one line) a result layer that would replace the searched tiles or anything an
    earlier search did not write: only layers recorded as search results may be replaced."""
    gpkg = layer_format(target) == "GPKG"
    if not name.strip() or len(name) > 200 or re.search(r'[\x00-\x1f\x7f"]', name):
        raise OptionError(f"{name[:80]!r} is not a usable layer name; use letters, digits and _", option="result_layer")
    if not gpkg and _same_file(target, layer):
        raise OutputError(f"{target}: is the tile layer being searched; write the results to another file («output»)")
    lowered = name.lower()  # SQLite table names ignore case
    if gpkg and (lowered in (RUNS_TABLE, "mpgi_sources") or lowered.startswith(("gpkg_", "rtree_", "sqlite_"))):
        raise OptionError(f"{name!r} is a table of the GeoPackage, not a result layer; choose another name",
                          option="result_layer")
    if gpkg and _same_file(target, layer) and lowered == TILES_LAYER:
        raise OptionError(f"{name!r} is the tile layer being searched; choose another name for the results",
                          option="result_layer")
    if not Path(target).exists():
        return
    if gpkg:
        try:
            present = {n.lower() for n, _ in pyogrio.list_layers(target)}
        except Exception:  # pyogrio raises several types for foreign files
            raise OutputError(f"{target}: exists but is not a readable GeoPackage; choose another output") from None
        if lowered not in present:
            return
    written = {str(run.get("layer")).lower() for run in read_runs(target) if run.get("command") == RESULT_COMMAND}
    if lowered not in written:
        where = f"{target}|layername={name}" if gpkg else str(target)
        raise OutputError(f"{where}: exists and was not written by an hqrs_geo search; choose another "
                          f"{'layer name' if gpkg else 'file'} for the results")


def write_result_layer(layer: str, results, name: str, params: dict, output: str | None = None) -> str:
    """Write ranked results as layer ``name`` of the tile GeoPackage (or to ``output``); returns where.

    Replaces only a layer an earlier search wrote under that name (see :func:`check_result_target`).
    """
    target = output or layer
    if layer_format(target) != "GPKG" and output is None:
        raise OutputError(f"{layer}: result layers go into GeoPackages; give a GeoPackage as «output»")
    check_result_target(layer, target, name)
    frame = results.drop(columns=[c for c in results.columns if c.startswith("emb_")])
    write_tiles(target, frame, new_run(RESULT_COMMAND, name, params), layer=name, replace_all=True)
    return f"{target}|layername={name}" if layer_format(target) == "GPKG" else str(target)


def write_score_column(layer: str, scores: dict[str, float], column: str, params: dict) -> None:
    """Add (or replace) a score column on the tile layer (NaN for tiles that were filtered out)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", column):
        raise OptionError(f"{column!r} is not a usable column name; use letters, digits and _", option="score_column")
    frame = read_tiles(layer)
    if column.lower() in {c.lower() for c in frame.columns} or column.lower() in ("geometry", "geom", "fid"):
        earlier = {run.get("params", {}).get("column") for run in read_runs(layer)
                   if run.get("command") == SCORE_COMMAND}
        if column not in earlier:
            raise OptionError(f"the layer already has a column {column!r} that no earlier search wrote; choose "
                              "another column name", option="score_column")
    frame[column] = frame["tile_id"].map(scores).astype(float)
    write_tiles(layer, frame, new_run(SCORE_COMMAND, "tiles", {**params, "column": column}),
                replace_sources=list(frame["source"].unique()))


def _cell_size(tiles) -> int:
    """Largest cell (native pixels) that divides every tile edge and offset, at least tile/16."""
    values = [int(v) for v in np.concatenate([tiles.x_off, tiles.y_off, tiles.width, tiles.height]) if v > 0]
    cell = reduce(math.gcd, values) if values else 1
    return max(cell, int(tiles.width.min()) // 16, 1)


def write_score_raster(layer: str, scores: dict[str, float], path: str) -> list[str]:
    """GeoTIFF(s) of tile scores at tile resolution, overlaps averaged, one per scene.

    With one scene the file is ``path``; with several, ``<stem>_<scene key><suffix>``.
    """
    tiles = read_tiles(layer)
    tiles = tiles[tiles.tile_id.isin(list(scores))]
    scenes = {}
    for run in read_runs(layer):
        for scene in run.get("params", {}).get("scenes", []):
            scenes[scene["source"]] = scene
    target = Path(path)
    if target.suffix.lower() not in (".tif", ".tiff"):
        raise OutputError(f"{path}: score rasters are GeoTIFFs; use a .tif file name")
    check_dir = target.parent if str(target.parent) else Path(".")
    if not check_dir.is_dir() or not os.access(check_dir, os.W_OK):
        raise OutputError(f"{path}: folder missing or not writable; choose another output")
    if target.is_dir():
        raise OutputError(f"{path}: is a folder; give a .tif file name")
    if _same_file(target, layer) or any(_same_file(target, s) for s in scenes):
        raise OutputError(f"{path}: is an input of this search; choose another file for the score raster")
    written = []
    groups = list(tiles.groupby("source"))
    for source, group in groups:
        scene = scenes[source]
        cell = _cell_size(group)
        width, height = math.ceil(scene["width"] / cell), math.ceil(scene["height"] / cell)
        total = np.zeros((height, width), np.float64)
        count = np.zeros((height, width), np.int32)
        for rec in group.itertuples():
            c0, r0 = max(rec.x_off // cell, 0), max(rec.y_off // cell, 0)
            c1 = min(-(-(rec.x_off + rec.width) // cell), width)
            r1 = min(-(-(rec.y_off + rec.height) // cell), height)
            total[r0:r1, c0:c1] += scores[rec.tile_id]
            count[r0:r1, c0:c1] += 1
        data = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
        out = target if len(groups) == 1 else target.with_name(f"{target.stem}_{scene['key']}{target.suffix}")
        transform = Affine(*scene["transform"][:6]) * Affine.scale(cell)
        with atomic_path(out, verify=_raster_check(data)) as tmp:
            with rasterio.open(tmp, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                               crs=scene.get("crs"), transform=transform, nodata=float("nan"),
                               compress="deflate") as dst:
                dst.write(data, 1)
                dst.set_band_description(1, "score")
        written.append(str(out))
    return written


def _raster_check(expected: np.ndarray):
    """A check of a written GeoTIFF: GDAL reopens it and reads back exactly ``expected``
    (GDAL reports a full disk only in its log, so the file itself is the evidence)."""
    def verify(tmp: Path) -> None:
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OSError(errno.ENOSPC, "the written raster is empty")
        try:
            with rasterio.open(tmp) as src:
                back = src.read(1)
        except RasterioError as exc:
            raise OSError(errno.EIO, f"the written raster cannot be read back ({str(exc).splitlines()[0][:120]})") \
                from None
        if back.shape != expected.shape or not np.array_equal(back, expected, equal_nan=True):
            raise OSError(errno.EIO, "the written raster does not hold the scores (incomplete write)")
    return verify
