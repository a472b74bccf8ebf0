"""The two date layers of a comparison: made from rasters when needed, with embeddings (of ONE
model for both dates) and captions computed where they are missing.

* Rasters: BEFORE is tiled with the tiling options, AFTER on BEFORE's footprints
  (:func:`hqrs_geo.tiling.coregister.tile_like`), into ``<stem>-before.<ext>`` and
  ``<stem>-after.<ext>`` beside the output; a rerun finds them and skips finished results.
* Layers (files or dataset folders) are used as they are; missing results are added to them in
  place (:func:`hqrs_geo.engine.jobs.model_job`).

Everything here works on :class:`~hqrs_geo.layer.source.TileSource` values; the dates are
resolved once, at the entry (:func:`resolve_dates`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.jobs import model_job, model_plan, tile_job
from ..errors import InputError, OptionError
from ..layer.columns import CAPTION, EMBEDDING_PREFIX, TILE_ID, embedding_column, embedding_columns, has_value
from ..layer.crs import box_in
from ..layer.runs import EmbeddingSource, LayerRuns
from ..layer.source import TileSource, open_source
from ..models.registry import REGISTRY, default_caption_model, default_embed_model, get_spec
from ..tiling.inputs import Rasters, as_list, names_layer, resolve_input
from .dates import read_tiles
from .output import beside
from .pairs import pair_tiles

Date = Rasters | TileSource


def resolve_dates(before: Any, after: Any) -> tuple[Date, Date]:
    """The inputs of both dates resolved once (:func:`~hqrs_geo.tiling.inputs.resolve_input`), with
    one-line errors before any work: a date without inputs, a tile layer that does not exist."""
    b_items, a_items = as_list(before), as_list(after)
    if not b_items or not a_items:
        raise OptionError("give the rasters or tile layers of both dates", option="before" if not b_items else "after")
    for items in (b_items, a_items):
        if names_layer(items) and not Path(str(items[0]).rstrip("/")).exists():
            raise InputError(f"{items[0]}: file not found; give a tile layer, a dataset folder or rasters")
    return resolve_input(b_items), resolve_input(a_items)


def date_layers(before: Date, after: Date, output: str | os.PathLike, tiling: Any = None, progress: Any = None
                ) -> tuple[TileSource, TileSource]:
    """The two date layers: the layers given, or layers made from the rasters given (AFTER on the
    footprints of BEFORE, beside ``output``)."""
    if isinstance(before, Rasters):
        path = beside(output, "before")
        tile_job(before, path, tiling, progress=progress)
        before = open_source(path)
    if isinstance(after, Rasters):
        path = beside(output, "after", like=before)
        tile_job(after, path, tiling, progress=progress, like=before.path)
        after = open_source(path)
    if Path(before.path).resolve() == Path(after.path).resolve():
        raise OptionError(f"{before.path}: given as both dates; give the layer or rasters of another date as «after»",
                          option="after")
    return before, after


def _wgs84_box(layer: TileSource) -> tuple[float, ...] | None:
    """The lon/lat bounds of a layer's tiles (None: no tiles, or no CRS to place them)."""
    bounds, crs = layer.bounds(), layer.crs()
    if bounds is None or crs is None:
        return None
    return box_in(bounds, crs, "EPSG:4326")


def check_overlap(before: TileSource, after: TileSource) -> None:
    """One-line errors, before any model runs, when the two dates' tiles do not overlap at all, or
    (dates of one part each, read at once) when no tile of AFTER has the footprint of one of BEFORE."""
    b, a = _wgs84_box(before), _wgs84_box(after)
    if b is not None and a is not None and (b[0] > a[2] or a[0] > b[2] or b[1] > a[3] or a[1] > b[3]):
        raise InputError(f"{after.path}: does not overlap {before.path} at all (lon/lat {_box(a)} and {_box(b)}); "
                         "give the same place at both dates")
    if len(before.parts()) == 1 and len(after.parts()) == 1:  # misaligned layers: said before any model runs
        (b_tiles,), (a_tiles,) = read_tiles(before, [TILE_ID]), read_tiles(after, [TILE_ID])
        if len(b_tiles) and not pair_tiles(b_tiles, a_tiles).paired.any():
            raise no_pairs(before.path, after.path)


def no_pairs(b_path: str, a_path: str) -> InputError:
    """The one-line error of two dates without a single pair of tiles."""
    return InputError(f"{a_path}: no tile has the footprint of a tile of {b_path} (they do not overlap, or were "
                      "tiled on other grids); give the same place at both dates, and tile the after date on the "
                      "before date's tiles (rasters given to change are)")


def _box(box: tuple[float, ...]) -> str:
    return ",".join(f"{v:.4f}" for v in box)


