"""Partitioned tile datasets: a folder of GeoParquet parts plus a manifest.

A dataset is what the scale-out engine (:mod:`hqrs_geo.engine.partitioned`) writes for an
archive of scenes: one GeoParquet file per scene, or per block of grid rows of a large
scene, each written atomically (:func:`hqrs_geo.atomic.atomic_path`), and ``_manifest.json``
(written atomically too)::

    DATASET/
      _manifest.json                 # the manifest (below)
      <scene>.parquet                # one part per scene ...
      <scene>.b0003.parquet          # ... or per block of a large scene

Each part is a complete GeoParquet tile layer: the tile columns
(:data:`~hqrs_geo.layer.columns.TILE_COLUMNS`, ``source_url``, ``stac_item``), the results
(embeddings as fixed-size lists, captions), the footprints in the dataset's CRS, and in its
``hqrs_geo`` schema metadata the run records with the scene's reading and the part's facts
(``params.part``), so one part can be opened on its own. DuckDB
(``read_parquet('DATASET/*.parquet')``) and geopandas (``geopandas.read_parquet('DATASET')``;
names starting with ``_`` or ``.`` are skipped) read the parts as they are.

The manifest (``format`` ``hqrs_geo.dataset``, ``version`` 1):

* ``crs``: the CRS of every footprint (the first scene's, or the one asked for);
* ``runs``: the run records of the jobs that wrote the dataset (as in a layer, see
  :mod:`hqrs_geo.layer.runs`); ``fingerprint``: the last job's (tiling, CRS, models' weights,
  decoding): a part made with another fingerprint is recomputed;
* ``scenes``: per scene key its ``source`` (what GDAL opens), ``url``, ``item`` (STAC item id),
  ``reading`` (bands, stretch, … as :class:`~hqrs_geo.raster.reading.SceneReading`), ``grid``,
  ``blocks`` (parts it is split into), ``tiles``;
* ``parts``: per part file name its ``scene``, ``block``, ``rows`` (grid rows ``[first, last)``),
  ``tiles``, ``bounds`` (in ``crs``) and ``bounds_wgs84`` (lon/lat; for pruning partitions by
  area), ``crs``, ``sha256`` and ``bytes`` of the file, and the job ``fingerprint``;
* ``failed``: per scene key that failed in the last job its ``source``, ``url``, ``item`` and
  one-line ``error``; running the job again retries exactly those (and anything unfinished).

:func:`hqrs_geo.layer.io.open_layer`, :func:`~hqrs_geo.layer.io.read_tiles`,
:func:`~hqrs_geo.layer.io.read_runs` and :func:`~hqrs_geo.layer.io.write_tiles` accept a
dataset folder, so every command that reads or updates a tile layer works on one;
:func:`merge_dataset` writes one GeoPackage (or GeoParquet/FlatGeobuf) for QGIS.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from ..atomic import atomic_path, file_facts, folder_lock, output_error, sha256_file, write_text
from ..errors import InputError, OutputError
from ..raster.reading import SceneReading
from ..safe_paths import inside, unsafe_name_reason
from .columns import (
    PROVENANCE_COLUMNS,
    SOURCE,
    SOURCE_URL,
    STAC_ITEM,
    TILE_COLUMNS,
    TILE_ID,
    embedding_columns,
    encode,
    has_value,
)
from .crs import box_in, same_crs, validate_box
from .files import TileLayer, check_file_writable, has_layer, write_file
from .formats import TILES_LAYER, file_format, file_state
from .parquet import geoparquet_crs, stored_runs, write_parquet_file
from .runs import LayerRuns, new_run

MANIFEST = "_manifest.json"
FORMAT = "hqrs_geo.dataset"
VERSION = 1
PART_SUFFIX = ".parquet"
PathLike = str | os.PathLike


# -- what a folder is ---------------------------------------------------------------------------
def manifest_path(folder: PathLike) -> Path:
    """``<folder>/_manifest.json``."""
    return Path(folder) / MANIFEST


def is_dataset(path: PathLike) -> bool:
    """True when ``path`` is a dataset folder (it holds a manifest)."""
    return manifest_path(path).is_file()


def is_dataset_output(path: PathLike) -> bool:
    """True when ``path`` names a dataset to write: an existing dataset or folder, a name ending
    in ``/``, or a name without extension (tile layer files end in ``.gpkg``, ``.parquet``, ``.fgb``)."""
    text = str(path)
    return (is_dataset(text) or os.path.isdir(text) or text.endswith(("/", os.sep))
            or Path(text).suffix == "")


def part_name(scene: str, block: int, blocks: int) -> str:
    """File name of a part: ``<scene>.parquet``, or ``<scene>.b0003.parquet`` for block 3 of several."""
    return f"{scene}{PART_SUFFIX}" if blocks <= 1 else f"{scene}.b{block:04d}{PART_SUFFIX}"


# -- the manifest ---------------------------------------------------------------------------------
_SECTIONS = ("crs", "fingerprint", "runs", "scenes", "parts", "failed")


def _empty_sections() -> dict:
    return {"crs": None, "fingerprint": None, "runs": [], "scenes": {}, "parts": {}, "failed": {}}


@dataclass
class Manifest:
    """The manifest of a dataset, in memory.

    :meth:`load` validates what it reads (one-line :class:`InputError` naming the file and the
    key at fault). :meth:`save` is a transaction: under the dataset's lock
    (:func:`~hqrs_geo.atomic.folder_lock`) it reads the manifest on disk again, applies what
    this job changed since it read it (parts, scenes and failures added, changed or dropped; run
    records appended) on top of what other jobs wrote meanwhile, and writes the result
    atomically. So jobs writing into one dataset at once never drop each other's parts.
    """

    folder: Path
    crs: str | None = None
    fingerprint: str | None = None
    runs: list = field(default_factory=list)
    scenes: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    _base: dict = field(default_factory=_empty_sections, repr=False, compare=False)

    @classmethod
    def load(cls, folder: PathLike) -> Manifest:
        """The manifest of ``folder`` (an empty one when the folder has none yet)."""
        manifest = cls(Path(folder))
        read = _read_manifest(manifest_path(folder), snapshot=True)
        if read is not None:
            data, manifest._base = read
            for name in _SECTIONS:
                setattr(manifest, name, data[name])
        return manifest

    def _sections(self) -> dict:
        """The sections as this job sees them (not copied: the merge only reads them)."""
        return {name: getattr(self, name) for name in _SECTIONS}

    def as_dict(self) -> dict:
        """The JSON document."""
        return {"format": FORMAT, "version": VERSION, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "crs": self.crs, "fingerprint": self.fingerprint, "runs": self.runs, "scenes": self.scenes,
                "parts": self.parts, "failed": self.failed}

    def locked(self) -> Any:
        """The dataset's lock (re-entrant): hold it to make a read, change and save of the manifest
        (and the part files it lists) one step among jobs."""
        return folder_lock(self.folder, manifest_path(self.folder))

    def refresh(self) -> None:
        """Take in what other jobs saved since this manifest was read, keeping this job's
        changes (call it under :meth:`locked` before deciding from the manifest)."""
        read = _read_manifest(manifest_path(self.folder), snapshot=True)
        if read is None:
            return
        data, snapshot = read
        merged = _merge_sections(self.folder, self._base, self._sections(), data)
        for name in _SECTIONS:
            setattr(self, name, merged[name])
        self._base = snapshot

    def save(self) -> None:
        """Write the manifest atomically, merged with what other jobs saved meanwhile (the folder
        is created when missing)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.folder, exc) from None
        with self.locked():
            data = _read_manifest(manifest_path(self.folder))
            merged = self._sections() if data is None else _merge_sections(self.folder, self._base,
                                                                           self._sections(), data)
            for name in _SECTIONS:
                setattr(self, name, merged[name])
            text = json.dumps(self.as_dict(), ensure_ascii=False)
            write_text(manifest_path(self.folder), text)
            written = json.loads(text)  # a snapshot of the disk that later in-place changes cannot touch
            self._base = {name: written[name] for name in _SECTIONS}

    def part_files(self) -> list[Path]:
        """Paths of the parts with tiles, ordered by name."""
        return [self.folder / name for name in sorted(self.parts) if self.parts[name].get("tiles", 0) > 0]

    def scene_parts(self, key: str) -> list[str]:
        """Names of the parts of scene ``key``."""
        return [name for name, part in self.parts.items() if part.get("scene") == key]

    def scene_done(self, key: str, source: str, fingerprint: str | None) -> bool:
        """True when every block of scene ``key`` (read from ``source``) has a part made by ``fingerprint``."""
        scene = self.scenes.get(key)
        if not scene or scene.get("source") != source or "blocks" not in scene:
            return False
        blocks = int(scene["blocks"])
        if blocks == 0:
            return scene.get("fingerprint") == fingerprint
        done = {part.get("block") for part in (self.parts[n] for n in self.scene_parts(key))
                if part.get("fingerprint") == fingerprint and part.get("blocks") == blocks}
        return done >= set(range(blocks))

    def add_part(self, info: dict) -> None:
        """Record a finished part (and drop the failure of its scene)."""
        self.parts[info["name"]] = info
        self.failed.pop(info["scene"], None)

    def drop_obsolete_parts(self, key: str, keep: Iterable[str]) -> list[str]:
        """Forget the parts of scene ``key`` not in ``keep`` (another blocking or job); returns their names."""
        keep = set(keep)
        gone = [name for name in self.scene_parts(key) if name not in keep]
        for name in gone:
            del self.parts[name]
        return gone


