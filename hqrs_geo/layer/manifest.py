"""The manifest of a partitioned dataset (``_manifest.json``): what a dataset folder is, the
manifest in memory (:class:`Manifest`, saved as a transaction among concurrent jobs), the check
of every value it holds, and the check of a part file against its entry (:func:`verified_part`).

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

The folder and its parts: :mod:`hqrs_geo.layer.dataset`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyproj import CRS
from pyproj.exceptions import CRSError

from ..atomic import folder_lock, output_error, sha256_file, write_text
from ..errors import InputError
from ..raster.reading import SceneReading
from ..safe_paths import inside, unsafe_name_reason

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


def bad_value(path: PathLike, key: str, problem: str, advice: str = "fix that value, or restore the manifest") \
        -> InputError:
    """The one-line error for a wrong value in the manifest ``path``: which key, what is wrong
    with it, what to do."""
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
        raise bad_value(path, key, f"is {shown(value)}, not [minx, miny, maxx, maxy] with min <= max")


def shown(value: Any) -> str:
    """A manifest value as JSON text short enough for a one-line error."""
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
        raise bad_value(path, key, f"{shown(value)} {problem}",
                        "give the CRS the parts are in (e.g. EPSG:3857), or restore the manifest")


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
    where = f"parts[{shown(name)}]"
    if not isinstance(part, dict):
        raise bad_value(path, where, f"is {shown(part)}, not an object",
                        "remove that entry (running the job again recomputes its part), or restore the manifest")
    for key in _TEXT_OR_NONE:
        if part.get(key) is not None and not isinstance(part[key], str):
            raise bad_value(path, f"{where}.{key}", f"is {shown(part[key])}, not text")
    if not isinstance(part.get("scene"), str):
        raise bad_value(path, f"{where}.scene", "is missing", "remove that entry, or restore the manifest")
    if part.get("name") is not None and part["name"] != name:
        raise bad_value(path, f"{where}.name", f"is {shown(part['name'])}, not the entry's own name")
    for key, low in _PART_INTS.items():
        if part.get(key) is not None and not _is_int(part[key], low):
            raise bad_value(path, f"{where}.{key}", f"is {shown(part[key])}, not a whole number of at least {low}")
    if not _is_int(part.get("tiles")):
        raise bad_value(path, f"{where}.tiles", "is missing", "remove that entry, or restore the manifest")
    rows = part.get("rows")
    if rows is not None and not (isinstance(rows, list) and len(rows) == 2 and all(_is_int(v) for v in rows)
                                 and rows[0] <= rows[1]):
        raise bad_value(path, f"{where}.rows", f"is {shown(rows)}, not [first, last] grid rows")
    _check_bounds(path, f"{where}.bounds", part.get("bounds"))
    _check_bounds(path, f"{where}.bounds_wgs84", part.get("bounds_wgs84"))
    _check_crs(path, f"{where}.crs", part.get("crs"))
    if part["tiles"] > 0:
        digest = part.get("sha256")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise bad_value(path, f"{where}.sha256", f"is {shown(digest)}, not the SHA-256 of the part",
                            "remove that entry (running the job again recomputes its part), or restore the manifest")
        if not _is_int(part.get("bytes")):
            raise bad_value(path, f"{where}.bytes", "is missing", "remove that entry, or restore the manifest")


def scene_reading(path: PathLike, key: str, reading: Any) -> SceneReading:
    """The :class:`~hqrs_geo.raster.reading.SceneReading` a manifest (``path``) records for scene
    ``key``: one hqrs_geo can read the scene's pixels with again, or a one-line error naming the key."""
    try:
        return SceneReading.from_dict(reading)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise bad_value(path, f"scenes[{shown(key)}].reading",
                        f"is not a scene reading ({type(exc).__name__}: {exc})",
                        "remove that scene's entry and run the job that made the dataset again") from None


