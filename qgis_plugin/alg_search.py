"""Search algorithms on embedded tile layers: ``hqrs:search``, ``hqrs:similar``, ``hqrs:classify``."""
from __future__ import annotations

from typing import Any, Dict, List

from qgis.core import (
    QgsFeatureRequest,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from .alg_base import HqrsAlgorithm, cli_option, layer_uri, slug, split_destination, tr
from .alg_models import add_tile_layer_input, add_updated_output
from .alg_params import CHECKPOINT_FILTER, advanced

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


def embedding_args(alg: HqrsAlgorithm, parameters: Dict[str, Any], context: QgsProcessingContext) -> List[str]:
    """CLI options for :func:`add_embedding_choice`."""
    args = []
    embeddings = alg.optional_text(parameters, "EMBEDDINGS", context)
    if embeddings:
        args.append(cli_option("--model", embeddings))
    if parameters.get("CHECKPOINT"):
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


def result_args(alg: HqrsAlgorithm, parameters: Dict[str, Any], context: QgsProcessingContext,
                default_name: str) -> tuple:
    """CLI options writing the ranked tiles, the registered destination and the result layer's URI."""
    registered = alg.parameterAsOutputLayer(parameters, "OUTPUT", context)
    path, table = split_destination(registered)
    name = table or default_name
    args = ["-k", str(alg.parameterAsInt(parameters, "K", context)),
            cli_option("--result-layer", name), cli_option("--output", path)]
    if parameters.get("EXTENT"):
        rect = alg.parameterAsExtent(parameters, "EXTENT", context)
        if not rect.isNull() and not rect.isEmpty():
            values = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
            args.append(cli_option("--bbox", ",".join(repr(v) for v in values)))
            crs = alg.parameterAsExtentCrs(parameters, "EXTENT", context)
            if crs.isValid():
                args.append(cli_option("--bbox-crs", crs.authid() or crs.toWkt()))
    return args + embedding_args(alg, parameters, context), registered, layer_uri(path, name), name


class SearchAlgorithm(HqrsAlgorithm):
    """``hqrs:search``: the tiles most similar to a text, as a ranked result layer."""

    NAME = "search"
    DISPLAY = "Text search"
    GROUP = "Search"
    GROUP_ID = "search"
    HELP = ("Ranks the tiles of an embedded tile layer by similarity to a text (e.g. <i>a river with a bridge</i>) "
            "and writes the best <b>K</b> as a result layer with fields <i>rank</i> and <i>score</i>. "
            "<b>Extent</b> restricts the search to tiles within it (in the extent's CRS).<br>" + EMBEDDINGS_HELP)

    def initAlgorithm(self, config: Dict[str, Any] = None) -> None:  # noqa: N802
        """Declare the parameters."""
        add_tile_layer_input(self)
        self.addParameter(QgsProcessingParameterString("QUERY", tr("Text")))
        add_result_parameters(self)

    def process(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Run ``hqrs-geo search LAYER TEXT``."""
        layer = self.input_tile_layer(parameters, "INPUT", context, feedback)
        query = self.optional_text(parameters, "QUERY", context)
        if not query:
            raise QgsProcessingException(tr("HQRS: give a text to search for"))
        args, registered, uri, name = result_args(self, parameters, context, f"search_{slug(query) or 'results'}")
        positional = f" {query}" if query.startswith("-") else query  # never taken for an option
        self.run_engine(["search", layer, positional, *args], feedback)
        self.load_output(context, registered, uri, name)
        return {"OUTPUT": uri}


def split_list(text: str) -> List[str]:
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

    def initAlgorithm(self, config: Dict[str, Any] = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterFeatureSource(
            "INPUT", tr("Tile layer (selected features: the example tiles)"), [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString("TILE_IDS", tr("Example tile ids (comma-separated)"),
                                                       None, False, True))
        self.addParameter(advanced(QgsProcessingParameterString(
            "NEGATIVE_IDS", tr("Negative example tile ids (comma-separated)"), None, False, True)))
        add_result_parameters(self)

    def selected_ids(self, parameters: Dict[str, Any], context: QgsProcessingContext) -> List[str]:
        """The tile ids of the selected features, when the input is limited to them."""
        value = parameters.get("INPUT")
        if not (isinstance(value, QgsProcessingFeatureSourceDefinition) and value.selectedFeaturesOnly):
            return []
        source = self.parameterAsSource(parameters, "INPUT", context)
        if source is None or source.fields().indexOf("tile_id") < 0:
            raise QgsProcessingException(tr("HQRS: the input has no tile_id field; choose a tile layer"))
        request = QgsFeatureRequest().setSubsetOfAttributes(["tile_id"], source.fields())
        request.setFlags(QgsFeatureRequest.NoGeometry)
        return [str(f["tile_id"]) for f in source.getFeatures(request)]

    def process(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Run ``hqrs-geo similar LAYER --tile ID …``."""
        value = parameters.get("INPUT")
        whole = dict(parameters, INPUT=value.source) \
            if isinstance(value, QgsProcessingFeatureSourceDefinition) else parameters  # the layer, not a selection
        layer = self.input_tile_layer(whole, "INPUT", context, feedback)
        ids = split_list(self.optional_text(parameters, "TILE_IDS", context))
        ids += [i for i in self.selected_ids(parameters, context) if i not in ids]
        if not ids:
            raise QgsProcessingException(
                tr("HQRS: no example tiles: give tile ids or select tiles and tick 'Selected features only'"))
        negatives = split_list(self.optional_text(parameters, "NEGATIVE_IDS", context))
        feedback.pushInfo(tr("Examples: {}").format(", ".join(ids)))
        args, registered, uri, name = result_args(self, parameters, context, f"similar_{slug('_'.join(ids))}")
        self.run_engine(["similar", layer, *[cli_option("--tile", i) for i in ids],
                         *[cli_option("--negative", i) for i in negatives], *args], feedback)
        self.load_output(context, registered, uri, name)
        return {"OUTPUT": uri}


class ClassifyAlgorithm(HqrsAlgorithm):
    """``hqrs:classify``: zero-shot classes for every tile, stored on the tile layer."""

    NAME = "classify"
    DISPLAY = "Zero-shot classify"
    GROUP = "Search"
    GROUP_ID = "search"
    HELP = ("Gives every tile of an embedded tile layer the most similar of the <b>labels</b> "
            "(comma-separated class names, e.g. <i>river,forest,parking lot</i>): fields <i>label</i>, "
            "<i>label_score</i> and <i>label_top</i> (the best <b>top k</b> with scores).<br>" + EMBEDDINGS_HELP)

    def initAlgorithm(self, config: Dict[str, Any] = None) -> None:  # noqa: N802
        """Declare the parameters."""
        add_tile_layer_input(self)
        self.addParameter(QgsProcessingParameterString("LABELS", tr("Labels (comma-separated)")))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "TOP_K", tr("Classes kept in label_top"), QgsProcessingParameterNumber.Integer, 3, False, 1)))
        add_embedding_choice(self)
        add_updated_output(self)

    def process(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Run ``hqrs-geo classify LAYER --labels …``."""
        layer = self.input_tile_layer(parameters, "INPUT", context, feedback)
        labels = ",".join(split_list(self.optional_text(parameters, "LABELS", context)))
        if not labels:
            raise QgsProcessingException(tr("HQRS: give the class names as comma-separated labels"))
        self.run_engine(["classify", layer, cli_option("--labels", labels),
                         "--top-k", str(self.parameterAsInt(parameters, "TOP_K", context)),
                         *embedding_args(self, parameters, context)], feedback)
        return {"OUTPUT": layer_uri(layer)}
