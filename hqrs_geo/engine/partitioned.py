"""The partitioned engine: scenes of an archive -> a dataset of GeoParquet parts, resumable.

:func:`run_dataset` is the driver. It resolves the sources (:mod:`hqrs_geo.raster.catalog`),
reads the dataset's manifest (:mod:`hqrs_geo.layer.dataset`), skips every scene whose parts
were made by the same job (same tiling, CRS and model weights: the job *fingerprint*), and
hands the other units (:mod:`hqrs_geo.engine.units`) to an executor:

* ``local`` (the default): this process, one unit after the other — no Ray needed;
* ``ray`` (:mod:`hqrs_geo.engine.distributed`): CPU read/write tasks and model worker actors
  on a Ray cluster, a bounded number of units in flight.

Each finished unit's part is written atomically by the executor; the driver records it in the
manifest (written atomically every few seconds and at the end; a part written after the last
manifest write is adopted from its own metadata by the next run). A scene that fails (corrupt
file, unreachable URL) is recorded with its one-line error and the job goes on; running the
same command again computes exactly the missing and failed units, so an interrupted job ends,
after a re-run, with the same tiles and values as an uninterrupted one.

:func:`update_dataset` runs models over the parts of an existing dataset (``embed``,
``caption``, ``run`` on a dataset), part by part, each rewritten atomically.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq

from ..atomic import file_facts, folder_lock, output_folder, remove_stale_temporaries_in
from ..errors import HqrsError, OptionError, OutputError
from ..layer.dataset import (
    Manifest,
    commit_part,
    frame_bounds,
    is_dataset,
    manifest_path,
    open_manifest,
    part_crs,
    part_name,
    part_problem,
    part_record,
    verified_part,
)
from ..layer.io import open_layer, read_tiles
from ..layer.runs import new_run
from ..models.loader import LoadedModel, load_models
from ..raster.catalog import SourceEntry, SourceFilter, common_crs, removed_scenes, resolve_catalog
from ..tiling.config import TileConfig
from ..tiling.dataset import TileDataset
from .options import RunOptions
from .run import fill_columns, make_tasks, run_record_params, tiles_to_do
from .units import (
    DEFAULT_BLOCK_TILES,
    JobContext,
    Outcome,
    TaskSpec,
    Unit,
    empty_part,
    grid_dict,
    infer_unit,
    job_fingerprint,
    one_line,
    read_unit,
    scene_with_grid,
    write_unit,
)

ENGINES = ("local", "ray")


@dataclass
class ScaleOptions:
    """How the partitioned engine runs (all have defaults).

    engine: ``local`` (this process) or ``ray``. ray_address: ``None`` (start a Ray instance on
    this machine, unless ``RAY_ADDRESS`` is set), ``auto`` (the cluster running on this machine)
    or ``HOST:PORT``. workers: model worker actors (default: one per GPU group, or one per
    node on CPU clusters). gpus_per_worker: GPUs per worker (default 1 when the cluster has
    GPUs and the device is not ``cpu``, else 0). cpus_per_worker: CPUs reserved per worker (and
    torch threads on CPU; default 1 with GPUs, else all of the smallest node less half a core for
    reading). block_tiles: grid cells per unit; larger scenes are split into blocks of whole
    rows. in_flight: units read, computed or written at once (default 3 per worker + 2): the
    memory bound. manifest_interval: seconds between manifest writes. unit_timeout (Ray): seconds
    a unit may be under way (read, computed, written) before it is put back in the queue.
    verify_parts: at resume, check every finished part's SHA-256 (finds parts damaged in place,
    such as bit rot, with their size and time unchanged; by default a part counts as finished
    while its size and modification time are the manifest's; reads always check the SHA-256).
    """

    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    block_tiles: int = DEFAULT_BLOCK_TILES
    in_flight: int | None = None
    manifest_interval: float = 5.0
    max_attempts: int = 3
    unit_timeout: float = 1800.0
    verify_parts: bool = False

    def validated(self) -> ScaleOptions:
        """Check values (one-line OptionError)."""
        if self.engine not in ENGINES:
            raise OptionError(f"invalid engine {self.engine!r}: use local or ray", option="engine")
        for name, low in (("workers", 1), ("block_tiles", 1), ("in_flight", 1), ("max_attempts", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise OptionError(f"invalid value {value!r}: use a whole number of at least {low}", option=name)
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise OptionError(f"invalid value {value!r}: use 0 or more", option=name)
        if isinstance(self.unit_timeout, bool) or not isinstance(self.unit_timeout, (int, float)) \
                or not 0 < self.unit_timeout < float("inf"):
            raise OptionError(f"invalid value {self.unit_timeout!r}: use a number of seconds above 0",
                              option="unit_timeout")
        if self.cpus_per_worker == 0:
            raise OptionError("a worker needs some CPU: use a value above 0", option="cpus_per_worker")
        if self.engine != "ray" and any(v is not None for v in (self.ray_address, self.gpus_per_worker,
                                                                 self.cpus_per_worker)):
            raise OptionError("Ray settings need the Ray engine: add «engine» ray", option="engine")
        return self


@dataclass
class ModelPlan:
    """The models of a job, by name (loaded where the work runs: this process or each worker)."""

    embed_models: list = field(default_factory=list)
    embed_checkpoints: list = field(default_factory=list)
    embed_arch: list = field(default_factory=list)
    caption_model: str | None = None
    caption_checkpoint: str | None = None
    caption_arch: str | None = None
    decoding: Any = None
    device: str = "auto"
    trust_checkpoint: bool = False

    @property
    def empty(self) -> bool:
        """True when the job runs no model (tiling only)."""
        return not self.embed_models and not self.caption_model

    def load(self, device: str | None = None) -> tuple[list[LoadedModel], LoadedModel | None]:
        """Load the models (on ``device``, default the plan's): the embedding models and the
        caption model (``None`` when the job has none)."""
        where = device or self.device
        embedders = load_models(self.embed_models, self.embed_checkpoints, self.embed_arch, where,
                                self.trust_checkpoint)
        captioner = None
        if self.caption_model:
            captioner = load_models([self.caption_model], [self.caption_checkpoint], [self.caption_arch], where,
                                    self.trust_checkpoint)[0]
        return embedders, captioner

    def tasks(self, options: RunOptions, device: str | None = None) -> list:
        """Load the models and return the engine's tasks (embeddings first, then captions)."""
        if self.empty:
            return []
        embedders, captioner = self.load(device)
        return make_tasks(embedders, captioner, self.decoding, options)


@dataclass
class DatasetReport:
    """What a partitioned job did."""

    output: str
    scenes: int = 0  # scenes named by the sources
    done: int = 0  # scenes finished by this run
    skipped: int = 0  # scenes already finished by an earlier run of the same job
    failed: dict = field(default_factory=dict)  # scene key -> one-line error
    tiles: int = 0  # tiles written by this run
    parts: int = 0  # parts written by this run
    seconds: float = 0.0
    engine: str = "local"

    @property
    def tiles_per_second(self) -> float:
        """Throughput of this run."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One paragraph for the terminal."""
        text = (f"{self.done} scene(s) finished ({self.tiles} tiles, {self.tiles_per_second:.1f} tiles/s, "
                f"engine {self.engine}), {self.skipped} already done, {len(self.failed)} failed; "
                f"dataset {self.output}")
        if self.failed:
            shown = list(self.failed.items())[:10]
            text += "\nfailed scenes (run the same command again to retry them):\n" + "\n".join(
                f"  {key}: {error}" for key, error in shown)
            if len(self.failed) > len(shown):
                text += f"\n  … and {len(self.failed) - len(shown)} more (see {self.output}/_manifest.json)"
        return text


# -- executors ------------------------------------------------------------------------------------
class LocalExecutor:
    """Runs units one after the other in this process (no Ray)."""

    name = "local"

    def __init__(self, plan: ModelPlan | None, options: RunOptions, progress: Any = None) -> None:
        self.plan, self.options, self.progress = plan, options, progress
        self.tasks: list = []
        self.specs: list[TaskSpec] = []
        self.queue: deque[Unit] = deque()
        self.ctx: JobContext | None = None

    def start(self) -> list[TaskSpec]:
        """Load the models; the specs of their tasks."""
        self.tasks = self.plan.tasks(self.options) if self.plan is not None else []
        self.specs = [TaskSpec.of(t) for t in self.tasks]
        return self.specs

    def begin(self, ctx: JobContext) -> None:
        """Fix the job's context before the first unit."""
        self.ctx = ctx

    def room(self) -> bool:
        """True when another unit may be submitted."""
        return not self.queue

    def busy(self) -> bool:
        """True while a submitted unit is not finished."""
        return bool(self.queue)

    def submit(self, unit: Unit) -> None:
        """Queue a unit."""
        self.queue.append(unit)

    def wait(self) -> list[Outcome]:
        """Run the queued unit to its end."""
        assert self.ctx is not None
        return [run_unit(self.queue.popleft(), self.tasks, self.ctx, self._oom)]

    def _oom(self, n: int) -> None:
        if self.progress is not None:
            self.progress.message(f"CUDA out of memory: retrying in batches of {n}")

    def close(self) -> None:
        """Nothing to release."""


def run_unit(unit: Unit, tasks: list, ctx: JobContext, on_oom: Any = None) -> Outcome:
    """A unit's three steps in this process (what the local executor does)."""
    status, frame, payload = read_unit(unit, ctx)
    if status["kind"] in ("split", "failed"):
        return Outcome(unit, status["kind"], scene=status.get("scene"), blocks=status.get("blocks"),
                       error=status.get("error"))
    if status["kind"] == "empty":
        return Outcome(unit, "part", part=empty_part(unit, status, ctx), scene=status["scene"],
                       blocks=status["blocks"])
    ids, pixels = payload
    try:
        stored = infer_unit(tasks, ids, pixels, ctx.batch_size, on_oom)
    except HqrsError as exc:
        return Outcome(unit, "failed", error=one_line(exc))
    del payload, pixels
    part = write_unit(unit, status, frame, stored, ctx)
    return Outcome(unit, "part", part=part, scene=status["scene"], blocks=status["blocks"])


def make_executor(scale: ScaleOptions, plan: ModelPlan | None, options: RunOptions, progress: Any) -> Any:
    """The executor of ``scale.engine`` (Ray itself is imported only when the Ray one starts)."""
    if scale.engine == "ray":
        from .distributed import RayExecutor  # imports Ray

        return RayExecutor(plan, options, scale, progress)
    return LocalExecutor(plan, options, progress)


# -- the driver -----------------------------------------------------------------------------------
def _check_folder(folder: Path, existing: bool) -> None:
    """A dataset is written into ``folder``: it must be new, empty or a dataset (``existing``)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; give a folder for the dataset")
    if folder.is_dir() and not existing and any(folder.iterdir()):
        raise OutputError(f"{folder}: is a folder with other files, not an hqrs_geo dataset; choose a new or empty "
                          "folder")
    if folder.is_dir() and not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: not writable (permission denied); choose another output")


def dataset_crs(entries: Sequence[SourceEntry], config: TileConfig) -> str | None:
    """The CRS of a new dataset's footprints: the requested one, else the one that suits all
    scenes (theirs when they share one, else EPSG:4326: :func:`~hqrs_geo.raster.catalog.common_crs`)."""
    if config.crs:
        return str(config.crs)
    return common_crs(entries)


def drop_removed(manifest: Manifest, catalogs: dict[str, set], keep: bool) -> list[str]:
    """Scenes of items no longer in their STAC catalog (one read now): reported, and their parts
    dropped from the manifest and the folder unless ``keep``. Returns their keys."""
    removed = removed_scenes({**manifest.failed, **manifest.scenes}, catalogs)
    if not removed:
        return removed
    shown = ", ".join(removed[:10]) + (f" and {len(removed) - 10} more" if len(removed) > 10 else "")
    if keep:
        logging.getLogger(__name__).warning("%d scene(s) are no longer in their STAC catalog and are kept "
                                            "(«keep_removed»): %s", len(removed), shown)
        return removed
    for key in removed:
        for name in manifest.drop_obsolete_parts(key, ()):
            (manifest.folder / name).unlink(missing_ok=True)
        manifest.scenes.pop(key, None)
        manifest.failed.pop(key, None)
    logging.getLogger(__name__).warning("%d scene(s) are no longer in their STAC catalog; their parts were "
                                        "dropped (keep them with «keep_removed»): %s", len(removed), shown)
    return removed


def _tidy(manifest: Manifest, fingerprint: str, verify: bool = False) -> int:
    """Make the manifest match the folder: remove temporary files of killed writers (not those of
    jobs still writing), forget parts whose file is gone or is not the file the manifest lists
    (truncated, emptied, changed: their scenes are computed again, with a warning), adopt parts
    written after the last manifest write (``verify``: check every part's SHA-256, not only its
    size and modification time). Returns the number of parts adopted."""
    folder = manifest.folder
    remove_stale_temporaries_in(folder)
    damaged = set()
    for name, part in list(manifest.parts.items()):
        problem = part_problem(folder, name, part, full=verify) if part.get("tiles", 0) > 0 else None
        if problem is None:
            continue
        del manifest.parts[name]
        if problem != "it is missing":
            damaged.add(name)  # never adopted below: its file is computed again
            logging.getLogger(__name__).warning("%s: %s; computing this part again", folder / name, problem)
    adopted = 0
    for path in sorted(folder.glob("*.parquet")):
        if path.name in manifest.parts or path.name in damaged:
            continue
        record = part_record(path)
        if not record or record.get("name") != path.name or not isinstance(record.get("scene"), str):
            continue
        try:
            tiles = pq.ParquetFile(path).metadata.num_rows
            bounds, wgs84 = frame_bounds(gpd.read_parquet(path, columns=["geometry"]))
        except Exception:  # pyarrow raises many types for damaged files: the scene is computed again
            continue
        entry = {k: v for k, v in record.items() if k not in ("reading", "grid", "block_rows")}
        manifest.add_part({**entry, "tiles": int(tiles), "bounds": bounds, "bounds_wgs84": wgs84,
                           "crs": part_crs(path), **file_facts(path)})
        scene = manifest.scenes.setdefault(record["scene"], {})
        if not scene.get("reading"):
            scene.update(source=record["source"], url=record.get("url"), item=record.get("item"),
                         catalog=record.get("catalog"), reading=record["reading"], grid=record["grid"],
                         blocks=record["blocks"], block_rows=record.get("block_rows"))
        adopted += 1
    return adopted


def plan_units(entries: Sequence[SourceEntry], manifest: Manifest, fingerprint: str
               ) -> tuple[list[Unit], int, dict[str, set]]:
    """The units still to compute, the number of scenes already done, and per scene to do the
    blocks it waits for (empty until the scene is split)."""
    units: list[Unit] = []
    waiting: dict[str, set] = {}
    skipped = 0
    for entry in entries:
        if manifest.scene_done(entry.key, entry.path, fingerprint):
            skipped += 1
            continue
        scene = manifest.scenes.get(entry.key) or {}
        blocks, ranges = int(scene.get("blocks", 0)), scene.get("block_rows") or []
        if blocks > 1 and len(ranges) == blocks and scene.get("source") == entry.path and scene.get("grid"):
            prepared = scene_with_grid(scene["reading"], scene["grid"])  # resume the missing blocks only
            done = {p.get("block") for p in (manifest.parts[n] for n in manifest.scene_parts(entry.key))
                    if p.get("fingerprint") == fingerprint and p.get("blocks") == blocks}
            todo = [b for b in range(blocks) if b not in done]
            waiting[entry.key] = set(todo)
            units += [Unit(entry, b, blocks, (int(ranges[b][0]), int(ranges[b][1])), prepared) for b in todo]
            continue
        waiting[entry.key] = set()
        units.append(Unit(entry))
    return units, skipped, waiting


def run_dataset(
    sources: Any,
    output: str | os.PathLike,
    plan: ModelPlan | None = None,
    tiling: TileConfig | None = None,
    options: RunOptions | None = None,
    scale: ScaleOptions | None = None,
    progress: Any = None,
    command: str = "run",
    source_filter: SourceFilter | None = None,
) -> DatasetReport:
    """Tile the scenes of ``sources`` (and run ``plan``'s models on their tiles) into the dataset
    folder ``output``, skipping what an earlier run of the same job finished. Failed scenes are
    recorded in the manifest and listed in the report; the job goes on without them."""
    config = (tiling or TileConfig()).validated()
    options = (options or RunOptions()).validated()
    scale = (scale or ScaleOptions()).validated()
    folder = Path(output)
    if folder.is_dir():
        with folder_lock(folder, folder):  # a job saving this dataset's first manifest finishes first
            existing = is_dataset(folder)
            _check_folder(folder, existing)
    else:
        existing = False
        _check_folder(folder, existing)
    resolution = resolve_catalog(sources, source_filter)
    entries = resolution.entries
    manifest = Manifest.load(folder) if existing else Manifest(folder)
    report = DatasetReport(str(output), scenes=len(entries), engine=scale.engine)
    started = time.monotonic()
    executor = make_executor(scale, plan, options, progress)
    created = not existing
    with output_folder(folder):
        try:
            specs = executor.start()
            known = bool(manifest.scenes or manifest.parts)
            crs = manifest.crs if known else dataset_crs(entries, config)
            with manifest.locked():  # another job may be starting on this dataset: one CRS for both
                manifest.refresh()
                if manifest.scenes or manifest.parts:
                    crs = manifest.crs
                fingerprint = job_fingerprint(config, crs, specs)
                params = {"tiling": config.as_dict(), "tasks": [s.description for s in specs], "crs": crs,
                          "fingerprint": fingerprint, "batch_size": options.batch_size, "engine": scale.engine,
                          "block_tiles": scale.block_tiles, "sources": len(entries)}
                run = new_run(command, "tiles", params)
                manifest.crs, manifest.fingerprint = crs, fingerprint
                _tidy(manifest, fingerprint, scale.verify_parts)
                drop_removed(manifest, resolution.catalogs, bool(source_filter and source_filter.keep_removed))
                units, report.skipped, waiting = plan_units(entries, manifest, fingerprint)
                manifest.runs.append({"run_id": len(manifest.runs) + 1, **run})
                manifest.save()
            ctx = JobContext(str(folder.resolve()), config, crs, fingerprint, run, specs, scale.block_tiles,
                             options.batch_size)
            executor.begin(ctx)
            _drive(executor, units, waiting, manifest, report, scale, progress, command)
        except BaseException:
            try:
                _save_or_forget(manifest, created)
            finally:
                executor.close()
            raise
        try:
            manifest.save()
        finally:
            executor.close()
    report.seconds = time.monotonic() - started
    return report


def _save_or_forget(manifest: Manifest, created: bool) -> None:
    """After a failed job: save what it finished, or, for a dataset this job created that holds
    no part (say the disk was full from the start), remove the manifest so that no empty
    dataset is left behind."""
    try:
        with manifest.locked():
            manifest.refresh()
            if created and not manifest.parts and len(manifest.runs) <= 1:
                manifest_path(manifest.folder).unlink(missing_ok=True)
                return
            manifest.save()
    except HqrsError:  # the job's own error (say a full disk) is the one to report
        pass


def _drive(executor: Any, units: list[Unit], waiting: dict[str, set], manifest: Manifest, report: DatasetReport,
           scale: ScaleOptions, progress: Any, command: str) -> None:
    """The driver loop: submit while there is room, record each outcome."""
    queue: deque[Unit] = deque(units)
    finished: set[str] = set()
    saved, took = time.monotonic(), 0.0
    started = time.monotonic()
    last = [0.0]
    if progress is not None:
        progress.start(command, report.scenes, unit="scene", initial=report.skipped)

    def finish(key: str) -> None:
        if key in finished:
            return
        finished.add(key)
        if progress is None:
            return
        rate = round(report.tiles / max(time.monotonic() - started, 1e-9), 1)
        if progress.mode == "json":  # one object per finished scene, at most every interval
            progress.done += 1
            now = time.monotonic()
            if now - last[0] >= progress.interval or progress.done >= report.scenes:
                last[0] = now
                progress.emit(command, tiles=report.tiles, tiles_per_s=rate, failed=len(report.failed))
        else:
            progress.postfix(tiles=report.tiles, tiles_per_s=rate, failed=len(report.failed))
            progress.advance(1)

    while queue or executor.busy():
        while queue and executor.room():
            executor.submit(queue.popleft())
        for outcome in executor.wait():
            unit = outcome.unit
            key = unit.key
            if outcome.kind == "failed":
                error = outcome.error or "failed"
                manifest.failed[key] = {"source": unit.entry.path, "url": unit.entry.url, "item": unit.entry.item,
                                        "catalog": unit.entry.catalog, "error": error,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                report.failed[key] = error
                finish(key)
            elif outcome.kind == "retry":
                unit.attempts += 1
                if unit.attempts >= scale.max_attempts:
                    error = f"{unit.entry.path}: lost {unit.attempts} times ({outcome.error}); run again"
                    manifest.failed[key] = {"source": unit.entry.path, "url": unit.entry.url,
                                            "item": unit.entry.item, "error": error}
                    report.failed[key] = error
                    finish(key)
                else:
                    queue.appendleft(unit)
            elif outcome.kind == "split":
                assert outcome.scene is not None and outcome.blocks is not None
                _record_scene(manifest, unit, outcome)
                blocks = outcome.blocks
                done = _blocks_done(manifest, key, blocks)  # parts an earlier, interrupted run wrote
                waiting[key] = set(range(len(blocks))) - done
                if not waiting[key]:
                    _complete_scene(manifest, key, manifest.parts[part_name(key, 0, len(blocks))])
                    report.done += 1
                    finish(key)
                for b in reversed(sorted(waiting[key])):
                    queue.appendleft(Unit(unit.entry, b, len(blocks), tuple(blocks[b]), outcome.scene))
            else:
                part = outcome.part or {}
                _record_scene(manifest, unit, outcome)
                manifest.add_part(part)
                report.parts += 1 if part.get("tiles") else 0
                report.tiles += int(part.get("tiles", 0))
                left = waiting.setdefault(key, set())
                left.discard(part.get("block", 0))
                if not left and key not in report.failed:
                    _complete_scene(manifest, key, part)
                    report.done += 1
                    finish(key)
        if time.monotonic() - saved >= max(scale.manifest_interval, 10 * took):  # a large manifest: at most
            begun = time.monotonic()                                                 # a tenth of the time saving
            manifest.save()
            saved = time.monotonic()
            took = saved - begun


def _blocks_done(manifest: Manifest, key: str, blocks: list) -> set[int]:
    """Blocks of scene ``key`` whose part the current job already made (same rows and blocking)."""
    done = set()
    for name in manifest.scene_parts(key):
        part = manifest.parts[name]
        block = int(part.get("block", -1))
        if part.get("fingerprint") == manifest.fingerprint and part.get("blocks") == len(blocks) \
                and 0 <= block < len(blocks) and list(part.get("rows") or []) == list(blocks[block]):
            done.add(block)
    return done


def _record_scene(manifest: Manifest, unit: Unit, outcome: Outcome) -> None:
    scene = outcome.scene
    if scene is None or scene.grid is None or outcome.blocks is None:
        return
    entry = manifest.scenes.get(unit.key) or {}
    if entry.get("source") == unit.entry.path and entry.get("blocks") == len(outcome.blocks) and entry.get("grid"):
        return
    manifest.scenes[unit.key] = {"source": unit.entry.path, "url": unit.entry.url, "item": unit.entry.item,
                                 "catalog": unit.entry.catalog, "reading": scene.as_dict(),
                                 "grid": grid_dict(scene.grid), "blocks": len(outcome.blocks),
                                 "block_rows": [list(b) for b in outcome.blocks]}


def _complete_scene(manifest: Manifest, key: str, part: dict) -> None:
    """A scene has all its parts: count its tiles, drop parts of an older blocking or job."""
    scene = manifest.scenes[key]
    blocks = int(scene.get("blocks", 1))
    keep = {part_name(key, b, blocks) for b in range(blocks)}
    for name in manifest.drop_obsolete_parts(key, keep):
        (manifest.folder / name).unlink(missing_ok=True)
    scene["tiles"] = sum(int(manifest.parts[n].get("tiles", 0)) for n in manifest.scene_parts(key))
    scene["fingerprint"] = part.get("fingerprint")


# -- model jobs on an existing dataset -------------------------------------------------------------
class _NoStore:
    """Stands in for the resume store: a dataset resumes part by part."""

    def done(self, fields: Sequence[str]) -> dict[str, set]:
        return {f: set() for f in fields}


def update_dataset(path: str | os.PathLike, plan: ModelPlan, options: RunOptions | None = None,
                   progress: Any = None, command: str = "run") -> Any:
    """Run ``plan``'s models over the tiles of the dataset at ``path`` that lack their results
    (or all tiles with ``options.overwrite``, or when other weights made a column), part by part:
    each part is rewritten atomically when done and recorded in the manifest at once
    (:func:`~hqrs_geo.layer.dataset.commit_part`), so an interrupted job resumes with the next
    part. Returns the dataset's tiles (GeoDataFrame)."""
    options = (options or RunOptions()).validated()
    manifest = open_manifest(path)
    tasks = plan.tasks(options)
    specs = [TaskSpec.of(t) for t in tasks]
    run = new_run(command, "tiles", run_record_params(tasks, options, tasks[0].loaded.device))
    files = manifest.part_files()
    total = sum(int(manifest.parts[f.name].get("tiles", 0)) for f in files)
    if progress is not None:
        progress.start(command, total)
    manifest.runs.append({"run_id": len(manifest.runs) + 1, **run})
    try:
        for part_file in files:
            verified_part(manifest, part_file.name)  # a damaged part is named, not read
            layer = open_layer(part_file)
            frame = layer.frame
            dataset = TileDataset.from_frame(frame, layer.scenes(), where=str(part_file))
            # each part's own records say which weights made its values (stale ones are recomputed)
            todo, keep = tiles_to_do(frame, dataset.records, tasks, _NoStore(), layer.runs,  # type: ignore[arg-type]
                                     options.overwrite)
            if progress is not None:
                progress.advance(len(frame) - len(todo))
            if not todo:
                continue
            pixels = np.stack([dataset[i][1].transpose(2, 0, 1) for i in todo])
            ids = [dataset.records[i].tile_id for i in todo]
            stored = infer_unit(tasks, ids, pixels, options.batch_size)
            frame = fill_columns(frame, specs, stored, keep)
            commit_part(manifest, part_file.name, frame, run)  # the part and its manifest entry, as one step
            if progress is not None:
                progress.advance(len(todo))
    finally:
        manifest.save()
    return read_tiles(path)


__all__ = ["DatasetReport", "ModelPlan", "ScaleOptions", "run_dataset", "update_dataset"]
