"""Names that become paths, and cells that go into CSV files: the one place that makes them safe.

Tile ids, scene stems and chip names come from files a user (or someone else) made, so
anything that turns them into a file name goes through :func:`file_name` (refuses path
separators, ``.``/``..``, control characters and other names that are not one plain file name), and
anything that joins a stored relative path to a folder goes through :func:`inside` (the result
never leaves the folder, symbolic links included). Every CSV file the project writes goes
through :func:`csv_cell` / :func:`write_csv`: a text cell that a spreadsheet would run as a
formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) is written with a
leading ``'``; :func:`csv_uncell` undoes it when hqrs_geo reads its own CSV files back.
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text
from .errors import InputError

#: Longest file name component written (most file systems allow 255 bytes).
MAX_NAME_BYTES = 240
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
_FORMULA = re.compile(r"^'*[=+\-@\t\r]")
_ESCAPED = re.compile(r"^'+[=+\-@\t\r]")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` cannot be used as one plain file name, or None when it can."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if name in (".", ".."):
        return "it is '.' or '..'"
    if _UNSAFE.search(name):
        return "it holds a path separator or a control character"
    if len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        return "it is a reserved device name"
    return None


def file_name(name: str, what: str = "tile id", where: str | os.PathLike | None = None) -> str:
    """``name`` when it is one plain file name (no folder part, no ``..``, no control
    characters); a one-line :class:`InputError` otherwise."""
    reason = unsafe_name_reason(name)
    if reason is not None:
        prefix = f"{where}: " if where is not None else ""
        raise InputError(f"{prefix}{what} {str(name)[:80]!r} cannot be used as a file name ({reason}); "
                         "rename it (tile the raster again) before exporting")
    return name


def inside(folder: str | os.PathLike, relative: str | os.PathLike, what: str = "path",
           allow_absolute: bool = False) -> Path:
    """``folder / relative``, refused with a one-line :class:`InputError` when it would leave
    ``folder`` (``..`` parts, an absolute path, a symbolic link pointing outside).

    ``allow_absolute``: an absolute ``relative`` is returned as it is (inputs that may name any
    file, such as image paths in an open_clip CSV); relative ones must still stay inside.
    """
    text = os.fspath(relative)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InputError(f"{folder}: {what} {text!r} is empty or holds a NUL character; fix the file that names it")
    if os.path.isabs(text):
        if allow_absolute:
            return Path(text)
        raise InputError(f"{folder}: {what} {text[:80]!r} is absolute; it must be relative to {folder}")
    base = Path(folder).resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise InputError(f"{folder}: {what} {text[:80]!r} points outside {folder}; it must stay inside that folder")
    return Path(folder) / text


def safe_stem(stem: str) -> str:
    """A file stem made usable as part of tile ids and file names: spaces, path separators and
    control characters become ``_`` (so tile ids made by hqrs_geo are always plain names)."""
    cleaned = _UNSAFE.sub("_", stem.replace(" ", "_"))
    cleaned = cleaned if cleaned not in ("", ".", "..") else cleaned.replace(".", "_") or "scene"
    return cleaned[:120]


def csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula: text starting with ``= + - @`` (or a
    tab or carriage return) gets a leading ``'``; other values are returned unchanged."""
    if isinstance(value, str) and _FORMULA.match(value):
        return "'" + value
    return value


def csv_uncell(value: str) -> str:
    """Undo :func:`csv_cell` for a cell read back from a CSV file hqrs_geo wrote."""
    return value[1:] if isinstance(value, str) and _ESCAPED.match(value) else value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]], delimiter: str = ",") -> str:
    """CSV text of ``rows`` under ``header``, every cell through :func:`csv_cell`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)  # "\r\n" rows: cells holding \r or \n are quoted
    writer.writerow([csv_cell(h) for h in header])
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically and verified (:func:`hqrs_geo.atomic.write_text`), cells
    neutralised by :func:`csv_cell`."""
    write_text(path, csv_text(header, rows))


def frame_to_csv(path: str | os.PathLike, frame: Any) -> None:
    """Write a DataFrame as CSV (no index) through :func:`write_csv`; numbers stay numbers."""
    rows = frame.itertuples(index=False, name=None)
    write_csv(path, [str(c) for c in frame.columns], ([None if _missing(v) else v for v in row] for row in rows))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


__all__ = ["MAX_NAME_BYTES", "csv_cell", "csv_text", "csv_uncell", "file_name", "frame_to_csv", "inside",
           "safe_stem", "unsafe_name_reason", "write_csv"]
