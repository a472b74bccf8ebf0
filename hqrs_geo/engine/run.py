"""Batched model inference over the tiles of a layer: embeddings and captions in one pass.

Tiles are read by :class:`~hqrs_geo.tiling.dataset.TileDataset` in DataLoader worker processes,
moved to the device as uint8 (pinned memory, non-blocking copies), preprocessed there as one
batch per model, and run under ``torch.inference_mode`` with the precision rule of
:mod:`hqrs_geo.models.precision`. On CUDA a batch's embeddings come back to pinned host memory
without stopping the GPU: the next batch is queued before the previous one is stored. Each
batch's results are committed to the
:class:`~hqrs_geo.engine.store.ResumeStore`, so a killed run resumes where it stopped; on
completion the layer is rewritten atomically with the new columns and a run record. On CUDA
out-of-memory a batch is split in halves and retried, never lost.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import OptionError
from ..layer.columns import TILE_ID, has_value
from ..layer.io import TileLayer, check_writable, open_layer, write_tiles
from ..layer.runs import LayerRuns, new_run
from ..models.loader import LoadedModel
from ..tiling.dataset import TileDataset, collate_tiles
from .options import RunOptions
from .store import ResumeStore, partial_path
from .tasks import CaptionTask, EmbedTask, share_image_tower

Row = tuple[str, str, object]  # (tile_id, store key, value)


def make_tasks(embedders: Sequence[LoadedModel], captioner: LoadedModel | None, decoding: Any,
               options: RunOptions) -> list:
    """The tasks of a job: one :class:`EmbedTask` per embedding model, then the caption task (which
    reuses the image tower tokens of an embedding task of the same CoCa weights)."""
    tasks: list = [EmbedTask(m, options) for m in embedders]
    if captioner is not None:
        tasks.append(CaptionTask(captioner, options, decoding))
    if not tasks:
        raise OptionError("nothing to compute: give an embedding model and/or a caption model", option="model")
    return share_image_tower(tasks)


def stale_fields(runs: LayerRuns, tasks: Sequence) -> set[str]:
    """Fields whose values in the layer were made by other weights than the task's: they are
    recomputed for every tile, never mixed with the new model's results."""
    stale = set()
    for task in tasks:
        previous = runs.weights_of(task.field)
        if previous and task.loaded.sha256 and previous != task.loaded.sha256:
            stale.add(task.field)
    return stale


def launch_batch(tasks: Sequence, images: Any, records: Sequence, on_oom: Callable[[int], None] = lambda n: None
                 ) -> Callable[[], list[Row]]:
    """Start every task on one uint8 batch; the returned call waits for the results and gives the
    ``(tile_id, store key, value)`` rows. On CUDA out-of-memory the batch is split in halves (each
    half again if need be) and ``on_oom`` is told the new size; a single tile that does not fit is
    the error. Tasks with a ``launch`` method run asynchronously (see :class:`EmbedTask`)."""
    import torch

    try:
        pending = [(task.store_key, task.launch(images) if hasattr(task, "launch") else _ready(task(images)))
                   for task in tasks]
    except torch.cuda.OutOfMemoryError:
        if len(records) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(records) // 2
        on_oom(half)
        first = launch_batch(tasks, images[:half], records[:half], on_oom)
        second = launch_batch(tasks, images[half:], records[half:], on_oom)
        return lambda: first() + second()
    return lambda: [(rec.tile_id, name, value) for name, finish in pending for rec, value in zip(records, finish())]


def _ready(values: list) -> Callable[[], list]:
    return lambda: values


def run_batch(tasks: Sequence, images: Any, records: Sequence, on_oom: Callable[[int], None] = lambda n: None
              ) -> list[Row]:
    """Every task on one uint8 batch: ``(tile_id, store key, value)`` rows; halves the batch on CUDA OOM."""
    return launch_batch(tasks, images, records, on_oom)()