def _merge_sections(folder: Path, base: dict, mine: dict, theirs: dict) -> dict:
    """``theirs`` (the manifest on disk now) with the changes from ``base`` to ``mine`` (this job's)
    applied: entries this job added, changed or removed; run records it appended (numbered after
    theirs); ``crs`` and ``fingerprint`` when this job set them. An entry this job removed that
    another job changed meanwhile stays; a part both changed is the one whose entry matches the
    file in the folder."""
    merged = theirs  # read for this merge: ours to change
    for name in ("crs", "fingerprint"):
        if mine.get(name) != base.get(name):
            merged[name] = mine.get(name)
    added = mine["runs"][len(base["runs"]):]
    for run in added:
        merged["runs"].append({**run, "run_id": len(merged["runs"]) + 1} if "run_id" in run else run)
    for section in ("scenes", "parts", "failed"):
        before, now, result = base[section], mine[section], merged[section]
        for key in set(before) | set(now):
            if before.get(key) == now.get(key):
                continue
            if key not in now:
                if result.get(key) == before.get(key):  # another job's newer entry stays
                    result.pop(key, None)
            elif section == "parts" and key in result and result[key] != before.get(key):
                result[key] = _entry_on_disk(folder / key, now[key], result[key])
            else:
                result[key] = now[key]
    return merged


