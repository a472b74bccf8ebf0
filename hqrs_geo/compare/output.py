"""Where the change layer goes: one layer file (written once, atomically, at the end), or, for a
BEFORE dataset, a dataset folder written part by part as the BEFORE parts are compared (each
part atomically, then the manifest), so memory stays that of one part."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd

from ..errors import OptionError
from ..layer.columns import TILE_ID
from ..layer.dataset import Manifest, is_dataset, open_manifest, part_path, write_part
from ..layer.io import write_tiles


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
        if not before.dataset:
            raise OptionError(f"{output}: a folder output needs a dataset as «before»; write the change layer of "
                              "tile layers or rasters to a file (.gpkg, .parquet, .fgb)", option="output")
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


__all__ = ["DatasetSink", "LayerSink", "concat"]
