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

Credentials are never part of an entry's ``path`` or ``url``: a user name and password or a
query-string token (``?token=``, ``?sig=``, ``X-Amz-*``…) in a URL the user gives, or in a STAC
asset's href, is stripped (:func:`hqrs_geo.redact.public_url`); the URL with its credentials is
kept in memory only and used by the read itself (:func:`hqrs_geo.raster.scene.open_dataset`).

A STAC document read over the network may only point at network assets (http(s), ``s3://``,
``gs://``, ``az://``, ``/vsicurl/``…) and network links, never at local files, unless
``allow_local_assets`` is set. Network reads (STAC JSON, rasters) keep to the limits of
:mod:`hqrs_geo.raster.network`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from pyproj import CRS

from ..errors import HqrsError, InputError, OptionError
from ..redact import public_url, redact, remember
from .network import apply_gdal_options, fetch
from .scene import describe, open_raster
from .sources import expand_inputs, is_gdal_virtual, is_network, scene_keys

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst")
STAC_SUFFIXES = (".json", ".geojson")
#: Asset keys tried, in order, when no asset is named.
DEFAULT_ASSETS = ("visual", "rgb", "image", "data")
RASTER_MEDIA = ("image/tiff", "image/vnd.stac.geotiff", "image/jp2", "application/x-vrt")
_CLOUD = {"s3://": "/vsis3/", "gs://": "/vsigs/", "az://": "/vsiaz/"}

def remote_defaults() -> None:
    """Set GDAL's network options (timeouts, retries) from the network limits
    (:mod:`hqrs_geo.raster.network`); child processes inherit them."""
    apply_gdal_options()


@dataclass(frozen=True)
class SourceEntry:
    """One scene to read: what GDAL opens (``path``), where it was found (``url``), its STAC item,
    its key; for STAC items also the catalog it came from (``catalog``), its WGS 84 ``bbox`` and
    its CRS when the item states it (projection extension).

    ``path`` and ``url`` never hold credentials. ``real``, when set, is the path to open with
    them: it is not shown (repr), compared or written (:meth:`as_dict`); it travels with the entry
    to other processes (pickle) and is kept there in memory only (:func:`hqrs_geo.redact.remember`).
    """

    path: str
    url: str
    item: str | None = None
    key: str = ""
    catalog: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    crs: str | None = None
    real: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.real:
            remember(self.path, self.real)

    def __reduce__(self) -> tuple:  # rebuilt through __init__: the credentials are remembered there too
        return (SourceEntry, (self.path, self.url, self.item, self.key, self.catalog, self.bbox, self.crs,
                              self.real))

    def with_key(self, key: str) -> SourceEntry:
        """The same entry with scene key ``key``."""
        return SourceEntry(self.path, self.url, self.item, key, self.catalog, self.bbox, self.crs, self.real)

    @property
    def remote(self) -> bool:
        """True when the scene is read over the network."""
        return is_network(self.path)

    def as_dict(self) -> dict:
        """JSON form (without credentials)."""
        return {"path": self.path, "url": self.url, "item": self.item, "key": self.key,
                **({"catalog": self.catalog} if self.catalog else {})}


def entry_for(path: str, url: str | None = None, **facts: Any) -> SourceEntry:
    """The entry of a GDAL ``path`` (which may hold credentials): public path and URL, with the
    credentials kept in memory for the read."""
    public = public_url(path)
    return SourceEntry(path=public, url=public_url(url) if url is not None else source_url(public),
                       real=path if public != path else None, **facts)


@dataclass(frozen=True)
class SourceFilter:
    """Choices applied to STAC inputs: the asset key, the bbox/datetime filters, whether a
    catalog read over the network may point at local files (``allow_local_assets``), and whether
    a dataset keeps the parts of items since removed from their catalog (``keep_removed``)."""

    asset: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None
    allow_local_assets: bool = False
    keep_removed: bool = False

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


def _bbox2d(item: Any) -> tuple[float, float, float, float] | None:
    """An item's bbox as (min lon, min lat, max lon, max lat); None when it has no usable one."""
    box = item.bbox
    if not isinstance(box, (list, tuple)) or len(box) not in (4, 6) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None
    if len(box) == 6:  # 3-D: min x, y, z, max x, y, z
        box = [box[0], box[1], box[3], box[4]]
    return float(box[0]), float(box[1]), float(box[2]), float(box[3])


def _item_matches(item: Any, flt: SourceFilter) -> bool:
    if flt.bbox is not None:
        box = _bbox2d(item)
        if box is None:
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


def _read_text(href: str) -> str:
    """A STAC document's text: over HTTP(S) within the network limits, else from a local file."""
    if href.startswith(("http://", "https://")):
        data = fetch(href)
    elif _is_url(href):
        raise InputError(f"{public_url(href)}: STAC documents are read over http(s) or from local files; "
                         "give an https:// URL of the catalog")
    else:
        data = Path(href.removeprefix("file://")).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{public_url(href)}: not a STAC document (not UTF-8 text)") from None


def _read_json(href: str) -> dict:
    try:
        data = json.loads(_read_text(href))
    except HqrsError:
        raise
    except RecursionError:
        raise InputError(f"{public_url(href)}: the JSON nests too deep to be a STAC document") from None
    except (OSError, ValueError) as exc:
        reason = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise InputError(f"{public_url(href)}: cannot read STAC JSON ({reason}); check the path or URL") from None
    if not isinstance(data, dict):
        raise InputError(f"{public_url(href)}: not a STAC Item, ItemCollection or Catalog (JSON is not an object)")
    return data


def _stac_io(root: str, allow_local: bool) -> Any:
    """A pystac StacIO that reads links within the network limits and, for a catalog read over the
    network (``root``), refuses links to local files unless ``allow_local``."""
    import pystac

    remote = _is_url(root)

    class GuardedStacIO(pystac.StacIO):
        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            href = str(os.fspath(source))
            if remote and not allow_local and not _is_url(href):
                raise InputError(f"{public_url(root)}: links to the local file {href}; a catalog read over the "
                                 "network may only point at http(s) or cloud locations (allow local files with "
                                 "«allow_local_assets» if you trust it)")
            return _read_text(href)

        def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
            raise InputError("STAC catalogs are only read here")

    return GuardedStacIO()


@contextmanager
def _default_stac_io(io: Any) -> Iterator[None]:
    """The default StacIO of pystac set to ``io`` while a catalog's links are followed."""
    import pystac

    previous = pystac.StacIO._default_io
    pystac.StacIO.set_default(lambda: io)
    try:
        yield
    finally:
        pystac.StacIO._default_io = previous


def _stac_items(href: str, allow_local: bool = False) -> Iterator[Any]:
    """The items of a STAC JSON document (Item, ItemCollection, Catalog or Collection)."""
    try:
        import pystac
    except ImportError:
        raise InputError(f"{public_url(href)}: reading STAC needs pystac; pip install 'hqrs_geo[scale]'") from None
    data = _read_json(href)
    kind = data.get("type")
    location = href if _is_url(href) else os.path.abspath(href)
    shown = public_url(href)
    io = _stac_io(href, allow_local)
    try:
        with _default_stac_io(io):
            if kind == "Feature":
                yield pystac.Item.from_dict(data, href=location, preserve_dict=False)
            elif kind == "FeatureCollection":
                features = data.get("features")
                if not isinstance(features, list):
                    raise InputError(f"{shown}: an ItemCollection without a list of features")
                for feature in features:
                    if not isinstance(feature, dict) or feature.get("type") != "Feature":
                        raise InputError(f"{shown}: a feature of the ItemCollection is not a STAC Item")
                    item = pystac.Item.from_dict(feature, preserve_dict=False)
                    if item.get_self_href() is None:
                        item.set_self_href(location)
                    yield item
            elif kind in ("Catalog", "Collection"):
                root = pystac.read_dict(data, href=location, stac_io=io)
                for item in root.get_items(recursive=True):  # type: ignore[attr-defined]
                    if not isinstance(item, pystac.Item):
                        where = public_url(item.get_self_href() or "?") if hasattr(item, "get_self_href") else "?"
                        raise InputError(f"{shown}: an 'item' link points at a {type(item).__name__} ({where}), not "
                                         "an Item; fix the link (rel 'child' for catalogs and collections)")
                    yield item
            else:
                raise InputError(f"{shown}: not a STAC Item, ItemCollection or Catalog (type {kind!r})")
    except HqrsError:
        raise
    except Exception as exc:  # pystac raises many types on broken catalogs
        cause: BaseException | None = exc
        while cause is not None:  # pystac wraps what our StacIO raised (a refused link, a timeout)
            if isinstance(cause, HqrsError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        if isinstance(exc, RecursionError):
            raise InputError(f"{shown}: cannot read STAC catalog (its links form a cycle or nest too deep)") from None
        reason = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        if isinstance(exc, KeyError):
            reason = f"a required key is missing: {reason}"
        raise InputError(f"{shown}: cannot read STAC catalog ({reason})") from None


def _asset_href(item: Any, asset: Any) -> str:
    if (asset.href or "").startswith("file://"):
        return asset.href
    href = asset.get_absolute_href() or asset.href
    if not _is_url(href) and not os.path.isabs(href):
        base = item.get_self_href()
        if base and _is_url(base):
            return urljoin(base, href)
        if base:
            return os.path.normpath(os.path.join(os.path.dirname(base), href))
    return href


def _item_crs(item: Any, asset: Any) -> str | None:
    """The CRS an item or its asset states (STAC projection extension), if any."""
    for props in (getattr(asset, "extra_fields", None) or {}, item.properties or {}):
        if not isinstance(props, dict):
            continue
        code, epsg = props.get("proj:code"), props.get("proj:epsg")
        if isinstance(code, str) and code.count(":") == 1 and all(code.split(":")):
            return code
        if isinstance(epsg, int) and not isinstance(epsg, bool) and epsg > 0:
            return f"EPSG:{epsg}"
    return None


def _stac_entries(href: str, flt: SourceFilter, members: dict[str, set[str]] | None = None) -> list[SourceEntry]:
    """The entries of the items of ``href`` that pass the filters; ``members`` gets the ids of all
    its items (filtered or not) under the catalog's public href."""
    out = []
    catalog = public_url(href if _is_url(href) else os.path.abspath(href))
    ids = members.setdefault(catalog, set()) if members is not None else set()
    remote = _is_url(href)
    for item in _stac_items(href, flt.allow_local_assets):
        if not isinstance(item.id, str) or not item.id.strip():
            raise InputError(f"{public_url(href)}: a STAC item without a text id ({item.id!r}); fix the catalog")
        ids.add(item.id)
        if not _item_matches(item, flt):
            continue
        asset = choose_asset(item, flt.asset)
        url = _asset_href(item, asset)
        local = not (_is_url(url) or is_network(url))
        if remote and local and not flt.allow_local_assets:
            raise InputError(f"STAC item {item.id} of {public_url(href)}: its asset is the local file "
                             f"{public_url(url)}; a catalog read over the network may only point at http(s) or "
                             "cloud assets (allow local files with «allow_local_assets» if you trust it)")
        if url.startswith("file://"):
            url = url[len("file://"):]
        facts = {"item": item.id, "catalog": catalog, "crs": _item_crs(item, asset),
                 "bbox": _bbox2d(item)}
        if local:
            path = os.path.abspath(url)
            out.append(SourceEntry(path=path, url=path, **facts))
        else:
            out.append(entry_for(gdal_path(url), url, **facts))
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


def _resolve(items: Iterable[Any], flt: SourceFilter, members: dict[str, set[str]],
             depth: int = 0) -> Iterator[SourceEntry]:
    for item in items:
        if isinstance(item, SourceEntry):
            yield item
            continue
        text = str(item)
        if _is_stac(text):
            yield from _stac_entries(text, flt, members)
        elif _is_list(text):
            if depth > 4:
                raise InputError(f"{text}: lists of sources nest too deep")
            yield from _resolve(_list_lines(text), flt, members, depth + 1)
        elif _is_url(text) or is_gdal_virtual(text):
            yield entry_for(gdal_path(text))
        else:
            for path in expand_inputs([text]):
                yield SourceEntry(path=path, url=path)


@dataclass
class Resolution:
    """What the sources name: the scenes (``entries``, in order, unique) and, per STAC catalog
    read (its public href), the ids of all its items, filtered or not (``catalogs``)."""

    entries: list[SourceEntry]
    catalogs: dict[str, set[str]] = field(default_factory=dict)


def resolve_catalog(inputs: Sequence[Any] | str | os.PathLike, flt: SourceFilter | None = None) -> Resolution:
    """Like :func:`resolve_sources`, with the item ids of every STAC catalog read (a dataset
    compares them with the items it holds: :func:`removed_scenes`)."""
    if isinstance(inputs, (str, os.PathLike, SourceEntry)):
        inputs = [inputs]
    flt = (flt or SourceFilter()).validated()
    if flt.active and not any(isinstance(i, str | os.PathLike) and _is_stac(str(i)) for i in inputs) \
            and not any(isinstance(i, str) and _is_list(i) for i in inputs):
        raise OptionError("bbox and datetime filter STAC items, and no STAC input was given; "
                          "remove the filter or give a STAC Item, ItemCollection or Catalog",
                          option="bbox" if flt.bbox is not None else "datetime")
    members: dict[str, set[str]] = {}
    entries: dict[str, SourceEntry] = {}
    shared: dict[str, list[str]] = {}
    for entry in _resolve(inputs, flt, members):
        first = entries.setdefault(entry.path, entry)
        if first is not entry and entry.item and entry.item != first.item:
            shared.setdefault(entry.path, [first.item or first.path]).append(entry.item)
    if not entries:
        raise InputError("no input rasters: the sources (after the STAC filters) name no scene")
    for path, items in shared.items():
        log.warning("STAC items %s share one asset (%s): it is read once, as the scene of item %s",
                    ", ".join(items), entries[path].url, items[0])
    if any(e.remote for e in entries.values()):
        remote_defaults()
    missing = [e for e in entries.values() if not e.key]
    names = {e.path: _safe_name(e.item) if e.item else None for e in missing}
    keys = scene_keys([e.path for e in missing], names)
    return Resolution([e if e.key else e.with_key(keys[e.path]) for e in entries.values()], members)


def resolve_sources(inputs: Sequence[Any] | str | os.PathLike, flt: SourceFilter | None = None) -> list[SourceEntry]:
    """Every scene named by ``inputs`` (paths, globs, folders, lists, URLs, STAC documents or
    entries already resolved), in order, de-duplicated, each with its unique scene key. Items
    of STAC catalogs that share one asset are one scene (a warning names them)."""
    return resolve_catalog(inputs, flt).entries


def removed_scenes(scenes: dict[str, dict], catalogs: dict[str, set[str]]) -> list[str]:
    """Keys of a dataset's ``scenes`` (manifest entries with ``catalog`` and ``item``) whose item
    is no longer in its catalog, for the catalogs read now (``catalogs``: see :class:`Resolution`)."""
    return [key for key, scene in scenes.items()
            if isinstance(scene, dict) and scene.get("catalog") in catalogs and scene.get("item")
            and scene["item"] not in catalogs[scene["catalog"]]]


#: The CRS of a dataset whose scenes are in several CRSs (unless the user chooses one).
COMMON_CRS = "EPSG:4326"


def common_crs(entries: Sequence[SourceEntry], sample: int = 20) -> str | None:
    """The CRS that suits all scenes of a new dataset: the scenes' CRS when they share one, else
    :data:`COMMON_CRS` (with a warning: footprints in one distant UTM zone would be distorted);
    None when no scene has a CRS. The CRSs STAC items state are used as they are; up to
    ``sample`` other scenes, spread over the list, are opened."""
    stated = {e.crs for e in entries if e.crs}
    others = [e for e in entries if not e.crs]
    if len(others) > sample:
        step = (len(others) - 1) / (sample - 1)
        others = [others[round(i * step)] for i in range(sample)]
    found: list[str] = list(stated)
    for entry in others:
        try:
            with open_raster(entry.path) as src:
                crs = describe(src).crs
        except (HqrsError, OSError):
            continue
        if crs:
            found.append(crs)
    return suited_crs(found, "dataset")


def suited_crs(crss: Iterable[str], what: str = "layer") -> str | None:
    """The CRS of footprints of scenes in ``crss``: theirs when they share one (the first form
    given), else :data:`COMMON_CRS` with a warning naming them; None when there is none."""
    found = list(dict.fromkeys(c for c in crss if c))
    if len(found) <= 1:
        return next(iter(found), None)

    distinct = set()
    for crs in found:
        try:
            distinct.add(CRS.from_user_input(crs).to_string())
        except Exception:  # pyproj's CRSError and friends: an odd CRS is a CRS of its own here
            distinct.add(crs)
    if len(distinct) == 1:
        return found[0]
    shown = ", ".join(sorted(distinct)[:5]) + (", …" if len(distinct) > 5 else "")
    log.warning("the scenes are in %d CRSs (%s): the %s's footprints are in %s; choose another with «crs»",
                len(distinct), shown, what, COMMON_CRS)
    return COMMON_CRS


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)
