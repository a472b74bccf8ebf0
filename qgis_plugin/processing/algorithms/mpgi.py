"""MpGI algorithms: ``hqrs:mpgi`` (captions from VLM perspectives, facts and an LLM) and
``hqrs:export_dataset`` (captioned tiles as an image-text dataset)."""
from __future__ import annotations

import os
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProviderRegistry,
    QgsVectorLayer,
)

from ..base import HqrsAlgorithm, tr
from ..params import advanced, static_enum
from .models import add_tile_layer_input, add_updated_output


def vector_spec(layer: QgsVectorLayer, class_fields: dict[str, str]) -> str:
    """``PATH[:LAYER[:CLASS_FIELD]]`` of a file-based vector layer, as ``hqrs-geo mpgi --vectors`` takes it."""
    parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
    path = str(parts.get("path") or "")
    if layer.providerType() != "ogr" or not os.path.isfile(path):
        raise QgsProcessingException(
            tr("HQRS: {} is not a vector file layer; save it as a GeoPackage first").format(layer.name()))
    name = parts.get("layerName") or ""
    field = class_fields.get(layer.name(), "")
    if field and layer.fields().indexOf(field) < 0:
        raise QgsProcessingException(tr("HQRS: layer {} has no field {}").format(layer.name(), field))
    spec = path + (f":{name}" if name or field else "")
    return spec + (f":{field}" if field else "")


def parse_class_fields(text: str) -> dict[str, str]:
    """``buildings=building, roads=highway`` -> {layer name: field}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise QgsProcessingException(tr("HQRS: class fields are written layer=field, not {}").format(item))
        layer, field = (s.strip() for s in item.split("=", 1))
        out[layer] = field
    return out


class MpgiAlgorithm(HqrsAlgorithm):
    """``hqrs:mpgi``: MpGI captions on every tile of a tile layer."""

    NAME = "mpgi"
    DISPLAY = "MpGI captions"
    GROUP = "Models"
    GROUP_ID = "models"
    HELP = ("Writes MpGI captions on the tile layer: a vision-language model describes each tile from several "
            "perspectives and relays facts computed from the raster and the <b>vector layers</b> (counts, area and "
            "length, dominant classes of the <b>class fields</b>, where in the tile; vegetation and water from a NIR "
            "band; size, place, date); the caption model adds its caption; an LLM merges everything into "
            "<i>mpgi_caption</i> (detailed) and <i>mpgi_short</i> (short captions). Every description and fact "
            "is kept in the <i>mpgi_sources</i> table.<br>The <b>recipe</b> (TOML) chooses the models and prompts; "
            "without one the offline default runs (no VLM, the shipped caption model, SmolLM2 for merging). "
            "Every model call is cached beside the layer, so running again after a cancel resumes.")

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        add_tile_layer_input(self)
        self.addParameter(QgsProcessingParameterFile(
            "RECIPE", tr("Recipe (TOML; default: the shipped offline recipe)"), QgsProcessingParameterFile.File,
            "toml", None, True, "Recipes (*.toml)"))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            "VECTORS", tr("Vector layers for the facts (e.g. OSM buildings, roads, land use)"),
            QgsProcessing.TypeVectorAnyGeometry, None, True))
        self.addParameter(QgsProcessingParameterString(
            "CLASS_FIELDS", tr("Class fields (layer=field, …; e.g. buildings=building, roads=highway)"),
            None, False, True))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "LIMIT", tr("Only the first N tiles (0: all)"), QgsProcessingParameterNumber.Integer, 0, True, 0)))
        add_updated_output(self)

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo mpgi LAYER``."""
        args: list[str] = []
        recipe = self.parameterAsFile(parameters, "RECIPE", context) if self.given(parameters, "RECIPE") else ""
        if recipe:
            args += ["--recipe", recipe]
        fields = parse_class_fields(self.optional_text(parameters, "CLASS_FIELDS", context))
        for layer in self.parameterAsLayerList(parameters, "VECTORS", context):
            args += ["--vectors", vector_spec(layer, fields)]
        limit = self.parameterAsInt(parameters, "LIMIT", context) if self.given(parameters, "LIMIT") else 0
        if limit:
            args += ["--limit", str(limit)]
        return self.update_tile_layer(parameters, context, feedback, "mpgi", args)


class ExportDatasetAlgorithm(HqrsAlgorithm):
    """``hqrs:export_dataset``: chips + open_clip CSV + Karpathy JSON of a captioned tile layer."""

    NAME = "export_dataset"
    DISPLAY = "Export image-text dataset"
    GROUP = "Models"
    GROUP_ID = "models"
    HELP = ("Writes the captioned tiles as an image-text dataset: <i>images/</i>, <i>captions.csv</i> (open_clip "
            "CSV) and <i>dataset.json</i> (Karpathy style, train/val split by tile id), the input of "
            "fine-tuning a CLIP model (outside QGIS: see the plugin's documentation). <b>Captions</b>: "
            "<i>mpgi</i> (detailed + short MpGI captions), "
            "<i>caption</i> (the caption model's field) or <i>labels</i> (the few-shot labels saved with the "
            "layer from the HQRS search dock: the labelled tiles only, class positive/negative).")

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        add_tile_layer_input(self)
        self.addParameter(static_enum("CAPTIONS", tr("Captions"), ("mpgi", "caption", "labels"), "mpgi"))
        self.addParameter(static_enum("FORMAT", tr("Image format"), ("jpg", "png"), "jpg"))
        self.addParameter(QgsProcessingParameterNumber(
            "VAL_FRACTION", tr("Share of tiles in the val split"), QgsProcessingParameterNumber.Double, 0.1,
            False, 0.0, 0.99))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", tr("Dataset folder")))
        self.addOutput(QgsProcessingOutputNumber("IMAGES", tr("Number of images")))

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo export-dataset``."""
        path = self.input_tile_layer(parameters, "INPUT", context, feedback)
        folder = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        final = self.run_engine([
            "export-dataset", path, "-o", folder,
            "--captions", self.parameterAsEnumString(parameters, "CAPTIONS", context) or "mpgi",
            "--format", self.parameterAsEnumString(parameters, "FORMAT", context) or "jpg",
            "--val-fraction", repr(self.parameterAsDouble(parameters, "VAL_FRACTION", context))], feedback)
        return {"OUTPUT": folder, "IMAGES": final.get("images", 0)}
