"""Co-registered tiling: a later date tiled on the grid of an existing tile layer.

:func:`tile_like` reads the reference layer's run records (every scene's CRS, transform, size and
the tiling options), resamples the new rasters onto each reference scene's own pixel grid, writes
those pixels once per scene as a tiled, DEFLATE-compressed GeoTIFF with an internal valid mask
(``<output>.aligned/<scene key>.<recipe>.tif``), and writes a tile layer whose tiles are the reference's
own: same ``tile_id``, row, column, pixel window, output size and footprint. Only the valid
fraction is measured again, on the new pixels; tiles below ``min_valid`` are left out. The new
layer is an ordinary tile layer (its scenes are the aligned files), so the model engine embeds and
captions it unchanged, and tiles of the two dates pair by ``tile_id``.

Several rasters for one date make a mosaic: at each pixel the first input (in the order given)
with a valid pixel there wins. Each date gets a stretch of its own (the reference's stretch rule,
e.g. 2-98 % percentiles, computed on the new pixels), so a global brightness change between the
dates does not change every tile; its bands are chosen as in normal tiling (the reference's band
option, else colour interpretation). A partitioned dataset as reference gives a dataset with the
same parts, made part by part.

Resampling runs in GDAL's warper, block by block (memory stays flat); blocks no input reaches
are left unwritten (a sparse file). ``GDAL_NUM_THREADS=ALL_CPUS`` lets the warper use every core.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..atomic import atomic_path, output_error, output_folder
from ..errors import InputError, OptionError
from ..layer.columns import SOURCE, TILE_COLUMNS, TILE_ID
from ..layer.dataset import (
    DatasetRuns,
    Manifest,
    is_dataset_output,
    open_manifest,
    verified_part,
    write_part,
)
from ..layer.io import TileLayer, check_writable, is_layer_path, read_runs, write_layer
from ..layer.runs import LayerRuns, new_run
from ..layer.source import TileSource, open_source
from ..raster.catalog import resolve_sources
from ..raster.reading import SceneReading
from ..raster.scene import BandChoice, choose_bands, describe, open_dataset, open_raster, read_pixels
from ..safe_paths import file_name
from .config import TileConfig
from .plan import TilingReport, prepare_scenes
from .reader import TileReader
from .records import TileRecord

log = logging.getLogger(__name__)

ALIGNED_SUFFIX = ".aligned"
#: GeoTIFF tags of an aligned file: what it was made from (a rerun with the same reuses the file)
#: and how many of its pixels are valid.
ALIGNED_TAG = "HQRS_GEO_ALIGNED"
VALID_TAG = "HQRS_GEO_VALID_PIXELS"
#: Side of the blocks the aligned pixels are warped and written in (memory stays flat).
BLOCK = 1024
#: Stand-in CRS for co-registering rasters that both have none (only their transforms count).
_PIXEL_CRS = "EPSG:3857"
#: Options of the new date; the grid options (tile size, overlap, gsd, edge, crs) are the reference's.
DATE_OPTIONS = ("min_valid", "bands", "stretch", "resampling")
GRID_OPTIONS = ("tile_size", "overlap", "gsd", "edge", "crs")


@dataclass
class _Input:
    """One raster of the new date: its facts and the bands it contributes."""

    path: str
    crs: str | None
    transform: Affine
    width: int
    height: int
    bands: BandChoice
    dtype: str
    nodata: float | None
    has_alpha: bool
    colormap: dict | None
    stamp: list


def aligned_folder(output: str | os.PathLike) -> Path:
    """Where the aligned pixels of the layer ``output`` are kept: ``<output>.aligned/``."""
    return Path(f"{output}{ALIGNED_SUFFIX}")


def _reference(reference: str | os.PathLike) -> TileSource:
    """The reference layer (a file or a dataset folder), with the one-line errors of tiling like it."""
    if not is_layer_path(reference):
        raise InputError(f"{reference}: is not a tile layer (.gpkg, .parquet or .fgb); give the layer of the "
                         "earlier date (tile its raster first)")
    if not Path(reference).exists():
        raise InputError(f"{reference}: file not found; tile the earlier date into a layer first")
    return open_source(reference)


def _reference_tiling(runs: LayerRuns) -> dict:
    """The tiling options of the reference's last tiling run."""
    for run in reversed(runs):
        tiling = (run.get("params") or {}).get("tiling")
        if isinstance(tiling, dict):
            return tiling
    return {}


