"""``export-chips``: tiles as image files plus an index, for building image datasets.

Output folder layout::

    chips/
      <tile_id>.png      one image per tile (PNG or JPEG)
      index.csv          filepath (relative to the folder), tile_id
      index.gpkg         footprints with tile columns and filepath (layer "tiles")

Each image is written to a temporary name and renamed, so a chip on disk is always complete.
Re-running with the same parameters keeps the chips already there (resume); other
parameters rewrite them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..errors import OptionError, OutputError
from ..layer.io import is_layer_path, read_tiles, write_tiles
from ..layer.runs import new_run, read_runs
from .config import TileConfig
from .dataset import TileDataset
from .plan import output_crs, records_to_frame

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}


def _is_layer(inputs: Sequence[str | os.PathLike]) -> bool:
    return len(inputs) == 1 and is_layer_path(inputs[0])  # a layer file or a dataset folder


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
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(i) for i in inputs]
    fmt = image_format.lower().lstrip(".")
    if fmt not in IMAGE_FORMATS:
        raise OptionError(f"invalid image format {image_format!r}: use png or jpg")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose a folder for the chips")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create folder ({exc.strerror}); choose another output") from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"{out}: not writable (permission denied); choose another output")

    if _is_layer(inputs):
        dataset = TileDataset.from_layer(inputs[0])
        frame = read_tiles(inputs[0])
        scene_params = [s.as_dict() for s in dataset.reader.scenes.values()]
        params = {"layer": os.path.abspath(inputs[0]), "scenes": scene_params}
    else:
        config = (config or TileConfig()).validated()
        dataset = TileDataset.from_rasters(inputs, config)
        scenes = list(dataset.reader.scenes.values())
        frame = records_to_frame(dataset.records, scenes, output_crs(scenes, config.crs))
        params = {"tiling": config.as_dict(), "scenes": [s.as_dict() for s in scenes]}
    params.update(format=fmt, quality=quality if fmt != "png" else None)
    fingerprint = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    index_layer = out / "index.gpkg"
    previous = read_runs(index_layer) if index_layer.exists() else []
    resume = bool(previous) and previous[-1]["params"].get("fingerprint") == fingerprint

    ext = "jpg" if IMAGE_FORMATS[fmt] == "JPEG" else "png"
    names = [f"{rec.tile_id}.{ext}" for rec in dataset.records]
    if progress is not None:
        progress.start("export-chips", len(dataset))
    written = 0
    for i, name in enumerate(names):
        target = out / name
        if not (resume and target.exists()):
            _, rgb = dataset[i]
            _save_atomic(Image.fromarray(rgb), target, IMAGE_FORMATS[fmt], quality)
            written += 1
        if progress is not None:
            progress.advance(1)
    dataset.reader.close()

    frame = frame.copy()
    frame["filepath"] = frame["tile_id"].map(dict(zip([r.tile_id for r in dataset.records], names)))
    _write_csv(out / "index.csv", frame[["filepath", "tile_id"]])
    write_tiles(index_layer, frame, new_run("export-chips", "tiles", {**params, "fingerprint": fingerprint}),
                replace_sources=frame["source"].unique().tolist() if not frame.empty else [])
    if progress is not None:
        progress.message(f"{written} chip(s) written, {len(names) - written} kept, index in {out / 'index.csv'}")
    return frame


def _save_atomic(image: Image.Image, target: Path, fmt: str, quality: int) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, target)


def _write_csv(path: Path, table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(table.columns))
        writer.writerows(table.itertuples(index=False, name=None))
    os.replace(tmp, path)
