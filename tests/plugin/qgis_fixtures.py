"""What the plugin's QGIS tests share: the QGIS application, Processing with the HQRS provider,
no engine installed elsewhere, waiting on the event loop, a stand-in QGIS window for the search
dock, Processing feedback that keeps what the algorithms said, the example scene tiled and embedded
with the tiny CLIP, and an XYZ server of real imagery on 127.0.0.1. Import the fixtures by name."""
from __future__ import annotations

import io
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from conftest import EXAMPLE_SCENE
from http_helpers import send_body
from PIL import Image
from rasterio.transform import from_bounds
from rasterio.warp import Resampling, reproject
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo.engine.options import RunOptions

pytest.importorskip("qgis.core")
from qgis.core import QgsApplication, QgsProcessingFeedback  # noqa: E402
from qgis.gui import QgsMapCanvas, QgsMessageBar  # noqa: E402
from qgis.PyQt import sip  # noqa: E402
from qgis.PyQt.QtWidgets import QAction  # noqa: E402

from qgis_plugin.core import sessions, settings  # noqa: E402
from qgis_plugin.processing.provider import HqrsProvider  # noqa: E402


def qgis_app() -> QgsApplication:
    """The QGIS application (one per process), initialised; keep the reference while QGIS is in use
    (the one that made it deletes the application with it)."""
    app = QgsApplication.instance() or QgsApplication([], False)
    app.initQgis()
    return app


@pytest.fixture(scope="module")
def qgis() -> Iterator[QgsApplication]:
    """The QGIS application; the module's search sessions are closed after."""
    yield qgis_app()
    sessions.close_all()


@pytest.fixture(scope="module")
def processing_run() -> Iterator[Any]:
    """QGIS with Processing initialised and the HQRS provider registered; yields ``processing.run``.

    The engine is this test venv's interpreter, set explicitly (never an engine found elsewhere)."""
    app = qgis_app()  # held: the application lives as long as this reference (the first one made here)
    settings.set_value("interpreter", sys.executable)
    from processing.core.Processing import Processing

    Processing.initialize()
    import processing

    registry = QgsApplication.processingRegistry()
    provider = None
    if registry.providerById("hqrs") is None:
        provider = HqrsProvider()
        assert registry.addProvider(provider)
    yield processing.run
    sessions.close_all()
    settings.set_value("interpreter", "")
    if provider is not None:
        registry.removeProvider(provider)
    del app


@pytest.fixture(autouse=True)
def no_installed_engine(tmp_path, monkeypatch):
    """The engine is this test process's Python (no engine the plugin installed elsewhere): every
    test of a module that imports this fixture."""
    monkeypatch.setenv("HQRS_GEO_ENGINE_DIR", str(tmp_path / "no-engine"))


