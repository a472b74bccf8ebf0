"""Units of work of the partitioned (scale-out) engine, the same for every executor.

A unit is one scene, or one block of grid rows of a large scene; it becomes one part of a
dataset (:mod:`hqrs_geo.layer.dataset`). Its three steps are plain functions, so the
in-process executor and the Ray executor (:mod:`hqrs_geo.engine.distributed`) run exactly the
same code, and a unit computed twice (a retried task, a re-run after a crash) gives the same
part:

1. :func:`plan_unit` (CPU): prepare the scene when needed (bands, the one stretch, the grid; a
   scene larger than ``block_tiles`` grid cells is split into blocks instead), measure valid
   fractions, and make the tile frame with footprints in the dataset's CRS and the windows of
   the kept tiles (:class:`UnitWindows`); :func:`read_pixels` reads those windows as one
   ``[N, 3, H, W]`` uint8 array where the model runs (:func:`read_unit`: both in one call), so
   no pixel array is sent between processes;
2. :func:`infer_unit` (the model worker): every task on the pixels, batch by batch, through
   :func:`hqrs_geo.engine.run.run_batch` (the model engine's own per-batch code, with its
   CUDA out-of-memory halving);
3. :func:`write_unit` (CPU): the results into the frame (:func:`hqrs_geo.engine.run.fill_columns`)
   and the part written atomically, with the run record and the part's facts.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HqrsError, InputError
from ..layer.columns import SOURCE_URL, STAC_ITEM
from ..layer.dataset import VERSION, part_name, write_part
from ..layer.runs import new_run
from ..raster.catalog import SourceEntry, remote_defaults
from ..raster.grid import SceneGrid
from ..raster.reading import SceneReading
from ..redact import redact
from ..tiling.config import TileConfig
from ..tiling.plan import plan_tiles, prepare_scenes, records_to_frame
from ..tiling.reader import TileReader
from .run import fill_columns, run_batch

DEFAULT_BLOCK_TILES = 1024


@dataclass
class Unit:
    """One scene (``blocks == 0``: not prepared yet) or block ``block`` of ``blocks`` of a prepared scene."""

    entry: SourceEntry
    block: int = 0
    blocks: int = 0
    rows: tuple[int, int] | None = None
    scene: SceneReading | None = None  # with its grid, once prepared
    attempts: int = 0

    @property
    def key(self) -> str:
        """The scene key."""
        return self.entry.key

    @property
    def name(self) -> str:
        """The part file name (the scene key while the scene is not prepared)."""
        return part_name(self.key, self.block, self.blocks) if self.blocks else self.key


@dataclass
class TaskSpec:
    """What the writer needs of a model task, without the model: its column, store key,
    constant columns and description (duck-types the task for :func:`~hqrs_geo.engine.run.fill_columns`)."""

    field: str
    store_key: str
    constants: dict
    description: dict

    @classmethod
    def of(cls, task: Any) -> TaskSpec:
        """The spec of a live task (:class:`~hqrs_geo.engine.tasks.EmbedTask` / ``CaptionTask``)."""
        return cls(task.field, task.store_key, dict(task.columns()), dict(task.describe()))

    def columns(self) -> dict:
        """Constant columns written beside the result."""
        return dict(self.constants)


@dataclass
class JobContext:
    """Everything a unit needs, fixed for a job (picklable; one copy per worker)."""

    folder: str
    config: TileConfig
    crs: str | None
    fingerprint: str
    run: dict  # the job's run record (without run_id)
    specs: list = field(default_factory=list)
    block_tiles: int = DEFAULT_BLOCK_TILES
    batch_size: int = 32


@dataclass
class Outcome:
    """What became of a unit: a part (``part``: its manifest entry), a split into blocks, or a failure."""

    unit: Unit
    kind: str  # "part" | "split" | "failed"
    part: dict | None = None
    scene: SceneReading | None = None
    blocks: list | None = None
    error: str | None = None


# -- fingerprint and block plan ---------------------------------------------------------------------
FINGERPRINT_TASK_KEYS = ("field", "name", "arch", "sha256", "quick_gelu", "preprocess", "template", "dtype", "decoding")


def job_fingerprint(config: TileConfig, crs: str | None, specs: list) -> str:
    """sha256 of what a part's content depends on: tiling, CRS, every model's weights and settings."""
    payload = {"version": VERSION, "tiling": config.as_dict(), "crs": crs,
               "tasks": [{k: s.description.get(k) for k in FINGERPRINT_TASK_KEYS} for s in specs]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def block_rows(grid: SceneGrid, block_tiles: int) -> list[tuple[int, int]]:
    """Grid row ranges ``[first, last)`` of the blocks of a scene: whole rows, at most
    ``block_tiles`` grid cells each (at least one row)."""
    rows, cols = len(grid.row_offsets), max(1, len(grid.col_offsets))
    per_block = max(1, block_tiles // cols)
    count = max(1, math.ceil(rows / per_block))
    return [(i * per_block, min(rows, (i + 1) * per_block)) for i in range(count)]


def grid_dict(grid: SceneGrid) -> dict:
    """JSON form of a grid (kept in the manifest so blocks resume without preparing the scene again)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(grid).items()}


