"""Run records: how a tile layer was made (data only; no file is read or written here).

Every job that writes a layer appends one record ``{"run_id", "created", "command",
"version", "layer", "params"}`` (:func:`new_run`). Each format stores them its own way:

* GeoPackage: attribute table ``hqrs_runs`` (``params`` as JSON text; visible in QGIS;
  :mod:`hqrs_geo.layer.gpkg`);
* GeoParquet: the ``hqrs_geo`` key of the file's schema metadata (JSON list;
  :mod:`hqrs_geo.layer.parquet`);
* FlatGeobuf: a sidecar ``<file>.hqrs.json`` (:mod:`hqrs_geo.layer.flatgeobuf`);
* a dataset: its manifest's ``runs`` (:mod:`hqrs_geo.layer.dataset`).

:func:`hqrs_geo.layer.io.read_runs` is the only reader. It returns :class:`LayerRuns`, a list
of the stored records (dicts, as written) with typed accessors for what later steps need: the
scenes' pixel readings (:meth:`LayerRuns.scenes`), the model tasks that wrote each result
column (:meth:`LayerRuns.task_for`, :meth:`LayerRuns.weights_of`) and which model made an
embedding column (:meth:`LayerRuns.embedding_source`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Union

from .._version import __version__
from ..errors import InputError, OptionError
from ..raster.reading import SceneReading
from ..redact import redact_all
from .columns import EMBEDDING_PREFIX, embedding_column, key_of_column

RUN_FIELDS = ("run_id", "created", "command", "version", "layer", "params")
PathLike = Union[str, "os.PathLike[str]"]


def new_run(command: str, layer: str, params: dict) -> dict:
    """A run record for ``params`` (JSON-serialisable) made now by this package version; URLs in
    it lose their credentials and registered secrets are masked (:func:`hqrs_geo.redact.redact_all`)."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "version": __version__,
        "layer": layer,
        "params": redact_all(params),
    }


@dataclass(frozen=True)
class EmbeddingSource:
    """Which model made embedding column ``emb_<key>`` of a layer, as its run record says."""

    key: str
    model: str
    arch: str
    checkpoint: str | None
    sha256: str | None
    template: str

    @property
    def column(self) -> str:
        """The embedding column (``emb_<key>``)."""
        return embedding_column(self.key)


class LayerRuns(list):
    """The run records of one layer, oldest first: stored dicts plus typed accessors."""

    def __init__(self, records: Any = (), path: PathLike | None = None) -> None:
        super().__init__(records)
        self.path = str(path) if path is not None else None

    def scenes(self) -> dict:
        """``{source: SceneReading}``: how each scene's pixels are read (the latest record wins)."""
        out: dict = {}
        for run in self:
            for scene in (run.get("params") or {}).get("scenes", []) or []:
                out[scene["source"]] = SceneReading.from_dict(scene)
        return out

    def tasks(self) -> list[dict]:
        """Every model task recorded (``params.tasks``), oldest first."""
        return [task for run in self for task in (run.get("params") or {}).get("tasks", []) or []]

    def task_for(self, field: str) -> dict | None:
        """The last recorded model task that wrote column ``field`` (None when no record says)."""
        found = None
        for task in self.tasks():
            if task.get("field") == field:
                found = task
        return found

    def weights_of(self, field: str) -> str | None:
        """sha256 of the weights of the last recorded run that wrote ``field``."""
        task = self.task_for(field)
        return task.get("sha256") if task else None

    def labels(self) -> dict:
        """The few-shot labels last saved with the layer (run records ``labels``):
        ``{"positive": [...], "negative": [...], "name": ...}``; empty lists when none were saved."""
        for run in reversed(self):
            if run.get("command") == "labels":
                params = run.get("params") or {}
                return {"positive": [str(t) for t in params.get("positive") or []],
                        "negative": [str(t) for t in params.get("negative") or []], "name": params.get("name")}
        return {"positive": [], "negative": [], "name": None}

    def embedding_source(self, keys: list[str], model: str | None = None) -> EmbeddingSource:
        """The embedding set to search among ``keys`` (the layer's embedding keys): the only one,
        or the one made by ``model`` (a registry name or key). A model that made none of the
        layer's embeddings is refused: vectors of different models are not comparable."""
        where = self.path or "layer"
        if not keys:
            raise InputError(f"{where}: has no embeddings; run 'hqrs-geo embed {where}' first")
        tasks = {}
        for task in self.tasks():
            key = key_of_column(str(task.get("field", "")))
            if key is not None:
                tasks[key] = task
        if model is None:
            if len(keys) > 1:
                raise OptionError(f"{where}: holds embeddings of several models ({', '.join(keys)}); choose one",
                                  option="model")
            key = keys[0]
        else:
            wanted = {model, model.lower()}
            matches = [k for k in keys if k in wanted or tasks.get(k, {}).get("name") in wanted]
            if not matches:
                made_by = ", ".join(tasks[k]["name"] for k in keys if k in tasks) or ", ".join(keys)
                raise OptionError(
                    f"{where}: has no embeddings made by {model} (it has: {made_by}); vectors of different "
                    f"models are not comparable: search with one of those, or embed the layer with {model} first",
                    option="model")
            key = matches[0]
        found = tasks.get(key)
        if found is None:
            raise InputError(f"{where}: no run record says which model made {EMBEDDING_PREFIX}{key}; "
                             "embed the layer again")
        return EmbeddingSource(key=key, model=found["name"], arch=found["arch"], checkpoint=found.get("checkpoint"),
                               sha256=found.get("sha256"), template=found.get("template") or "{}")


def parse_json(text: Any, where: PathLike) -> Any:
    """Stored run records (JSON text or bytes; None: none) as Python values; a one-line
    :class:`InputError` naming ``where`` when they are not valid JSON."""
    try:
        return json.loads(text) if text is not None else {}
    except (TypeError, ValueError):
        raise InputError(f"{where}: its run records are not valid JSON; the file was changed outside hqrs_geo") \
            from None


__all__ = ["RUN_FIELDS", "EmbeddingSource", "LayerRuns", "new_run", "parse_json"]
