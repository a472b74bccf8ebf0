"""The base of every HQRS Processing algorithm: identity, the engine run, layer paths, outputs.

Algorithms never import ``hqrs_geo``: they build a ``hqrs-geo`` command line and run it out of
process through :mod:`.engine`, so the engine's environment (torch, CUDA, its own GDAL) can
differ from QGIS' and can never take QGIS down.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from qgis.core import (
    QgsMapLayer,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingUtils,
    QgsProviderRegistry,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication, QThread
from qgis.PyQt.QtGui import QIcon

from . import engine

ICON = Path(__file__).with_name("icon.png")
TILES_LAYER = "tiles"
TILE_LAYER_SUFFIXES = (".gpkg", ".parquet", ".geoparquet", ".fgb")
_OGR_DESTINATION = re.compile(r"^ogr:dbname='(?P<path>.*)' table=\"(?P<table>[^\"]*)\"")

# interpreters that passed engine_problem() in this QGIS session (failures are never cached,
# so installing the engine takes effect on the next run)
_ENGINE_READY: Set[str] = set()


def tr(text: str) -> str:
    """Translate ``text`` in the HQRS Processing context."""
    return QCoreApplication.translate("HqrsProcessing", text)


def layer_uri(path: str, layer_name: str = TILES_LAYER) -> str:
    """``path|layername=NAME`` for GeoPackages (several layers per file), else ``path``."""
    return f"{path}|layername={layer_name}" if path.lower().endswith(".gpkg") else path


def split_destination(destination: str) -> Tuple[str, Optional[str]]:
    """File path and table of a vector destination (a path or an ``ogr:dbname='…' table="…"`` URI)."""
    match = _OGR_DESTINATION.match(destination)
    if match:
        return match.group("path"), match.group("table") or None
    return destination, None


def slug(text: str, limit: int = 40) -> str:
    """A layer-name-safe lower-case form of ``text`` (as the CLI names result layers)."""
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")[:limit]


def cli_option(flag: str, value: str) -> str:
    """``--flag=value`` in one argument, so values starting with ``-`` are not taken for options."""
    return f"{flag}={value}"


def ensure_engine(feedback: QgsProcessingFeedback) -> str:
    """The interpreter to run the engine with; raises the one-line install message when it cannot."""
    python = engine.interpreter()
    if python not in _ENGINE_READY:
        feedback.pushInfo(tr("Checking the HQRS engine in {}").format(python))
        problem = engine.engine_problem(python)
        if problem:
            raise QgsProcessingException(problem)
        _ENGINE_READY.add(python)
    return python


class HqrsAlgorithm(QgsProcessingAlgorithm):
    """Common base: identity from class attributes, the CLI run with progress and cancel, paths.

    Subclasses set ``NAME``, ``DISPLAY``, ``GROUP`` (display), ``GROUP_ID`` and ``HELP``.
    """

    NAME = ""
    DISPLAY = ""
    GROUP = ""
    GROUP_ID = ""
    HELP = ""

    def __init__(self) -> None:
        super().__init__()
        self._reload: List[QgsMapLayer] = []

    # identity ----------------------------------------------------------------------------
    def createInstance(self) -> "HqrsAlgorithm":  # noqa: N802 - QGIS API name
        """A fresh instance of the same algorithm (Processing runs copies)."""
        return type(self)()

    def name(self) -> str:
        """The algorithm id within the provider (``hqrs:<name>``)."""
        return self.NAME

    def displayName(self) -> str:  # noqa: N802
        """The name shown in the toolbox."""
        return tr(self.DISPLAY)

    def group(self) -> str:
        """The toolbox group shown."""
        return tr(self.GROUP)

    def groupId(self) -> str:  # noqa: N802
        """The toolbox group id."""
        return self.GROUP_ID

    def shortHelpString(self) -> str:  # noqa: N802
        """Help shown beside the parameters."""
        return tr(self.HELP)

    def icon(self) -> QIcon:
        """The HQRS icon."""
        return QIcon(str(ICON))

    # inputs ------------------------------------------------------------------------------
    def raster_path(self, parameters: Dict[str, Any], name: str, context: QgsProcessingContext) -> str:
        """The file (or GDAL data source) of a raster layer parameter."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(tr("HQRS: no raster layer given for {}").format(name))
        return self.gdal_path(layer)

    @staticmethod
    def gdal_path(layer: QgsMapLayer) -> str:
        """The GDAL data source of a raster layer; only GDAL rasters can be read by the engine."""
        if layer.providerType() != "gdal":
            raise QgsProcessingException(
                tr("HQRS: {} is not a GDAL raster (provider {}); save it as a GeoTIFF first")
                .format(layer.name(), layer.providerType()))
        parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
        return str(parts.get("path") or layer.source())

    def tile_layer_path(self, layer: Optional[QgsMapLayer], feedback: QgsProcessingFeedback) -> str:
        """The file of a tile layer (GeoPackage, GeoParquet, FlatGeobuf made by ``Tile raster``)."""
        if not isinstance(layer, QgsVectorLayer):
            raise QgsProcessingException(tr("HQRS: no tile layer given"))
        parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
        path = str(parts.get("path") or "")
        if layer.providerType() != "ogr" or Path(path).suffix.lower() not in TILE_LAYER_SUFFIXES \
                or not os.path.isfile(path):
            raise QgsProcessingException(
                tr("HQRS: {} is not a tile layer file (GeoPackage, GeoParquet or FlatGeobuf); "
                   "make one with 'Tile raster' first").format(layer.name()))
        sublayer = parts.get("layerName") or None
        if sublayer and sublayer != TILES_LAYER:
            feedback.pushInfo(tr("Using the '{}' layer of {}").format(TILES_LAYER, path))
        return path

    def input_tile_layer(self, parameters: Dict[str, Any], name: str, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> str:
        """The file of the tile layer parameter ``name``; remembers the layer to reload it after."""
        layer = self.parameterAsVectorLayer(parameters, name, context)
        path = self.tile_layer_path(layer, feedback)
        self._reload.append(layer)
        return path

    def optional_number(self, parameters: Dict[str, Any], name: str,
                        context: QgsProcessingContext) -> Optional[float]:
        """The value of an optional number parameter, or None when it is not set."""
        if parameters.get(name) in (None, ""):
            return None
        return self.parameterAsDouble(parameters, name, context)

    def optional_text(self, parameters: Dict[str, Any], name: str, context: QgsProcessingContext) -> str:
        """A string parameter's value stripped ('' when unset)."""
        if parameters.get(name) is None:
            return ""
        return (self.parameterAsString(parameters, name, context) or "").strip()

    # running -----------------------------------------------------------------------------
    def processAlgorithm(self, parameters: Dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: Optional[QgsProcessingFeedback]) -> Dict[str, Any]:
        """Check the engine first (the one-line install message when it is missing), then :meth:`process`."""
        feedback = feedback or QgsProcessingFeedback()
        ensure_engine(feedback)
        return self.process(parameters, context, feedback)

    def process(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Evaluate the parameters, run the engine and return the outputs (in subclasses)."""
        raise NotImplementedError

    def run_engine(self, args: List[str], feedback: QgsProcessingFeedback) -> dict:
        """Run ``hqrs-geo ARGS`` with progress and cancel; returns the CLI's final progress event.

        Raises QgsProcessingException with the install message, ``cancelled …`` or the CLI's
        one-line error.
        """
        python = ensure_engine(feedback)
        args = [str(a) for a in args]
        feedback.pushCommandInfo(" ".join(shlex.quote(a) for a in [python, "-m", "hqrs_geo", *args]))
        last = {"text": ""}

        def on_progress(percent: float, message: str) -> None:
            feedback.setProgress(percent)
            if message and message != last["text"]:
                last["text"] = message
                feedback.setProgressText(message)

        result = engine.run_cli(args, on_progress, feedback.isCanceled, python=python)
        if result.cancelled:  # the CLI's own message says what was kept (e.g. finished model batches)
            detail = (result.error or "").partition("cancelled; ")[2] \
                or tr("outputs were left as they were before this run")
            raise QgsProcessingException(tr("cancelled: HQRS {} stopped; {}").format(self.NAME, detail))
        if not result.ok:
            if "No module named" in (result.error or ""):  # the engine went away since it was checked
                _ENGINE_READY.discard(python)
                problem = engine.engine_problem(python)
                if problem:
                    raise QgsProcessingException(problem)
            raise QgsProcessingException(f"hqrs-geo: error: {result.error}")
        summary = result.final.get("message") if result.final else ""
        if summary:
            feedback.pushInfo(summary)
        feedback.setProgress(100)
        return result.final

    # outputs -----------------------------------------------------------------------------
    @staticmethod
    def load_output(context: QgsProcessingContext, registered: str, uri: str, name: str,
                    output: str = "OUTPUT", always: bool = False) -> None:
        """Make Processing load ``uri`` where it would have loaded ``registered`` (the plain file).

        ``always``: load it even though Processing did not ask (an output left unset that the
        algorithm placed itself).
        """
        layers = context.layersToLoadOnCompletion()
        if registered and registered in layers:
            details = layers.pop(registered)
            layers[uri] = details
            context.setLayersToLoadOnCompletion(layers)
        elif always and context.project() is not None:
            context.addLayerToLoadOnCompletion(
                uri, QgsProcessingContext.LayerDetails(name, context.project(), output,
                                                       QgsProcessingUtils.LayerHint.Vector))

    def postProcessAlgorithm(self, context: QgsProcessingContext,  # noqa: N802
                             feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Reload input layers the engine updated on disk (new fields), in their own thread."""
        for layer in self._reload:
            try:
                if layer is not None and layer.thread() == QThread.currentThread():
                    layer.reload()
                    layer.triggerRepaint()
            except RuntimeError:  # the layer was deleted meanwhile
                pass
        self._reload = []
        return {}
