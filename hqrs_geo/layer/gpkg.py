"""GeoPackage tile layers (the default format): tiles, run records and attribute tables in one
file, read and written atomically.

The tiles are the layer ``tiles`` (or another name for result layers), embeddings BLOBs; the
run records the attribute table ``hqrs_runs`` (``params`` as JSON text, visible in QGIS); extra
tables ``{name: DataFrame}`` attribute tables of their own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyogrio

from ..atomic import atomic_path
from ..errors import InputError
from .formats import TILES_LAYER, PathLike, feature_check, first_line
from .runs import RUN_FIELDS, LayerRuns, parse_json

RUNS_TABLE = "hqrs_runs"


def layer_names(path: PathLike) -> list[str]:
    """The layers (and attribute tables) of the GeoPackage ``path``; a one-line
    :class:`InputError` when it is not a readable GeoPackage."""
    try:
        return [name for name, _ in pyogrio.list_layers(path)]
    except Exception:  # pyogrio raises several types for foreign files
        raise InputError(f"{path}: exists but is not a readable GeoPackage; remove it or choose another output") \
            from None


def read_gpkg(path: PathLike, layer: str = TILES_LAYER) -> Any:
    """The features of ``layer`` of the GeoPackage ``path`` (GeoDataFrame, as stored)."""
    try:
        return pyogrio.read_dataframe(path, layer=layer)
    except Exception as exc:  # pyogrio raises many types for foreign files
        raise InputError(f"{path}: cannot read layer {layer!r} ({first_line(exc)})") from None


def read_gpkg_runs(path: PathLike) -> LayerRuns:
    """The run records of the GeoPackage ``path`` (table ``hqrs_runs``; empty when it has none)."""
    try:
        names = [name for name, _ in pyogrio.list_layers(path)]
        if RUNS_TABLE not in names:
            return LayerRuns(path=path)
        table = pyogrio.read_dataframe(path, layer=RUNS_TABLE)
    except Exception as exc:  # pyogrio raises several types for foreign files
        raise InputError(f"{path}: cannot read its run records ({first_line(exc)}); "
                         "is it a GeoPackage made by hqrs_geo?") from None
    runs = table.to_dict("records")
    for run in runs:
        run["params"] = parse_json(run.get("params"), path)
    return LayerRuns(runs, path)


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """Run records as the ``hqrs_runs`` attribute table (``params`` as JSON text)."""
    return pd.DataFrame([{**r, "params": json.dumps(r["params"], sort_keys=True)} for r in runs],
                        columns=list(RUN_FIELDS))


def write_gpkg(path: PathLike, frame: Any, runs: list[dict], layer: str = TILES_LAYER,
               tables: dict | None = None) -> None:
    """Write ``frame`` as layer ``layer`` of the GeoPackage ``path`` with the run records
    ``runs`` and attribute ``tables``, atomically: the other layers of an existing file are kept,
    and the written file is checked to hold every feature before it replaces the old one."""
    def count(tmp: Path) -> int:
        return int(pyogrio.read_info(tmp, layer=layer)["features"])

    with atomic_path(path, copy_existing=True, verify=feature_check(len(frame), count)) as tmp:
        # through Arrow, so bytes columns (embeddings) become real BLOBs
        pyogrio.write_dataframe(frame, tmp, layer=layer, driver="GPKG", geometry_type="Polygon", use_arrow=True)
        pyogrio.write_dataframe(runs_table(runs), tmp, layer=RUNS_TABLE, driver="GPKG")
        for name, table in (tables or {}).items():
            pyogrio.write_dataframe(table, tmp, layer=name, driver="GPKG")


__all__ = ["RUNS_TABLE", "layer_names", "read_gpkg", "read_gpkg_runs", "runs_table", "write_gpkg"]