def wait_for(predicate: Callable[[], Any], timeout: float = 180.0) -> float:
    """Process events until ``predicate()``; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("timed out")
        QgsApplication.processEvents()
        time.sleep(0.01)
    return time.monotonic() - started


class IfaceStandIn:
    """The parts of QgisInterface the dock uses."""

    def __init__(self):
        self.canvas = QgsMapCanvas()
        self.canvas.resize(400, 400)
        self.bar = QgsMessageBar()
        self.map_tips = QAction("Show map tips")
        self.map_tips.setCheckable(True)

    def mapCanvas(self):  # noqa: N802 - QGIS API name
        return self.canvas

    def messageBar(self):  # noqa: N802
        return self.bar

    def actionMapTips(self):  # noqa: N802
        return self.map_tips


def new_dock(show_canvas: bool = False, show_dock: bool = False):
    """A search dock on a stand-in QGIS window (``dock.iface_stand_in``); show its map canvas or
    the dock itself for tests that click them."""
    from qgis_plugin.widgets.dock import SearchDock

    iface = IfaceStandIn()
    dock = SearchDock(iface)
    dock.iface_stand_in = iface
    if show_canvas:
        iface.canvas.show()
    if show_dock:
        dock.show()
    return dock


def close_dock(dock) -> None:
    """Clear, unload and delete a dock (as the plugin does on unload)."""
    dock.clear_results()
    dock.unload()
    # searches that were cancelled (or replaced by a newer one) end in the background: their
    # callbacks must not find the dock deleted
    wait_for(lambda: QgsApplication.taskManager().countActiveTasks() == 0, 60)
    QgsApplication.processEvents()
    # delete the widgets now, not at interpreter exit: a combo box popup that was shown, or a message
    # bar item with a timeout, crash it then
    iface = dock.iface_stand_in
    iface.bar.clearWidgets()
    for item in (dock, iface.bar, iface.canvas):
        sip.delete(item)


def embedded_example(path: Path, checkpoint: Path, tile_size: int = 250, **options: Any) -> Path:
    """The example scene tiled at ``tile_size`` px into ``path`` (250: 16 tiles, 125: 64) and embedded
    with the tiny CLIP of ``checkpoint`` in this process (``options``: more :class:`RunOptions`)."""
    hg.tile(EXAMPLE_SCENE, path, hg.TileConfig(tile_size=tile_size))
    hg.embed(path, model=TINY_CLIP, checkpoint=str(checkpoint), device="cpu", options=RunOptions(workers=0, **options))
    return path


class Recorder(QgsProcessingFeedback):
    """Feedback that keeps command lines, infos and progress texts."""

    def __init__(self):
        super().__init__()
        self.commands, self.infos, self.texts = [], [], []

    def pushCommandInfo(self, info):  # noqa: N802 - QGIS API
        self.commands.append(info)

    def pushInfo(self, info):  # noqa: N802
        self.infos.append(info)

    def setProgressText(self, text):  # noqa: N802
        self.texts.append(text)


# an XYZ server of real imagery -----------------------------------------------------------------
SCENE_BOUNDS = (127375.0, 428000.0, 127625.0, 428250.0)  # the example scene, EPSG:28992


def extent_string(x0, y0, x1, y1, crs="EPSG:28992") -> str:
    """A Processing extent parameter's text."""
    return f"{x0!r},{x1!r},{y0!r},{y1!r} [{crs}]"


class TileHandler(BaseHTTPRequestHandler):
    """``/<run>/{z}/{x}/{y}.png``: the example GeoTIFF warped into the web-mercator tile (PNG). The
    ``<run>`` part is new for each server, so tiles in Qt's disk cache (which outlives the tests)
    from an earlier server on the same port are never used."""

    requests = 0

    def do_GET(self):  # noqa: N802 - http.server API
        try:
            z, x, y = (int(part) for part in self.path.strip("/").split(".")[0].split("/")[-3:])
        except ValueError:
            self.send_error(404)
            return
        TileHandler.requests += 1
        size = 20037508.342789244
        span = 2 * size / 2 ** z
        x0, y1 = -size + x * span, size - y * span
        rgba = np.zeros((4, 256, 256), np.uint8)
        with rasterio.open(EXAMPLE_SCENE) as src:
            for band in range(3):
                reproject(rasterio.band(src, band + 1), rgba[band], dst_transform=from_bounds(
                    x0, y1 - span, x0 + span, y1, 256, 256), dst_crs="EPSG:3857", resampling=Resampling.bilinear)
        rgba[3] = np.where(rgba[:3].any(axis=0), 255, 0)
        buffer = io.BytesIO()
        Image.fromarray(np.moveaxis(rgba, 0, -1), "RGBA").save(buffer, "PNG")
        send_body(self, 200, buffer.getvalue(), "image/png")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def xyz_server() -> Iterator[str]:
    """The base URL of an XYZ server of the example scene (append ``/{z}/{x}/{y}.png``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), TileHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{uuid.uuid4().hex}"
    server.shutdown()
    server.server_close()
