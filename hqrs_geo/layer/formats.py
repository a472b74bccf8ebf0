"""What the three layer file formats share: the driver of a file by its extension, the check of
a written file, the file state a read remembers, and attribute tables beside a single-layer file.

The formats themselves: :mod:`hqrs_geo.layer.gpkg` (GeoPackage, the default),
:mod:`hqrs_geo.layer.parquet` (GeoParquet, ``.parquet``), :mod:`hqrs_geo.layer.flatgeobuf`
(FlatGeobuf, ``.fgb``).
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Union

from ..atomic import check_nonempty
from ..errors import OutputError
from ..safe_paths import file_name, frame_to_csv

FORMATS = {".gpkg": "GPKG", ".parquet": "Parquet", ".geoparquet": "Parquet", ".fgb": "FlatGeobuf"}
TILES_LAYER = "tiles"
PathLike = Union[str, "os.PathLike[str]"]


def file_format(path: PathLike) -> str:
    """The driver of the layer file ``path`` by its extension (``GPKG``, ``Parquet``,
    ``FlatGeobuf``); a one-line :class:`OutputError` for other extensions."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise OutputError(f"{path}: unsupported layer format {suffix or '(none)'!r}; use .gpkg, .parquet or .fgb")
    return FORMATS[suffix]


def file_state(path: PathLike) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of a file as it is now (None when it is missing): a layer read
    is reused while its file keeps this state."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def feature_check(rows: int, count: Callable[[Path], int]) -> Callable[[Path], None]:
    """A check of a written layer file for :func:`hqrs_geo.atomic.atomic_path`: it is not empty,
    ``count`` (the format's reader of its feature count) opens it, and it holds ``rows`` features."""
    def verify(tmp: Path) -> None:
        check_nonempty(tmp)
        try:
            found = count(tmp)
        except Exception as exc:  # pyogrio/pyarrow raise many types for damaged files
            raise OSError(errno.EIO, f"the written file cannot be read back ({str(exc).splitlines()[0][:120]})") \
                from None
        if found != rows:
            raise OSError(errno.EIO, f"the written file holds {found} features instead of {rows}")
    return verify


def write_sidecar_tables(path: PathLike, tables: dict) -> None:
    """Attribute tables ``{name: DataFrame}`` of a single-layer file, each written atomically as
    ``<file>.<name>.csv`` beside it."""
    for name, table in tables.items():
        frame_to_csv(Path(f"{path}.{file_name(str(name), 'table name')}.csv"), table)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (readers' errors are one line)."""
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["FORMATS", "TILES_LAYER", "feature_check", "file_format", "file_state", "first_line",
           "write_sidecar_tables"]
