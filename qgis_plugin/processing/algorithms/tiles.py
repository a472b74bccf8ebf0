"""Tiling algorithms: ``hqrs:tile`` (raster to tile layer) and ``hqrs:export_chips`` (tiles to images)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsRasterLayer,
)

from ...core.rasters import RasterPlan
from ...core.rasters import slug as file_slug
from ..base import TILES_LAYER, HqrsAlgorithm, layer_uri, output_folder, split_destination, tr
from ..params import add_extent_parameters, add_tiling_parameters, static_enum, tiling_args

IMAGE_FORMATS = ("png", "jpg")
EXTENT_HELP = ("<b>Extent</b>: only the pixels within it (the map canvas when the dialog opens; clear it for the "
               "whole raster). Any raster layer works: files are read where they are (a small VRT of the extent is "
               "written beside the output), web, WMS and XYZ layers are first written over the extent at the "
               "<b>ground resolution</b> to a GeoTIFF beside the output.<br>")


def default_tiles_path(plan: RasterPlan) -> str:
    """Where tiles go when no output is given: ``<raster folder>/<raster stem>_tiles.gpkg`` for a
    local file, else a temporary GeoPackage."""
    if plan.path is not None and os.path.isfile(plan.path):  # a local file raster
        source = Path(plan.path)
        return str(source.with_name(f"{source.stem}_tiles.gpkg"))
    return QgsProcessingUtils.generateTempFilename(f"{file_slug(plan.name)}_tiles.gpkg")


def add_tile_destination(alg: HqrsAlgorithm, description: str) -> None:
    """OUTPUT: a tile layer file (a temporary file in the dialog; unset in scripts: next to the raster)."""
    alg.addParameter(QgsProcessingParameterVectorDestination(
        "OUTPUT", tr(description), QgsProcessing.TypeVectorPolygon, None, True, True))


def tile_destination(alg: HqrsAlgorithm, parameters: dict[str, Any], context: QgsProcessingContext,
                     plan: RasterPlan, feedback: QgsProcessingFeedback) -> tuple[str, str]:
    """The tile layer file to write and the destination Processing registered ('' when unset)."""
    registered = alg.parameterAsOutputLayer(parameters, "OUTPUT", context) or "" \
        if parameters.get("OUTPUT") not in (None, "") else ""
    if not registered:
        path = default_tiles_path(plan)
        feedback.pushInfo(tr("No output given: writing {}").format(path))
        return path, ""
    path, table = split_destination(registered)
    if table and table != TILES_LAYER:
        feedback.pushWarning(tr("Tile layers are always named '{}' in their file").format(TILES_LAYER))
    return path, registered


class RasterInputAlgorithm(HqrsAlgorithm):
    """An algorithm whose INPUT may be any raster layer, limited to EXTENT."""

    def __init__(self) -> None:
        super().__init__()
        self.raster_plan: RasterPlan | None = None

    def prepare(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> None:
        """Main thread: look at the raster layer (and clone a web layer's provider)."""
        layer = self.parameterAsLayer(parameters, "INPUT", context)
        self.raster_plan = self.plan_raster(parameters, "INPUT", context) \
            if isinstance(layer, QgsRasterLayer) or layer is None else None

    def planned_raster(self) -> RasterPlan:
        """The raster plan :meth:`prepare` made (a one-line error when the input was no raster)."""
        if self.raster_plan is None:
            raise QgsProcessingException("HQRS: the input is not a raster layer: choose a raster")
        return self.raster_plan

    def write_tile_layer(self, parameters: dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback, command: str, args: list[Any]) -> dict[str, Any]:
        """Run ``hqrs-geo COMMAND RASTER -o OUT ARGS`` (the raster within the extent, OUT the tile
        layer destination) and load the tile layer it writes; returns the outputs."""
        plan = self.planned_raster()
        path, registered = tile_destination(self, parameters, context, plan, feedback)
        raster = self.raster_file(plan, parameters, context, output_folder(path), feedback)
        self.run_engine([command, raster, "-o", path, *args], feedback, outputs=[path])
        uri = layer_uri(path)
        self.load_output(context, registered, uri, f"tiles: {Path(path).stem}", always=not registered)
        return {"OUTPUT": uri}


class TileAlgorithm(RasterInputAlgorithm):
    """``hqrs:tile``: cut a raster into a tile layer (GeoPackage, GeoParquet or FlatGeobuf)."""

    NAME = "tile"
    DISPLAY = "Tile raster"
    GROUP = "Tiles"
    GROUP_ID = "tiles"
    HELP = ("Cuts a raster into square tiles and writes their footprints as a tile layer "
            "(GeoPackage by default; also .fgb or .parquet).<br>" + EXTENT_HELP +
            "<b>Tile size</b> in pixels, or in ground metres when set (e.g. 64). <b>Overlap</b> in percent. "
            "<b>GSD</b> resamples to that ground resolution on read. <b>Edge</b>: shift partial tiles inward, "
            "pad them with nodata, or drop them. Tiles with less than <b>minimum valid fraction</b> of valid "
            "pixels are skipped. Defaults come from the HQRS settings.<br>"
            "In scripts, an unset output writes <i>&lt;raster name&gt;_tiles.gpkg</i> next to the raster. "
            "Writing a scene again into an existing tile layer replaces that scene's tiles.")

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", tr("Raster")))
        add_extent_parameters(self)
        add_tiling_parameters(self)
        add_tile_destination(self, "Tile layer")

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo tile``."""
        return self.write_tile_layer(parameters, context, feedback, "tile", tiling_args(self, parameters, context))


class ExportChipsAlgorithm(RasterInputAlgorithm):
    """``hqrs:export_chips``: tiles of a raster or a tile layer as PNG/JPEG files with an index."""

    NAME = "export_chips"
    DISPLAY = "Export chips"
    GROUP = "Tiles"
    GROUP_ID = "tiles"
    HELP = ("Writes every tile as an image file (PNG or JPEG) into the output folder, with "
            "<i>index.csv</i> and <i>index.gpkg</i> (footprints with the chip's file path).<br>"
            "The input is a raster (tiled with the tiling parameters, within the extent) or a tile layer (its "
            "tiles as they are; extent and tiling parameters are ignored). Running again with the same parameters "
            "keeps the chips already written.")

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterMapLayer(
            "INPUT", tr("Raster or tile layer"), None, False,
            [QgsProcessing.TypeRaster, QgsProcessing.TypeVectorPolygon]))
        self.addParameter(static_enum("FORMAT", tr("Image format"), IMAGE_FORMATS, "png"))
        add_extent_parameters(self)
        add_tiling_parameters(self, advanced_all=True)
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", tr("Chips folder")))
        self.addOutput(QgsProcessingOutputVectorLayer("INDEX", tr("Chip index"), QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("CHIPS", tr("Number of chips")))

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo export-chips``."""
        folder = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        fmt = self.parameterAsEnumString(parameters, "FORMAT", context) or "png"
        if self.raster_plan is not None:
            raster = self.raster_file(self.raster_plan, parameters, context, folder, feedback)
            args = ["export-chips", raster, "-o", folder, "--format", fmt, *tiling_args(self, parameters, context)]
        else:
            layer = self.parameterAsLayer(parameters, "INPUT", context)
            args = ["export-chips", self.tile_layer_path(layer, feedback), "-o", folder, "--format", fmt]
        final = self.run_engine(args, feedback)
        return {"OUTPUT": folder, "INDEX": layer_uri(os.path.join(folder, "index.gpkg")),
                "CHIPS": final.get("tiles", 0)}
