"""Parameter sets shared by the HQRS algorithms (rasters, tiling, models, device) and their CLI flags.

Model choice: the provider must load without starting the engine, so the model lists come from
:mod:`..core.registry`, generated from the engine's registry by ``make plugin`` (a test checks it
is up to date). They are enums with static strings, so scripts, batch runs and models store the
name (``"remoteclip-vit-b-32"``), not a position. The last entry, :data:`CUSTOM_MODEL`, runs any
open_clip architecture (or a registry name missing here, e.g. one added later) named in the ARCH
parameter with the CHECKPOINT file. With a registry entry, ARCH overrides the architecture and
CHECKPOINT the weights file (default: the engine's checkpoint cache).

Defaults come from the HQRS settings (model, caption model, checkpoint, device, batch size, tile
size in pixels or metres, overlap, resolution), read when a dialog or ``processing.run`` creates
the algorithm.
"""
from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterCrs,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
)

from ..core import settings
from ..core.registry import CLIP_MODELS
from .base import cli_option, tr

CUSTOM_MODEL = "custom (architecture + checkpoint)"
DEVICES = settings.DEVICES
EDGES = ("shift", "pad", "drop")
DECODINGS = ("greedy", "beam", "sample", "consensus")  # the engine's decoding methods (models.decoding_options.METHODS)
CHECKPOINT_FILTER = "Checkpoints (*.pt *.pth *.bin *.safetensors *.ckpt);;All files (*.*)"
DEFAULT_MIN_LENGTH = 5  # the CLI's --min-length default
DEFAULT_WEB_RESOLUTION_M = 0.5

# the CLI flags of a model's name, architecture and checkpoint, per parameter prefix and job
MODEL_FLAGS = {
    "": ("--model", "--arch", "--checkpoint"),
    "EMBED_": ("--embed-model", "--embed-arch", "--embed-checkpoint"),
    "CAPTION_": ("--caption-model", "--caption-arch", "--caption-checkpoint"),
}


