"""Model algorithms: ``hqrs:embed``, ``hqrs:caption`` (update a tile layer) and ``hqrs:run`` (all in one)."""
from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorLayer,
)

from ...core.registry import CLIP_MODELS, COCA_MODELS
from ..base import HqrsAlgorithm, tr
from ..params import (
    MODEL_FLAGS,
    add_decoding_parameters,
    add_engine_parameters,
    add_extent_parameters,
    add_model_parameters,
    add_tiling_parameters,
    decoding_args,
    engine_args,
    model_args,
    tiling_args,
)
from .tiles import EXTENT_HELP, RasterInputAlgorithm, add_tile_destination

MODEL_HELP = ("<b>Model</b>: a registry model (its checkpoint is looked up in the engine's cache unless "
              "<b>checkpoint</b> is given), or <i>custom</i>: any open_clip architecture named in "
              "<b>architecture</b> with its <b>checkpoint</b> file. The shipped demo models (<i>hqrs-mini-…</i>) need "
              "no checkpoint; for another model give its file here or once in <i>Raster ▸ HQRS ▸ HQRS "
              "settings…</i> (<i>Its checkpoint</i>; <i>Check engine</i> tests it). Defaults come from the HQRS "
              "settings. ")
VIEWS_HELP = ("<b>Views</b> (advanced): 1 embeds each tile as it is; 8 averages the embeddings of its eight "
              "rotations and flips; 16 also those of its centre. Zero-shot classes get about a point better "
              "(hqrs-mini-clip, 16 views), at about 12x the time. ")
RESUME_HELP = ("Tiles that already carry this model's results are skipped unless <b>recompute</b> is ticked; "
               "cancelling keeps finished batches, so running the same job again resumes.")


def add_tile_layer_input(alg: HqrsAlgorithm) -> None:
    """INPUT: a tile layer file (GeoPackage, GeoParquet, FlatGeobuf)."""
    alg.addParameter(QgsProcessingParameterVectorLayer("INPUT", tr("Tile layer"), [QgsProcessing.TypeVectorPolygon]))


def add_updated_output(alg: HqrsAlgorithm) -> None:
    """OUTPUT: the input tile layer, updated in place."""
    alg.addOutput(QgsProcessingOutputVectorLayer("OUTPUT", tr("Updated tile layer"), QgsProcessing.TypeVectorPolygon))


class TileLayerModelAlgorithm(HqrsAlgorithm):
    """One model over every tile of a tile layer, its results stored on that layer (``hqrs-geo COMMAND
    LAYER``, COMMAND being ``NAME``); subclasses set ``MODELS`` (the registry models offered),
    ``MODEL_LABEL`` and whether the caption ``DECODING`` parameters belong to it."""

    GROUP = "Models"
    GROUP_ID = "models"
    MODELS: tuple[str, ...] = ()
    MODEL_LABEL = ""
    DECODING = False

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        add_tile_layer_input(self)
        add_model_parameters(self, "", self.MODELS, self.MODEL_LABEL)
        if self.DECODING:
            add_decoding_parameters(self)
        add_engine_parameters(self, views=not self.DECODING)
        add_updated_output(self)

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo NAME LAYER``."""
        decoding = decoding_args(self, parameters, context) if self.DECODING else []
        return self.update_tile_layer(parameters, context, feedback, self.NAME, [
            *model_args(self, parameters, context), *decoding, *engine_args(self, parameters, context)])


class EmbedAlgorithm(TileLayerModelAlgorithm):
    """``hqrs:embed``: image embeddings of every tile, stored on the tile layer."""

    NAME = "embed"
    DISPLAY = "Embed tiles"
    HELP = ("Computes an image embedding of every tile with a CLIP model and stores it on the tile layer "
            "(field <i>emb_&lt;model&gt;</i>), for text search, similar tiles and zero-shot classes.<br>"
            + MODEL_HELP + VIEWS_HELP + RESUME_HELP)
    MODELS = CLIP_MODELS
    MODEL_LABEL = "Embedding model"


class CaptionAlgorithm(TileLayerModelAlgorithm):
    """``hqrs:caption``: a caption of every tile from a CoCa model, stored on the tile layer."""

    NAME = "caption"
    DISPLAY = "Caption tiles"
    HELP = ("Writes a caption of every tile (field <i>caption</i>) with a CoCa model.<br>"
            "<b>Decoding</b>: greedy (fastest), beam (default), sample, or consensus (several captions per tile, "
            "the one most like the others; about 3x the time of beam). <b>Maximum length</b> in tokens.<br>"
            + MODEL_HELP + RESUME_HELP)
    MODELS = COCA_MODELS
    MODEL_LABEL = "Caption model (CoCa)"
    DECODING = True


class RunAlgorithm(RasterInputAlgorithm):
    """``hqrs:run``: tile a raster, embed and caption its tiles in one pass."""

    NAME = "run"
    DISPLAY = "Tile, embed and caption"
    GROUP = "Models"
    GROUP_ID = "models"
    HELP = ("Tiles a raster, then embeds (CLIP) and captions (CoCa) every tile in one pass over the pixels. "
            "In scripts, an unset output writes <i>&lt;raster name&gt;_tiles.gpkg</i> next to the raster.<br>"
            + EXTENT_HELP + MODEL_HELP + VIEWS_HELP + RESUME_HELP)

    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        """Declare the parameters."""
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", tr("Raster")))
        add_extent_parameters(self)
        add_model_parameters(self, "EMBED_", CLIP_MODELS, "Embedding model")
        add_model_parameters(self, "CAPTION_", COCA_MODELS, "Caption model (CoCa)")
        add_decoding_parameters(self)
        add_engine_parameters(self)
        add_tiling_parameters(self, advanced_all=True)
        add_tile_destination(self, "Tile layer")

    def process(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Run ``hqrs-geo run RASTER -o OUT``."""
        return self.write_tile_layer(parameters, context, feedback, "run", [
            *model_args(self, parameters, context, "EMBED_", MODEL_FLAGS["EMBED_"]),
            *model_args(self, parameters, context, "CAPTION_", MODEL_FLAGS["CAPTION_"]),
            *decoding_args(self, parameters, context), *engine_args(self, parameters, context),
            *tiling_args(self, parameters, context)])