def effective_config(tiling: dict, config: TileConfig | None) -> TileConfig:
    """The options of the new date: the reference's tiling, with the date options of ``config``
    (``min_valid``, ``bands``, ``stretch``, ``resampling``) where they differ from the defaults.
    Grid options of ``config`` are ignored (the grid is the reference's); a warning says so."""
    known = {f.name for f in fields(TileConfig)}
    base = {k: v for k, v in tiling.items() if k in known}
    if base.get("bands") is not None:
        base["bands"] = tuple(base["bands"])
    merged = TileConfig(**base)
    if config is not None:
        default = TileConfig()
        changes = {name: getattr(config, name) for name in DATE_OPTIONS
                   if getattr(config, name) != getattr(default, name)}
        ignored = [name for name in GRID_OPTIONS if str(getattr(config, name)) != str(getattr(default, name))
                   and str(getattr(config, name)) != str(getattr(merged, name))]
        if ignored:
            log.warning("%s: ignored; tiles made like a reference layer follow its grid",
                        ", ".join(ignored))
        merged = TileConfig(**{**{f.name: getattr(merged, f.name) for f in fields(TileConfig)}, **changes})
    return merged.validated()


def _describe_inputs(inputs: Sequence[Any], config: TileConfig) -> list[_Input]:
    found = []
    for entry in resolve_sources(inputs):
        with open_raster(entry.path) as src:
            info = describe(src)
            if info.crs is None and info.has_gcps:
                raise InputError(f"{entry.path}: is georeferenced by GCPs only; warp it first "
                                 "(gdalwarp -r bilinear in.tif out.tif) and tile the result")
            bands = choose_bands(info, config.bands)
            colormap = src.colormap(bands.indexes[0]) if bands.palette else None
            has_alpha = ColorInterp.alpha in src.colorinterp
        stat = os.stat(entry.path) if os.path.isfile(entry.path) else None
        found.append(_Input(
            path=entry.path, crs=info.crs, transform=Affine(*info.transform), width=info.width, height=info.height,
            bands=bands, dtype=info.dtypes[bands.indexes[0] - 1], nodata=info.nodata, has_alpha=has_alpha,
            colormap=colormap, stamp=[entry.path, stat.st_size if stat else None, stat.st_mtime_ns if stat else None],
        ))
    return found


def _unique_bands(choice: BandChoice) -> list[int]:
    """The input bands written to the aligned file: R, G, B, or the one band (replicated or palette)."""
    return [choice.indexes[0]] if len(set(choice.indexes)) == 1 else list(choice.indexes)


def _check_mosaic(items: list[_Input]) -> None:
    first = items[0]
    for other in items[1:]:
        if other.dtype != first.dtype or len(_unique_bands(other.bands)) != len(_unique_bands(first.bands)) \
                or other.bands.palette != first.bands.palette:
            raise InputError(f"{other.path}: its bands ({len(_unique_bands(other.bands))} x {other.dtype}) differ "
                             f"from those of {first.path} ({len(_unique_bands(first.bands))} x {first.dtype}); "
                             "give rasters of one kind for one date")


