"""The plugin's settings (QgsSettings ``hqrs_geo/<name>``): one table of names, defaults and types.

Every setting reaches the engine: the interpreter runs it; model, caption model, checkpoint,
device, batch size, tile size (pixels or metres), overlap and resolution are the defaults of the
Processing algorithms' parameters (:mod:`..processing.params`); device and checkpoint are also
passed to the dock's search sessions. :data:`notifier` emits ``changed(names)`` when settings are
saved, so search sessions restart with the new values.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from qgis.core import QgsSettings
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .registry import DEFAULT_CLIP, DEFAULT_COCA

GROUP = "hqrs_geo"
# every device a setting may name; the settings dialog offers only those the engine reports
DEVICES = ("auto", "cpu", "cuda", "mps") if sys.platform == "darwin" else ("auto", "cpu", "cuda")
TILE_UNITS = ("px", "m")

# name -> default (its type is the setting's type)
DEFAULTS: dict[str, Any] = {
    "interpreter": "",        # the engine's Python; '' = the engine the plugin installed, else QGIS's Python
    "model": DEFAULT_CLIP,    # embedding model (Embed tiles, Tile + embed + caption)
    "caption_model": DEFAULT_COCA,
    "checkpoint": "",         # weights file of the embedding model (default: the engine's checkpoint cache)
    "device": "auto",
    "batch_size": 32,
    "tile_size": 256.0,       # in tile_unit
    "tile_unit": "px",
    "overlap": 0.0,           # percent of the tile size
    "gsd": 0.0,               # resample to this ground resolution (m/px); 0: native
    "heatmap": False,         # the dock's score heat map
}

# settings that change what a running search session does (it restarts when they change)
SESSION_SETTINGS = ("interpreter", "model", "device", "checkpoint")


def key(name: str) -> str:
    """The QgsSettings key of a setting."""
    return f"{GROUP}/{name}"


def value(name: str) -> Any:
    """A setting with its documented default and type ('' or an unreadable value gives the default)."""
    default = DEFAULTS[name]
    raw = QgsSettings().value(key(name), default)
    if raw in (None, ""):
        return default
    try:
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
        return type(default)(raw)
    except (TypeError, ValueError):
        return default


def values(names: Iterable[str] = ()) -> dict[str, Any]:
    """Several settings at once (all when ``names`` is empty)."""
    return {name: value(name) for name in (list(names) or DEFAULTS)}


class SettingsNotifier(QObject):
    """Emits ``changed(names)`` after :func:`set_values` stored different values."""

    changed = pyqtSignal(list)


notifier = SettingsNotifier()


def set_values(new: dict[str, Any]) -> list[str]:
    """Store settings; returns (and announces) the names whose value changed."""
    settings = QgsSettings()
    changed = []
    for name, val in new.items():
        if name not in DEFAULTS:
            raise KeyError(f"unknown HQRS setting {name}")
        if value(name) != val:
            changed.append(name)
        settings.setValue(key(name), val)
    if changed:
        notifier.changed.emit(changed)
    return changed


def set_value(name: str, val: Any) -> list[str]:
    """Store one setting (see :func:`set_values`)."""
    return set_values({name: val})
