"""The two date layers of a comparison: made from rasters when needed, with embeddings (of ONE
model for both dates) and captions computed where they are missing.

* Rasters: BEFORE is tiled with the tiling options, AFTER on BEFORE's footprints
  (:func:`hqrs_geo.tiling.coregister.tile_like`), into ``<stem>-before.<ext>`` and
  ``<stem>-after.<ext>`` beside the output; a rerun finds them and skips finished results.
* Layers (files or dataset folders) are used as they are; missing results are added to them in
  place with :func:`hqrs_geo.run`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pyproj import Transformer

from ..errors import InputError, OptionError
from ..layer.columns import CAPTION, embedding_column, embedding_keys, has_value
from ..layer.dataset import DatasetRuns, is_dataset, is_dataset_output, open_manifest, verified_part
from ..layer.io import open_layer
from ..layer.runs import EmbeddingSource
from ..models.registry import REGISTRY, default_caption_model, default_embed_model, get_spec
from ..search.partitioned import DatasetSession
from ..tiling.coregister import tile_like


def beside(output: str | os.PathLike, tag: str, folder: bool = False) -> str:
    """``<stem>-<tag>.<ext>`` beside ``output`` (a folder output, or ``folder``: the folder ``<stem>-<tag>/``)."""
    out = Path(str(output).rstrip("/" + os.sep))
    if folder or is_dataset_output(output):
        return f"{out.parent / f'{out.stem}-{tag}'}/"
    return str(out.with_name(f"{out.stem}-{tag}{out.suffix}"))


def date_layers(before: Any, after: Any, output: str | os.PathLike, tiling: Any = None, progress: Any = None
                ) -> tuple[str, str]:
    """The paths of the two date layers: the layers given, or layers made from the rasters given."""
    from ..api import tile
    from ..tiling.inputs import as_list as _as_list, names_layer as is_layer_input

    b_items, a_items = _as_list(before), _as_list(after)
    if not b_items or not a_items:
        raise OptionError("give the rasters or tile layers of both dates", option="before" if not b_items else "after")
    if is_layer_input(b_items):
        b_path = str(b_items[0])
    else:
        b_path = beside(output, "before")
        tile(b_items, b_path, tiling, progress=progress)
    if is_layer_input(a_items):
        a_path = str(a_items[0])
    else:
        a_path = beside(output, "after", folder=is_dataset(b_path))  # a dataset is tiled like into a dataset
        like(b_path, a_items, a_path, tiling, progress)
    for path in (b_path, a_path):
        if not Path(path.rstrip("/")).exists():
            raise InputError(f"{path}: file not found; give a tile layer, a dataset folder or rasters")
    if Path(b_path).resolve() == Path(a_path).resolve():
        raise OptionError(f"{b_path}: given as both dates; give the layer or rasters of another date as «after»",
                          option="after")
    return b_path, a_path


def like(reference: str, inputs: list, output: str, tiling: Any, progress: Any) -> None:
    """Tile ``inputs`` on the footprints of the layer ``reference`` (co-registered tiling)."""
    tile_like(reference, inputs, output, tiling, progress=progress)


_OPENED: dict[str, Any] = {}


def opened(path: str) -> Any:
    """The layer file at ``path`` as read (:func:`~hqrs_geo.layer.io.open_layer`), read again only
    when the file changed since: the checks of one comparison read each date once."""
    key = os.path.abspath(path)
    layer = _OPENED.get(key)
    if layer is None or not layer.unchanged():
        layer = _OPENED[key] = open_layer(path)
    return layer


def forget() -> None:
    """Drop the layers kept by :func:`opened` (at the end of a comparison)."""
    _OPENED.clear()


def _wgs84_box(path: str) -> tuple[float, float, float, float] | None:
    """The lon/lat bounds of a layer's tiles (None: no tiles, or no CRS to place them)."""
    if is_dataset(path):
        boxes = [p.get("bounds_wgs84") for p in open_manifest(path).parts.values() if p.get("tiles")]
        boxes = [b for b in boxes if b]
        if not boxes:
            return None
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes))
    frame = opened(path).frame
    if frame.empty or frame.crs is None:
        return None

    to_wgs84 = Transformer.from_crs(frame.crs, "EPSG:4326", always_xy=True)
    return tuple(float(v) for v in to_wgs84.transform_bounds(*frame.total_bounds, densify_pts=21))  # type: ignore