def _corners(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    xs, ys = zip(*(transform * (c, r) for c, r in ((0, 0), (width, 0), (0, height), (width, height))))
    return min(xs), min(ys), max(xs), max(ys)


def _pixel_box(scene: SceneReading, item: _Input) -> tuple[float, float, float, float] | None:
    """The input's extent in the scene's pixel coordinates ``(col0, row0, col1, row1)``, padded by
    two pixels (None when the CRSs cannot be related: then it is assumed to cover the scene)."""
    bounds = _corners(item.transform, item.width, item.height)
    if scene.crs and item.crs and item.crs != scene.crs:
        try:
            bounds = transform_bounds(item.crs, scene.crs, *bounds, densify_pts=21)
        except Exception:  # noqa: BLE001 - a CRS pair pyproj cannot relate: let the warp decide
            return None
        if not all(np.isfinite(bounds)):
            return None
    left, bottom, right, top = bounds
    inverse = ~Affine(*scene.transform)
    cols, rows = zip(*(inverse * (x, y) for x, y in ((left, bottom), (left, top), (right, bottom), (right, top))))
    return min(cols) - 2, min(rows) - 2, max(cols) + 2, max(rows) + 2


def _meets(box: tuple[float, float, float, float] | None, window: Window) -> bool:
    """True when a pixel box (None: unknown) meets ``window``."""
    if box is None:
        return True
    return box[0] < window.col_off + window.width and box[2] > window.col_off \
        and box[1] < window.row_off + window.height and box[3] > window.row_off


def _overlaps(scene: SceneReading, item: _Input) -> bool:
    """True when the input's extent meets the scene's."""
    return _meets(_pixel_box(scene, item), Window(0, 0, scene.width, scene.height))


def _check_crs(reference: str, scenes: Sequence[SceneReading], items: Sequence[_Input]) -> None:
    with_crs = [s for s in scenes if s.crs]
    for item in items:
        if item.crs is None and with_crs:
            raise InputError(f"{item.path}: has no CRS while the scenes of {reference} are in {with_crs[0].crs}; "
                             "georeference it first (gdal_translate -a_srs or gdalwarp)")
        if item.crs is not None and len(with_crs) < len(scenes):
            raise InputError(f"{item.path}: is in {item.crs} while the scenes of {reference} have no CRS; "
                             "the dates cannot be co-registered: give rasters without CRS, or tile the earlier "
                             "date from a georeferenced raster")


def _recipe(scene: SceneReading, items: Sequence[_Input], resampling: str) -> dict:
    """What an aligned file is made from (stored in it; equal recipes reuse the file)."""
    return {"crs": scene.crs, "transform": list(scene.transform), "width": scene.width, "height": scene.height,
            "resampling": resampling, "inputs": [[*i.stamp, list(i.bands.indexes), i.bands.palette] for i in items]}


def _reusable(target: Path, recipe: dict) -> int | None:
    """The valid pixel count of the aligned file ``target`` when it was made by ``recipe``, else None."""
    if not target.is_file():
        return None
    try:
        with rasterio.open(target) as src:
            tags = src.tags()
            if json.loads(tags.get(ALIGNED_TAG, "null")) != recipe:
                return None
            return int(tags[VALID_TAG])
    except (rasterio.errors.RasterioError, ValueError, KeyError):
        return None


def _blocks(width: int, height: int) -> list[Window]:
    return [Window(x, y, min(BLOCK, width - x), min(BLOCK, height - y))
            for y in range(0, height, BLOCK) for x in range(0, width, BLOCK)]


def align_scene(scene: SceneReading, items: Sequence[_Input], target: Path, resampling: str,
                progress: Any = None) -> int:
    """Warp ``items`` (first valid pixel wins) onto the pixel grid of ``scene`` and write the
    result to ``target`` atomically: tiled, DEFLATE, the bands of the first input, an internal
    mask (blocks no input reaches are left unwritten: masked). Returns the number of valid pixels."""
    first = items[0]
    indexes = _unique_bands(first.bands)
    method = Resampling.nearest if first.bands.palette else Resampling[resampling]
    transform = Affine(*scene.transform)
    crs = scene.crs or _PIXEL_CRS
    dtype = np.dtype(first.dtype)
    recipe = _recipe(scene, items, resampling)
    profile = dict(driver="GTiff", width=scene.width, height=scene.height, count=len(indexes), dtype=first.dtype,
                   crs=scene.crs, transform=transform, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", predictor=3 if dtype.kind == "f" else 2, BIGTIFF="IF_SAFER",
                   SPARSE_OK=True)
    if len(indexes) == 3:
        profile["photometric"] = "RGB"
    with atomic_path(target) as tmp, rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), \
            rasterio.open(tmp, "w", **profile) as dst:
        sources: list = []
        vrts: list = []
        count = 0
        try:
            for item in items:
                sources.append(open_dataset(item.path))
                vrts.append(WarpedVRT(sources[-1], src_crs=item.crs or _PIXEL_CRS, crs=crs, transform=transform,
                                      width=scene.width, height=scene.height, resampling=method,
                                      add_alpha=not item.has_alpha, warp_extras=_warp_options()))
            boxes = [_pixel_box(scene, item) for item in items]
            for window in _blocks(scene.width, scene.height):
                if progress is not None:
                    progress.advance(1)
                meeting = [(item, vrt) for item, vrt, box in zip(items, vrts, boxes) if _meets(box, window)]
                if not meeting:
                    continue  # left unwritten (a sparse file): no pixels, masked
                shape = (int(window.height), int(window.width))
                data = np.zeros((len(indexes), *shape), dtype)
                filled = np.zeros(shape, bool)
                for item, vrt in meeting:
                    block, valid = read_pixels(item.path, partial(_read_block, vrt, item, window))
                    take = valid & ~filled
                    if take.any():
                        data[:, take] = block[:, take]
                        filled |= take
                    if filled.all():
                        break
                dst.write(data, window=window)
                dst.write_mask(filled.astype(np.uint8) * 255, window=window)
                count += int(np.count_nonzero(filled))
            if first.bands.palette and first.colormap:
                dst.write_colormap(1, first.colormap)
            elif len(indexes) == 3:
                dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
            else:
                dst.colorinterp = (ColorInterp.gray,)
            dst.update_tags(**{ALIGNED_TAG: json.dumps(recipe), VALID_TAG: str(count)})
        finally:
            for handle in [*vrts, *sources]:
                handle.close()
    return count


