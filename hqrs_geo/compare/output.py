"""Where the change layer goes: one layer file (written once, atomically, at the end), or, for a
BEFORE dataset, a dataset folder written part by part as the BEFORE parts are compared (each
part atomically, then the manifest), so memory stays that of one part.

The kind of a comparison's outputs is decided here and only here: a folder output (a dataset)
needs a dataset as BEFORE (:func:`check_output`, :func:`open_sink`), and the layers made from
rasters beside the output are folders when it is one, or when they are tiled like a BEFORE
dataset (:func:`beside`): a dataset is tiled like part by part into a dataset."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd

from ..errors import OptionError
from ..layer.columns import TILE_ID
from ..layer.dataset import Manifest, is_dataset, is_dataset_output, open_manifest, part_path, write_part
from ..layer.io import check_writable, write_tiles
from ..layer.source import TileSource
from ..tiling.inputs import Rasters

FOLDER_NEEDS_DATASET = ("{output}: a folder output needs a dataset as «before»; write the change layer of tile "
                        "layers or rasters to a file ending in .gpkg, .parquet or .fgb")


def beside(output: str | os.PathLike, tag: str, like: TileSource | None = None) -> str:
    """``<stem>-<tag>.<ext>`` beside ``output``; the folder ``<stem>-<tag>/`` for a folder output,
    or when the layer is tiled ``like`` a dataset."""
    out = Path(str(output).rstrip("/" + os.sep))
    if is_dataset_output(output) or (like is not None and like.partitioned):
        return f"{out.parent / f'{out.stem}-{tag}'}/"
    return str(out.with_name(f"{out.stem}-{tag}{out.suffix}"))


def check_output(output: str | os.PathLike, before: Rasters | TileSource) -> None:
    """Before any work: a folder ``output`` needs a dataset as BEFORE; a file must be writable."""
    if not is_dataset_output(output):
        check_writable(output)
    elif isinstance(before, Rasters) or not before.partitioned:
        raise OptionError(FOLDER_NEEDS_DATASET.format(output=output), option="output")


def open_sink(output: str | os.PathLike, before: Any) -> LayerSink | DatasetSink:
    """The sink of the change layer of the date ``before`` (:class:`~hqrs_geo.compare.dates.DateLayer`):
    a dataset for a folder ``output`` (checked by :func:`check_output`), else a layer file."""
    return DatasetSink(output, before) if is_dataset_output(output) else LayerSink(output, before.crs)


class LayerSink:
    """Collects the change layer's rows and writes them as one layer file."""

    def __init__(self, output: str | os.PathLike, crs: Any):
        self.output, self.crs, self.frames = output, crs, []  # type: ignore[var-annotated]

    def add(self, name: str | None, frame: Any, run: dict) -> None:
        """Keep the rows of one BEFORE block."""
        self.frames.append(frame)

    def finish(self, run: dict) -> Any:
        """Write the layer with its run record; returns it as written (GeoDataFrame)."""
        return write_tiles(self.output, concat(self.frames, self.crs), run, replace_all=True)

    def changed(self) -> int:
        """How many rows are ``changed``."""
        return int(sum(int(f["changed"].sum()) for f in self.frames))


class DatasetSink:
    """Writes the change layer of a BEFORE dataset as a dataset: one part per BEFORE part, with the
    BEFORE scenes' readings (so the change dataset is a tile dataset of those scenes)."""

    def __init__(self, output: str | os.PathLike, before: Any):
        folder = Path(str(output).rstrip("/" + os.sep))
        if folder.exists() and not is_dataset(folder) and any(folder.iterdir()):
            raise OptionError(f"{output}: is a folder with other files, not a dataset; choose a new or empty folder",
                              option="output")
        source = open_manifest(before.path)
        self.folder = folder
        self.manifest = Manifest.load(folder)
        if self.manifest.parts and not any(r.get("command") == "change" for r in self.manifest.runs):
            raise OptionError(f"{output}: is a dataset not written by change (its parts would be replaced); choose "
                              "a new folder", option="output")
        self.manifest.crs = source.crs
        self.manifest.scenes = copy.deepcopy(source.scenes)
        self.entries = source.parts
        self.written: list[str] = []
        self.count = 0

    def add(self, name: str | None, frame: Any, run: dict) -> None:
        """Write the rows of BEFORE part ``name`` as the part of the same name."""
        assert name is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        facts = write_part(part_path(self.folder, name), frame, [{"run_id": 1, **run}])
        entry = {k: v for k, v in self.entries[name].items() if k in ("scene", "block", "blocks", "rows")}
        self.manifest.add_part({**entry, "name": name, **facts})
        self.manifest.save()  # listed at once: an interrupted run leaves a dataset a rerun replaces
        self.written.append(name)
        self.count += int(frame["changed"].sum())

    def finish(self, run: dict) -> dict:
        """Drop parts of an earlier change run that this one did not write, record the run, save
        the manifest; returns a summary (``output``, ``parts`` and the run's ``counts``)."""
        for name in [n for n in self.manifest.parts if n not in self.written]:
            part_path(self.folder, name).unlink(missing_ok=True)
            del self.manifest.parts[name]
        self.manifest.runs.append({"run_id": len(self.manifest.runs) + 1, **run})
        self.manifest.save()
        return {"output": str(self.folder), "parts": len(self.written), **run["params"]["counts"]}

    def changed(self) -> int:
        """How many rows are ``changed``."""
        return self.count


def concat(frames: list, crs: Any) -> Any:
    """The rows of every block as one GeoDataFrame ordered by ``tile_id``."""
    if not frames:
        return gpd.GeoDataFrame({TILE_ID: []}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    frame = gpd.GeoDataFrame(frame, geometry=frames[0].geometry.name, crs=crs)
    return frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)


__all__ = ["DatasetSink", "LayerSink", "beside", "check_output", "concat", "open_sink"]