def _entry_on_disk(path: Path, mine: dict, theirs: dict) -> dict:
    """Of two entries of one part written by two jobs, the one that describes the file now there."""
    try:
        stat = path.stat()
    except OSError:
        return mine if not mine.get("tiles") else theirs
    for entry in (mine, theirs):
        if entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry
    digest = sha256_file(path)
    return mine if mine.get("sha256") == digest else theirs


# -- validating what a manifest says ----------------------------------------------------------------
def _read_manifest(path: Path, snapshot: bool = False) -> Any:
    """The validated sections of the manifest at ``path`` (None when there is none); with
    ``snapshot`` also a second, independent copy of them."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the dataset manifest ({exc}); check the file's permissions") \
            from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: the dataset manifest is not valid JSON ({exc}); was it changed outside "
                         "hqrs_geo? Restore it, or write the dataset again into a new folder") from None
    sections = validate_manifest(data, path)
    if not snapshot:
        return sections
    again = json.loads(text)
    return sections, {name: again[name] if name in again else _empty_sections()[name] for name in _SECTIONS}


def _bad(path: PathLike, key: str, problem: str, advice: str = "fix that value, or restore the manifest") \
        -> InputError:
    return InputError(f"{path}: key {key} {problem}; {advice}")


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _check_bounds(path: PathLike, key: str, value: Any) -> None:
    if value is None:
        return
    if not (isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)
            and value[0] <= value[2] and value[1] <= value[3]):
        raise _bad(path, key, f"is {_shown(value)}, not [minx, miny, maxx, maxy] with min <= max")


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.lru_cache(maxsize=64)
def _crs_problem(text: str) -> str | None:
    try:
        CRS.from_user_input(text)
    except (CRSError, TypeError, ValueError):
        return "is not a CRS pyproj knows"
    return None


def _check_crs(path: PathLike, key: str, value: Any) -> None:
    if value is None:
        return
    problem = "is not text" if not isinstance(value, str) else _crs_problem(value)
    if problem:
        raise _bad(path, key, f"{_shown(value)} {problem}", "give the CRS the parts are in (e.g. EPSG:3857), "
                                                             "or restore the manifest")


def part_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a part of a dataset (None when it can): a part is one plain file
    name ending in ``.parquet`` inside the dataset folder, not hidden (``.``) nor reserved (``_``)."""
    if not isinstance(name, str):
        return "is not text"
    reason = unsafe_name_reason(name)
    if reason is not None:
        return f"is not a plain file name inside the dataset folder ({reason})"
    if not name.endswith(PART_SUFFIX) or name.startswith((".", "_")):
        return f"is not a part file name (<scene>{PART_SUFFIX}, not starting with '.' or '_')"
    return None


_SHA256 = re.compile(r"[0-9a-f]{64}")
_PART_INTS = {"block": 0, "blocks": 0, "tiles": 0, "bytes": 0, "mtime_ns": 0}
_TEXT_OR_NONE = ("scene", "source", "url", "item", "fingerprint", "name")


def _check_part(path: PathLike, name: str, part: Any) -> None:
    where = f"parts[{_shown(name)}]"
    if not isinstance(part, dict):
        raise _bad(path, where, f"is {_shown(part)}, not an object", "remove that entry (running the job again "
                                                                     "recomputes its part), or restore the manifest")
    for key in _TEXT_OR_NONE:
        if part.get(key) is not None and not isinstance(part[key], str):
            raise _bad(path, f"{where}.{key}", f"is {_shown(part[key])}, not text")
    if not isinstance(part.get("scene"), str):
        raise _bad(path, f"{where}.scene", "is missing", "remove that entry, or restore the manifest")
    if part.get("name") is not None and part["name"] != name:
        raise _bad(path, f"{where}.name", f"is {_shown(part['name'])}, not the entry's own name")
    for key, low in _PART_INTS.items():
        if part.get(key) is not None and not _is_int(part[key], low):
            raise _bad(path, f"{where}.{key}", f"is {_shown(part[key])}, not a whole number of at least {low}")
    if not _is_int(part.get("tiles")):
        raise _bad(path, f"{where}.tiles", "is missing", "remove that entry, or restore the manifest")
    rows = part.get("rows")
    if rows is not None and not (isinstance(rows, list) and len(rows) == 2 and all(_is_int(v) for v in rows)
                                 and rows[0] <= rows[1]):
        raise _bad(path, f"{where}.rows", f"is {_shown(rows)}, not [first, last] grid rows")
    _check_bounds(path, f"{where}.bounds", part.get("bounds"))
    _check_bounds(path, f"{where}.bounds_wgs84", part.get("bounds_wgs84"))
    _check_crs(path, f"{where}.crs", part.get("crs"))
    if part["tiles"] > 0:
        digest = part.get("sha256")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise _bad(path, f"{where}.sha256", f"is {_shown(digest)}, not the SHA-256 of the part",
                       "remove that entry (running the job again recomputes its part), or restore the manifest")
        if not _is_int(part.get("bytes")):
            raise _bad(path, f"{where}.bytes", "is missing", "remove that entry, or restore the manifest")


