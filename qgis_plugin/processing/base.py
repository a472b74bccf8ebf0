"""The base of every HQRS Processing algorithm: identity, the engine run, layer paths, outputs.

Algorithms never import ``hqrs_geo``: they build a ``hqrs-geo`` command line and run it out of
process through :mod:`..core.runner`, so the engine's environment (torch, CUDA, its own GDAL)
can differ from QGIS' and can never take QGIS down. Searches go through the shared search
sessions of :mod:`..core.sessions` instead, so they reuse a loaded model.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsFeatureRequest,
    QgsMapLayer,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingUtils,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication, QThread
from qgis.PyQt.QtGui import QIcon

from ..core import detections, engine, rasters, styles
from ..core.runner import Progress, run_cli
from ..core.tile_layers import TILES_LAYER, engine_layer_file, not_a_tile_layer, settle_new_layer

ICON = Path(__file__).resolve().parents[1] / "icon.png"
_OGR_DESTINATION = re.compile(r"^ogr:dbname='(?P<path>.*)' table=\"(?P<table>[^\"]*)\"")


def tr(text: str) -> str:
    """Translate ``text`` in the HQRS Processing context."""
    return QCoreApplication.translate("HqrsProcessing", text)


def layer_uri(path: str, layer_name: str = TILES_LAYER) -> str:
    """``path|layername=NAME`` for GeoPackages (several layers per file), else ``path``."""
    return f"{path}|layername={layer_name}" if path.lower().endswith(".gpkg") else path


def split_destination(destination: str) -> tuple[str, str | None]:
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


def ensure_engine(feedback: QgsProcessingFeedback, announce: bool = True) -> str:
    """The interpreter to run the engine with; raises the one-line set-up message when it cannot.
    ``announce``: say which engine and device run the job."""
    python = engine.interpreter()
    info = engine.cached(python)
    if info is None:
        feedback.pushInfo(tr("Checking the HQRS engine in {}").format(python))
        info = engine.probe(python)
        if info.problem is not None:
            raise QgsProcessingException(f"HQRS: {info.problem.text}")
    if announce:
        feedback.pushInfo(tr("HQRS engine: {}").format(info.summary))
    return python


class StylePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Gives a loaded output its name and HQRS style: tile outlines, score-coloured hits on the
    model's ``scale``, zero-shot ``classes`` in the order of ``labels``, few-shot ``detections``
    by probability, or a ``change`` layer graduated at ``threshold`` (the last three above the
    imagery)."""

    def __init__(self, name: str, kind: str, scale: styles.ScoreScale | None = None, labels: Sequence[str] = (),
                 threshold: float | None = None):
        super().__init__()
        self.name, self.kind, self.scale, self.labels, self.threshold = name, kind, scale, tuple(labels), threshold

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,  # noqa: N802 - QGIS API
                         feedback: QgsProcessingFeedback) -> None:
        """Main thread, after the layer was added to the project."""
        if not isinstance(layer, QgsVectorLayer):
            return
        fields = layer.fields()
        if self.kind == "detections":
            if fields.indexOf("detect_prob") >= 0:
                layer.setName(self.name)
                detections.style_detections(layer)
            return
        if self.kind == "change":
            if fields.indexOf("change_score") >= 0:
                layer.setName(self.name)
                settle_new_layer(layer)
                styles.change_style(layer, self.threshold)
                styles.above_imagery(layer, context.project())
                styles.show_feature_counts(layer, context.project())
            return
        layer.setName(self.name)
        if self.kind == "hits" and fields.indexOf("score") >= 0:
            styles.style_hits(layer, scale=self.scale)
        elif self.kind == "classes" and fields.indexOf("label") >= 0:
            styles.style_classes(layer, self.labels)
            project = context.project()  # None: the current project
            styles.replace_classes_layers(layer, project)
            styles.above_imagery(layer, project)
            styles.show_feature_counts(layer, project)
        else:
            styles.style_tile_layer(layer, force=True)


_post_processors: list[StylePostProcessor] = []  # QGIS does not own them: keep them alive