# ------------------------------------------------------------------------------------ results
def missing(layer: TileSource, columns: list[str]) -> set[str]:
    """Those of ``columns`` in which some tile of the layer has no value (a part without the
    column counts as such; read part by part, only these columns)."""
    lacking: set[str] = set()
    for tiles in read_tiles(layer, columns):
        lacking |= {c for c in columns if c not in tiles.columns or not bool(tiles[c].map(has_value).all())}
        if len(lacking) == len(columns):
            break
    return lacking


class Embeddings:
    """The embedding columns and run records of a date layer, read once (before results are added
    to it): which model made its embeddings."""

    def __init__(self, layer: TileSource):
        self.layer = layer
        parts = layer.parts()
        self.keys = [c[len(EMBEDDING_PREFIX):] for c in embedding_columns(parts[0].columns())] if parts else []
        self._runs: LayerRuns | None = None

    @property
    def runs(self) -> LayerRuns:
        """The layer's run records (read on first use)."""
        if self._runs is None:
            self._runs = self.layer.runs()
        return self._runs

    def source(self, model: str | None) -> EmbeddingSource | None:
        """Which model made the layer's embeddings (``model``'s, or its only one); None when it has
        none of them. Several models without ``model``: the one-line error of the search session."""
        if not self.keys:
            return None
        if model is not None and not any(k in (model, model.lower()) for k in self.keys):
            names = {str(t.get("name")) for t in self.runs.tasks()}
            if model not in names and model.lower() not in names:
                return None
        try:
            return self.runs.embedding_source(self.keys, model)
        except OptionError:
            if model is not None:
                return None
            raise


def same_model(a: EmbeddingSource, b: EmbeddingSource) -> bool:
    """True when two embedding sets were made by the same weights (comparable vectors)."""
    if a.key != b.key or a.model != b.model:
        return False
    return not (a.sha256 and b.sha256 and a.sha256 != b.sha256)


@dataclass
class ModelChoice:
    """The embedding model both dates are compared with: ``load`` (what to load, with
    ``checkpoint`` and ``arch``) and ``name`` (the name its results are stored under: a custom
    model's carries its checkpoint's)."""

    load: str
    name: str
    checkpoint: str | None = None
    arch: str | None = None


def choose_model(before: Embeddings, after: Embeddings, model: str | None, checkpoint: str | None) -> ModelChoice:
    """The one embedding model of the comparison: ``model``, else the one the dates' embeddings
    were made with (one-line error when they were made by different models), else the default."""
    if model is not None:
        name = get_spec(model, None, checkpoint).name
        known = before.source(name) or after.source(name)
        return ModelChoice(model, name, checkpoint or (known.checkpoint if known else None))
    sb, sa = before.source(None), after.source(None)
    if sb is not None and sa is not None and not same_model(sb, sa):
        raise OptionError(f"{before.layer.path} was embedded by {sb.model}, {after.layer.path} by {sa.model}; both "
                          "dates must be embedded by the same model: give «model» to embed both with one",
                          option="model")
    known = sb or sa
    if known is not None:
        load = known.model if known.model in REGISTRY else known.arch
        return ModelChoice(load, known.model, checkpoint or known.checkpoint, known.arch)
    name = default_embed_model()
    return ModelChoice(name, get_spec(name, None, checkpoint).name, checkpoint)


def complete_results(date: Embeddings, choice: ModelChoice, caption_model: str | None,
                     caption_checkpoint: str | None, captions: bool, device: str, options: Any, decoding: Any,
                     progress: Any) -> None:
    """Compute the embeddings of ``choice`` and (with ``captions``) the captions the layer lacks, in place."""
    source = date.source(choice.name)
    wanted = ([] if source is None else [embedding_column(source.key)]) + ([CAPTION] if captions else [])
    lacking = missing(date.layer, wanted) if wanted else set()
    embed = source is None or embedding_column(source.key) in lacking
    caption = CAPTION in lacking
    if not embed and not caption:
        return
    plan = model_plan("run", embed_models=[choice.load] if embed else [],
                      embed_checkpoints=[choice.checkpoint] if embed and choice.checkpoint else [],
                      embed_arch=[choice.arch] if embed and choice.arch else [],
                      caption_model=(caption_model or default_caption_model()) if caption else None,
                      caption_checkpoint=caption_checkpoint if caption else None, decoding=decoding, device=device)
    model_job(date.layer, None, plan, options=options, progress=progress, command="run")


__all__ = ["Date", "Embeddings", "ModelChoice", "check_overlap", "choose_model", "complete_results", "date_layers",
           "missing", "no_pairs", "resolve_dates", "same_model"]
