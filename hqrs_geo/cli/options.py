"""What every command line of ``hqrs-geo`` shares: the parser, checked value types, option groups.

* :class:`Parser` prints argument errors as one line (``hqrs-geo: error: --batch-size: …``)
  instead of argparse's usage dump, exit status 2.
* :func:`number` is the one validated-number type of every numeric option: whole or real,
  finite, within bounds; the error names the option and the accepted range.
* The option groups (progress, tiling, engine, decoding) are added by the commands that use
  them; :func:`tile_config` turns the tiling group into a :class:`~hqrs_geo.tiling.config.TileConfig`.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ..models.decoding_options import CONSENSUS_TEMPERATURE, MAX_SAMPLES, METHODS, DecodingConfig
from ..models.precision import PRECISIONS
from ..models.views import VIEW_COUNTS
from ..progress import MODES
from ..raster.grid import DEFAULT_EDGE, EDGE_POLICIES
from ..tiling.config import DEFAULT_MIN_VALID, TileConfig

PROG = "hqrs-geo"


_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d)")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong, and where to read more.

    A value that starts with ``-`` and a digit (``--tile-size -5m``, ``--overlap -10%``) is read
    as the option's value (so its own check explains what is wrong), never as an unknown flag.
    """

    def _parse_optional(self, arg_string: str) -> Any:
        if _NEGATIVE_VALUE.match(arg_string):
            return None
        return super()._parse_optional(arg_string)

    def error(self, message: str) -> NoReturn:
        """Print ``hqrs-geo: error: <option>: <what>; see <prog> --help`` and exit with status 2."""
        message = " ".join(message.split())
        message = message.replace("argument ", "", 1) if message.startswith("argument ") else message
        required = re.match(r"the following arguments are required: (.+)$", message)
        unknown = re.match(r"unrecognized arguments: (.+)$", message)
        if required:
            message = f"{required.group(1)}: required but missing; give it"
        elif unknown:
            message = f"{unknown.group(1)}: not an option of this command; remove it"
        elif message.endswith("expected one argument"):
            message += "; give a value after it (a value starting with '-' may be written --option=VALUE)"
        elif ": " not in message:
            message = f"{self.prog}: {message}"
        sys.stderr.write(f"{PROG}: error: {message}; see '{self.prog} --help'\n")
        sys.exit(2)


