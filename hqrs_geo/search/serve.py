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
"""
from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from ..errors import HqrsError
from .session import SearchSession
from .spatial import SpatialFilter


def _filter(request: dict) -> SpatialFilter:
    return SpatialFilter(
        bbox=tuple(request["bbox"]) if request.get("bbox") else None, bbox_crs=request.get("bbox_crs"),
        within=request.get("within"), near=tuple(request["near"]) if request.get("near") else None,
        near_crs=request.get("near_crs", "EPSG:4326"), distance=request.get("distance"),
    )


def answer(session: SearchSession, request: dict) -> dict:
    """The response object for one request (raises HqrsError for bad requests)."""
    op = request.get("op", "search")
    if op == "ping":
        return {"pong": True}
    k = int(request.get("k", 20))
    spatial = _filter(request)
    if request.get("similar") or request.get("similar_images"):
        results = session.search_similar(
            positive_ids=request.get("similar") or (), negative_ids=request.get("negative") or (),
            positive_images=request.get("similar_images") or (), negative_images=request.get("negative_images") or (),
            negative_weight=float(request.get("negative_weight", 0.5)), k=k, spatial=spatial)
    elif request.get("text"):
        results = session.search_text(request["text"], k=k, spatial=spatial, template=request.get("template", True))
    else:
        raise HqrsError("request needs 'text' or 'similar' (tile ids)")
    return {"results": [
        {"tile_id": r.tile_id, "score": round(float(r.score), 6), "rank": int(r.rank),
         "bounds": list(r.geometry.bounds)}
        for r in results.itertuples()
    ]}


def serve(session: SearchSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Answer requests until end of input or ``{"op": "quit"}``; returns the number answered."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def send(obj: dict) -> None:
        stdout.write(json.dumps(obj) + "\n")
        stdout.flush()

    send({"ready": True, "layer": session.layer, "model": session.source.model, "tiles": len(session.index.ids)})
    answered = 0
    for line in stdin:
        if not line.strip():
            continue
        start = time.perf_counter()
        request_id = None
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise HqrsError("each request must be a JSON object")
            request_id = request.get("id")
            if request.get("op") == "quit":
                send({"id": request_id, "bye": True})
                break
            response = answer(session, request)
        except json.JSONDecodeError as exc:
            response = {"error": f"not JSON: {exc.msg} at column {exc.colno}"}
        except HqrsError as exc:
            response = {"error": str(exc)}
        except (TypeError, ValueError, KeyError) as exc:
            response = {"error": f"bad request: {type(exc).__name__}: {exc}"}
        send({"id": request_id, **response, "seconds": round(time.perf_counter() - start, 4)})
        answered += 1
    return answered