def validate_manifest(data: Any, path: PathLike) -> dict:
    """The sections of a manifest document, after checking every value hqrs_geo uses (format,
    version, CRS, part names and facts, scenes, failures, run records): a one-line
    :class:`InputError` naming the file and the key otherwise."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not an hqrs_geo dataset manifest; choose another folder")
    version: Any = data.get("version")
    if not _is_int(version, 1):
        raise bad_value(path, "version",
                        f"is {shown(version)}, not a format version (a whole number such as {VERSION})")
    if version > VERSION:
        raise InputError(f"{path}: dataset format version {version} is newer than this hqrs_geo reads; "
                         "upgrade hqrs_geo")
    _check_crs(path, "crs", data.get("crs"))
    if data.get("fingerprint") is not None and not isinstance(data["fingerprint"], str):
        raise bad_value(path, "fingerprint", f"is {shown(data['fingerprint'])}, not text")
    out = _empty_sections()
    out["crs"], out["fingerprint"] = data.get("crs"), data.get("fingerprint")
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("params", {}), dict)
                                             for r in runs):
        raise bad_value(path, "runs", "is not a list of run records")
    out["runs"] = runs
    for section in ("scenes", "parts", "failed"):
        value = data.get(section, {})
        if not isinstance(value, dict):
            raise bad_value(path, section, f"is {shown(value)}, not an object of entries by name")
        out[section] = value
    for name, part in out["parts"].items():
        problem = part_name_problem(name)
        if problem:
            raise bad_value(path, f"parts[{shown(name)}]", problem, "remove that entry, or restore the manifest")
        _check_part(path, name, part)
    for key, scene in out["scenes"].items():
        where = f"scenes[{shown(key)}]"
        if not isinstance(scene, dict):
            raise bad_value(path, where, f"is {shown(scene)}, not an object",
                            "remove that entry (running the job again reads the scene again)")
        for name in ("blocks", "tiles"):
            if scene.get(name) is not None and not _is_int(scene[name]):
                raise bad_value(path, f"{where}.{name}", f"is {shown(scene[name])}, not a whole number")
        for name in ("reading", "grid"):
            if scene.get(name) is not None and not isinstance(scene[name], dict):
                raise bad_value(path, f"{where}.{name}", f"is {shown(scene[name])}, not an object")
        ranges = scene.get("block_rows")
        if ranges is not None and not (isinstance(ranges, list) and all(
                isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) for r in ranges)):
            raise bad_value(path, f"{where}.block_rows", f"is {shown(ranges)}, not a list of [first, last] rows")
        if scene.get("source") is not None and not isinstance(scene["source"], str):
            raise bad_value(path, f"{where}.source", f"is {shown(scene['source'])}, not text")
        if scene.get("reading"):
            scene_reading(path, key, scene["reading"])
    for key, failure in out["failed"].items():
        if not isinstance(failure, dict):
            raise bad_value(path, f"failed[{shown(key)}]", f"is {shown(failure)}, not an object",
                            "remove that entry (running the job again retries the scene)")
    return out


# -- checking parts against the manifest ----------------------------------------------------------
_VERIFIED: dict[tuple, bool] = {}  # parts whose sha256 was checked in this process, by file identity


def part_path(folder: PathLike, name: str) -> Path:
    """The path of part ``name`` of the dataset at ``folder`` (refused when it would leave the folder)."""
    problem = part_name_problem(name)
    if problem:
        raise InputError(f"{manifest_path(folder)}: part {shown(name)} {problem}; remove that entry")
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


def open_manifest(path: PathLike) -> Manifest:
    """The manifest of an existing dataset (one-line error otherwise)."""
    if not Path(path).exists():
        raise InputError(f"{path}: dataset not found; run a job with this folder as output first")
    if not is_dataset(path):
        raise InputError(f"{path}: is a folder without {MANIFEST}, not an hqrs_geo dataset")
    return Manifest.load(path)


__all__ = ["FORMAT", "MANIFEST", "PART_SUFFIX", "VERSION", "Manifest", "is_dataset", "is_dataset_output",
           "bad_value", "manifest_path", "open_manifest", "part_name", "part_name_problem", "part_path",
           "part_problem", "scene_reading", "shown", "validate_manifest", "verified_part"]
