"""``hqrs-geo serve-search LAYER``: a long-lived search session speaking JSON lines.

One request per line on stdin, one response per line on stdout (flushed). Requests:

    {"id": 1, "text": "a river with a bridge", "k": 10}
    {"id": 2, "text": ["harbour", "boats"], "bbox": [x0, y0, x1, y1], "bbox_crs": "EPSG:4326"}
    {"id": 3, "similar": ["scene_r0001_c0002"], "negative": ["scene_r0000_c0000"], "k": 5}
    {"id": 4, "near": [5.0, 51.8], "distance": 200, "text": "parking"}
    {"id": 5, "op": "ping"}            {"op": "quit"}

Responses: ``{"id": 1, "results": [{"tile_id": …, "score": …, "rank": 1, "bounds": [...]}, …],
"seconds": 0.012}``; a bad request gets ``{"id": …, "error": "one line"}`` and the session
goes on. The first line written is ``{"ready": true, …}`` once the layer, matrix and model
are loaded.

The ready message: ``layer`` (the path served), ``model`` (the model that made the embeddings),
``tiles`` (tiles with an embedding), ``crs`` (the CRS of every footprint and ``bounds``:
``"EPSG:28992"``, or WKT when it has no authority code; null when unknown), ``kind``
(``"layer"`` or ``"dataset"``), ``embeddings`` (the key of the searched column ``emb_<key>``)
and, for a dataset, ``parts``. Each result: ``tile_id``, ``score``, ``rank``, ``bounds``
(``[minx, miny, maxx, maxy]`` in ``crs``), ``wkt`` (the footprint), ``source`` (the raster
GDAL opens) and ``window`` (``[x_off, y_off, width, height]``: the tile's pixels in it, e.g. for
thumbnails or chips), ``caption`` when the tile has one, and ``part`` (its part file) for a
dataset. Clients ignore keys they do not know: later versions only add keys.

Several layers, one model: any request may carry ``"layer": PATH`` (a tile layer file or a
dataset folder); it is answered on that layer, opened on first use and kept open, and the
session's model (loaded once) serves every layer whose embeddings it made; a layer embedded by
another model is refused (``open it in its own session``). Without ``layer``, the layer named
on the command line. ``{"op": "open", "layer": PATH}`` answers ``{"opened": {…}}`` (the ready
message's fields for that layer), ``{"op": "close", "layer": PATH}`` ``{"closed": PATH}``.
The ready / opened message also holds ``score_scale`` ``{"none": a, "good": b}``: cosine scores
of this model at or below ``none`` mean no real match, at or above ``good`` a strong one
(:func:`hqrs_geo.models.registry.score_scale`).

Few-shot detection (:mod:`.fewshot`)::

    {"id": 7, "op": "detect", "positive": ["t1", "t2"], "negative": ["t9"], "method": "logistic",
     "k": 1000, "threshold": 0.5}

fits a light classifier on the labelled tiles' embeddings and scores every tile (the spatial keys
apply); the answer's ``results`` carry ``score`` (the probability, 0..1) and ``label`` (the
tile's own training label: 1, -1 or null), at most ``k`` (default 1000) at or above
``threshold`` (default 0.5), and ``detector``: ``method``, ``positives``, ``negatives``,
``background`` (unlabelled tiles drawn as weak negatives), ``tiles`` (scored), ``above`` (at or
over the threshold), ``threshold``, ``fit_seconds``, ``score_seconds``. Labels are kept with the
layer: ``{"op": "save_labels", "positive": [...], "negative": [...], "name": "…"}`` answers
``{"saved": n}``, ``{"op": "labels"}`` ``{"positive": [...], "negative": [...], "name": …}``.

Every line gets exactly one answer, blank and malformed ones included; the session ends only at
end of input or ``{"op": "quit"}``, never on a bad request. :func:`parse_request` is the one
validator: a JSON object of at most :data:`MAX_LINE` bytes and nesting depth
:data:`MAX_DEPTH`, known keys only, ``k`` a whole number (not ``true``, not ``2.5``) in
1..:data:`MAX_K`, finite numbers, texts and tile ids as a string or a list of strings
(``"similar": "scene_r0001_c0002"`` is one id).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from pyproj import CRS

from ..errors import HqrsError, OptionError
from ..models.registry import score_scale
from . import fewshot
from .fewshot import METHODS
from .session import BaseSession
from .sessions import open_session
from .spatial import SpatialFilter

MAX_LINE = 1 << 20  # bytes of one request line
MAX_DEPTH = 32  # nesting of JSON arrays/objects in one request
MAX_K = 10_000
MAX_ITEMS = 1_000  # texts, tile ids or image paths in one request
MAX_TEXT = 10_000  # characters of one text, id or path
OPS = ("search", "ping", "quit", "open", "close", "detect", "save_labels", "labels")
KEYS = {"id", "op", "text", "template", "k", "similar", "negative", "similar_images", "negative_images",
        "negative_weight", "bbox", "bbox_crs", "within", "near", "near_crs", "distance", "layer", "positive",
        "method", "threshold", "name"}
DETECT_K = 1000  # default k of a detect request


class RequestError(HqrsError):
    """A request line that cannot be answered (its message goes back as ``error``, with the
    request's ``id`` when it had a usable one)."""

    request_id: Any = None


@dataclass
class Request:
    """A validated request."""

    id: Any = None
    op: str = "search"
    text: list[str] = field(default_factory=list)
    template: bool = True
    k: int = 20
    similar: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    similar_images: list[str] = field(default_factory=list)
    negative_images: list[str] = field(default_factory=list)
    negative_weight: float = 0.5
    spatial: SpatialFilter = field(default_factory=SpatialFilter)
    layer: str | None = None
    positive: list[str] = field(default_factory=list)
    method: str = "logistic"
    threshold: float = 0.5
    name: str | None = None


def _depth(text: str) -> int:
    """Deepest nesting of brackets outside strings (checked before parsing, so no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _strings(request: dict, key: str) -> list[str]:
    value = request.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise RequestError(f"'{key}' must be a string or a list of strings")
    if len(items) > MAX_ITEMS or any(len(v) > MAX_TEXT for v in items):
        raise RequestError(f"'{key}' is too long (at most {MAX_ITEMS} items of {MAX_TEXT} characters)")
    return items


def _number(request: dict, key: str, low: float, high: float, default: Any = None) -> Any:
    value = request.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(f"'{key}' must be a number in {low:g}..{high:g}, not {json.dumps(value)[:40]}")
    return float(value)


def _numbers(request: dict, key: str, count: int) -> tuple[float, ...] | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise RequestError(f"'{key}' must be a list of {count} finite numbers")
    return tuple(float(v) for v in value)


def _crs_text(request: dict, key: str, default: str | None) -> str | None:
    value = request.get(key, default)
    if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT):
        raise RequestError(f"'{key}' must be a CRS string such as \"EPSG:4326\"")
    return value


def parse_request(line: str) -> Request:
    """The one validator of ``serve-search`` requests: a :class:`Request` from one line, or a
    :class:`RequestError` whose message says what is wrong (blank lines included)."""
    if not line.strip():
        raise RequestError("empty request; send one JSON object per line, e.g. {\"id\": 1, \"text\": \"river\"}")
    if len(line) > MAX_LINE:
        raise RequestError(f"request longer than {MAX_LINE} bytes")
    if _depth(line) > MAX_DEPTH:
        raise RequestError(f"request nested deeper than {MAX_DEPTH} levels")
    try:
        raw = json.loads(line, parse_constant=lambda name: math.nan)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. an integer of 10,000 digits
        raise RequestError(f"not a usable JSON request ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise RequestError("each request must be a JSON object")
    request_id = raw.get("id")
    if not (request_id is None or isinstance(request_id, (str, int)) and not isinstance(request_id, bool)
            and len(str(request_id)) <= 200):
        raise RequestError("'id' must be a string or a whole number")
    try:
        return _validated(raw, request_id)
    except RequestError as exc:
        exc.request_id = request_id
        raise


def _validated(raw: dict, request_id: Any) -> Request:
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise RequestError(f"unknown key '{str(unknown[0])[:40]}'; known keys: {', '.join(sorted(KEYS))}")
    op = raw.get("op", "search")
    if op not in OPS:
        raise RequestError(f"'op' must be one of {', '.join(OPS)}")
    k = raw.get("k", DETECT_K if op == "detect" else 20)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise RequestError(f"'k' must be a whole number in 1..{MAX_K}, not {json.dumps(k)[:40]}")
    template = raw.get("template", True)
    if not isinstance(template, bool):
        raise RequestError("'template' must be true or false")
    within = raw.get("within")
    if within is not None and (not isinstance(within, str) or not within.strip() or len(within) > MAX_TEXT):
        raise RequestError("'within' must be the path of a polygon layer")
    layer = raw.get("layer")
    if layer is not None and (not isinstance(layer, str) or not layer.strip() or len(layer) > MAX_TEXT):
        raise RequestError("'layer' must be the path of a tile layer file or dataset folder")
    if op in ("open", "close") and layer is None:
        raise RequestError(f"'{op}' needs 'layer': the path of a tile layer file or dataset folder")
    method = raw.get("method", "logistic")
    if method not in METHODS:
        raise RequestError(f"'method' must be one of {', '.join(METHODS)}, not {json.dumps(method)[:40]}")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise RequestError("'name' must be a text of at most 200 characters")
    spatial = SpatialFilter(
        bbox=_numbers(raw, "bbox", 4), bbox_crs=_crs_text(raw, "bbox_crs", None), within=within,  # type: ignore[arg-type]
        near=_numbers(raw, "near", 2), near_crs=_crs_text(raw, "near_crs", "EPSG:4326") or "EPSG:4326",  # type: ignore[arg-type]
        distance=_number(raw, "distance", 0, 1e8))
    request = Request(
        id=request_id, op=op, text=[t for t in _strings(raw, "text") if t.strip()], template=template, k=k,
        similar=_strings(raw, "similar"), negative=_strings(raw, "negative"),
        similar_images=_strings(raw, "similar_images"), negative_images=_strings(raw, "negative_images"),
        negative_weight=_number(raw, "negative_weight", 0, 10, 0.5), spatial=spatial, layer=layer,
        positive=_strings(raw, "positive"), method=method, threshold=_number(raw, "threshold", 0, 1, 0.5), name=name)
    if op == "search" and not (request.text or request.similar or request.similar_images):
        raise RequestError("request needs 'text' or 'similar' (tile ids) or 'similar_images'")
    if op == "detect" and not request.positive:
        raise RequestError("'detect' needs 'positive': at least one tile id of what to find")
    both = set(request.positive) & set(request.negative) if op in ("detect", "save_labels") else set()
    if both:
        raise RequestError(f"tile {sorted(both)[0][:80]!r} is both positive and negative; keep it in one list")
    return request


def _layer_key(path: str) -> str:
    return os.path.realpath(path)


class Sessions:
    """The layers one serve-search process answers on: the command line's, and every layer opened
    by a request's ``layer``, all served by the first session's model (loaded once)."""

    def __init__(self, first: Any, opener: Any = None):
        self.first = first
        self.opened: dict[str, Any] = {_layer_key(first.layer): first}
        self._opener = opener

    def _open(self, path: str) -> Any:
        first = self.first
        options = {"checkpoint": first.checkpoint, "device": first.device, "use_ann": bool(first.use_ann),
                   "trust_checkpoint": first.trust_checkpoint}
        ours = first.source
        try:
            session = open_session(path, model=ours.model, **options)
        except OptionError as exc:
            if "not comparable" not in str(exc):
                raise
            try:
                theirs = open_session(path, **options).source.model
            except HqrsError:
                theirs = "other models"
            raise RequestError(f"{path} was embedded with {theirs}; this session serves {ours.model}: "
                               "open it in its own session") from None
        if ours.sha256 and session.source.sha256 and ours.sha256 != session.source.sha256:
            raise RequestError(f"{path} was embedded with {session.source.model} (weights "
                               f"{session.source.sha256[:12]}); this session serves {ours.model} (weights "
                               f"{ours.sha256[:12]}): open it in its own session")
        session._model = first._model  # the one model of this session (loaded once)
        return session

    def get(self, layer: str | None) -> Any:
        """The session of ``layer`` (the command line's when None), opened on first use and again
        when its file changed since."""
        if layer is None:
            return self.first
        key = _layer_key(layer)
        session = self.opened.get(key)
        if session is not None and session.changed():
            session = None  # rewritten since (embedded again, …): read it anew
        if session is None:
            session = self._open(layer)
            self.opened[key] = session
        return session

    def close(self, layer: str) -> str:
        """Forget an opened layer (the command line's stays: it holds the model)."""
        key = _layer_key(layer)
        if key != _layer_key(self.first.layer):
            self.opened.pop(key, None)
        return layer


def answer(session: Any, request: Request | dict) -> dict:
    """The response object for one request (raises HqrsError for bad requests); ``session``: a
    search session or :class:`Sessions`."""
    if isinstance(request, dict):
        request = parse_request(json.dumps(request))
    if request.op == "ping":
        return {"pong": True}
    sessions = session if isinstance(session, Sessions) else Sessions(session)
    if request.op == "close":
        assert request.layer is not None
        return {"closed": sessions.close(request.layer)}
    session = sessions.get(request.layer)
    if request.op == "open":
        message = ready_message(session)
        del message["ready"]
        return {"opened": message}
    if request.op in ("detect", "save_labels", "labels"):
        return _fewshot(session, request)
    if request.similar or request.similar_images:
        results = session.search_similar(
            positive_ids=request.similar, negative_ids=request.negative, positive_images=request.similar_images,
            negative_images=request.negative_images, negative_weight=request.negative_weight, k=request.k,
            spatial=request.spatial)
    else:
        results = session.search_text(request.text, k=request.k, spatial=request.spatial, template=request.template)
    return {"results": [_result(row) for row in results.to_dict("records")]}


def _fewshot(session: Any, request: Request) -> dict:
    """The answer of a ``detect``, ``save_labels`` or ``labels`` request."""
    if request.op == "labels":
        return fewshot.saved_labels(session.layer)
    if request.op == "save_labels":
        return {"saved": fewshot.save_labels(session, request.positive, request.negative, request.name)}
    frame, detection = fewshot.detect(session, request.positive, request.negative, request.method, request.k,
                                      request.threshold, request.spatial)
    results = []
    for row in frame.to_dict("records"):
        out = _result(row)
        out["label"] = row.get("train_label")
        results.append(out)
    return {"results": results, "detector": detection.summary()}


WINDOW = ("x_off", "y_off", "width", "height")


def _result(row: dict) -> dict:
    """One result object (see the module docstring) from a result row."""
    geometry = row["geometry"]
    out: dict[str, Any] = {"tile_id": str(row["tile_id"]), "score": round(float(row["score"]), 6),
                           "rank": int(row["rank"]), "bounds": [float(v) for v in geometry.bounds],
                           "wkt": geometry.wkt}
    if isinstance(row.get("part"), str):
        out["part"] = row["part"]
    if isinstance(row.get("source"), str):
        out["source"] = row["source"]
    if all(_whole(row.get(name)) for name in WINDOW):
        out["window"] = [int(row[name]) for name in WINDOW]
    caption = row.get("caption")
    if isinstance(caption, str) and caption:
        out["caption"] = caption
    return out


def _whole(value: Any) -> bool:
    """A finite number (of a window column; missing values read as NaN or None)."""
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def crs_text(crs: Any) -> str | None:
    """A CRS as ``AUTHORITY:CODE`` when it has one, else WKT; None when unknown."""
    if crs is None:
        return None
    try:
        parsed = CRS.from_user_input(crs)
    except Exception:  # pyproj raises CRSError and others for strings it cannot read
        return str(crs)
    authority = parsed.to_authority(min_confidence=90)
    return ":".join(authority) if authority else parsed.to_wkt()


def ready_message(session: BaseSession) -> dict:
    """The first line of a session: what is served (see the module docstring)."""
    described = session.describe()
    message = {"ready": True, "layer": session.layer, "model": session.source.model, "tiles": int(session.index.n),
               "crs": crs_text(session.crs), "kind": described.pop("kind"), "embeddings": session.source.key,
               **described, "score_scale": score_scale(session.source.model)}
    return message


def _read_line(stdin: TextIO) -> str | None:
    """One line of at most :data:`MAX_LINE` characters; None at end of input. A longer line is
    skipped to its end and stands as a line of :data:`MAX_LINE` + 1 characters (refused later)."""
    line = stdin.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE and not line.endswith("\n"):
        while True:  # skip the rest of the over-long line
            rest = stdin.readline(MAX_LINE)
            if not rest or rest.endswith("\n"):
                break
        return "\0" * (MAX_LINE + 1)
    return line


def serve(session: Any, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Answer requests until end of input or ``{"op": "quit"}``; returns the number answered.

    Every line gets one answer; a bad request (or a failure while answering it) gets an
    ``error`` object and the session goes on.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def send(obj: dict) -> None:
        stdout.write(json.dumps(obj, allow_nan=False, default=str) + "\n")
        stdout.flush()

    send(ready_message(session))
    sessions = Sessions(session)
    answered = 0
    while True:
        line = _read_line(stdin)
        if line is None:
            break
        start = time.perf_counter()
        request_id = None
        try:
            request = parse_request(line)
            request_id = request.id
            if request.op == "quit":
                send({"id": request_id, "bye": True})
                break
            response = answer(sessions, request)
        except HqrsError as exc:
            request_id = request_id if request_id is not None else getattr(exc, "request_id", None)
            response = {"error": " ".join(str(exc).split())}
        except (MemoryError, RecursionError) as exc:
            response = {"error": f"request too large to answer ({type(exc).__name__})"}
        except Exception as exc:  # an internal bug must not end the session
            response = {"error": f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
        try:
            send({"id": request_id, **response, "seconds": round(time.perf_counter() - start, 4)})
        except ValueError:  # a value JSON cannot carry (NaN score): say so instead
            send({"id": request_id, "error": "the answer holds values JSON cannot carry (NaN)"})
        answered += 1
    return answered
