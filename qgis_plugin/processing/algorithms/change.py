"""``hqrs:change``: compare two dates of the same place tile by tile ("what changed")."""
from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterExtent,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsRasterLayer,
)

from ...core import changes, rasters, settings
from ...core.changes import ChangeError, ChangeOptions
from ..base import HqrsAlgorithm, output_folder, split_destination, tr
from ..params import DEFAULT_WEB_RESOLUTION_M, DEVICES, add_tiling_parameters, advanced, static_enum, tiling_args

DATES = (("BEFORE", "Earlier date (before): raster or tile layer"),
         ("AFTER", "Later date (after): raster or tile layer"))


class ChangeAlgorithm(HqrsAlgorithm):
    """``hqrs:change``: a change layer (change score, rank, captions and classes of both dates) of two dates."""

    NAME = "change"
    DISPLAY = "Compare two dates"
    GROUP = "Search"
    GROUP_ID = "search"
    HELP = ("Compares two dates of the same place tile by tile and writes a <b>change layer</b>: one row per tile "
            "of the earlier date with <i>change_score</i> (how far the two dates' embeddings are apart, as a "
            "robust z-score within this pair of scenes, so a change of season or light over the whole scene "
            "does not count), <i>change_rank</i> (1 = most changed), <i>changed</i> (score ≥ <b>threshold</b>), "
            "<i>compared</i> (tiles whose later date is missing or mostly empty are not compared) and the "
            "captions of both dates.<br>"
            "Each date is a <b>raster</b> (tiled here; the later date on the same grid, whatever its own "
            "resolution or CRS) or a <b>tile layer</b>; embeddings and captions a layer lacks are computed. "
            "<b>Tiles that became…</b> ranks tiles by how much more like a text they look after than before "
            "(e.g. <i>a solar farm</i>); <b>stopped being…</b> the other way round. <b>Class labels</b> "
            "(comma-separated) give each date a zero-shot class: <i>farmland → residential</i>.<br>"
            "The change layer is drawn over the imagery from <i>unchanged</i> to <i>strongly changed</i>, "
            "tiles that were not compared grey hatched, changed tiles numbered by rank.")

    def __init__(self) -> None:
        super().__init__()
        self.plans: dict[str, rasters.RasterPlan | None] = {}
        self.tile_paths: dict[str, str] = {}

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        for name, description in DATES:
            self.addParameter(QgsProcessingParameterMapLayer(
                name, tr(description), None, False, [QgsProcessing.TypeRaster, QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString(
            "BECAME", tr("Tiles that became… (a text, e.g. a solar farm)"), None, False, True))
        self.addParameter(QgsProcessingParameterString(
            "STOPPED", tr("Tiles that stopped being… (a text, e.g. a forest)"), None, False, True))
        self.addParameter(QgsProcessingParameterString(
            "LABELS", tr("Class labels, comma-separated (each date gets one: farmland → residential)"), None, False,
            True))
        self.addParameter(QgsProcessingParameterNumber(
            "THRESHOLD", tr("Changed from change score (robust z)"), QgsProcessingParameterNumber.Double,
            changes.DEFAULT_THRESHOLD, False, 0.0))
        self.addParameter(QgsProcessingParameterBoolean("CAPTIONS", tr("Caption both dates"), True))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "MIN_OVERLAP", tr("Least valid overlap of a tile pair to compare it"), QgsProcessingParameterNumber.Double,
            changes.DEFAULT_MIN_OVERLAP, False, 0.0, 1.0)))
        self.addParameter(advanced(QgsProcessingParameterString(
            "MODEL", tr("Embedding model (empty: the tile layers' own, else the HQRS settings' model)"), None, False,
            True)))
        self.addParameter(advanced(QgsProcessingParameterString(
            "CAPTION_MODEL", tr("Caption model (empty: the HQRS settings' caption model)"), None, False, True)))
        self.addParameter(advanced(static_enum("DEVICE", tr("Device"), DEVICES, settings.value("device")
                                               if settings.value("device") in DEVICES else "auto")))
        self.addParameter(advanced(QgsProcessingParameterExtent(
            "EXTENT", tr("Only the earlier raster within extent (empty: all of it)"), None, True)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "RESOLUTION", tr("Ground resolution of web/WMS/XYZ layers (m/px)"),
            QgsProcessingParameterNumber.Double, DEFAULT_WEB_RESOLUTION_M, True, 0.01)))
        add_tiling_parameters(self, advanced_all=True)
        params = [self.parameterDefinition("TILE_SIZE")]
        for param in params:  # the first tiling parameter too: only rasters are tiled
            param.setFlags(param.flags() | param.FlagAdvanced)
        self.addParameter(QgsProcessingParameterVectorDestination(
            "OUTPUT", tr("Change layer"), QgsProcessing.TypeVectorPolygon))

    # -- main thread -------------------------------------------------------------------------
    def prepare(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> None:
        """Look at both dates: a raster is planned (its extent, a web layer's provider), a tile layer's
        file taken; anything else is refused in one line."""
        self.plans, self.tile_paths = {}, {}
        before_extent: tuple[Any, Any] = (None, None)
        for name, _description in DATES:
            layer = self.parameterAsLayer(parameters, name, context)
            if layer is None:
                raise QgsProcessingException(tr("HQRS: no layer given for {}").format(self.date_word(name)))
            if isinstance(layer, QgsRasterLayer):
                extent, crs = None, None
                if name == "BEFORE" and parameters.get("EXTENT"):
                    extent = self.parameterAsExtent(parameters, "EXTENT", context)
                    crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
                elif name == "AFTER" and rasters.gdal_source(layer) is None:
                    extent, crs = before_extent  # a web layer of the later date: over the earlier date
                plan = rasters.plan(layer, extent, crs, context.transformContext())
                self.plans[name] = plan
                if name == "BEFORE":
                    before_extent = (plan.extent or plan.raster_extent, plan.crs)
            else:
                try:
                    self.tile_paths[name] = changes.date_path(layer)
                except ChangeError as exc:
                    raise QgsProcessingException(f"HQRS: {self.date_word(name)}: {exc}") from None
                self._reload.append(layer)  # embeddings and captions the engine adds show after the run
                if name == "BEFORE":
                    before_extent = (layer.extent(), layer.crs())

    @staticmethod
    def date_word(name: str) -> str:
        """``the earlier date (before)`` for BEFORE."""
        return tr("the earlier date (before)") if name == "BEFORE" else tr("the later date (after)")

    # -- worker --------------------------------------------------------------------------------
    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo change BEFORE AFTER -o OUTPUT …`` and load the change layer."""
        registered = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        path, _table = split_destination(registered)
        folder = output_folder(path)
        resolution = self.optional_number(parameters, "RESOLUTION", context) or DEFAULT_WEB_RESOLUTION_M
        dates = {}
        for name, _description in DATES:
            plan = self.plans.get(name)
            dates[name] = rasters.materialise(plan, folder, resolution, feedback) if plan is not None \
                else self.tile_paths[name]
        any_raster = bool(self.plans)
        captions = self.parameterAsBool(parameters, "CAPTIONS", context)
        model = self.optional_text(parameters, "MODEL", context)
        caption_model = self.optional_text(parameters, "CAPTION_MODEL", context)
        checkpoint = ""
        if any_raster:  # a raster's embeddings and captions come from the models of the HQRS settings
            if not model:
                model, checkpoint = settings.value("model"), settings.value("checkpoint") or ""
            caption_model = caption_model or settings.value("caption_model")
        options = ChangeOptions(
            became=self.optional_text(parameters, "BECAME", context),
            stopped=self.optional_text(parameters, "STOPPED", context),
            labels=changes.split_labels(self.optional_text(parameters, "LABELS", context)),
            threshold=self.parameterAsDouble(parameters, "THRESHOLD", context),
            min_overlap=self.parameterAsDouble(parameters, "MIN_OVERLAP", context),
            captions=captions, model=model, checkpoint=checkpoint, caption_model=caption_model,
            device=self.parameterAsEnumString(parameters, "DEVICE", context) or "auto",
            extra=tiling_args(self, parameters, context) if "BEFORE" in self.plans else ())
        try:
            args = changes.change_args(dates["BEFORE"], dates["AFTER"], path, options)
        except ChangeError as exc:
            raise QgsProcessingException(f"HQRS: {exc}") from None
        feedback.pushInfo(tr("Before: {}; after: {}").format(dates["BEFORE"], dates["AFTER"]))
        final = self.run_engine(args, feedback, outputs=[path])
        text = changes.summary(final or {}, options.ranking)
        if text:
            feedback.pushInfo(text)
        uri = changes.change_layer_uri(path)
        self.load_output(context, registered, uri, changes.layer_name(dates["BEFORE"], dates["AFTER"], options),
                         kind="change", threshold=options.threshold)
        return {"OUTPUT": uri}
