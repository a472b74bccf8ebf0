"""``hqrs:detect``: few-shot detection ("find all like these") as a Processing algorithm."""
from __future__ import annotations

import os
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from ...core import detections
from ..base import HqrsAlgorithm, cli_option, layer_uri, split_destination, tr
from ..params import advanced, static_enum
from .search import EMBEDDINGS_HELP, add_embedding_choice, embedding_args, split_list

DETECTIONS_LAYER = "detections"  # the layer the engine writes into the output GeoPackage


class DetectAlgorithm(HqrsAlgorithm):
    """``hqrs:detect``: every tile like the positive examples, as a detection layer with probabilities."""

    NAME = "detect"
    DISPLAY = "Detect from examples"
    GROUP = "Search"
    GROUP_ID = "search"
    HELP = ("Finds every tile like a few example tiles: a light classifier (logistic regression on the embeddings, "
            "or the query vector 2·mean(positives) − mean(negatives)) is fitted on the <b>positive</b> tiles (what "
            "to find: tile ids, comma-separated, and the selected tiles when <i>Selected features only</i> is "
            "ticked) and the <b>negative</b> ones (what not to find; without any, random tiles stand in) and scores "
            "every tile of the layer. The tiles at or above the <b>threshold</b> are written as a detection layer "
            "with fields <i>detect_prob</i> (probability 0..1) and <i>detect_rank</i>, drawn in probability "
            "classes. <b>Use the labels saved with the layer</b> adds the labels saved from the HQRS search dock "
            "(Find all like these ▸ Save labels).<br>" + EMBEDDINGS_HELP)

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterFeatureSource(
            "INPUT", tr("Tile layer (selected features: positive examples)"), [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString(
            "POSITIVE_IDS", tr("Positive example tile ids (comma-separated)"), None, False, True))
        self.addParameter(QgsProcessingParameterString(
            "NEGATIVE_IDS", tr("Negative example tile ids (comma-separated)"), None, False, True))
        self.addParameter(QgsProcessingParameterBoolean(
            "SAVED_LABELS", tr("Use the labels saved with the layer"), False))
        self.addParameter(static_enum("METHOD", tr("Method"), detections.METHODS, "logistic"))
        self.addParameter(QgsProcessingParameterNumber(
            "THRESHOLD", tr("Least probability of a detection"), QgsProcessingParameterNumber.Double, 0.5, False,
            0.0, 1.0))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "K", tr("At most this many detections (empty: all)"), QgsProcessingParameterNumber.Integer, None, True,
            1)))
        add_embedding_choice(self)
        self.addParameter(QgsProcessingParameterVectorDestination(
            "OUTPUT", tr("Detections"), QgsProcessing.TypeVectorPolygon))

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo detect LAYER --pos ID … --neg ID … -o OUTPUT``."""
        layer = self.whole_tile_layer(parameters, "INPUT", context, feedback)
        positive = split_list(self.optional_text(parameters, "POSITIVE_IDS", context))
        positive += [i for i in self.selected_tile_ids(parameters, "INPUT", context) if i not in positive]
        negative = [i for i in split_list(self.optional_text(parameters, "NEGATIVE_IDS", context))
                    if i not in positive]
        saved = self.parameterAsBool(parameters, "SAVED_LABELS", context)
        if not positive and not saved:
            raise QgsProcessingException(tr("HQRS: no positive example: give tile ids, select tiles and tick "
                                            "'Selected features only', or use the labels saved with the layer"))
        registered = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        path, _table = split_destination(registered)
        threshold = self.parameterAsDouble(parameters, "THRESHOLD", context)
        method = self.parameterAsEnumString(parameters, "METHOD", context) or "logistic"
        args = ["detect", layer, *[cli_option("--pos", t) for t in positive],
                *[cli_option("--neg", t) for t in negative], cli_option("--method", method),
                cli_option("--threshold", repr(threshold)), "-o", path, *embedding_args(self, parameters, context)]
        if saved:
            args.append("--labels-from")
        if self.given(parameters, "K"):
            args.append(cli_option("-k", str(self.parameterAsInt(parameters, "K", context))))
        feedback.pushInfo(tr("Positive: {}; negative: {}").format(", ".join(positive) or "saved labels",
                                                                  ", ".join(negative) or "none given"))
        self.run_engine(args, feedback, outputs=[path])
        uri = layer_uri(path, DETECTIONS_LAYER) if path.lower().endswith(".gpkg") else path
        name = os.path.splitext(os.path.basename(layer))[0]
        self.load_output(context, registered, uri, f"detections: {name}", kind="detections")
        return {"OUTPUT": uri}