def _warp_options() -> dict:
    """GDAL warp options: the warper's threads from ``$GDAL_NUM_THREADS`` (e.g. ``ALL_CPUS``; default 1)."""
    threads = os.environ.get("GDAL_NUM_THREADS", "").strip()
    return {"NUM_THREADS": threads} if threads else {}


def _read_block(vrt: WarpedVRT, item: _Input, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the input's bands in ``window`` of the target grid, and where they are valid."""
    block = vrt.read(_unique_bands(item.bands), window=window)
    valid = vrt.dataset_mask(window=window) > 0
    if block.dtype.kind == "f":
        valid &= ~np.isnan(block).any(axis=0)
    return block, valid


def _scene_name(scene: SceneReading) -> str:
    """A file name for the aligned pixels of ``scene``: its key, made safe."""
    try:
        return file_name(scene.key, "scene key")
    except InputError:
        return hashlib.sha256(scene.key.encode()).hexdigest()[:16]


def tile_like(reference: str | os.PathLike, inputs: Any, output: str | os.PathLike,
              config: TileConfig | None = None, progress: Any = None) -> TilingReport:
    """Tile ``inputs`` (rasters of a later date, any CRS or resolution) on the grid of the tile
    layer ``reference``: the new layer ``output`` holds the reference's tiles (same ``tile_id``,
    window, output size and footprint) read from the inputs resampled onto each reference scene's
    pixel grid, with the valid fraction measured on the new pixels; tiles below ``min_valid``
    (default: the reference's) are left out. Returns the :class:`TilingReport`.

    ``config``: ``min_valid``, ``bands``, ``stretch`` and ``resampling`` of the new date (defaults:
    the reference's tiling); its grid options are ignored. Several ``inputs`` make a mosaic (the
    first valid pixel wins, in the order given). The aligned pixels are kept in
    :func:`aligned_folder` of ``output`` and reused by a rerun with the same inputs.

    A partitioned dataset as ``reference`` makes a dataset ``output`` (a folder) with the same
    parts, made part by part (the aligned pixels in its ``_aligned/`` folder); the report's
    ``tiles`` then holds only ``tile_id``, ``source`` and ``valid_fraction`` of the new tiles.
    """
    if Path(output).resolve() == Path(reference).resolve():
        raise OptionError(f"{output}: is the reference layer itself; write the later date to another layer",
                          option="output")
    ref = _reference(reference)
    # the one place that tells the kinds apart, as the output follows the reference's: a dataset is
    # tiled like part by part into a dataset (the same parts), a layer file into a layer file
    tile = _tile_like_dataset if ref.partitioned else _tile_like_layer
    if ref.partitioned != is_dataset_output(output):
        raise OptionError(f"{output}: " + ("a dataset is tiled like part by part into a dataset; give a folder (e.g. "
                                           "later/) as output, or merge the reference first" if ref.partitioned else
                                           "tiling like a layer file writes a layer file; give a name ending in "
                                           ".gpkg, .parquet or .fgb"), option="output")
    return tile(ref, inputs, output, config, progress)


def _inputs_for(reference: str | os.PathLike, tiling: dict, used: list[SceneReading], inputs: Any,
                config: TileConfig | None) -> tuple[TileConfig, list[tuple[SceneReading, list[_Input]]]]:
    """The new date's options and, per reference scene the inputs reach, the inputs covering it."""
    if not used or not tiling:
        raise InputError(f"{reference}: has no record of how its scenes were tiled (made by an older version?); "
                         "tile the earlier date again, then tile the later one like it")
    config = effective_config(tiling, config)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found = _describe_inputs(items, config)
    if not found:
        raise InputError(f"{reference}: no rasters were given to tile like it")
    _check_mosaic(found)
    _check_crs(str(reference), used, found)
    plan = [(scene, [i for i in found if _overlaps(scene, i)]) for scene in used]
    plan = [(scene, covering) for scene, covering in plan if covering]
    if not plan:
        names = ", ".join(i.path for i in found[:3]) + (" ..." if len(found) > 3 else "")
        raise InputError(f"{names}: do(es) not overlap the tiles of {reference}; give rasters of the same place")
    return config, plan


def _aligned_scenes(reference: str | os.PathLike, plan: list[tuple[SceneReading, list[_Input]]], folder: Path,
                    config: TileConfig, progress: Any) -> dict[str, SceneReading]:
    """Align every planned scene (reusing aligned files of the same recipe): ``{reference source:
    SceneReading of its aligned file}`` (the new date's bands and own stretch). A one-line error
    when no input pixel inside the reference's scenes is valid (the files written are removed)."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    targets: dict[str, Path] = {}
    work = []
    valid = 0
    for scene, covering in plan:
        recipe = _recipe(scene, covering, config.resampling)
        # named by the recipe too: pixels made from other inputs are another scene to the layer (results
        # of the old pixels are not carried over to them)
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{_scene_name(scene)}.{digest}"
        while folder / f"{name}.tif" in targets.values():  # two scenes with one key (several tiling runs)
            name += "_"
        target = folder / f"{name}.tif"
        targets[scene.source] = target
        known = _reusable(target, recipe)
        if known is None:
            work.append((scene, covering, target))
        else:
            valid += known
    if progress is not None and work:
        progress.start("align", sum(len(_blocks(s.width, s.height)) for s, _, _ in work), unit="block")
    try:
        for scene, covering, target in work:
            valid += align_scene(scene, covering, target, config.resampling, progress)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    if not valid:
        for _, _, target in work:
            target.unlink(missing_ok=True)
        if created:
            folder.rmdir()
        raise _nothing_valid(reference)
    aligned = prepare_scenes([str(t.resolve()) for t in targets.values()],
                             TileConfig(**{**config.as_dict(), "bands": None}))
    return dict(zip(targets, aligned))


def _measured(rows: Any, reader: TileReader, by_reference: dict[str, SceneReading], min_valid: float,
              progress: Any) -> Any:
    """The reference's tile rows (tile columns and footprint only) on the aligned scenes, with
    the valid fraction measured there; tiles below ``min_valid`` left out."""
    keep, fractions = [], []
    for row in rows[list(TILE_COLUMNS)].to_dict("records"):
        rec = TileRecord(**{**row, SOURCE: by_reference[row[SOURCE]].source})
        fraction = round(reader.valid_fraction(rec), 6)
        keep.append(fraction > 0 and fraction >= min_valid)
        fractions.append(fraction)
        if progress is not None:
            progress.advance(1)
    frame = rows[list(TILE_COLUMNS)].copy()
    frame[SOURCE] = frame[SOURCE].map(lambda src: by_reference[src].source)
    frame["valid_fraction"] = np.asarray(fractions, float)
    out = gpd.GeoDataFrame(frame, geometry=rows.geometry.to_numpy(), crs=rows.crs)[np.asarray(keep, bool)]
    return out.sort_values(TILE_ID, kind="stable").reset_index(drop=True)


def _nothing_valid(reference: str | os.PathLike) -> InputError:
    return InputError(f"{reference}: no valid pixel of the given rasters falls inside its tiles; "
                      "give rasters of the same place (with valid pixels there)")


def _run_params(reference: str | os.PathLike, config: TileConfig, plan: list, by_reference: dict) -> dict:
    return {"tiling": config.as_dict(), "like": os.path.abspath(reference),
            "aligned": [{"source": by_reference[scene.source].source, "reference_source": scene.source,
                         "inputs": [i.path for i in covering]} for scene, covering in plan]}


def _tile_like_layer(layer: TileSource, inputs: Any, output: str | os.PathLike,
                     config: TileConfig | None, progress: Any) -> TilingReport:
    """:func:`tile_like` of a layer file: one layer file written at the end."""
    reference = layer.path
    check_writable(output)
    frame, runs = layer.read(), layer.runs()
    if frame.empty:
        raise InputError(f"{reference}: holds no tiles, so there is nothing to tile like it; give the layer of the "
                         "earlier date with its tiles")
    complete = set(TILE_COLUMNS) <= set(frame.columns)
    scenes = runs.scenes()
    used = [scenes[s] for s in dict.fromkeys(frame[SOURCE].tolist()) if s in scenes] if complete else []
    unknown = int((~frame[SOURCE].isin(list(scenes))).sum()) if complete else 0
    if used and unknown:
        log.warning("%s: %d tile(s) have no record of how their scene was tiled; they are left out",
                    reference, unknown)
    config, plan = _inputs_for(reference, _reference_tiling(runs), used, inputs, config)
    by_reference = _aligned_scenes(reference, plan, aligned_folder(output), config, progress)
    rows = frame[frame[SOURCE].isin(list(by_reference))]
    if progress is not None:
        progress.start("tile", len(rows))
    with TileReader(by_reference.values()) as reader:
        tiles = _measured(rows, reader, by_reference, config.min_valid, progress)
    aligned = list(by_reference.values())
    params = {**_run_params(reference, config, plan, by_reference), "scenes": [s.as_dict() for s in aligned]}
    earlier = _earlier_aligned(output, reference, set(by_reference)) - {s.source for s in aligned}
    written = write_layer(output, tiles, new_run("tile", "tiles", params),
                          replace_sources=[*(s.source for s in aligned), *sorted(earlier)])
    _remove_superseded(earlier, aligned_folder(output))
    return TilingReport(tiles, written, aligned, len(rows))


def _earlier_aligned(output: str | os.PathLike, reference: str | os.PathLike, scenes: set[str]) -> set[str]:
    """Aligned sources that earlier runs like ``reference`` wrote to ``output`` for ``scenes``
    (reference sources): their tiles are replaced by this run's."""
    if not Path(output).exists():
        return set()
    like = os.path.abspath(reference)
    return {str(a.get("source")) for run in read_runs(output) if (run.get("params") or {}).get("like") == like
            for a in run["params"].get("aligned") or [] if a.get("reference_source") in scenes}


def _remove_superseded(sources: set[str], folder: Path) -> None:
    """Remove aligned files of ``sources`` that this run replaced (only files inside ``folder``)."""
    for source in sources:
        path = Path(source)
        if path.parent.resolve() == folder.resolve() and path.suffix == ".tif":
            path.unlink(missing_ok=True)


#: Folder of a dataset made like another that holds the aligned pixels (skipped by Parquet readers).
DATASET_ALIGNED = "_aligned"


def _tile_like_dataset(layer: TileSource, inputs: Any, output: str | os.PathLike,
                       config: TileConfig | None, progress: Any) -> TilingReport:
    """:func:`tile_like` of a partitioned dataset: the same parts, made part by part (each part
    written atomically and recorded in the manifest at once; never the whole dataset in memory)."""
    reference = layer.path
    ref = open_manifest(reference)
    readings = {key: SceneReading.from_dict(scene["reading"]) for key, scene in ref.scenes.items()
                if scene.get("reading") and any(ref.parts[n].get("tiles", 0) for n in ref.scene_parts(key))}
    config, plan = _inputs_for(reference, _reference_tiling(layer.runs()), list(readings.values()), inputs, config)
    key_of = {reading.source: key for key, reading in readings.items()}
    fingerprint = hashlib.sha256(json.dumps({"like": os.path.abspath(reference), "tiling": config.as_dict()},
                                            sort_keys=True).encode()).hexdigest()
    light = []
    examined = 0
    with output_folder(output) as folder:
        manifest = Manifest.load(folder)  # empty for a new folder
        by_reference = _aligned_scenes(reference, plan, folder / DATASET_ALIGNED, config, progress)
        params = _run_params(reference, config, plan, by_reference)
        run = new_run("tile", "tiles", {**params, "scenes": [s.as_dict() for s in by_reference.values()]})
        names = {key_of[scene.source]: [n for n in sorted(ref.scene_parts(key_of[scene.source]))
                                        if ref.parts[n].get("tiles", 0)] for scene, _ in plan}
        if progress is not None:
            progress.start("tile", sum(int(ref.parts[n].get("tiles") or 0) for group in names.values() for n in group))
        with manifest.locked():
            manifest.refresh()
            manifest.crs, manifest.fingerprint = ref.crs, fingerprint
            manifest.runs.append({"run_id": len(manifest.runs) + 1, **run})
            manifest.save()
        with TileReader(by_reference.values()) as reader:
            for scene, _ in plan:
                key, aligned = key_of[scene.source], by_reference[scene.source]
                count = 0
                for name in names[key]:
                    rows = gpd.read_parquet(verified_part(ref, name), columns=[*TILE_COLUMNS, "geometry"])
                    examined += len(rows)
                    tiles = _measured(rows, reader, by_reference, config.min_valid, progress)
                    light.append(pd.DataFrame(tiles[[TILE_ID, SOURCE, "valid_fraction"]]))
                    source = ref.parts[name]
                    facts = {"name": name, "scene": key, "block": source.get("block", 0),
                             "blocks": source.get("blocks", 1), "rows": source.get("rows"),
                             "source": aligned.source, "url": aligned.source, "item": None,
                             "fingerprint": fingerprint}
                    target = folder / name
                    info: dict[str, Any]
                    if tiles.empty:
                        target.unlink(missing_ok=True)
                        info = {"tiles": 0, "bounds": None, "bounds_wgs84": None, "crs": manifest.crs,
                                "sha256": None, "bytes": 0}
                    else:
                        part_run = {"run_id": 1, **new_run("tile", "tiles", {
                            **params, "scenes": [aligned.as_dict()], "part": {**facts, "reading": aligned.as_dict()}}),
                            "created": run["created"]}
                        info = write_part(target, tiles, [part_run])
                    count += int(info["tiles"])
                    with manifest.locked():
                        manifest.refresh()
                        manifest.add_part({**facts, **info})
                        manifest.save()
                entry = ref.scenes[key]
                with manifest.locked():
                    manifest.refresh()
                    earlier = (manifest.scenes.get(key) or {}).get("source")
                    if earlier and earlier != aligned.source:
                        _remove_superseded({str(earlier)}, folder / DATASET_ALIGNED)
                    manifest.scenes[key] = {
                        "source": aligned.source, "url": aligned.source, "item": None, "reading": aligned.as_dict(),
                        **{k: entry[k] for k in ("grid", "blocks", "block_rows") if entry.get(k) is not None},
                        "tiles": count, "fingerprint": fingerprint}
                    manifest.save()
    summary = pd.concat(light, ignore_index=True) if light else pd.DataFrame(columns=[TILE_ID, SOURCE,
                                                                                       "valid_fraction"])
    written = TileLayer(str(output), summary, DatasetRuns(Manifest.load(output)))
    return TilingReport(summary, written, list(by_reference.values()), examined)


__all__ = ["ALIGNED_SUFFIX", "DATASET_ALIGNED", "aligned_folder", "align_scene", "effective_config", "tile_like"]