def _check_reading(path: PathLike, where: str, reading: dict) -> None:
    """A scene's ``reading`` must be one hqrs_geo can read the scene's pixels with again."""
    try:
        SceneReading.from_dict(reading)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _bad(path, f"{where}.reading", f"is not a scene reading ({type(exc).__name__}: {exc})",
                   "remove that scene's entry and run the job that made the dataset again") from None


def validate_manifest(data: Any, path: PathLike) -> dict:
    """The sections of a manifest document, after checking every value hqrs_geo uses (format,
    version, CRS, part names and facts, scenes, failures, run records): a one-line
    :class:`InputError` naming the file and the key otherwise."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not an hqrs_geo dataset manifest; choose another folder")
    version: Any = data.get("version")
    if not _is_int(version, 1):
        raise _bad(path, "version", f"is {_shown(version)}, not a format version (a whole number such as {VERSION})")
    if version > VERSION:
        raise InputError(f"{path}: dataset format version {version} is newer than this hqrs_geo reads; "
                         "upgrade hqrs_geo")
    _check_crs(path, "crs", data.get("crs"))
    if data.get("fingerprint") is not None and not isinstance(data["fingerprint"], str):
        raise _bad(path, "fingerprint", f"is {_shown(data['fingerprint'])}, not text")
    out = _empty_sections()
    out["crs"], out["fingerprint"] = data.get("crs"), data.get("fingerprint")
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("params", {}), dict)
                                             for r in runs):
        raise _bad(path, "runs", "is not a list of run records")
    out["runs"] = runs
    for section in ("scenes", "parts", "failed"):
        value = data.get(section, {})
        if not isinstance(value, dict):
            raise _bad(path, section, f"is {_shown(value)}, not an object of entries by name")
        out[section] = value
    for name, part in out["parts"].items():
        problem = part_name_problem(name)
        if problem:
            raise _bad(path, f"parts[{_shown(name)}]", problem, "remove that entry, or restore the manifest")
        _check_part(path, name, part)
    for key, scene in out["scenes"].items():
        where = f"scenes[{_shown(key)}]"
        if not isinstance(scene, dict):
            raise _bad(path, where, f"is {_shown(scene)}, not an object", "remove that entry (running the job "
                                                                          "again reads the scene again)")
        for name in ("blocks", "tiles"):
            if scene.get(name) is not None and not _is_int(scene[name]):
                raise _bad(path, f"{where}.{name}", f"is {_shown(scene[name])}, not a whole number")
        for name in ("reading", "grid"):
            if scene.get(name) is not None and not isinstance(scene[name], dict):
                raise _bad(path, f"{where}.{name}", f"is {_shown(scene[name])}, not an object")
        ranges = scene.get("block_rows")
        if ranges is not None and not (isinstance(ranges, list) and all(
                isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) for r in ranges)):
            raise _bad(path, f"{where}.block_rows", f"is {_shown(ranges)}, not a list of [first, last] rows")
        if scene.get("source") is not None and not isinstance(scene["source"], str):
            raise _bad(path, f"{where}.source", f"is {_shown(scene['source'])}, not text")
        if scene.get("reading"):
            _check_reading(path, where, scene["reading"])
    for key, failure in out["failed"].items():
        if not isinstance(failure, dict):
            raise _bad(path, f"failed[{_shown(key)}]", f"is {_shown(failure)}, not an object",
                       "remove that entry (running the job again retries the scene)")
    return out


# -- checking parts against the manifest ----------------------------------------------------------
_VERIFIED: dict[tuple, bool] = {}  # parts whose sha256 was checked in this process, by file identity


def part_path(folder: PathLike, name: str) -> Path:
    """The path of part ``name`` of the dataset at ``folder`` (refused when it would leave the folder)."""
    problem = part_name_problem(name)
    if problem:
        raise InputError(f"{manifest_path(folder)}: part {_shown(name)} {problem}; remove that entry")
    return inside(folder, name, what="part")


def part_problem(folder: PathLike, name: str, info: dict, full: bool = True) -> str | None:
    """Why the file of part ``name`` does not match its manifest entry ``info`` (None when it does):
    missing, another size, or (``full``) another SHA-256. Without ``full`` an unchanged size and
    modification time are taken as the file written (the check a resumed job makes of every part);
    with it the bytes are hashed, once per process while the file is unchanged."""
    path = Path(folder) / name
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "it is missing"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if not path.is_file():
        return "it is not a file"
    expected = info.get("bytes")
    if expected is not None and stat.st_size != expected:
        return f"it holds {stat.st_size} bytes, the manifest says {expected}"
    digest = info.get("sha256")
    if not digest:
        return None
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, digest)
    if key in _VERIFIED or (not full and info.get("mtime_ns") == stat.st_mtime_ns):
        return None
    try:
        found = sha256_file(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if found != digest:
        return "its SHA-256 differs from the manifest's: it was changed or damaged after it was written"
    if len(_VERIFIED) > 100_000:
        _VERIFIED.clear()
    _VERIFIED[key] = True
    return None


def verified_part(manifest: Manifest, name: str) -> Path:
    """The path of part ``name``, after checking the file is the one the manifest lists
    (:func:`part_problem`); a one-line :class:`InputError` naming the part otherwise. A part
    replaced by another job since ``manifest`` was read is taken with its new entry."""
    path = part_path(manifest.folder, name)
    problem = part_problem(manifest.folder, name, manifest.parts[name])
    if problem is None:
        return path
    fresh = _read_manifest(manifest_path(manifest.folder)) or _empty_sections()
    entry = fresh["parts"].get(name)
    if entry is not None and entry != manifest.parts[name] and part_problem(manifest.folder, name, entry) is None:
        manifest.parts[name] = entry
        return path
    info = manifest.parts[name]
    try:
        stat = path.stat()
        in_place = stat.st_size == info.get("bytes") and stat.st_mtime_ns == info.get("mtime_ns")
    except OSError:
        in_place = False
    again = ("run the job that made the dataset again with «verify_parts» (its size and time are unchanged): "
             "it computes this part again") if in_place else \
        "run the job that made the dataset again: it computes this part again"
    raise InputError(f"{path}: this part of dataset {manifest.folder} is damaged or was changed ({problem}); "
                     f"{again}")


def part_crs(path: PathLike) -> str | None:
    """The CRS of a part's footprints as its GeoParquet metadata says (None when it has none)."""
    return geoparquet_crs(path)


