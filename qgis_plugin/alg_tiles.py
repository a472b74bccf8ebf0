"""Tiling algorithms: ``hqrs:tile`` (raster to tile layer) and ``hqrs:export_chips`` (tiles to images)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Tuple

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
    QgsRasterLayer,
)

from .alg_base import TILES_LAYER, HqrsAlgorithm, layer_uri, split_destination, tr
from .alg_params import add_tiling_parameters, static_enum, tiling_args

IMAGE_FORMATS = ("png", "jpg")


def default_tiles_path(raster: str) -> str:
    """``<raster folder>/<raster stem>_tiles.gpkg``: where tiles go when no output is given."""
    if not os.path.isfile(raster):
        raise QgsProcessingException(
            tr("HQRS: {} is not a local file; choose the output tile layer").format(raster))
    source = Path(raster)
    return str(source.with_name(f"{source.stem}_tiles.gpkg"))


def add_tile_destination(alg: HqrsAlgorithm, description: str) -> None:
    """OUTPUT: a tile layer file; optional, left empty it goes next to the raster."""
    alg.addParameter(QgsProcessingParameterVectorDestination(
        "OUTPUT", tr(description), QgsProcessing.TypeVectorPolygon, None, True, False))


def tile_destination(alg: HqrsAlgorithm, parameters: Dict[str, Any], context: QgsProcessingContext,
                     raster: str, feedback: QgsProcessingFeedback) -> Tuple[str, str]:
    """The tile layer file to write and the destination Processing registered ('' when unset)."""
    registered = alg.parameterAsOutputLayer(parameters, "OUTPUT", context) or ""
    if not registered:
        path = default_tiles_path(raster)
        feedback.pushInfo(tr("No output given: writing {}").format(path))
        return path, ""
    path, table = split_destination(registered)
    if table and table != TILES_LAYER:
        feedback.pushWarning(tr("Tile layers are always named '{}' in their file").format(TILES_LAYER))
    return path, registered


class TileAlgorithm(HqrsAlgorithm):
    """``hqrs:tile``: cut a raster into a tile layer (GeoPackage, GeoParquet or FlatGeobuf)."""

    NAME = "tile"
    DISPLAY = "Tile raster"
    GROUP = "Tiles"
    GROUP_ID = "tiles"
    HELP = ("Cuts a raster into square tiles and writes their footprints as a tile layer "
            "(GeoPackage by default; also .fgb or .parquet).<br>"
            "<b>Tile size</b> in pixels, or in ground metres when set (e.g. 64). <b>Overlap</b> in percent. "
            "<b>GSD</b> resamples to that ground resolution on read. <b>Edge</b>: shift partial tiles inward, "
            "pad them with nodata, or drop them. Tiles with less than <b>minimum valid fraction</b> of valid "
            "pixels are skipped.<br>"
            "Leave the output empty to write <i>&lt;raster name&gt;_tiles.gpkg</i> next to the raster. "
            "Writing a scene again into an existing tile layer replaces that scene's tiles.")

    def initAlgorithm(self, config: Dict[str, Any] = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", tr("Raster")))
        add_tiling_parameters(self)
        add_tile_destination(self, "Tile layer [optional: <raster>_tiles.gpkg next to the raster]")

    def process(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Run ``hqrs-geo tile``."""
        raster = self.raster_path(parameters, "INPUT", context)
        path, registered = tile_destination(self, parameters, context, raster, feedback)
        self.run_engine(["tile", raster, "-o", path, *tiling_args(self, parameters, context)], feedback)
        uri = layer_uri(path)
        self.load_output(context, registered, uri, f"{Path(path).stem}", always=not registered)
        return {"OUTPUT": uri}


class ExportChipsAlgorithm(HqrsAlgorithm):
    """``hqrs:export_chips``: tiles of a raster or a tile layer as PNG/JPEG files with an index."""

    NAME = "export_chips"
    DISPLAY = "Export chips"
    GROUP = "Tiles"
    GROUP_ID = "tiles"
    HELP = ("Writes every tile as an image file (PNG or JPEG) into the output folder, with "
            "<i>index.csv</i> and <i>index.gpkg</i> (footprints with the chip's file path).<br>"
            "The input is a raster (tiled with the tiling parameters) or a tile layer (its tiles as they are; "
            "the tiling parameters are ignored). Running again with the same parameters keeps the chips "
            "already written.")

    def initAlgorithm(self, config: Dict[str, Any] = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterMapLayer(
            "INPUT", tr("Raster or tile layer"), None, False,
            [QgsProcessing.TypeRaster, QgsProcessing.TypeVectorPolygon]))
        self.addParameter(static_enum("FORMAT", tr("Image format"), IMAGE_FORMATS, "png"))
        add_tiling_parameters(self, advanced_all=True)
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", tr("Chips folder")))
        self.addOutput(QgsProcessingOutputVectorLayer("INDEX", tr("Chip index"), QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("CHIPS", tr("Number of chips")))

    def process(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Run ``hqrs-geo export-chips``."""
        layer = self.parameterAsLayer(parameters, "INPUT", context)
        folder = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        fmt = self.parameterAsEnumString(parameters, "FORMAT", context) or "png"
        if isinstance(layer, QgsRasterLayer):
            args = ["export-chips", self.gdal_path(layer), "-o", folder, "--format", fmt,
                    *tiling_args(self, parameters, context)]
        else:
            args = ["export-chips", self.tile_layer_path(layer, feedback), "-o", folder, "--format", fmt]
        final = self.run_engine(args, feedback)
        return {"OUTPUT": folder, "INDEX": layer_uri(os.path.join(folder, "index.gpkg")),
                "CHIPS": final.get("tiles", 0)}