def advanced(param: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    """Mark a parameter as advanced (collapsed in the dialog)."""
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def static_enum(name: str, description: str, options: tuple[str, ...], default: str,
                optional: bool = False) -> QgsProcessingParameterEnum:
    """An enum parameter whose values are the option strings themselves."""
    return QgsProcessingParameterEnum(name, description, list(options), False, default, optional, True)


# tiling ---------------------------------------------------------------------------------
def add_tiling_parameters(alg: QgsProcessingAlgorithm, advanced_all: bool = False) -> None:
    """TILE_SIZE, TILE_SIZE_M, OVERLAP, GSD, EDGE, MIN_VALID, CRS, BANDS."""
    size, metres = settings.value("tile_size"), settings.value("tile_unit") == "m"
    gsd = settings.value("gsd")
    params = [
        QgsProcessingParameterNumber("TILE_SIZE", tr("Tile size (pixels)"), QgsProcessingParameterNumber.Integer,
                                     256 if metres else max(8, int(round(size))), False, 8),
        QgsProcessingParameterNumber("TILE_SIZE_M", tr("Tile size in ground metres (overrides the pixel size)"),
                                     QgsProcessingParameterNumber.Double, size if metres else None, True, 0.0),
        QgsProcessingParameterNumber("OVERLAP", tr("Overlap (percent of the tile size)"),
                                     QgsProcessingParameterNumber.Double, settings.value("overlap"), False, 0.0, 90.0),
        QgsProcessingParameterNumber("GSD", tr("Resample to ground resolution (metres per pixel)"),
                                     QgsProcessingParameterNumber.Double, gsd if gsd > 0 else None, True, 0.0),
        static_enum("EDGE", tr("Partial tiles at the right/bottom edge"), EDGES, "shift"),
        QgsProcessingParameterNumber("MIN_VALID", tr("Minimum valid fraction of a tile"),
                                     QgsProcessingParameterNumber.Double, 0.5, False, 0.0, 1.0),
        QgsProcessingParameterCrs("CRS", tr("CRS of the tile footprints (default: the raster's)"), None, True),
        advanced(QgsProcessingParameterString("BANDS", tr("Bands for R,G,B (e.g. 4,3,2) or one band"),
                                              None, False, True)),
    ]
    for index, param in enumerate(params):
        alg.addParameter(advanced(param) if advanced_all and index > 0 else param)


def tiling_args(alg: Any, parameters: dict[str, Any], context: QgsProcessingContext) -> list[str]:
    """The CLI tiling options for the parameters of :func:`add_tiling_parameters`."""
    metres = alg.optional_number(parameters, "TILE_SIZE_M", context)
    if metres:
        args = ["--tile-size", f"{metres:g}m"]
    else:
        args = ["--tile-size", str(alg.parameterAsInt(parameters, "TILE_SIZE", context))]
    overlap = alg.parameterAsDouble(parameters, "OVERLAP", context)
    if overlap > 0:
        args += ["--overlap", f"{overlap:g}%"]
    gsd = alg.optional_number(parameters, "GSD", context)
    if gsd:
        args += ["--gsd", f"{gsd:g}"]
    args += ["--edge", alg.parameterAsEnumString(parameters, "EDGE", context) or "shift"]
    args += ["--min-valid", f"{alg.parameterAsDouble(parameters, 'MIN_VALID', context):g}"]
    crs = alg.parameterAsCrs(parameters, "CRS", context)
    if crs.isValid():
        args += ["--crs", crs.authid() or crs.toWkt()]
    bands = alg.optional_text(parameters, "BANDS", context)
    if bands:
        args += ["--bands", bands.replace(" ", "")]
    return args


# models ---------------------------------------------------------------------------------
def add_model_parameters(alg: QgsProcessingAlgorithm, prefix: str, names: tuple[str, ...], label: str) -> None:
    """<prefix>MODEL (registry names + custom), <prefix>ARCH, <prefix>CHECKPOINT; defaults from
    the settings' embedding model (and its checkpoint) or caption model."""
    clip = names is CLIP_MODELS or names[0] in CLIP_MODELS
    chosen = settings.value("model" if clip else "caption_model")
    checkpoint = settings.value("checkpoint") if clip else ""
    alg.addParameter(static_enum(f"{prefix}MODEL", tr(label), names + (CUSTOM_MODEL,),
                                 chosen if chosen in names else names[0]))
    alg.addParameter(QgsProcessingParameterString(
        f"{prefix}ARCH", tr("open_clip architecture (custom model; or overrides the model's)"), None, False, True))
    alg.addParameter(QgsProcessingParameterFile(
        f"{prefix}CHECKPOINT", tr("Checkpoint file (default: the engine's checkpoint cache)"),
        QgsProcessingParameterFile.File, "", checkpoint or None, True, CHECKPOINT_FILTER))


def model_args(alg: Any, parameters: dict[str, Any], context: QgsProcessingContext, prefix: str = "",
               flags: tuple[str, str, str] = MODEL_FLAGS[""]) -> list[str]:
    """CLI options naming the model chosen by the parameters of :func:`add_model_parameters`."""
    model_flag, arch_flag, checkpoint_flag = flags
    model = alg.parameterAsEnumString(parameters, f"{prefix}MODEL", context)
    arch = alg.optional_text(parameters, f"{prefix}ARCH", context)
    checkpoint = alg.parameterAsFile(parameters, f"{prefix}CHECKPOINT", context) \
        if alg.given(parameters, f"{prefix}CHECKPOINT") else ""
    if model == CUSTOM_MODEL:
        if not arch:
            raise QgsProcessingException(
                tr("HQRS: a custom model needs its open_clip architecture in {}ARCH (e.g. ViT-L-14)").format(prefix))
        args = [cli_option(model_flag, arch)]
    else:
        args = [cli_option(model_flag, model)] + ([cli_option(arch_flag, arch)] if arch else [])
    if checkpoint:
        args.append(cli_option(checkpoint_flag, checkpoint))
    return args


#: Test-time views per tile embedding (the engine's ``--views``): 1, or the 8 rotations/flips, or
#: those and the same of the centre crop (zero-shot classes about a point better, ~12x slower).
VIEWS = ("1", "8", "16")


def add_engine_parameters(alg: QgsProcessingAlgorithm, views: bool = True) -> None:
    """DEVICE, BATCH_SIZE, VIEWS (with ``views``: for algorithms that embed), OVERWRITE and TRUST_CHECKPOINT."""
    alg.addParameter(static_enum("DEVICE", tr("Device"), DEVICES, settings.value("device")
                                 if settings.value("device") in DEVICES else "auto"))
    alg.addParameter(QgsProcessingParameterNumber("BATCH_SIZE", tr("Batch size (tiles)"),
                                                  QgsProcessingParameterNumber.Integer, settings.value("batch_size"),
                                                  False, 1, 4096))
    if views:
        alg.addParameter(advanced(static_enum(
            "VIEWS", tr("Views averaged per tile embedding (8 or 16: see help)"), VIEWS, "1")))
    alg.addParameter(advanced(QgsProcessingParameterBoolean(
        "OVERWRITE", tr("Recompute results the layer already has"), False)))
    alg.addParameter(advanced(QgsProcessingParameterBoolean(
        "TRUST_CHECKPOINT", tr("Trust the checkpoint (allow pickle code execution; trusted sources only)"),
        False)))


def engine_args(alg: Any, parameters: dict[str, Any], context: QgsProcessingContext) -> list[str]:
    """CLI options for the parameters of :func:`add_engine_parameters`."""
    args = ["--device", alg.parameterAsEnumString(parameters, "DEVICE", context) or "auto",
            "--batch-size", str(alg.parameterAsInt(parameters, "BATCH_SIZE", context))]
    views = (alg.parameterAsEnumString(parameters, "VIEWS", context) or "1") if alg.parameterDefinition("VIEWS") \
        else "1"
    if views != "1":  # only when asked: an engine from before --views keeps working
        args += ["--views", views]
    if alg.parameterAsBool(parameters, "OVERWRITE", context):
        args.append("--overwrite")
    if alg.parameterAsBool(parameters, "TRUST_CHECKPOINT", context):
        args.append("--trust-checkpoint")
    return args


def add_decoding_parameters(alg: QgsProcessingAlgorithm) -> None:
    """DECODING and MAX_LENGTH."""
    alg.addParameter(static_enum("DECODING", tr("Caption decoding"), DECODINGS, "beam"))
    alg.addParameter(QgsProcessingParameterNumber("MAX_LENGTH", tr("Maximum caption length (tokens)"),
                                                  QgsProcessingParameterNumber.Integer, 30, False, 1, 256))


def decoding_args(alg: Any, parameters: dict[str, Any], context: QgsProcessingContext) -> list[str]:
    """CLI options for the parameters of :func:`add_decoding_parameters`."""
    max_length = alg.parameterAsInt(parameters, "MAX_LENGTH", context)
    return ["--decoding", alg.parameterAsEnumString(parameters, "DECODING", context) or "beam",
            "--max-length", str(max_length), "--min-length", str(min(DEFAULT_MIN_LENGTH, max_length))]


# rasters ---------------------------------------------------------------------------------
def canvas_extent() -> str | None:
    """The map canvas extent as an extent parameter value (None without a QGIS window)."""
    try:
        from qgis.utils import iface
    except ImportError:
        return None
    canvas = iface.mapCanvas() if iface is not None else None
    if canvas is None or canvas.extent().isEmpty():
        return None
    rect, crs = canvas.extent(), canvas.mapSettings().destinationCrs()
    return f"{rect.xMinimum()!r},{rect.xMaximum()!r},{rect.yMinimum()!r},{rect.yMaximum()!r} [{crs.authid()}]"


def add_extent_parameters(alg: QgsProcessingAlgorithm) -> None:
    """EXTENT (default: the map canvas) and RESOLUTION (for web/WMS layers)."""
    alg.addParameter(QgsProcessingParameterExtent(
        "EXTENT", tr("Extent (default: the map canvas; empty: the whole raster)"), canvas_extent(),
        True))
    alg.addParameter(QgsProcessingParameterNumber(
        "RESOLUTION", tr("Ground resolution of web/WMS/XYZ layers (m/px)"),
        QgsProcessingParameterNumber.Double, DEFAULT_WEB_RESOLUTION_M, True, 0.01))