def tiles_to_do(frame: Any, records: Sequence, tasks: Sequence, store: ResumeStore, runs: LayerRuns,
                overwrite: bool, progress: Any = None) -> tuple[list[int], set[str]]:
    """Indexes of the records some task still has to compute, and the fields whose existing
    values are kept (not stale, not overwritten)."""
    fields = [t.field for t in tasks]
    stored_done = store.done([t.store_key for t in tasks])
    done = {t.field: stored_done[t.store_key] for t in tasks}
    stale = stale_fields(runs, tasks)
    for name in sorted(stale):
        if progress is not None:
            progress.message(f"{name}: the layer's values were made by other weights; recomputing every tile")
    keep_existing = {name for name in fields if not overwrite and name not in stale}
    for name in keep_existing:
        if name in frame.columns:
            done[name] |= set(frame.loc[frame[name].map(has_value), TILE_ID])
    todo = [i for i, rec in enumerate(records) if any(rec.tile_id not in done[f] for f in fields)]
    return todo, keep_existing


def fill_columns(frame: Any, tasks: Sequence, stored: dict[str, dict], keep_existing: set[str]) -> Any:
    """``frame`` with each task's column (and its constant columns) filled from ``stored``
    (``{store key: {tile_id: value}}``), keeping existing values of ``keep_existing`` fields."""
    for task in tasks:
        values = frame[TILE_ID].map(stored.get(task.store_key, {}))
        if task.field in frame.columns and task.field in keep_existing:
            values = values.where(values.map(has_value), frame[task.field])
        frame[task.field] = values
        for name, constant in task.columns().items():
            frame[name] = [constant if has_value(v) else None for v in frame[task.field]]
    return frame


def run_record_params(tasks: Sequence, options: RunOptions, device: Any) -> dict:
    """The run-record parameters of a model job."""
    import torch

    return {"tasks": [t.describe() for t in tasks], "batch_size": options.batch_size,
            "device": str(device), "torch": torch.__version__}


def run_models(
    layer: str | TileLayer,
    embedders: Sequence[LoadedModel] = (),
    captioner: LoadedModel | None = None,
    decoding: Any = None,
    options: RunOptions | None = None,
    progress: Any = None,
    command: str = "run",
) -> Any:
    """Compute embeddings (one column set per model) and/or captions for the tiles of ``layer``
    (a path, or a :class:`~hqrs_geo.layer.io.TileLayer` already read).

    Results are added to the layer itself (atomic rewrite at the end); tiles that already
    have a value are skipped unless ``options.overwrite``, or unless the layer's run records
    say other weights made that field (then every tile is recomputed). Returns the updated
    GeoDataFrame.
    """
    from torch.utils.data import DataLoader, Subset

    options = (options or RunOptions()).validated()
    tasks = make_tasks(embedders, captioner, decoding, options)
    opened = layer if isinstance(layer, TileLayer) else open_layer(layer)
    check_writable(opened.path)  # before any model runs: a read-only layer fails now, not after the work
    frame = opened.frame
    dataset = TileDataset.from_frame(frame, opened.scenes(), where=opened.path)
    store = ResumeStore(partial_path(opened.path))
    todo, keep_existing = tiles_to_do(frame, dataset.records, tasks, store, opened.runs, options.overwrite, progress)
    device = tasks[0].loaded.device
    if progress is not None:
        progress.start(command, len(dataset))
        progress.advance(len(dataset) - len(todo))
    subset: Any = Subset(dataset, todo)  # type: ignore[arg-type]  # TileDataset is map-style
    loader: Any = DataLoader(
        subset, batch_size=options.batch_size, shuffle=False,
        num_workers=options.worker_count(device), collate_fn=collate_tiles, pin_memory=device.type == "cuda",
    )

    def oom_note(n: int) -> None:
        if progress is not None:
            progress.message(f"CUDA out of memory: retrying in batches of {n}")

    def commit(finish: Callable[[], list[Row]], count: int) -> None:
        store.put(finish())
        if progress is not None:
            progress.advance(count)

    try:
        previous: tuple[Callable[[], list[Row]], int] | None = None
        for records, batch in loader:
            images = batch.permute(0, 3, 1, 2).to(device, non_blocking=True)
            finish = launch_batch(tasks, images, records, oom_note)  # queued before the last batch is stored
            if previous is not None:
                commit(*previous)
            previous = (finish, len(records))
        if previous is not None:
            commit(*previous)
        stored = {task.store_key: store.load(task.store_key) for task in tasks}
        frame = fill_columns(frame, tasks, stored, keep_existing)
        merged = write_tiles(opened.path, frame, new_run(command, "tiles", run_record_params(tasks, options, device)),
                             replace_sources=list(frame["source"].unique()), known=opened)
    finally:
        store.close()
    store.remove()
    return merged
