"""Where scenes come from: files, globs and folders expanded into raster paths, and the short
unique name (scene key) each scene's tiles are named after."""
from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..safe_paths import safe_stem

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".png", ".jpg", ".jpeg")
_GLOB_CHARS = set("*?[")


NETWORK_PREFIXES = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift")


def is_gdal_virtual(path: str) -> bool:
    """True for GDAL virtual file system paths (``/vsicurl/…``, ``/vsizip/…``)."""
    return str(path).startswith("/vsi")


def is_network(path: str) -> bool:
    """True for GDAL paths read over the network (``/vsicurl/…``, ``/vsis3/…``, …)."""
    return str(path).startswith(NETWORK_PREFIXES)


def shown(text: str, limit: int = 200) -> str:
    """``text`` shortened for an error line (a path or pattern thousands of characters long)."""
    return text if len(text) <= limit else f"{text[:limit - 50]}…{text[-40:]}"


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Expand paths, globs and folders into an ordered, de-duplicated list of raster paths."""
    found: list[str] = []
    for item in inputs:
        text = str(item)
        if is_gdal_virtual(text):
            found.append(text)
        elif _GLOB_CHARS & set(text):
            matches = sorted(m for m in glob.glob(text, recursive=True) if os.path.isfile(m))
            if not matches:
                raise InputError(f"no files match {shown(text)!r}: check the pattern (quote it in the shell)")
            found.extend(os.path.abspath(m) for m in matches)
        elif os.path.isdir(text):
            matches = sorted(
                str(p) for p in Path(text).rglob("*")
                if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES
            )
            if not matches:
                raise InputError(
                    f"no rasters in folder {shown(text)}: expected files ending in {', '.join(RASTER_SUFFIXES)}"
                )
            found.extend(os.path.abspath(m) for m in matches)
        elif not os.path.exists(text):
            raise InputError(f"{shown(text)}: file not found; check the path")
        else:
            found.append(os.path.abspath(text))
    if not found:
        raise InputError("no input rasters given")
    return list(dict.fromkeys(found))


def scene_keys(paths: Sequence[str], names: dict[str, str | None] | None = None) -> dict[str, str]:
    """Short, stable, unique names for scenes: ``names[path]`` when given (a STAC item id), else
    the file stem, made safe for file names; a path hash is added on clashes."""
    names = names or {}
    stems = {p: safe_stem(names.get(p) or Path(p).stem) for p in paths}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {
        p: stem if counts[stem] == 1 else f"{stem}-{hashlib.sha1(p.encode()).hexdigest()[:6]}"
        for p, stem in stems.items()
    }