# -- parts ----------------------------------------------------------------------------------------
def frame_bounds(frame: Any) -> tuple[list[float] | None, list[float] | None]:
    """``(bounds in the frame's CRS, bounds in WGS 84)`` of a tile frame's footprints."""
    if frame.empty:
        return None, None
    bounds = [float(v) for v in frame.total_bounds]
    wgs84 = None
    if frame.crs is not None:
        transformer = Transformer.from_crs(frame.crs, "EPSG:4326", always_xy=True)
        box = transformer.transform_bounds(bounds[0], bounds[1], bounds[2], bounds[3], densify_pts=21)
        wgs84 = [float(v) for v in box]
    return bounds, wgs84


def write_part(path: PathLike, frame: Any, runs: list[dict]) -> dict:
    """Write one part (a GeoParquet tile layer) atomically; returns its file facts
    (``tiles``, ``bounds``, ``bounds_wgs84``, ``crs``, ``sha256``, ``bytes``, ``mtime_ns``)."""
    frame = frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)
    for name in PROVENANCE_COLUMNS:
        if name not in frame.columns:
            frame[name] = frame[SOURCE] if name == SOURCE_URL else None
    with atomic_path(path) as tmp:
        write_parquet_file(tmp, frame, runs, part=True)
    bounds, wgs84 = frame_bounds(frame)
    crs = frame.crs.to_string() if frame.crs is not None else None
    return {"tiles": int(len(frame)), "bounds": bounds, "bounds_wgs84": wgs84, "crs": crs, **file_facts(path)}


def part_record(path: PathLike) -> dict | None:
    """The ``params.part`` facts a part file carries (None for files that are not parts)."""
    for run in reversed(stored_runs(path)):
        part = (run.get("params") or {}).get("part")
        if part:
            return dict(part)
    return None


def _embedding_sizes(schema: Any) -> dict[str, int]:
    """``{embedding column: values per vector}`` of a part, from its Arrow schema."""
    return {name: schema.field(name).type.list_size for name in embedding_columns(schema.names)
            if pa.types.is_fixed_size_list(schema.field(name).type)}


def check_embedding_sizes(sizes: dict[str, dict[str, int]], where: PathLike) -> None:
    """Refuse parts whose embeddings have another dimension than most parts' (``sizes``: per
    part path, :func:`_embedding_sizes`), naming the first such part."""
    columns = {column for found in sizes.values() for column in found}
    for column in sorted(columns):
        counts = Counter(found[column] for found in sizes.values() if column in found)
        if len(counts) < 2:
            continue
        usual = counts.most_common(1)[0][0]
        odd = next(path for path, found in sizes.items() if found.get(column, usual) != usual)
        raise InputError(f"{odd}: its embeddings {column} have {sizes[odd][column]} values, the other parts of "
                         f"dataset {where} {usual}; embed the dataset again with one model («overwrite»), or "
                         "remove this part")


