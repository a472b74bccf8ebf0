"""Search results on disk: a result layer, a score column on the tiles, a score raster."""
from __future__ import annotations

import math
import os
import re
import tempfile
from functools import reduce
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..layer.io import layer_format, read_tiles, write_tiles
from ..layer.runs import new_run, read_runs


def result_layer_name(query: str) -> str:
    """A GeoPackage layer name from a query (``search_river_with_a_bridge``)."""
    slug = re.sub(r"[^0-9a-z]+", "_", query.lower()).strip("_")[:40]
    return f"search_{slug or 'results'}"


def write_result_layer(layer: str, results, name: str, params: dict, output: str | None = None) -> str:
    """Write ranked results as layer ``name`` of the tile GeoPackage (or to ``output``); returns where."""
    target = output or layer
    if layer_format(target) != "GPKG" and output is None:
        raise OutputError(f"{layer}: result layers go into GeoPackages; give a GeoPackage as «output»")
    frame = results.drop(columns=[c for c in results.columns if c.startswith("emb_")])
    write_tiles(target, frame, new_run("search", name, params), layer=name, replace_all=True)
    return f"{target}|layername={name}" if layer_format(target) == "GPKG" else str(target)


def write_score_column(layer: str, scores: dict[str, float], column: str, params: dict) -> None:
    """Add (or replace) a score column on the tile layer (NaN for tiles that were filtered out)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", column) or column in ("tile_id", "source", "geometry"):
        raise OutputError(f"invalid column name {column!r}: use letters, digits and _, not a tile column")
    frame = read_tiles(layer)
    frame[column] = frame["tile_id"].map(scores).astype(float)
    write_tiles(layer, frame, new_run("score", "tiles", {**params, "column": column}),
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
    import rasterio
    from affine import Affine

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
        fd, tmp = tempfile.mkstemp(suffix=".tif", dir=out.parent or ".")
        os.close(fd)
        try:
            with rasterio.open(tmp, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                               crs=scene.get("crs"), transform=transform, nodata=float("nan"),
                               compress="deflate") as dst:
                dst.write(data, 1)
                dst.set_band_description(1, "score")
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(str(out))
    return written