class HqrsAlgorithm(QgsProcessingAlgorithm):
    """Common base: identity from class attributes, the CLI run with progress and cancel, paths.

    Subclasses set ``NAME``, ``DISPLAY``, ``GROUP`` (display), ``GROUP_ID`` and ``HELP``, declare
    parameters in ``initAlgorithm``, may look at layers in :meth:`prepare` (main thread) and do
    the work in :meth:`process`.
    """

    NAME = ""
    DISPLAY = ""
    GROUP = ""
    GROUP_ID = ""
    HELP = ""

    def __init__(self) -> None:
        super().__init__()
        self._reload: list[QgsMapLayer] = []

    # identity ----------------------------------------------------------------------------
    def createInstance(self) -> HqrsAlgorithm:  # noqa: N802 - QGIS API name
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
    def tile_layer_path(self, layer: QgsMapLayer | None, feedback: QgsProcessingFeedback) -> str:
        """The file of a tile layer (GeoPackage, GeoParquet, FlatGeobuf made by 'Tile raster')."""
        if not isinstance(layer, QgsVectorLayer):
            raise QgsProcessingException(tr("HQRS: no tile layer given"))
        path = engine_layer_file(layer)
        if path is None:  # an empty GeoPackage, another table of one, a file of another kind
            raise QgsProcessingException("HQRS: " + not_a_tile_layer(layer))
        return path

    def input_tile_layer(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> str:
        """The file of the tile layer parameter ``name``; remembers the layer to reload it after."""
        layer = self.parameterAsVectorLayer(parameters, name, context)
        path = self.tile_layer_path(layer, feedback)
        self._reload.append(layer)
        return path

    def update_tile_layer(self, parameters: dict[str, Any], context: QgsProcessingContext,
                          feedback: QgsProcessingFeedback, command: str, args: Sequence[Any]) -> dict[str, Any]:
        """Run ``hqrs-geo COMMAND LAYER ARGS`` on the tile layer parameter ``INPUT``, which the engine
        updates in place (reloaded afterwards); returns the outputs."""
        path = self.input_tile_layer(parameters, "INPUT", context, feedback)
        self.run_engine([command, path, *args], feedback)
        return {"OUTPUT": layer_uri(path)}

    def whole_tile_layer(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> str:
        """The file of tile layer parameter ``name`` as a whole, also when only its selected features
        were given (those are the examples, read by :meth:`selected_tile_ids`)."""
        value = parameters.get(name)
        whole = dict(parameters, **{name: value.source}) \
            if isinstance(value, QgsProcessingFeatureSourceDefinition) else parameters
        return self.input_tile_layer(whole, name, context, feedback)

    def selected_tile_ids(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext) -> list[str]:
        """The tile ids of the selected features of parameter ``name``, when it is limited to them."""
        value = parameters.get(name)
        if not (isinstance(value, QgsProcessingFeatureSourceDefinition) and value.selectedFeaturesOnly):
            return []
        source = self.parameterAsSource(parameters, name, context)
        if source is None or source.fields().indexOf("tile_id") < 0:
            raise QgsProcessingException(tr("HQRS: the input has no tile_id field; choose a tile layer"))
        request = QgsFeatureRequest().setSubsetOfAttributes(["tile_id"], source.fields())
        request.setFlags(QgsFeatureRequest.NoGeometry)
        return [str(f["tile_id"]) for f in source.getFeatures(request)]

    def given(self, parameters: dict[str, Any], name: str) -> bool:
        """True when parameter ``name`` has a value: given, or (left out, as scripts do) a default
        (defaults come from the HQRS settings)."""
        if name in parameters:
            return parameters[name] not in (None, "")
        definition = self.parameterDefinition(name)
        return definition is not None and definition.defaultValue() not in (None, "")

    def optional_number(self, parameters: dict[str, Any], name: str,
                        context: QgsProcessingContext) -> float | None:
        """The value of an optional number parameter, or None when it is not set."""
        if not self.given(parameters, name):
            return None
        return self.parameterAsDouble(parameters, name, context)

    def optional_text(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext) -> str:
        """A string parameter's value stripped ('' when unset)."""
        if not self.given(parameters, name):
            return ""
        return (self.parameterAsString(parameters, name, context) or "").strip()

    def plan_raster(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext) -> rasters.RasterPlan:
        """Main thread: the raster parameter ``name`` limited to EXTENT (see :mod:`..core.rasters`)."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(tr("HQRS: no raster layer given for {}").format(name))
        extent, crs = None, None
        if parameters.get("EXTENT"):
            extent = self.parameterAsExtent(parameters, "EXTENT", context)
            crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
        return rasters.plan(layer, extent, crs, context.transformContext())

    def raster_file(self, plan: rasters.RasterPlan, parameters: dict[str, Any], context: QgsProcessingContext,
                    folder: str, feedback: QgsProcessingFeedback) -> str:
        """The raster file for the engine (the layer's file, a window of it, or a written GeoTIFF)."""
        resolution = self.optional_number(parameters, "RESOLUTION", context) or 0.0
        return rasters.materialise(plan, folder, resolution, feedback)

    # running -----------------------------------------------------------------------------
    def prepareAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> bool:
        """Main thread: :meth:`prepare` (look at layers that must not be touched from a worker).

        Its errors are raised again in :meth:`processAlgorithm`, where Processing shows their text.
        """
        self._prepare_error: Exception | None = None
        try:
            self.prepare(parameters, context, feedback or QgsProcessingFeedback())
        except QgsProcessingException as exc:
            self._prepare_error = exc
        return True

    def prepare(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> None:
        """Main-thread preparation (in subclasses)."""

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback | None) -> dict[str, Any]:
        """Check the engine first (the one-line set-up message when it is missing), then :meth:`process`."""
        feedback = feedback or QgsProcessingFeedback()
        error: Exception | None = getattr(self, "_prepare_error", None)
        if error is not None:
            raise error
        ensure_engine(feedback)
        return self.process(parameters, context, feedback)

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Evaluate the parameters, run the engine and return the outputs (in subclasses)."""
        raise NotImplementedError

    def run_engine(self, args: Sequence[Any], feedback: QgsProcessingFeedback,
                   outputs: Sequence[str] = ()) -> dict:
        """Run ``hqrs-geo ARGS`` with progress (tile counts) and cancel; returns the CLI's final event.

        ``outputs``: files the command writes, so a cancel message can say which ones now exist.
        Raises QgsProcessingException with the set-up message, ``cancelled: …`` or the engine's
        one-line error in the words of QGIS.
        """
        python = ensure_engine(feedback, announce=False)
        args = [str(a) for a in args]
        feedback.pushCommandInfo(" ".join(shlex.quote(a) for a in [python, "-m", "hqrs_geo", *args]))
        existed = {path: os.path.exists(path) for path in outputs}
        last = {"text": ""}

        def on_progress(event: Progress) -> None:
            feedback.setProgress(event.percent)
            if event.text != last["text"]:
                last["text"] = event.text
                feedback.setProgressText(event.text)

        result = run_cli(args, python, on_progress, feedback.isCanceled)
        if result.cancelled:
            made = [path for path, before in existed.items() if not before and os.path.exists(path)]
            if made:
                detail = tr("{} was written; finished model batches are kept, so running the same algorithm "
                            "again resumes").format(", ".join(made))
            else:
                detail = (str(result.error or "").partition("cancelled; ")[2]
                          or tr("outputs were left as they were before this run"))
            raise QgsProcessingException(tr("cancelled: HQRS {} stopped; {}").format(self.displayName(), detail))
        if not result.ok:
            error = result.error
            if error is not None and error.kind == "engine":
                engine.forget(python)
                raise QgsProcessingException(f"HQRS: {error.text}")
            raise QgsProcessingException(f"HQRS: {error.text if error else 'the engine failed'}")
        summary = result.final.get("message") if result.final else ""
        if summary:
            feedback.pushInfo(summary)
        feedback.setProgress(100)
        return result.final

    # outputs -----------------------------------------------------------------------------
    @staticmethod
    def load_output(context: QgsProcessingContext, registered: str, uri: str, name: str,
                    output: str = "OUTPUT", always: bool = False, kind: str = "tiles",
                    scale: styles.ScoreScale | None = None, labels: Sequence[str] = (),
                    threshold: float | None = None) -> None:
        """Make Processing load ``uri`` (named ``name``, styled as ``kind``: tiles, hits, classes,
        detections or change; see :class:`StylePostProcessor`) where it would have loaded
        ``registered`` (the plain file).

        ``always``: load it even though Processing did not ask (an output left unset that the
        algorithm placed itself).
        """
        layers = context.layersToLoadOnCompletion()
        details = None
        if registered and registered in layers:
            details = layers.pop(registered)
        elif always and context.project() is not None:
            details = QgsProcessingContext.LayerDetails(name, context.project(), output,
                                                        QgsProcessingUtils.LayerHint.Vector)
        if details is None:
            return
        details.name = name
        details.forceName = True
        processor = StylePostProcessor(name, kind, scale, labels, threshold)
        _post_processors.append(processor)
        details.setPostProcessor(processor)
        layers[uri] = details
        context.setLayersToLoadOnCompletion(layers)

    def postProcessAlgorithm(self, context: QgsProcessingContext,  # noqa: N802
                             feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Reload input layers the engine updated on disk (new fields), in their own thread."""
        for layer in self._reload:
            try:
                if layer is not None and layer.thread() == QThread.currentThread():
                    layer.reload()
                    styles.set_tile_map_tips(layer)
                    layer.triggerRepaint()
            except RuntimeError:  # the layer was deleted meanwhile
                pass
        self._reload = []
        return {}


def output_folder(path: str) -> str:
    """The folder of an output file (where cut rasters of the input are written beside it)."""
    return str(Path(path).resolve().parent)
