"""Search algorithms on embedded tile layers: ``hqrs:search``, ``hqrs:similar``, ``hqrs:classify``."""
from __future__ import annotations

import os
from typing import Any

from qgis.core import (
    QgsFeature,
    QgsField,
    QgsFields,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsVectorFileWriter,
)
from qgis.PyQt.QtCore import QVariant

from ...core import sessions, styles
from ...core.runner import EngineError
from ...core.tile_layers import features_by_tile, opened_in_worker
from ..base import HqrsAlgorithm, cli_option, layer_uri, slug, split_destination, tr
from ..params import CHECKPOINT_FILTER, advanced
from .models import add_tile_layer_input, add_updated_output

EMBEDDINGS_HELP = ("When the layer holds embeddings of several models, name the one to use in <b>embeddings</b> "
                   "(model name or key). <b>Checkpoint</b> only when the model's checkpoint moved since "
                   "embedding.")


def add_embedding_choice(alg: HqrsAlgorithm) -> None:
    """EMBEDDINGS and CHECKPOINT (advanced): which embeddings of the layer, and their model's weights."""
    alg.addParameter(advanced(QgsProcessingParameterString(
        "EMBEDDINGS", tr("Embeddings (model name or key) when the layer has several"), None, False, True)))
    alg.addParameter(advanced(QgsProcessingParameterFile(
        "CHECKPOINT", tr("Checkpoint of that model, if it moved since embedding"),
        QgsProcessingParameterFile.File, "", None, True, CHECKPOINT_FILTER)))


def embedding_args(alg: HqrsAlgorithm, parameters: dict[str, Any], context: QgsProcessingContext) -> list[str]:
    """CLI options for :func:`add_embedding_choice`."""
    args = []
    embeddings = alg.optional_text(parameters, "EMBEDDINGS", context)
    if embeddings:
        args.append(cli_option("--model", embeddings))
    if alg.given(parameters, "CHECKPOINT"):
        args.append(cli_option("--checkpoint", alg.parameterAsFile(parameters, "CHECKPOINT", context)))
    return args


def add_result_parameters(alg: HqrsAlgorithm) -> None:
    """K, EXTENT and OUTPUT (a result layer file; a temporary GeoPackage by default)."""
    alg.addParameter(QgsProcessingParameterNumber("K", tr("Number of results"),
                                                  QgsProcessingParameterNumber.Integer, 20, False, 1))
    alg.addParameter(QgsProcessingParameterExtent("EXTENT", tr("Only tiles within extent"), None, True))
    add_embedding_choice(alg)
    alg.addParameter(QgsProcessingParameterVectorDestination(
        "OUTPUT", tr("Results"), QgsProcessing.TypeVectorPolygon))


def result_request(alg: HqrsAlgorithm, parameters: dict[str, Any], context: QgsProcessingContext,
                   default_name: str) -> tuple:
    """The request's k and extent, the registered destination, the result file and its layer name."""
    registered = alg.parameterAsOutputLayer(parameters, "OUTPUT", context)
    path, table = split_destination(registered)
    request: dict[str, Any] = {"k": alg.parameterAsInt(parameters, "K", context)}
    if parameters.get("EXTENT"):
        rect = alg.parameterAsExtent(parameters, "EXTENT", context)
        if not rect.isNull() and not rect.isEmpty():
            request["bbox"] = [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]
            crs = alg.parameterAsExtentCrs(parameters, "EXTENT", context)
            if crs.isValid():
                request["bbox_crs"] = crs.authid() or crs.toWkt()
    return request, registered, path, table or default_name


def search_session(alg: HqrsAlgorithm, parameters: dict[str, Any], context: QgsProcessingContext, layer: str,
                   feedback: QgsProcessingFeedback) -> sessions.SearchSession:
    """The running search session of ``layer`` (started when there is none: the model loads once)."""
    embeddings = alg.optional_text(parameters, "EMBEDDINGS", context)
    key = sessions.session_key(layer, embeddings)
    if alg.given(parameters, "CHECKPOINT"):
        key = sessions.SessionKey(key.python, key.layer, key.embeddings, key.device,
                                  alg.parameterAsFile(parameters, "CHECKPOINT", context))
    session = sessions.get_session(key)
    if session.running:
        feedback.pushInfo(tr("Using the running search session of {} (model already loaded)").format(layer))
    else:
        feedback.pushInfo(tr("Loading the model of the layer's embeddings on {} (once: later searches of this "
                             "layer, here or in the HQRS search dock, reuse it)").format(key.device))
        feedback.setProgressText(tr("loading the model…"))
    feedback.canceled.connect(session.stop)
    try:
        session.start()
    except EngineError as exc:
        raise QgsProcessingException(f"HQRS: {exc.text}") from None
    finally:
        feedback.canceled.disconnect(session.stop)
    return session


