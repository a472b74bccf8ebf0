"""Batched model inference over the tiles of a layer: embeddings and captions in one pass.

Tiles are read by :class:`hqrs_geo.dataset.TileDataset` in DataLoader worker processes,
moved to the device as uint8 (pinned memory, non-blocking copies), preprocessed there as one
batch per model, and run under ``torch.inference_mode`` with mixed precision on CUDA. Each
batch's results are committed to a :class:`~hqrs_geo.results_store.ResultStore`, so a killed
run resumes where it stopped; on completion the layer is rewritten atomically with the new
columns and a run record. On CUDA out-of-memory a batch is split in halves and retried.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from . import embeddings
from .dataset import TileDataset, collate_tiles
from .errors import OptionError
from .layers import new_run, read_runs, read_tiles, write_tiles
from .models.device import autocast_dtype, inference_context
from .models.loader import LoadedModel
from .models.preprocess import BatchPreprocess
from .results_store import ResultStore


@dataclass
class RunOptions:
    """Engine settings (all have defaults)."""

    batch_size: int = 32
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    workers: Optional[int] = None  # DataLoader worker processes; default: see worker_count
    embedding_dtype: str = "float16"
    overwrite: bool = False  # recompute results the layer already has

    def validated(self) -> "RunOptions":
        """Check values (one-line OptionError)."""
        if self.batch_size < 1:
            raise OptionError(f"invalid batch size {self.batch_size}: must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise OptionError(f"invalid precision {self.precision!r}: use auto, fp32, bf16 or fp16")
        if self.embedding_dtype not in embeddings.DTYPES:
            raise OptionError(f"invalid embedding type {self.embedding_dtype!r}: use float16 or float32")
        if self.workers is not None and self.workers < 0:
            raise OptionError(f"invalid worker count {self.workers}: use 0 or more")
        return self

    def worker_count(self, device) -> int:
        """Worker processes used: the option, else min(4, CPUs - 1) for GPU inference; for CPU
        inference none on machines of up to 4 cores, where readers would take cores from the
        model (reading a tile costs ~1 ms, a CPU forward ~50 ms), else 1."""
        if self.workers is not None:
            return self.workers
        cpus = os.cpu_count() or 1
        if device.type == "cpu":
            return 0 if cpus <= 4 else 1
        return max(0, min(4, cpus - 1))


class EmbedTask:
    """L2-normalised image embeddings of one CLIP (or CoCa) model."""

    def __init__(self, loaded: LoadedModel, options: RunOptions):
        self.loaded = loaded
        self.field = embeddings.column(loaded.spec.key)
        self.store_key = store_key(self.field, loaded)
        self.preprocess = BatchPreprocess(loaded.preprocess, loaded.device)
        self.amp = autocast_dtype(loaded.device, options.precision)
        self.dtype = options.embedding_dtype

    def __call__(self, images) -> list:
        import torch.nn.functional as F

        with inference_context(self.loaded.device, self.amp):
            features = self.loaded.model.encode_image(self.preprocess(images))
        vectors = F.normalize(features.float(), dim=-1).cpu().numpy()
        return embeddings.encode(vectors, self.dtype)

    def columns(self) -> dict[str, object]:
        """Constant columns written beside the embedding."""
        key = self.loaded.spec.key
        return {f"emb_{key}_model": self.loaded.spec.name, f"emb_{key}_dim": self.loaded.embed_dim}

    def describe(self) -> dict:
        """Run metadata of this task."""
        return {**self.loaded.describe(), "field": self.field, "dtype": self.dtype,
                "precision": str(self.amp).replace("torch.", "") if self.amp else "fp32"}


class CaptionTask:
    """Captions from a CoCa model with the project's own decoder."""

    field = "caption"

    def __init__(self, loaded: LoadedModel, options: RunOptions, decoding=None):
        from .models.decoding import DecodingConfig

        if loaded.kind != "coca":
            raise OptionError(f"model {loaded.spec.name} is a {loaded.kind} model; captions need a CoCa model")
        self.loaded = loaded
        self.store_key = store_key(self.field, loaded)
        self.decoding = (decoding or DecodingConfig()).validated()
        self.preprocess = BatchPreprocess(loaded.preprocess, loaded.device)
        self.amp = autocast_dtype(loaded.device, options.precision)

    def __call__(self, images) -> list:
        from .models.decoding import generate_captions

        with inference_context(self.loaded.device, self.amp):
            return generate_captions(self.loaded.model, self.loaded.tokenizer, self.preprocess(images), self.decoding)

    def columns(self) -> dict[str, object]:
        """Constant columns written beside the caption."""
        return {"caption_model": self.loaded.spec.name}

    def describe(self) -> dict:
        """Run metadata of this task."""
        return {**self.loaded.describe(), "field": self.field, "decoding": self.decoding.as_dict(),
                "precision": str(self.amp).replace("torch.", "") if self.amp else "fp32"}