def _read_parts(manifest: Manifest, names: Sequence[str], where: PathLike) -> Any:
    """The tiles of parts ``names`` (each checked against the manifest, :func:`verified_part`),
    footprints in the dataset's CRS (a part in another CRS is reprojected)."""
    frames, sizes = [], {}
    for name in names:
        frame, path, found = _read_part(manifest, name, where)
        sizes[str(path)] = found
        frames.append(frame)
    check_embedding_sizes(sizes, where)
    if not frames:
        return None
    if len(frames) == 1:
        return frames[0]
    frame = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(frame, geometry=frames[0].geometry.name, crs=frames[0].crs)


def read_part(manifest: Manifest, name: str, columns: Sequence[str] | None = None) -> Any:
    """The tiles of part ``name`` of the dataset ``manifest`` describes, ordered by ``tile_id``:
    the file checked against its entry first (:func:`verified_part`), footprints in the dataset's
    CRS; ``columns``: only these besides the footprint (a one-line error for a column the part
    lacks)."""
    frame, _, _ = _read_part(manifest, name, manifest.folder, columns)
    if TILE_ID in frame.columns:
        frame = frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)
    return frame


def _read_part(manifest: Manifest, name: str, where: PathLike, columns: Sequence[str] | None = None) \
        -> tuple[Any, Path, dict[str, int]]:
    """``(tiles, path, embedding sizes)`` of one verified part (see :func:`read_part`)."""
    path = verified_part(manifest, name)
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise InputError(f"{path}: this part of dataset {where} has no column {missing[0]!r}; "
                                 f"it has {', '.join(n for n in schema.names if n != 'geometry')}")
            columns = [*dict.fromkeys([*columns, "geometry"])]
        sizes = _embedding_sizes(schema)
        frame = gpd.read_parquet(path, columns=columns)
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises many types for damaged files
        raise InputError(f"{path}: cannot read this part of dataset {where} ({str(exc).splitlines()[0]}); "
                         "run the job that made the dataset again") from None
    listed = manifest.parts[name].get("tiles")
    if meta.num_rows != listed:  # the file is the one written (SHA-256): its entry was changed
        raise _bad(manifest_path(manifest.folder), f"parts[{_shown(name)}].tiles",
                   f"is {listed}, the part holds {meta.num_rows} tiles", "restore the manifest")
    return _in_dataset_crs(frame, manifest, path), path, sizes


def _in_dataset_crs(frame: Any, manifest: Manifest, path: PathLike) -> Any:
    """A part's tiles with footprints in the dataset's CRS (reprojected when the part is in another)."""
    if manifest.crs is None or same_crs(frame.crs, manifest.crs):
        return frame
    if frame.crs is None:
        raise InputError(f"{path}: this part has no CRS, the dataset {manifest.folder} is in {manifest.crs}; run "
                         "the job that made the dataset again")
    return frame.to_crs(manifest.crs)


def _empty_frame(manifest: Manifest) -> Any:
    return gpd.GeoDataFrame({c: [] for c in (*TILE_COLUMNS, *PROVENANCE_COLUMNS)},
                            geometry=gpd.GeoSeries([], crs=manifest.crs), crs=manifest.crs)


def _overlaps(a: Sequence[float] | None, b: Sequence[float]) -> bool:
    return a is not None and all(math.isfinite(v) for v in b) and not (
        a[0] > b[2] or a[2] < b[0] or a[1] > b[3] or a[3] < b[1])


# -- reading --------------------------------------------------------------------------------------
def open_manifest(path: PathLike) -> Manifest:
    """The manifest of an existing dataset (one-line error otherwise)."""
    if not Path(path).exists():
        raise InputError(f"{path}: dataset not found; run a job with this folder as output first")
    if not is_dataset(path):
        raise InputError(f"{path}: is a folder without {MANIFEST}, not an hqrs_geo dataset")
    return Manifest.load(path)


def read_dataset_tiles(path: PathLike, bbox: Sequence[float] | None = None, bbox_crs: str | None = None) -> Any:
    """The tiles of a dataset as one GeoDataFrame ordered by ``tile_id``, footprints in the
    dataset's CRS; with ``bbox`` (in ``bbox_crs``, default the dataset's CRS) only the tiles
    intersecting it (parts outside it are not read). Every part read is checked against its
    manifest entry first (:func:`verified_part`)."""
    validate_box(bbox, bbox_crs)
    manifest = open_manifest(path)
    names = [name for name in sorted(manifest.parts) if manifest.parts[name].get("tiles", 0) > 0]
    box = None
    if bbox is not None:
        box = box_in(bbox, bbox_crs, manifest.crs)
        boxes: dict[Any, tuple[float, ...]] = {}

        def box_of(crs: Any) -> tuple[float, ...]:
            if crs not in boxes:  # a part in another CRS records its bounds in its own CRS
                boxes[crs] = box_in(bbox, bbox_crs or manifest.crs, crs)
            return boxes[crs]

        names = [n for n in names if _overlaps(manifest.parts[n].get("bounds"),
                                               box_of(manifest.parts[n].get("crs") or manifest.crs))]
    frame = _read_parts(manifest, names, path)
    if frame is None:
        frame = _empty_frame(manifest)
    if box is not None and not frame.empty:
        frame = frame[frame.geometry.intersects(shapely.box(*box))]
    return frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)