def ask(session: sessions.SearchSession, payload: dict[str, Any], feedback: QgsProcessingFeedback) -> list[dict]:
    """One request to the session; its ranked results."""
    feedback.setProgressText(tr("searching…"))
    try:
        response = session.request(payload)
    except EngineError as exc:
        raise QgsProcessingException(f"HQRS: {exc.text}") from None
    results = response.get("results", [])
    feedback.pushInfo(tr("{} tiles in {:.3f} s").format(len(results), response.get("seconds", 0.0)))
    return results


def write_results(tiles_path: str, results: list[dict], path: str, name: str, context: QgsProcessingContext,
                  feedback: QgsProcessingFeedback) -> str:
    """The ranked tiles (their tile columns, ``score`` and ``rank``; no embeddings) as layer
    ``name`` of ``path``, as the engine writes result layers; returns the layer's URI."""
    with opened_in_worker(layer_uri(tiles_path)) as tiles:  # an algorithm's thread: keeps the CRS cache sound
        if not tiles.isValid():
            raise QgsProcessingException(tr("HQRS: cannot read the tile layer {}").format(tiles_path))
        found = features_by_tile(tiles, [r["tile_id"] for r in results])
        source_fields, source_crs, wkb = tiles.fields(), tiles.crs(), tiles.wkbType()
    keep = [f for f in source_fields if not f.name().startswith("emb_") and f.name().lower() != "fid"]
    fields = QgsFields()
    for field in keep[:1]:
        fields.append(field)
    fields.append(QgsField("score", QVariant.Double))
    fields.append(QgsField("rank", QVariant.Int))
    for field in keep[1:]:
        if field.name() not in ("score", "rank"):
            fields.append(field)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = QgsVectorFileWriter.driverForExtension(os.path.splitext(path)[1]) or "GPKG"
    options.fileEncoding = "UTF-8"
    if options.driverName == "GPKG":
        options.layerName = name
    options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteLayer if os.path.exists(path) \
        else QgsVectorFileWriter.CreateOrOverwriteFile
    writer = QgsVectorFileWriter.create(path, fields, wkb, source_crs, context.transformContext(),
                                        options)
    if writer.hasError() != QgsVectorFileWriter.NoError:
        raise QgsProcessingException(tr("HQRS: cannot write {}: {}").format(path, writer.errorMessage()))
    for result in results:
        source = found.get(str(result["tile_id"]))
        if source is None:
            continue
        feature = QgsFeature(fields)
        feature.setGeometry(source.geometry())
        for field in fields:
            if field.name() == "score":
                feature["score"] = float(result["score"])
            elif field.name() == "rank":
                feature["rank"] = int(result["rank"])
            else:
                feature[field.name()] = source[field.name()]
        writer.addFeature(feature)
    writer.flushBuffer()
    del writer
    return layer_uri(path, name) if options.driverName == "GPKG" else path


def hits_name(query: str) -> str:
    """The name of a result layer in QGIS: ``hits: "a river"``."""
    return f'hits: "{query}"'


class SearchAlgorithm(HqrsAlgorithm):
    """``hqrs:search``: the tiles most similar to a text, as a ranked result layer."""

    NAME = "search"
    DISPLAY = "Text search"
    GROUP = "Search"
    GROUP_ID = "search"
    HELP = ("Ranks the tiles of an embedded tile layer by similarity to a text (e.g. <i>a river with a bridge</i>) "
            "and writes the best <b>K</b> as a result layer with fields <i>rank</i> and <i>score</i>, loaded as "
            "<i>hits: \"text\"</i> (outlines coloured by score on the model's fixed score scale, so a text that "
            "matches nothing stays grey; rank labels). The first search of a layer loads its "
            "model; later searches (here or in the HQRS search dock) reuse the running session. "
            "<b>Extent</b> restricts the search to tiles within it (in the extent's CRS).<br>" + EMBEDDINGS_HELP)

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        add_tile_layer_input(self)
        self.addParameter(QgsProcessingParameterString("QUERY", tr("Text")))
        add_result_parameters(self)

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo search LAYER TEXT``."""
        layer = self.input_tile_layer(parameters, "INPUT", context, feedback)
        query = self.optional_text(parameters, "QUERY", context)
        if not query:
            raise QgsProcessingException(tr("HQRS: give a text to search for"))
        request, registered, path, name = result_request(self, parameters, context,
                                                         f"search_{slug(query) or 'results'}")
        session = search_session(self, parameters, context, layer, feedback)
        results = ask(session, {"text": query, **request}, feedback)
        uri = write_results(layer, results, path, name, context, feedback)
        self.load_output(context, registered, uri, hits_name(query), kind="hits",
                         scale=styles.score_scale(session.info))
        return {"OUTPUT": uri}


def split_list(text: str) -> list[str]:
    """The non-empty items of a comma-separated string (tile ids, labels)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