def check_overlap(b_path: str, a_path: str) -> None:
    """A one-line error, before any model runs, when the two dates' tiles do not overlap at all."""
    b, a = _wgs84_box(b_path), _wgs84_box(a_path)
    if b is None or a is None:
        return
    if b[0] > a[2] or a[0] > b[2] or b[1] > a[3] or a[1] > b[3]:
        raise InputError(f"{a_path}: does not overlap {b_path} at all (lon/lat {_box(a)} and {_box(b)}); give the "
                         "same place at both dates")


def _box(box: tuple[float, ...]) -> str:
    return ",".join(f"{v:.4f}" for v in box)


# ------------------------------------------------------------------------------------ results
def _keys_and_runs(path: str) -> tuple[list[str], Any]:
    """The embedding keys and run records of a layer file or dataset."""
    if is_dataset(path):
        manifest = open_manifest(path)
        return DatasetSession._keys(manifest), DatasetRuns(manifest)
    layer = opened(path)
    return embedding_keys(layer.frame), layer.runs


def missing(path: str, column: str) -> bool:
    """True when some tile of the layer (or dataset) has no value in ``column``."""
    if is_dataset(path):
        manifest = open_manifest(path)
        for part in manifest.part_files():
            file = verified_part(manifest, part.name)
            if column not in pq.read_schema(file).names:
                return True
            if pq.read_table(file, columns=[column]).column(column).null_count:
                return True
        return False
    frame = opened(path).frame
    return column not in frame.columns or not bool(frame[column].map(has_value).all())


def _source(path: str, model: str | None) -> EmbeddingSource | None:
    """Which model made the layer's embeddings (``model``'s, or its only one); None when it has none
    of them. Several models without ``model``: the one-line error of the search session."""
    keys, runs = _keys_and_runs(path)
    if not keys:
        return None
    if model is not None and not any(k in (model, model.lower()) for k in keys):
        names = {str(t.get("name")) for t in runs.tasks()}
        if model not in names and model.lower() not in names:
            return None
    try:
        return runs.embedding_source(keys, model)
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


def choose_model(b_path: str, a_path: str, model: str | None, checkpoint: str | None) -> ModelChoice:
    """The one embedding model of the comparison: ``model``, else the one the dates' embeddings
    were made with (one-line error when they were made by different models), else the default."""
    if model is not None:
        name = get_spec(model, None, checkpoint).name
        known = _source(b_path, name) or _source(a_path, name)
        return ModelChoice(model, name, checkpoint or (known.checkpoint if known else None))
    sb, sa = _source(b_path, None), _source(a_path, None)
    if sb is not None and sa is not None and not same_model(sb, sa):
        raise OptionError(f"{b_path} was embedded by {sb.model}, {a_path} by {sa.model}; both dates must be embedded "
                          "by the same model: give «model» to embed both with one", option="model")
    known = sb or sa
    if known is not None:
        load = known.model if known.model in REGISTRY else known.arch
        return ModelChoice(load, known.model, checkpoint or known.checkpoint, known.arch)
    name = default_embed_model()
    return ModelChoice(name, get_spec(name, None, checkpoint).name, checkpoint)


def complete_results(path: str, choice: ModelChoice, caption_model: str | None, caption_checkpoint: str | None,
                     captions: bool, device: str, options: Any, decoding: Any, progress: Any) -> None:
    """Compute the embeddings of ``choice`` and (with ``captions``) the captions the layer lacks, in place."""
    from ..api import run

    source = _source(path, choice.name)
    embed = source is None or missing(path, embedding_column(source.key))
    caption = captions and missing(path, CAPTION)
    if not embed and not caption:
        return

    run(path, None, embed_models=[choice.load] if embed else [],
        embed_checkpoints=[choice.checkpoint] if embed and choice.checkpoint else [],
        embed_arch=[choice.arch] if embed and choice.arch else [],
        caption_model=(caption_model or default_caption_model()) if caption else None,
        caption_checkpoint=caption_checkpoint if caption else None, decoding=decoding, device=device,
        options=options, progress=progress, command="run")


__all__ = ["ModelChoice", "beside", "check_overlap", "choose_model", "complete_results", "date_layers", "forget",
           "missing", "opened", "same_model"]
