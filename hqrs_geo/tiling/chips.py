"""``export-chips``: tiles as image files plus an index, for building image datasets.

Output folder layout::

    chips/
      <tile_id>.png      one image per tile (PNG or JPEG)
      index.csv          filepath (relative to the folder), tile_id
      index.gpkg         footprints with tile columns and filepath (layer "tiles")

Each image is written through :func:`hqrs_geo.atomic.write_bytes` (temporary name, checked,
renamed), so a chip on disk is always complete; chip names are tile ids checked by
:func:`hqrs_geo.safe_paths.file_name`, so no chip is written outside the folder; the CSV cells
are neutralised (:func:`hqrs_geo.safe_paths.write_csv`). Re-running with the same parameters
keeps the chips already there (resume); other parameters rewrite them. A folder the job
created is removed again when the job fails before writing anything into it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..atomic import output_folder, write_bytes
from ..errors import OptionError
from ..layer.io import read_runs, write_tiles
from ..layer.runs import new_run
from ..layer.source import TileSource
from ..safe_paths import file_name, inside, write_csv
from .config import TileConfig
from .dataset import TileDataset
from .inputs import Rasters, resolve_input
from .plan import output_crs, records_to_frame

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}


def export_chips(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: TileConfig | None = None,
    image_format: str = "png",
    quality: int = 95,
    progress=None,
):
    """Write every tile of ``inputs`` (rasters, or one tile layer) as an image in ``out_dir``.

    Returns the index GeoDataFrame (tile columns + ``filepath``).
    """
    items = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    fmt = str(image_format).lower().lstrip(".")
    if fmt not in IMAGE_FORMATS:
        raise OptionError(f"{image_format!r} is not an image format; use png or jpg", option="image_format")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise OptionError(f"{quality!r} is not a JPEG quality; use a whole number in 1..100", option="quality")
    source = resolve_input(items)
    with output_folder(out_dir) as out:
        return _export(source, out, config, fmt, quality, progress)


def _export(source: Rasters | TileSource, out: Path, config: TileConfig | None, fmt: str, quality: int, progress):
    params: dict[str, Any]
    where: str | None = None
    if isinstance(source, Rasters):
        config = (config or TileConfig()).validated()
        dataset = TileDataset.from_rasters(source.scenes(), config)
        scenes = list(dataset.reader.scenes.values())
        frame = records_to_frame(dataset.records, scenes, output_crs(scenes, config.crs))
        params = {"tiling": config.as_dict(), "scenes": [s.as_dict() for s in scenes]}
    else:  # one tile layer (a file or a dataset folder), read once
        where = source.path
        frame = source.read()
        dataset = TileDataset.from_frame(frame, source.runs().scenes(), where=where)
        scene_params = [s.as_dict() for s in dataset.reader.scenes.values()]
        params = {"layer": os.path.abspath(where), "scenes": scene_params}
    params.update(format=fmt, quality=quality if fmt != "png" else None)
    fingerprint = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    index_layer = out / "index.gpkg"
    previous = read_runs(index_layer) if index_layer.exists() else []
    resume = bool(previous) and previous[-1]["params"].get("fingerprint") == fingerprint

    ext = "jpg" if IMAGE_FORMATS[fmt] == "JPEG" else "png"
    names = [f"{file_name(rec.tile_id, 'tile id', where)}.{ext}" for rec in dataset.records]
    targets = [inside(out, name, "chip name") for name in names]
    if progress is not None:
        progress.start("export-chips", len(dataset))
    written = 0
    try:
        for i, target in enumerate(targets):
            if not (resume and target.is_file() and target.stat().st_size > 0):
                _, rgb = dataset[i]
                _save_atomic(Image.fromarray(rgb), target, IMAGE_FORMATS[fmt], quality)
                written += 1
            if progress is not None:
                progress.advance(1)
    finally:
        dataset.reader.close()

    frame = frame.copy()
    frame["filepath"] = frame["tile_id"].map(dict(zip([r.tile_id for r in dataset.records], names)))
    write_csv(out / "index.csv", ["filepath", "tile_id"], frame[["filepath", "tile_id"]].itertuples(index=False))
    write_tiles(index_layer, frame, new_run("export-chips", "tiles", {**params, "fingerprint": fingerprint}),
                replace_sources=frame["source"].unique().tolist() if not frame.empty else [])
    if progress is not None:
        progress.message(f"{written} chip(s) written, {len(names) - written} kept, index in {out / 'index.csv'}")
    return frame


def _save_atomic(image: Image.Image, target: Path, fmt: str, quality: int) -> None:
    """Encode in memory, then write through :func:`hqrs_geo.atomic.write_bytes` (checked, renamed)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    write_bytes(target, buffer.getvalue())
