"""FlatGeobuf tile layers (``.fgb``): the tiles in the file, the run records in a sidecar
``<file>.hqrs.json``, attribute tables as ``<file>.<name>.csv`` beside it; written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyogrio

from ..atomic import atomic_path, write_text
from ..errors import InputError
from .formats import TILES_LAYER, PathLike, feature_check, first_line, write_sidecar_tables
from .runs import LayerRuns, parse_json


def sidecar_path(path: PathLike) -> Path:
    """The run-record sidecar of a FlatGeobuf layer (``<file>.hqrs.json``)."""
    return Path(f"{path}.hqrs.json")


def read_fgb(path: PathLike) -> Any:
    """The features of the FlatGeobuf file ``path`` (GeoDataFrame, as stored)."""
    try:
        return pyogrio.read_dataframe(path)
    except Exception as exc:  # pyogrio raises many types for foreign files
        raise InputError(f"{path}: cannot read layer {TILES_LAYER!r} ({first_line(exc)})") from None


def read_fgb_runs(path: PathLike) -> LayerRuns:
    """The run records of the FlatGeobuf layer ``path`` (its sidecar; empty when it has none)."""
    sidecar = sidecar_path(path)
    return LayerRuns(parse_json(sidecar.read_text(), sidecar) if sidecar.exists() else [], path)


def write_fgb(path: PathLike, frame: Any, runs: list[dict], tables: dict | None = None) -> None:
    """Write ``frame`` to the FlatGeobuf file ``path`` atomically (checked to hold every feature),
    then its run records to the sidecar and ``tables`` beside it."""
    def count(tmp: Path) -> int:
        return int(pyogrio.read_info(tmp)["features"])

    write_sidecar_tables(path, tables or {})
    with atomic_path(path, copy_existing=False, verify=feature_check(len(frame), count)) as tmp:
        pyogrio.write_dataframe(frame, tmp, driver="FlatGeobuf", geometry_type="Polygon", use_arrow=True)
        write_text(sidecar_path(path), json.dumps(runs, indent=1))


__all__ = ["read_fgb", "read_fgb_runs", "sidecar_path", "write_fgb"]