class DatasetRuns(LayerRuns):
    """The run records of a dataset (the manifest's), with the scenes' readings from its scenes."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest.runs, manifest.folder)
        self.manifest = manifest

    def scenes(self) -> dict:
        """``{source: SceneReading}`` of every scene of the dataset."""
        out = super().scenes()
        for key, scene in self.manifest.scenes.items():
            if scene.get("reading"):
                try:
                    out[scene["reading"]["source"]] = SceneReading.from_dict(scene["reading"])
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise _bad(manifest_path(self.manifest.folder), f"scenes[{_shown(key)}].reading",
                               f"is not a scene reading ({type(exc).__name__}: {exc})",
                               "remove that scene's entry and run the job that made the dataset again") from None
        return out


def read_dataset_runs(path: PathLike) -> DatasetRuns:
    """The run records of a dataset."""
    return DatasetRuns(open_manifest(path))


# -- writing back (results of embed, caption, classify, score columns) -----------------------------
def _part_of_rows(manifest: Manifest, frame: Any) -> Any:
    """The part file name of each row of a tile frame (by its scene and grid row)."""
    by_source = {scene.get("source"): key for key, scene in manifest.scenes.items()}
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for name, part in manifest.parts.items():
        first, last = part.get("rows") or (0, 1 << 62)
        ranges.setdefault(part["scene"], []).append((int(first), int(last), name))

    def which(source: str, row: int) -> str | None:
        for first, last, name in ranges.get(by_source.get(source, ""), []):
            if first <= row < last:
                return name
        return None

    return pd.Series([which(s, int(r)) for s, r in zip(frame[SOURCE], frame["row"])], index=frame.index,
                     dtype=object)


def write_dataset_layer(path: PathLike, tiles: Any, run: dict | None = None,
                        replace_sources: Sequence[str] | None = None, layer: str = "tiles",
                        replace_all: bool = False, tables: dict | None = None) -> Any:
    """Write ``tiles`` (a whole-dataset frame with new or changed columns) back into the parts of
    the dataset at ``path``; each changed part is rewritten atomically, then the manifest.
    Returns what :func:`hqrs_geo.layer.io.write_layer` returns (a :class:`TileLayer`)."""
    if layer != "tiles" or tables:
        raise OutputError(f"{path}: a dataset holds tile parts only; write result layers and tables to a "
                          "GeoPackage («output»), or merge the dataset into one first")
    manifest = open_manifest(path)
    if tiles.crs is not None and manifest.crs is not None and not same_crs(tiles.crs, manifest.crs):
        raise OutputError(f"{path}: the dataset is in {manifest.crs}, the tiles in {tiles.crs}; write tiles in the "
                          "dataset's CRS")
    parts = _part_of_rows(manifest, tiles)
    if parts.isna().any():
        stray = tiles.loc[parts.isna(), TILE_ID].iloc[0]
        raise OutputError(f"{path}: tile {stray} belongs to no part of the dataset; add scenes with the job "
                          "that made the dataset (run or tile with this folder as output)")
    replace = set(replace_sources if replace_sources is not None else tiles[SOURCE].unique())
    touched = set(parts.unique())
    if replace_all:
        touched |= set(manifest.parts)
    else:
        touched |= {name for name, part in manifest.parts.items()
                    if manifest.scenes.get(part["scene"], {}).get("source") in replace}
    if run is not None:
        manifest.runs.append({"run_id": len(manifest.runs) + 1, **run})
    for name in sorted(touched):
        commit_part(manifest, name, tiles[parts == name], run)
    manifest.save()
    frame = tiles.sort_values(TILE_ID, kind="stable").reset_index(drop=True) if TILE_ID in tiles.columns else tiles
    return TileLayer(str(path), frame, DatasetRuns(manifest), file_state(path))


def commit_part(manifest: Manifest, name: str, rows: Any, run: dict | None = None) -> None:
    """Rewrite part ``name`` with ``rows`` (its tiles with new or changed columns; none: the part
    is emptied) and record it in the manifest on disk, both under the dataset's lock: the
    manifest never lists a part file that is not there. Columns another job added to the part
    since this job read it are kept."""
    target = part_path(manifest.folder, name)
    with manifest.locked():
        manifest.refresh()
        if name not in manifest.parts:  # another job dropped it (its scene was made again)
            return
        if rows.empty:
            target.unlink(missing_ok=True)
            manifest.parts[name] = {**manifest.parts[name], "tiles": 0, "bounds": None, "bounds_wgs84": None}
        else:
            runs = stored_runs(target) if target.exists() else []
            if run is not None:
                runs.append({"run_id": len(runs) + 1, **run})
            rows = _keep_columns_of(manifest, name, target, rows)
            manifest.parts[name] = {**manifest.parts[name], **write_part(target, rows, runs)}
        manifest.save()


def _keep_columns_of(manifest: Manifest, name: str, target: Path, rows: Any) -> Any:
    """``rows`` with the result columns the part file on disk has and ``rows`` lacks (written by
    another job meanwhile), matched by tile id."""
    if not target.exists() or part_problem(manifest.folder, name, manifest.parts[name]) is not None:
        return rows
    try:
        names = pq.read_schema(target).names
    except Exception:  # pyarrow raises many types for damaged files: nothing to keep
        return rows
    missing = [c for c in names if c not in rows.columns and c != "geometry"]
    if not missing or TILE_ID not in names:
        return rows
    found = gpd.read_parquet(target, columns=[TILE_ID, *missing, "geometry"]).drop(columns="geometry")
    rows = rows.merge(found, on=TILE_ID, how="left")
    return rows


# -- merging into one layer -----------------------------------------------------------------------
def _as_blobs(frame: Any) -> Any:
    """Embedding arrays (as read from GeoParquet) as little-endian BLOBs of their own float width."""
    for name in embedding_columns(list(frame.columns)):
        values = frame[name]
        present = values.map(has_value)
        if not present.any():
            continue
        first = np.asarray(values[present].iloc[0])
        dtype = "float16" if first.dtype == np.float16 else "float32"
        blobs = encode(np.stack([np.asarray(v) for v in values[present]]), dtype)
        out: list[bytes | None] = [None] * len(values)
        for i, blob in zip(np.flatnonzero(present.to_numpy()), blobs):
            out[int(i)] = blob
        frame[name] = out
    return frame


def merge_dataset(path: PathLike, output: PathLike, bbox: Sequence[float] | None = None,
                  bbox_crs: str | None = None, overwrite: bool = False) -> Any:
    """Write the tiles of the dataset at ``path`` (those intersecting ``bbox``, in ``bbox_crs`` or
    the dataset's CRS) as one tile layer ``output`` (GeoPackage for QGIS, GeoParquet or
    FlatGeobuf), with the dataset's run records and the readings of its scenes: every command
    works on the merged layer as on the dataset. ``output`` must be outside the dataset; an
    existing tile layer there is replaced only with ``overwrite``. Parts in another CRS than the
    dataset's are reprojected. Returns the merged layer as a :class:`TileLayer`."""
    validate_box(bbox, bbox_crs)
    if is_dataset(output):
        raise OutputError(f"{output}: is a dataset; merge into a file ending in .gpkg, .parquet or .fgb")
    manifest = open_manifest(path)
    folder, target = Path(path).resolve(), Path(output).resolve()
    if folder == target or folder in target.parents:
        raise OutputError(f"{output}: is inside the dataset {path} being merged; write the merged layer outside "
                          "the dataset folder")
    check_file_writable(output)
    driver = file_format(output)
    with folder_lock(target.parent, output):
        if not overwrite:
            _refuse_existing_layer(output, driver)
        frame = read_dataset_tiles(path, bbox, bbox_crs)
        sources = set(frame[SOURCE]) if not frame.empty else set()
        readings = [s["reading"] for s in manifest.scenes.values()
                    if s.get("reading") and s.get("source") in sources]
        params = {"dataset": str(folder), "bbox": list(bbox) if bbox is not None else None,
                  "bbox_crs": bbox_crs, "parts": len(manifest.part_files()), "scenes": readings}
        runs = [*manifest.runs, {"run_id": len(manifest.runs) + 1, **new_run("merge", "tiles", params)}]
        for name in (SOURCE_URL, STAC_ITEM):
            if name in frame.columns:
                frame[name] = frame[name].astype(object)
        if driver != "Parquet":
            frame = _as_blobs(frame.copy())
        write_file(output, frame, runs, TILES_LAYER)
    return TileLayer(str(output), frame, LayerRuns(runs, output), file_state(output))