def number(kind: type = float, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` for a finite number (``int`` or ``float``) within ``[low, high]``
    (``low_open``/``high_open`` exclude the bound)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    what = "a whole number" if kind is int else "a number"
    if low is not None and high is not None:
        rule = f"{what} in {lo}{low:g}, {high:g}{hi}"
    elif low is not None:
        rule = f"{what} {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rule = f"{what} {'<' if high_open else '<='} {high:g}"
    else:
        rule = what

    def parse(text: str) -> Any:
        try:
            value = int(text, 10) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        return value

    parse.__name__ = rule  # argparse shows the type name in some messages
    return parse


def numbers(count: int) -> Callable[[str], tuple[float, ...]]:
    """An argparse ``type`` for ``count`` comma-separated finite numbers (``x,y`` or a box)."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count or not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return values
    return parse


def band_list(text: str) -> tuple[int, ...]:
    """``4,3,2`` or ``1``: 1-based band numbers."""
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        bands = ()
    if not bands or any(b < 1 for b in bands):
        raise argparse.ArgumentTypeError(f"invalid band list {text!r}: use e.g. 4,3,2 or 1")
    return bands


def flag_of(option: str, args: argparse.Namespace | None = None) -> str:
    """The command-line flag of a Python parameter name (``tile_size`` -> ``--tile-size``)."""
    flags = getattr(args, "option_flags", None) or {}
    return flags.get(option) or "--" + option.replace("_", "-")


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    """``--progress``, ``--quiet``, ``--debug`` (every command)."""
    group = parser.add_argument_group("output and progress")
    group.add_argument("--progress", choices=MODES, default="auto",
                       help="progress display: bar on a terminal (auto), json lines on stdout, or none")
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def add_tiling_options(parser: argparse.ArgumentParser) -> None:
    """The tiling options (see :class:`~hqrs_geo.tiling.config.TileConfig`)."""
    group = parser.add_argument_group("tiling")
    group.add_argument("--tile-size", default="256",
                       help="tile size: pixels (256) or ground units (64m, 0.5km); default 256")
    group.add_argument("--overlap", default="0", help="overlap: pixels, ground units or percent (25%%); default 0")
    group.add_argument("--gsd", type=number(float, 0, low_open=True), default=None,
                       help="target ground resolution in metres per pixel (resampled on read)")
    group.add_argument("--edge", choices=EDGE_POLICIES, default=DEFAULT_EDGE,
                       help="partial tiles at the right/bottom edge: shift inward (default), pad with nodata, drop")
    group.add_argument("--min-valid", type=number(float, 0, 1), default=DEFAULT_MIN_VALID,
                       help=f"skip tiles with a smaller valid fraction (default {DEFAULT_MIN_VALID})")
    group.add_argument("--bands", type=band_list, default=None,
                       help="bands for R,G,B (e.g. 1,2,3 or 4,3,2) or one band to replicate; "
                            "default from colour interpretation")
    group.add_argument("--stretch", default="auto",
                       help="to 8 bits: auto (uint8 as is, else per-scene 2-98%% percentiles), none, p1,99 or 0,3000")
    group.add_argument("--crs", default=None, help="CRS of the footprints, e.g. EPSG:4326 (default: the raster's)")
    group.add_argument("--resampling", default="bilinear", help="resampling when --gsd is given (default bilinear)")


def tile_config(args: argparse.Namespace) -> TileConfig:
    """The validated :class:`TileConfig` of the tiling options."""
    return TileConfig(
        tile_size=args.tile_size, overlap=args.overlap, gsd=args.gsd, edge=args.edge,
        min_valid=args.min_valid, bands=args.bands, stretch=args.stretch, crs=args.crs,
        resampling=args.resampling,
    ).validated()


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Device, batch size, reader processes, precision, stored embedding type, test-time views, overwrite."""
    group = parser.add_argument_group("engine")
    group.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    group.add_argument("--batch-size", type=number(int, 1, 65536), default=32,
                       help="tiles per batch (halved on CUDA out-of-memory)")
    group.add_argument("--workers", type=number(int, 0, 256), default=None,
                       help="tile reader processes (default: min(16, CPUs-1) on GPU; on CPU 0 up to 4 cores, else 1)")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: bf16 (or fp16) on CUDA, fp32 on CPU; bf16 also on CPU")
    group.add_argument("--embedding-dtype", default="float16", choices=("float16", "float32"),
                       help="stored embedding values (little-endian; default float16)")
    group.add_argument("--views", type=int, default=1, choices=VIEW_COUNTS,
                       help="test-time views averaged into each embedding: 8 rotations/flips, 16 also of the centre "
                            "crop (zero-shot top-1 +1 point on the selection sets at about 12x the embedding time; "
                            "default 1)")
    group.add_argument("--overwrite", action="store_true", help="recompute results the layer already has")


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Caption decoding (see :class:`~hqrs_geo.models.decoding_options.DecodingConfig`)."""
    group = parser.add_argument_group("caption decoding")
    group.add_argument("--decoding", default="beam", choices=METHODS,
                       help="default beam; consensus: the caption most similar to the other decodings of the image "
                            "(the beams' best hypotheses, greedy, --samples seeded samples)")
    group.add_argument("--beams", type=number(int, 1, 64), default=3, help="beam width (default 3)")
    group.add_argument("--samples", type=number(int, 0, MAX_SAMPLES), default=DecodingConfig.samples,
                       help=f"consensus: sampled candidates per image (default {DecodingConfig.samples})")
    group.add_argument("--top-k", type=number(int, 0, 100_000), default=0,
                       help="sampling: keep the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0,
                       help="sampling: nucleus probability (1.0: off)")
    group.add_argument("--temperature", type=number(float, 0, 100, low_open=True), default=None,
                       help="sampling temperature, also of the consensus samples (default 1.0; consensus "
                            f"{CONSENSUS_TEMPERATURE})")
    group.add_argument("--repetition-penalty", type=number(float, 0, 100, low_open=True), default=1.0,
                       help="> 1 discourages repeated tokens")
    group.add_argument("--min-length", type=number(int, 0, 1000), default=5, help="minimum caption length in tokens")
    group.add_argument("--max-length", type=number(int, 1, 1000), default=30, help="maximum caption length in tokens")
    group.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="sampling seed")


def decoding_config(args: argparse.Namespace) -> Any:
    """The validated decoding settings of :func:`add_decoding_options`."""
    return DecodingConfig(
        method=args.decoding, num_beams=args.beams, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, repetition_penalty=args.repetition_penalty,
        min_length=args.min_length, max_length=args.max_length, seed=args.seed, samples=args.samples,
    ).validated()


def finish(args: argparse.Namespace, progress: Any, summary: str, **extra: Any) -> int:
    """End a command: the final progress event, and the summary on stderr unless quiet or JSON."""
    progress.finish(summary, **extra)
    if not args.quiet and progress.mode != "json":
        print(summary, file=sys.stderr)
    return 0
