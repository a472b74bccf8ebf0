"""Catalog inputs: every way of naming scenes, resolved into :class:`SourceEntry` items.

A source is any of

* a raster file, a glob (quoted in the shell) or a folder (searched recursively), as in
  :func:`~hqrs_geo.raster.sources.expand_inputs`;
* a text file of sources (``.txt`` / ``.lst``): one path, URL or glob per line, ``#`` comments,
  relative paths taken from the list's folder;
* a URL of a raster (``https://…/scene.tif``, read with HTTP range requests through GDAL's
  ``/vsicurl/``), a cloud object (``s3://bucket/key`` -> ``/vsis3/``, ``gs://`` -> ``/vsigs/``)
  or any GDAL virtual path (``/vsicurl/…``, ``/vsis3/…``);
* a STAC Item, ItemCollection, Catalog or Collection JSON (local file or URL, read with pystac,
  the ``scale`` extra): each item gives one scene, its asset ``asset`` (default: the visual/RGB
  one), filtered by ``bbox`` (WGS 84 lon/lat) and ``datetime`` (``2021-06-01``,
  ``2021-01-01/2021-12-31``, open ends as ``..``).

Each entry keeps what GDAL opens (``path``), where the scene was found (``url``: the URL, or
the absolute path of a local file) and its STAC item id; tiles record the last two in the
columns ``source_url`` and ``stac_item`` (:mod:`hqrs_geo.layer.columns`). Scene keys (the
prefix of tile ids) are the item id for STAC items and the file stem otherwise.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import HqrsError, InputError, OptionError
from .sources import is_gdal_virtual, is_network, scene_keys

LIST_SUFFIXES = (".txt", ".lst")
STAC_SUFFIXES = (".json", ".geojson")
#: Asset keys tried, in order, when no asset is named.
DEFAULT_ASSETS = ("visual", "rgb", "image", "data")
RASTER_MEDIA = ("image/tiff", "image/vnd.stac.geotiff", "image/jp2", "application/x-vrt")
_CLOUD = {"s3://": "/vsis3/", "gs://": "/vsigs/", "az://": "/vsiaz/"}

#: GDAL settings for remote reads (set only when the user has not set them). Directory listing is
#: turned off per network open (:func:`hqrs_geo.raster.scene.open_dataset`), not process-wide, so
#: local scenes keep their sidecars (``.msk``, ``.aux.xml``, world files).
REMOTE_DEFAULTS = {
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
    "GDAL_HTTP_TIMEOUT": "120",
}


def remote_defaults() -> None:
    """Set GDAL's network options for COG reads (retries, timeouts)
    unless the environment already sets them; child processes inherit them."""
    for name, value in REMOTE_DEFAULTS.items():
        os.environ.setdefault(name, value)


@dataclass(frozen=True)
class SourceEntry:
    """One scene to read: what GDAL opens, where it was found, its STAC item, its key."""

    path: str
    url: str
    item: str | None = None
    key: str = ""

    @property
    def remote(self) -> bool:
        """True when the scene is read over the network."""
        return is_network(self.path)

    def as_dict(self) -> dict:
        """JSON form (the dataset manifest keeps one per scene)."""
        return {"path": self.path, "url": self.url, "item": self.item, "key": self.key}


@dataclass(frozen=True)
class SourceFilter:
    """Choices applied to STAC inputs: the asset key and the bbox/datetime filters."""

    asset: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None

    def validated(self) -> SourceFilter:
        """Check the values (one-line OptionError)."""
        if self.bbox is not None:
            box = tuple(float(v) for v in self.bbox)
            if len(box) != 4 or not box[0] <= box[2] or not box[1] <= box[3]:
                raise OptionError(f"invalid bbox {self.bbox!r}: give min_lon,min_lat,max_lon,max_lat", option="bbox")
        if self.datetime is not None:
            datetime_range(self.datetime)
        return self

    @property
    def active(self) -> bool:
        """True when an item filter is set."""
        return self.bbox is not None or self.datetime is not None


def gdal_path(text: str) -> str:
    """The path GDAL opens for a URL or path (``https://x`` -> ``/vsicurl/https://x``)."""
    if text.startswith(("http://", "https://")):
        return f"/vsicurl/{text}"
    for prefix, vsi in _CLOUD.items():
        if text.startswith(prefix):
            return vsi + text[len(prefix):]
    return text


def source_url(path: str) -> str:
    """Where a scene lives, as a URL for remote scenes (``/vsis3/b/k`` -> ``s3://b/k``), else the path."""
    if path.startswith("/vsicurl/"):
        return path[len("/vsicurl/"):]
    for prefix, vsi in _CLOUD.items():
        if path.startswith(vsi):
            return prefix + path[len(vsi):]
    return path


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://", *_CLOUD))


def _is_stac(text: str) -> bool:
    name = text.split("?", 1)[0].lower()
    return name.endswith(STAC_SUFFIXES)


def _is_list(text: str) -> bool:
    return not _is_url(text) and text.lower().endswith(LIST_SUFFIXES) and os.path.isfile(text)


def _parse_instant(text: str, end: bool) -> datetime | None:
    text = text.strip()
    if text in ("", ".."):
        return None
    try:
        if len(text) == 10:  # a date: the whole day
            day = datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
            return day + timedelta(days=1) - timedelta(microseconds=1) if end else day
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise OptionError(f"invalid datetime {text!r}: use e.g. 2021-06-01, 2021-06-01T10:00:00Z or "
                          "2021-01-01/2021-12-31 ('..' for an open end)", option="datetime") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def datetime_range(text: str) -> tuple[datetime | None, datetime | None]:
    """``(start, end)`` of a STAC-style datetime filter (either may be None: open)."""
    parts = text.split("/")
    if len(parts) == 1:
        return _parse_instant(parts[0], False), _parse_instant(parts[0], True)
    if len(parts) != 2:
        raise OptionError(f"invalid datetime {text!r}: use START/END", option="datetime")
    start, end = _parse_instant(parts[0], False), _parse_instant(parts[1], True)
    if start and end and start > end:
        raise OptionError(f"invalid datetime {text!r}: the start is after the end", option="datetime")
    return start, end


def _item_matches(item: Any, flt: SourceFilter) -> bool:
    if flt.bbox is not None:
        box = item.bbox
        if not box:
            return False
        b = flt.bbox
        if box[0] > b[2] or box[2] < b[0] or box[1] > b[3] or box[3] < b[1]:
            return False
    if flt.datetime is not None:
        start, end = datetime_range(flt.datetime)
        props = item.properties
        first = item.datetime or _parse_instant(str(props.get("start_datetime") or ""), False)
        last = item.datetime or _parse_instant(str(props.get("end_datetime") or ""), True)
        first, last = first or last, last or first
        if first is None or last is None:
            return False
        first = first if first.tzinfo else first.replace(tzinfo=timezone.utc)
        last = last if last.tzinfo else last.replace(tzinfo=timezone.utc)
        if (end is not None and first > end) or (start is not None and last < start):
            return False
    return True


def choose_asset(item: Any, key: str | None) -> Any:
    """The asset of a STAC item to read: ``key``, else the visual/RGB one."""
    assets = item.assets
    if key is not None:
        if key not in assets:
            raise InputError(f"STAC item {item.id}: has no asset {key!r} (it has: {', '.join(assets) or 'none'}); "
                             "choose one with «asset»")
        return assets[key]
    for name in DEFAULT_ASSETS:
        if name in assets:
            return assets[name]
    visual = [a for a in assets.values() if "visual" in (a.roles or [])]
    if len(visual) == 1:
        return visual[0]
    rasters = [a for a in assets.values() if (a.media_type or "").split(";")[0].strip() in RASTER_MEDIA
               or (a.href or "").lower().split("?")[0].endswith((".tif", ".tiff", ".jp2", ".vrt"))]
    if len(rasters) == 1:
        return rasters[0]
    raise InputError(f"STAC item {item.id}: no visual asset and {len(rasters)} raster assets "
                     f"({', '.join(assets) or 'none'}); choose one with «asset»")


def _read_json(href: str) -> dict:
    try:
        if _is_url(href):
            import pystac

            data = pystac.StacIO.default().read_json(href)
        else:
            data = json.loads(Path(href).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{href}: cannot read STAC JSON ({reason}); check the path or URL") from None
    except Exception as exc:  # pystac's StacIO raises urllib's errors and its own
        raise InputError(f"{href}: cannot read STAC JSON ({type(exc).__name__}: {exc}); check the URL") from None
    if not isinstance(data, dict):
        raise InputError(f"{href}: not a STAC Item, ItemCollection or Catalog (JSON is not an object)")
    return data


def _stac_items(href: str) -> Iterator[Any]:
    """The items of a STAC JSON document (Item, ItemCollection, Catalog or Collection)."""
    try:
        import pystac
    except ImportError:
        raise InputError(f"{href}: reading STAC needs pystac; pip install 'hqrs_geo[scale]'") from None
    data = _read_json(href)
    kind = data.get("type")
    location = href if _is_url(href) else os.path.abspath(href)
    try:
        if kind == "Feature":
            yield pystac.Item.from_dict(data, href=location, preserve_dict=False)
        elif kind == "FeatureCollection":
            for feature in data.get("features", []):
                item = pystac.Item.from_dict(feature, preserve_dict=False)
                if item.get_self_href() is None:
                    item.set_self_href(location)
                yield item
        elif kind in ("Catalog", "Collection"):
            root = pystac.read_dict(data, href=location)
            yield from root.get_items(recursive=True)  # type: ignore[attr-defined]
        else:
            raise InputError(f"{href}: not a STAC Item, ItemCollection or Catalog (type {kind!r})")
    except HqrsError:
        raise
    except Exception as exc:  # pystac raises many types on broken catalogs
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{href}: cannot read STAC catalog ({reason})") from None


def _asset_href(item: Any, asset: Any) -> str:
    href = asset.get_absolute_href() or asset.href
    if not _is_url(href) and not os.path.isabs(href):
        base = item.get_self_href()
        if base and _is_url(base):
            from urllib.parse import urljoin

            return urljoin(base, href)
        if base:
            return os.path.normpath(os.path.join(os.path.dirname(base), href))
    return href


def _stac_entries(href: str, flt: SourceFilter) -> list[SourceEntry]:
    out = []
    for item in _stac_items(href):
        if not _item_matches(item, flt):
            continue
        url = _asset_href(item, choose_asset(item, flt.asset))
        if url.startswith("file://"):
            url = url[len("file://"):]
        path = gdal_path(url)
        out.append(SourceEntry(path=path, url=url if _is_url(url) else os.path.abspath(url), item=item.id))
    return out


def _list_lines(path: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(path))
    lines = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the list of sources ({exc}); give a text file, one source a line") \
            from None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not (_is_url(line) or is_gdal_virtual(line) or os.path.isabs(line)):
            line = os.path.join(folder, line)
        lines.append(line)
    if not lines:
        raise InputError(f"{path}: the list of sources is empty; give one path or URL a line")
    return lines


def _resolve(items: Iterable[Any], flt: SourceFilter, depth: int = 0) -> Iterator[SourceEntry]:
    from .sources import expand_inputs

    for item in items:
        if isinstance(item, SourceEntry):
            yield item
            continue
        text = str(item)
        if _is_stac(text):
            yield from _stac_entries(text, flt)
        elif _is_list(text):
            if depth > 4:
                raise InputError(f"{text}: lists of sources nest too deep")
            yield from _resolve(_list_lines(text), flt, depth + 1)
        elif _is_url(text) or is_gdal_virtual(text):
            path = gdal_path(text)
            yield SourceEntry(path=path, url=source_url(path))
        else:
            for path in expand_inputs([text]):
                yield SourceEntry(path=path, url=path)


def resolve_sources(inputs: Sequence[Any] | str | os.PathLike, flt: SourceFilter | None = None) -> list[SourceEntry]:
    """Every scene named by ``inputs`` (paths, globs, folders, lists, URLs, STAC documents or
    entries already resolved), in order, de-duplicated, each with its unique scene key."""
    if isinstance(inputs, (str, os.PathLike, SourceEntry)):
        inputs = [inputs]
    flt = (flt or SourceFilter()).validated()
    if flt.active and not any(isinstance(i, str | os.PathLike) and _is_stac(str(i)) for i in inputs) \
            and not any(isinstance(i, str) and _is_list(i) for i in inputs):
        raise OptionError("bbox and datetime filter STAC items, and no STAC input was given; "
                          "remove the filter or give a STAC Item, ItemCollection or Catalog",
                          option="bbox" if flt.bbox is not None else "datetime")
    entries: dict[str, SourceEntry] = {}
    for entry in _resolve(inputs, flt):
        entries.setdefault(entry.path, entry)
    if not entries:
        raise InputError("no input rasters: the sources (after the STAC filters) name no scene")
    if any(e.remote for e in entries.values()):
        remote_defaults()
    missing = [e for e in entries.values() if not e.key]
    names = {e.path: _safe_name(e.item) if e.item else None for e in missing}
    keys = scene_keys([e.path for e in missing], names)
    resolved = [e if e.key else SourceEntry(e.path, e.url, e.item, keys[e.path]) for e in entries.values()]
    return resolved


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)