def grid_from_dict(d: dict) -> SceneGrid:
    """Inverse of :func:`grid_dict`."""
    return SceneGrid(width=d["width"], height=d["height"], window=tuple(d["window"]), stride=tuple(d["stride"]),
                     out_size=tuple(d["out_size"]), col_offsets=tuple(d["col_offsets"]),
                     row_offsets=tuple(d["row_offsets"]), gsd_m=d.get("gsd_m"))


def scene_with_grid(reading: dict, grid: dict) -> SceneReading:
    """A prepared scene rebuilt from its manifest entry."""
    scene = SceneReading.from_dict(reading)
    scene.grid = grid_from_dict(grid)
    return scene


def one_line(exc: BaseException) -> str:
    """An exception as the one-line message recorded for a failed scene (without credentials)."""
    text = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    if isinstance(exc, HqrsError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- step 1: read ---------------------------------------------------------------------------------
def prepare(unit: Unit, ctx: JobContext) -> SceneReading:
    """The unit's scene with its reading and grid (prepared now unless the unit carries it)."""
    if unit.scene is not None:
        return unit.scene

    scene = prepare_scenes([unit.entry], ctx.config)[0]
    if bool(scene.crs) != bool(ctx.crs):
        raise InputError(f"{unit.entry.path}: has {'a' if scene.crs else 'no'} CRS while the dataset has "
                         f"{'one' if ctx.crs else 'none'}; tile it into another dataset")
    return scene


def plan_unit(unit: Unit, ctx: JobContext) -> tuple[dict, Any, Any]:
    """Step 1 without the pixels: ``(status, tile frame, windows)``; ``windows`` is
    :class:`UnitWindows` (the kept tiles' ids and records, and their scene: a few hundred bytes
    per tile), read by :func:`read_pixels` where the model runs.

    ``status["kind"]``: ``ready`` (frame and windows follow), ``empty`` (no tile reached the
    minimum valid fraction), ``split`` (a large scene: ``status["blocks"]`` row ranges, and the
    prepared ``status["scene"]``; nothing read), or ``failed`` (``status["error"]``: one line).
    Errors of the scene (missing or corrupt file, unreachable URL) never raise.
    """
    remote_defaults()
    try:
        scene = prepare(unit, ctx)
        assert scene.grid is not None
        blocks = block_rows(scene.grid, ctx.block_tiles)
        if unit.blocks == 0 and len(blocks) > 1:
            return {"kind": "split", "scene": scene, "blocks": blocks}, None, None
        rows = blocks[unit.block] if unit.blocks else blocks[0]
        status: dict = {"scene": scene, "blocks": blocks, "rows": rows}
        with TileReader([scene]) as reader:
            records = list(plan_tiles([scene], reader, ctx.config.min_valid, rows=rows))
        if not records:
            return {**status, "kind": "empty", "tiles": 0}, None, None
        frame = records_to_frame(records, [scene], ctx.crs)
        frame[SOURCE_URL] = unit.entry.url
        frame[STAC_ITEM] = unit.entry.item
        return {**status, "kind": "ready", "tiles": len(records)}, frame, UnitWindows(unit.entry.path, scene, records)
    except (HqrsError, OSError) as exc:
        return {"kind": "failed", "error": one_line(exc)}, None, None
    except Exception as exc:  # GDAL, network and format errors of one scene must not stop the archive
        return {"kind": "failed", "error": f"{unit.entry.path}: {one_line(exc)}"}, None, None


@dataclass
class UnitWindows:
    """The tiles of a unit to read: its scene and the records of the kept tiles (no pixels)."""

    path: str
    scene: SceneReading
    records: list

    @property
    def ids(self) -> list[str]:
        """The tile ids, in order."""
        return [r.tile_id for r in self.records]


def read_pixels(windows: UnitWindows, threads: int = 1, allocate: Any = None) -> np.ndarray:
    """The pixels of a unit's tiles as one ``[N, 3, H, W]`` uint8 array, read with ``threads``
    threads (each its own reader: GDAL decodes without the GIL). ``allocate(shape)`` gives the
    array to fill (a pinned host buffer for a GPU), by default a new NumPy array. A read error
    raises :class:`~hqrs_geo.errors.InputError` naming the scene (one line)."""
    records = windows.records
    readers: list = []
    local = threading.local()

    def reader() -> TileReader:
        if not hasattr(local, "reader"):
            local.reader = TileReader([windows.scene])
            readers.append(local.reader)
        return local.reader

    try:
        first = reader().read(records[0])[0]
        shape = (len(records), 3, *first.shape[:2])
        pixels = allocate(shape) if allocate is not None else np.empty(shape, dtype=np.uint8)
        pixels[0] = first.transpose(2, 0, 1)

        def fill(i: int) -> None:
            pixels[i] = reader().read(records[i])[0].transpose(2, 0, 1)

        if threads > 1 and len(records) > 2:
            with ThreadPoolExecutor(min(threads, len(records) - 1)) as pool:
                list(pool.map(fill, range(1, len(records))))
        else:
            for i in range(1, len(records)):
                fill(i)
        return pixels
    except (HqrsError, OSError) as exc:
        raise InputError(one_line(exc)) from None
    except Exception as exc:  # GDAL, network and format errors of one scene
        raise InputError(f"{windows.path}: {one_line(exc)}") from None
    finally:
        for r in readers:
            r.close()


def read_unit(unit: Unit, ctx: JobContext) -> tuple[dict, Any, Any]:
    """Step 1: ``(status, tile frame, (tile ids, pixels [N, 3, H, W] uint8))``: :func:`plan_unit`
    and :func:`read_pixels` in one call (the in-process executor); ``status`` as there."""
    status, frame, windows = plan_unit(unit, ctx)
    if status["kind"] != "ready":
        return status, frame, windows
    try:
        return status, frame, (windows.ids, read_pixels(windows))
    except InputError as exc:
        return {"kind": "failed", "error": str(exc)}, None, None


# -- step 2: infer --------------------------------------------------------------------------------
def infer_unit(tasks: list, tile_ids: list[str], pixels: np.ndarray, batch_size: int,
               on_oom: Any = None) -> dict[str, dict[str, object]]:
    """Step 2: every task on the unit's pixels, ``batch_size`` tiles at a time, with
    :func:`~hqrs_geo.engine.run.run_batch`; ``{store key: {tile_id: value}}``."""
    import torch

    stored: dict[str, dict[str, object]] = {t.store_key: {} for t in tasks}
    if not tasks:
        return stored
    device = tasks[0].loaded.device
    records = [_Id(t) for t in tile_ids]
    for start in range(0, len(records), batch_size):
        with warnings.catch_warnings():  # pixels may be read-only shared memory (Ray): they are only read
            warnings.simplefilter("ignore", UserWarning)
            batch = torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size]))
        images = batch.to(device, non_blocking=True)  # asynchronous from a pinned buffer (GPU workers)
        for tile_id, key, value in run_batch(tasks, images, records[start:start + batch_size],
                                             on_oom or (lambda n: None)):
            stored[key][tile_id] = value
    return stored


