"""Change detection between two dates in QGIS, without widgets: what the engine is asked for
(``hqrs-geo change BEFORE AFTER -o OUT …``), which layers can be a date, and the change layer it
writes, read back as ranked rows for the dock's list.

A date is a raster file (the engine tiles it, and the other date on the same grid) or a tile layer
(GeoPackage, GeoParquet, FlatGeobuf made by the engine). The change layer has one row per tile of
the earlier date with the engine's fixed columns: ``change_score`` (robust z of the embedding
distance within the pair of scenes), ``change_rank`` (1 = most changed), ``compared``, ``changed``,
``caption_before``/``caption_after``, ``class_before``/``class_after``/``class_change``, and with a
text ``became_score``/``became_rank`` or ``stopped_score``/``stopped_rank``.

Nothing here starts the engine: the Processing algorithm and the dock's panel run the arguments
built here through :mod:`.runner`.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qgis.core import QgsFeatureRequest, QgsGeometry, QgsMapLayer, QgsRasterLayer, QgsVectorLayer

from . import settings, tile_layers
from .rasters import gdal_source

CHANGE_LAYER_NAMES = ("change", "changes", tile_layers.TILES_LAYER)  # GeoPackage tables the layer may be in
DEFAULT_THRESHOLD = 3.0  # the engine's --threshold default (robust z)
DEFAULT_MIN_OVERLAP = 0.5
# the ranking of a change layer: (rank field, score field) per what was asked
RANKINGS = {"change": ("change_rank", "change_score"), "became": ("became_rank", "became_score"),
            "stopped": ("stopped_rank", "stopped_score")}
ARROW = "→"


class ChangeError(ValueError):
    """A comparison that cannot be asked for (one line: what is wrong and what to do)."""


@dataclass
class ChangeOptions:
    """What to compute besides the change score, and how (the engine's options)."""

    became: str = ""
    stopped: str = ""
    labels: Sequence[str] = ()
    threshold: float = DEFAULT_THRESHOLD
    min_overlap: float = DEFAULT_MIN_OVERLAP
    captions: bool = True
    model: str = ""
    checkpoint: str = ""
    caption_model: str = ""
    device: str = ""
    extra: Sequence[str] = field(default_factory=tuple)  # further CLI options (tiling of raster dates)

    @property
    def ranking(self) -> str:
        """Which score orders the results: ``became``, ``stopped`` or ``change``."""
        return "became" if self.became.strip() else "stopped" if self.stopped.strip() else "change"


def change_args(before: str, after: str, output: str, options: ChangeOptions | None = None) -> list[str]:
    """The ``hqrs-geo change`` command line (without ``--progress``, which the runner adds).

    Values go as ``--flag=value`` so a text starting with ``-`` is never taken for an option."""
    options = options or ChangeOptions()
    if not before or not after:
        raise ChangeError("give both dates: the earlier one (before) and the later one (after)")
    if os.path.abspath(before) == os.path.abspath(after):
        raise ChangeError(f"both dates are {before}: choose the layer or raster of the other date")
    if not math.isfinite(options.threshold):
        raise ChangeError(f"the change threshold must be a number, not {options.threshold}")
    if not 0.0 <= options.min_overlap <= 1.0:
        raise ChangeError(f"the least overlap is a fraction from 0 to 1, not {options.min_overlap:g}")
    args = ["change", before, after, "-o", output, f"--threshold={options.threshold!r}",
            f"--min-overlap={options.min_overlap!r}"]
    if options.became.strip():
        args.append(f"--became={options.became.strip()}")
    if options.stopped.strip():
        args.append(f"--stopped={options.stopped.strip()}")
    labels = [label.strip() for label in options.labels if label.strip()]
    if labels:
        args.append("--labels=" + ",".join(labels))
    if not options.captions:
        args.append("--no-captions")
    if options.model:
        args.append(f"--model={options.model}")
    if options.model and options.checkpoint:
        args.append(f"--checkpoint={options.checkpoint}")
    if options.caption_model and options.captions:
        args.append(f"--caption-model={options.caption_model}")
    if options.device:
        args.append(f"--device={options.device}")
    args.extend(str(a) for a in options.extra)
    return args


def split_labels(text: str) -> list[str]:
    """Class labels from a comma-separated text (empty items dropped)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


# -- dates --------------------------------------------------------------------------------------
def is_date_layer(layer: QgsMapLayer | None) -> bool:
    """A layer that can be one date of a comparison: a file raster or a tile layer file (not a
    change layer, which carries its earlier date's tile columns too)."""
    if isinstance(layer, QgsRasterLayer):
        return layer.isValid() and raster_file(layer) is not None
    return tile_layers.engine_layer_file(layer) is not None and tile_layers.is_tile_layer(layer) \
        and not is_change_layer(layer)


def is_change_layer(layer: QgsMapLayer | None) -> bool:
    """A change layer written by ``hqrs-geo change`` (it has a ``change_score`` column)."""
    return isinstance(layer, QgsVectorLayer) and layer.fields().indexOf("change_score") >= 0


def raster_file(layer: QgsRasterLayer) -> str | None:
    """The local file of a GDAL raster layer (None for web, WMS and XYZ layers)."""
    source = gdal_source(layer)
    return source if source is not None and os.path.isfile(source) else None


def date_path(layer: QgsMapLayer | None) -> str:
    """The file the engine reads for the date ``layer``; a one-line error for layers it cannot take."""
    if layer is None:
        raise ChangeError("no layer chosen for this date")
    if is_change_layer(layer):
        raise ChangeError(f"{layer.name()} is a change layer: choose the raster or tile layer of a date")
    if isinstance(layer, QgsRasterLayer):
        path = raster_file(layer)
        if path is None:
            raise ChangeError(f"{layer.name()} is a {layer.providerType()} layer, not a raster file: use "
                              "Processing ▸ HQRS ▸ Search ▸ Compare two dates (it writes web layers over an extent), "
                              "or tile it first with Processing ▸ HQRS ▸ Tiles ▸ Tile raster")
        return path
    path = tile_layers.engine_layer_file(layer)
    if path is None or not tile_layers.is_tile_layer(layer):
        raise ChangeError(tile_layers.not_a_tile_layer(layer))
    return path


def date_name(path: str) -> str:
    """A short name of a date for layer names and captions (the file's stem)."""
    name = Path(path.rstrip("/\\")).name
    stem = Path(name).stem if Path(name).suffix.lower() in (*tile_layers.TILE_SUFFIXES, ".tif", ".tiff", ".vrt",
                                                               ".jp2", ".png", ".jpg") else name
    return stem or name


def default_output(before: str, after: str, folder: str | None = None) -> str:
    """Where a change layer goes when none is given: ``<before>_vs_<after>_change.gpkg`` beside the
    earlier date (a temporary folder when that one cannot be written)."""
    stem = re.sub(r"[^\w.-]+", "_", f"{date_name(before)}_vs_{date_name(after)}_change").strip("_")
    if folder is None:
        parent = Path(before).resolve().parent  # (a dataset folder: beside it, too)
        folder = str(parent) if os.access(parent, os.W_OK) else tempfile.gettempdir()
    return os.path.join(folder, f"{stem[:120]}.gpkg")


def layer_name(before: str, after: str, options: ChangeOptions | None = None) -> str:
    """``change: 2019 → 2023`` (with ``(became "a solar farm")`` when the tiles are also ranked by a text)."""
    options = options or ChangeOptions()
    name = f"change: {date_name(before)} {ARROW} {date_name(after)}"
    if options.ranking == "became":
        return f'{name} (became "{options.became.strip()}")'
    if options.ranking == "stopped":
        return f'{name} (stopped being "{options.stopped.strip()}")'
    return name


# -- the change layer ----------------------------------------------------------------------------
def change_layer_uri(path: str) -> str:
    """The QGIS data source of the change layer file ``path`` (its table in a GeoPackage)."""
    if not path.lower().endswith(".gpkg"):
        return path
    tables = tile_layers.gpkg_tables(path) or []
    table = next((name for name in CHANGE_LAYER_NAMES if name in tables), tables[0] if tables else "change")
    return f"{path}|layername={table}"


@dataclass
class ChangedTile:
    """One row of the dock's list: a tile of the earlier date and how it changed."""

    tile_id: str
    rank: int
    score: float
    geometry: QgsGeometry
    change_score: float | None = None
    changed: bool = False
    caption_before: str = ""
    caption_after: str = ""
    class_before: str = ""
    class_after: str = ""

    @property
    def what(self) -> str:
        """``farmland → residential`` (classes, when they differ) and ``caption → caption``."""
        parts = []
        if self.class_before or self.class_after:
            if self.class_before != self.class_after:
                parts.append(f"{self.class_before or '?'} {ARROW} {self.class_after or '?'}")
            else:
                parts.append(f"{self.class_before} (same class)")
        if self.caption_before or self.caption_after:
            parts.append(f"{self.caption_before or '—'} {ARROW} {self.caption_after or '—'}")
        return "; ".join(parts)


def _text(value) -> str:
    return "" if value is None or str(value) == "NULL" else str(value)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_changes(layer: QgsVectorLayer, k: int = 50, ranking: str = "change") -> list[ChangedTile]:
    """The ``k`` best-ranked tiles of a change layer (by ``change_rank``, or ``became_rank`` /
    ``stopped_rank`` for ``ranking`` ``became`` / ``stopped``), best first; tiles without a rank
    (not compared) are left out. Safe in a worker thread for a layer opened there."""
    rank_field, score_field = RANKINGS.get(ranking, RANKINGS["change"])
    names = layer.fields().names()
    if rank_field not in names:
        raise ChangeError(f"{layer.source()}: no {rank_field} column; is this a change layer written by "
                          "'hqrs-geo change'?")
    request = QgsFeatureRequest().setFilterExpression(f'"{rank_field}" IS NOT NULL')
    request.addOrderBy(f'"{rank_field}"', True)
    request.setLimit(max(1, int(k)))
    rows = []
    for feature in layer.getFeatures(request):
        def get(name: str):
            return feature[name] if name in names else None

        rows.append(ChangedTile(
            tile_id=_text(get("tile_id")), rank=int(feature[rank_field]),
            score=_number(get(score_field)) or 0.0, geometry=QgsGeometry(feature.geometry()),
            change_score=_number(get("change_score")), changed=bool(get("changed")),
            caption_before=_text(get("caption_before")), caption_after=_text(get("caption_after")),
            class_before=_text(get("class_before")), class_after=_text(get("class_after"))))
    return rows


def read_change_file(path: str, k: int = 50, ranking: str = "change") -> list[ChangedTile]:
    """:func:`read_changes` of the change layer file ``path``, opened for the calling thread."""
    with tile_layers.opened_in_worker(change_layer_uri(path), "change") as layer:
        if not layer.isValid():
            raise ChangeError(f"cannot read the change layer {path}")
        return read_changes(layer, k, ranking)


def summary(final: dict, ranking: str = "change") -> str:
    """The engine's final event in words: ``12 of 64 tile pairs changed (change score ≥ 3)``."""
    compared, changed = final.get("compared"), final.get("changed")
    threshold = final.get("threshold", DEFAULT_THRESHOLD)
    if compared is None:
        return str(final.get("message") or "")
    text = (f"{int(changed or 0):,} of {int(compared):,} compared tile pairs changed "
            f"(change score ≥ {float(threshold):g})")
    not_compared = final.get("not_compared")
    if not_compared is None and final.get("tiles") is not None:
        not_compared = int(final["tiles"]) - int(compared)
    if not_compared:
        text += f"; {int(not_compared):,} not compared"
    return text


def settings_options(models: bool, tiling: bool, **given) -> ChangeOptions:
    """Options with the HQRS settings' defaults: the device always; ``models`` (a date is a raster,
    embedded and captioned here): the embedding and caption models; ``tiling`` (the earlier date is
    a raster, tiled here; the later one follows its grid): the tile size, overlap and resolution."""
    options = ChangeOptions(**given)
    options.device = options.device or str(settings.value("device") or "auto")
    if models:
        if not options.model:  # the settings' model, with its checkpoint
            options.model = str(settings.value("model") or "")
            options.checkpoint = options.checkpoint or str(settings.value("checkpoint") or "")
        options.caption_model = options.caption_model or str(settings.value("caption_model") or "")
    if tiling:
        size, unit = float(settings.value("tile_size")), settings.value("tile_unit")
        extra = ["--tile-size", f"{size:g}m" if unit == "m" else str(max(8, int(round(size))))]
        if float(settings.value("overlap")) > 0:
            extra += ["--overlap", f"{float(settings.value('overlap')):g}%"]
        if float(settings.value("gsd")) > 0:
            extra += ["--gsd", f"{float(settings.value('gsd')):g}"]
        options.extra = [*extra, *options.extra]
    return options