def _has_value(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def store_key(field: str, loaded: LoadedModel) -> str:
    """The partial-results key of a task: its field and its weights, so results of other
    weights saved under the same field (a retrained checkpoint at the same path, an updated
    shipped model) are never resumed into this run."""
    return f"{field}@{(loaded.sha256 or '')[:16]}"


def written_by(layer: str, field: str) -> Optional[str]:
    """sha256 of the weights of the last recorded run that wrote ``field`` to the layer."""
    sha256 = None
    for run in read_runs(layer):
        for task in run.get("params", {}).get("tasks", []):
            if task.get("field") == field:
                sha256 = task.get("sha256")
    return sha256


def stale_fields(layer: str, tasks) -> set[str]:
    """Fields whose values in the layer were made by other weights than the task's: they are
    recomputed for every tile, never mixed with the new model's results."""
    stale = set()
    for task in tasks:
        previous = written_by(layer, task.field)
        if previous and task.loaded.sha256 and previous != task.loaded.sha256:
            stale.add(task.field)
    return stale


def _run_batch(tasks, images, records, store: ResultStore, on_oom: Callable[[int], None]) -> None:
    """Run every task on one batch and commit the results; halves the batch on CUDA OOM."""
    import torch

    try:
        results = [(task.store_key, task(images)) for task in tasks]
    except torch.cuda.OutOfMemoryError:
        if len(records) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(records) // 2
        on_oom(half)
        _run_batch(tasks, images[:half], records[:half], store, on_oom)
        _run_batch(tasks, images[half:], records[half:], store, on_oom)
        return
    store.put((rec.tile_id, name, value) for name, values in results for rec, value in zip(records, values))


def run_models(
    layer: str,
    embedders: Sequence[LoadedModel] = (),
    captioner: Optional[LoadedModel] = None,
    decoding=None,
    options: Optional[RunOptions] = None,
    progress=None,
    command: str = "run",
):
    """Compute embeddings (one column set per model) and/or captions for the tiles of ``layer``.

    Results are added to the layer itself (atomic rewrite at the end); tiles that already
    have a value are skipped unless ``options.overwrite``, or unless the layer's run records
    say other weights made that field (then every tile is recomputed). Returns the updated
    GeoDataFrame.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    options = (options or RunOptions()).validated()
    tasks = [EmbedTask(m, options) for m in embedders]
    if captioner is not None:
        tasks.append(CaptionTask(captioner, options, decoding))
    if not tasks:
        raise OptionError("nothing to compute: give an embedding model and/or a caption model")
    frame = read_tiles(layer)
    dataset = TileDataset.from_layer(layer)
    store = ResultStore(layer)
    fields = [t.field for t in tasks]
    stored_done = store.done([t.store_key for t in tasks])
    done = {t.field: stored_done[t.store_key] for t in tasks}
    stale = stale_fields(layer, tasks)
    for name in sorted(stale):
        if progress is not None:
            progress.message(f"{name}: the layer's values were made by other weights; recomputing every tile")
    keep_existing = {name for name in fields if not options.overwrite and name not in stale}
    for name in keep_existing:
        if name in frame.columns:
            done[name] |= set(frame.loc[frame[name].map(_has_value), "tile_id"])
    todo = [i for i, rec in enumerate(dataset.records) if any(rec.tile_id not in done[f] for f in fields)]
    device = tasks[0].loaded.device
    if progress is not None:
        progress.start(command, len(dataset))
        progress.advance(len(dataset) - len(todo))
    loader = DataLoader(
        Subset(dataset, todo), batch_size=options.batch_size, shuffle=False, num_workers=options.worker_count(device),
        collate_fn=collate_tiles, pin_memory=device.type == "cuda",
    )
    oom_note = (lambda n: progress.message(f"CUDA out of memory: retrying in batches of {n}")) if progress else (lambda n: None)
    try:
        for records, batch in loader:
            images = batch.permute(0, 3, 1, 2).to(device, non_blocking=True)
            _run_batch(tasks, images, records, store, oom_note)
            if progress is not None:
                progress.advance(len(records))
        for task in tasks:
            stored = store.load(task.store_key)
            values = frame["tile_id"].map(stored)
            if task.field in frame.columns and task.field in keep_existing:
                values = values.where(values.map(_has_value), frame[task.field])
            frame[task.field] = values
            for name, constant in task.columns().items():
                frame[name] = [constant if _has_value(v) else None for v in frame[task.field]]
        params = {"tasks": [t.describe() for t in tasks], "batch_size": options.batch_size,
                  "device": str(device), "torch": torch.__version__}
        merged = write_tiles(layer, frame, new_run(command, "tiles", params), replace_sources=list(frame["source"].unique()))
    finally:
        store.close()
    store.remove()
    return merged