@dataclass(frozen=True)
class _Id:
    tile_id: str


# -- step 3: write --------------------------------------------------------------------------------
def part_facts(unit: Unit, status: dict, ctx: JobContext) -> dict:
    """The manifest entry of a unit's part, before its file facts are added."""
    scene = status["scene"]
    blocks = status["blocks"]
    block = unit.block if unit.blocks else 0
    rows = list(status.get("rows") or blocks[block])
    return {"name": part_name(unit.key, block, len(blocks)), "scene": unit.key, "block": block,
            "blocks": len(blocks), "rows": rows, "source": unit.entry.path, "url": unit.entry.url,
            "item": unit.entry.item, "catalog": unit.entry.catalog, "fingerprint": ctx.fingerprint,
            "reading": scene.as_dict(), "grid": grid_dict(scene.grid), "block_rows": [list(b) for b in blocks]}


def empty_part(unit: Unit, status: dict, ctx: JobContext) -> dict:
    """The manifest entry of a unit without tiles (no file is written; an old file is removed)."""
    facts = part_facts(unit, status, ctx)
    (Path(ctx.folder) / facts["name"]).unlink(missing_ok=True)
    return {**_manifest_entry(facts), "tiles": 0, "bounds": None, "bounds_wgs84": None, "crs": ctx.crs,
            "sha256": None, "bytes": 0}


def _manifest_entry(facts: dict) -> dict:
    return {k: v for k, v in facts.items() if k not in ("reading", "grid", "block_rows")}


def write_unit(unit: Unit, status: dict, frame: Any, stored: dict, ctx: JobContext) -> dict:
    """Step 3: the results into the tile frame, the part written atomically; returns its
    manifest entry (``name``, ``scene``, ``block``, ``tiles``, ``bounds``, ``sha256``…)."""
    facts = part_facts(unit, status, ctx)
    frame = fill_columns(frame, ctx.specs, stored, keep_existing=set())
    missing = [s.field for s in ctx.specs if frame[s.field].isna().any()]
    if missing:
        raise InputError(f"{unit.entry.path}: the model worker returned no {missing[0]} for some tiles; "
                         "run the job again")
    params = {**ctx.run["params"], "scenes": [facts["reading"]], "part": facts}
    run = {"run_id": 1, **new_run(ctx.run["command"], "tiles", params), "created": ctx.run["created"]}
    info = write_part(Path(ctx.folder) / facts["name"], frame, [run])
    return {**_manifest_entry(facts), **info}