class SimilarAlgorithm(HqrsAlgorithm):
    """``hqrs:similar``: the tiles most similar to example tiles, as a ranked result layer."""

    NAME = "similar"
    DISPLAY = "Similar tiles"
    GROUP = "Search"
    GROUP_ID = "search"
    HELP = ("Ranks the tiles of an embedded tile layer by similarity to example tiles: the tiles whose "
            "<i>tile_id</i> is in <b>tile ids</b> (comma-separated) and, when <i>Selected features only</i> is "
            "ticked for the tile layer, the selected tiles. <b>Negative tile ids</b> steer away from tiles "
            "like those. The examples themselves are left out of the results.<br>" + EMBEDDINGS_HELP)

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterFeatureSource(
            "INPUT", tr("Tile layer (selected features: the example tiles)"), [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString("TILE_IDS", tr("Example tile ids (comma-separated)"),
                                                       None, False, True))
        self.addParameter(advanced(QgsProcessingParameterString(
            "NEGATIVE_IDS", tr("Negative example tile ids (comma-separated)"), None, False, True)))
        add_result_parameters(self)

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo similar LAYER --tile ID …``."""
        layer = self.whole_tile_layer(parameters, "INPUT", context, feedback)
        ids = split_list(self.optional_text(parameters, "TILE_IDS", context))
        ids += [i for i in self.selected_tile_ids(parameters, "INPUT", context) if i not in ids]
        if not ids:
            raise QgsProcessingException(
                tr("HQRS: no example tiles: give tile ids or select tiles and tick 'Selected features only'"))
        negatives = split_list(self.optional_text(parameters, "NEGATIVE_IDS", context))
        feedback.pushInfo(tr("Examples: {}").format(", ".join(ids)))
        request, registered, path, name = result_request(self, parameters, context,
                                                         f"similar_{slug('_'.join(ids))}")
        session = search_session(self, parameters, context, layer, feedback)
        results = ask(session, {"similar": ids, "negative": negatives, **request}, feedback)
        uri = write_results(layer, results, path, name, context, feedback)
        self.load_output(context, registered, uri, hits_name("like " + ", ".join(ids)), kind="hits",
                         scale=styles.score_scale(session.info, similar=True))
        return {"OUTPUT": uri}


class ClassifyAlgorithm(HqrsAlgorithm):
    """``hqrs:classify``: zero-shot classes for every tile, stored on the tile layer."""

    NAME = "classify"
    DISPLAY = "Zero-shot classify"
    GROUP = "Search"
    GROUP_ID = "search"
    HELP = ("Gives every tile of an embedded tile layer the most similar of the <b>labels</b> "
            "(comma-separated class names, e.g. <i>river,forest,parking lot</i>): fields <i>label</i>, "
            "<i>label_score</i> and <i>label_top</i> (the best <b>top k</b> with scores). The classes are drawn on "
            "the map as a layer of their own above the imagery, <i>classes: …</i>: one semi-transparent colour "
            "per label with the label on each tile, a legend with each class's tile count, and map tips with "
            "the score (the tile layer's own style is left as it is; a new run replaces the layer).<br>"
            + EMBEDDINGS_HELP)

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        add_tile_layer_input(self)
        self.addParameter(QgsProcessingParameterString("LABELS", tr("Labels (comma-separated)")))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "TOP_K", tr("Classes kept in label_top"), QgsProcessingParameterNumber.Integer, 3, False, 1)))
        add_embedding_choice(self)
        add_updated_output(self)

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo classify LAYER --labels …``."""
        layer = self.input_tile_layer(parameters, "INPUT", context, feedback)
        classes = split_list(self.optional_text(parameters, "LABELS", context))
        labels = ",".join(classes)
        if not labels:
            raise QgsProcessingException(tr("HQRS: give the class names as comma-separated labels"))
        self.run_engine(["classify", layer, cli_option("--labels", labels),
                         "--top-k", str(self.parameterAsInt(parameters, "TOP_K", context)),
                         *embedding_args(self, parameters, context)], feedback)
        # the classes on the map: a layer of its own over the same file (the tile layer's style untouched)
        self.load_output(context, "", styles.classes_layer_uri(layer_uri(layer)), styles.classes_layer_name(classes),
                         always=True, kind="classes", labels=classes)
        return {"OUTPUT": layer_uri(layer)}