def _refuse_existing_layer(output: PathLike, driver: str) -> None:
    """A one-line error when ``output`` already holds a tile layer (a GeoPackage may hold other layers)."""
    if not Path(output).exists():
        return
    if driver == "GPKG" and not has_layer(output, TILES_LAYER):
        return
    raise OutputError(f"{output}: already holds a tile layer; add «overwrite» to replace it, or choose another "
                      "output")


def dataset_summary(path: PathLike) -> dict:
    """Counts of a dataset: scenes, parts, tiles, failed scenes, bytes."""
    manifest = open_manifest(path)
    return {"scenes": len(manifest.scenes), "parts": len(manifest.part_files()),
            "tiles": sum(int(p.get("tiles", 0)) for p in manifest.parts.values()),
            "failed": len(manifest.failed), "bytes": sum(int(p.get("bytes", 0)) for p in manifest.parts.values()),
            "crs": manifest.crs}


__all__ = ["FORMAT", "MANIFEST", "DatasetRuns", "Manifest", "check_embedding_sizes", "commit_part",
           "dataset_summary", "is_dataset", "is_dataset_output", "merge_dataset", "open_manifest", "part_crs",
           "part_name", "part_name_problem", "part_path", "part_problem", "part_record", "read_part",
           "read_dataset_runs", "read_dataset_tiles", "same_crs", "validate_manifest", "verified_part",
           "write_dataset_layer", "write_part"]
