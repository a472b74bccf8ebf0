"""The ``hqrs-geo`` command line: one module per command group, no engine work here.

Every user error ends in one line on stderr (``hqrs-geo: error: <file or option>: <what>;
<what to do>``) and exit status 2; tracebacks are shown only with ``--debug``. Ctrl-C and
SIGTERM cancel cleanly (exit 130) and leave outputs as they were before the run; internal
errors exit with status 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import rasterio

from .._version import __version__
from ..atomic import output_error, write_failure
from ..errors import Cancelled, HqrsError, InputError
from ..progress import Progress
from ..redact import RedactingFilter, redact
from . import change, dataset, detect, inference, info, mpgi, search, tiles, training
from .options import PROG, Parser, flag_of

log = logging.getLogger("hqrs_geo")

COMMAND_GROUPS = (info, tiles, inference, search, detect, change, training, mpgi, dataset)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hqrs-geo`` (one sub-command per job)."""
    parser = Parser(prog=PROG, description="Remote-sensing vision-language models on georeferenced tiles.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def _configure_logging(quiet: bool, debug: bool) -> None:
    """Our warnings as one line each; library chatter (GDAL, transformers, tqdm) only with --debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: warning: %(message)s"))
    handler.addFilter(RedactingFilter())  # API keys never reach the terminal
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        for root_handler in logging.getLogger().handlers:  # GDAL's messages quote URLs: no credentials
            root_handler.addFilter(RedactingFilter())
        return
    for name in ("rasterio", "transformers", "huggingface_hub", "urllib3", "filelock", "tokenizers", "gguf",
                 "accelerate", "torch", "PIL", "pyogrio", "fiona", "numexpr"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # library progress bars (GGUF de-quantising); ours are our own
    if "transformers" in sys.modules:  # already imported: its settings were read at import
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:  # an old or partial transformers: the environment variables above still apply
            pass


def _raise_cancel(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


CANCELLED = ("cancelled; outputs were left as they were before this run (finished model results are kept "
             "beside the output and skipped when you run the same command again)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    progress = Progress("none" if args.quiet else args.progress)
    _configure_logging(args.quiet, args.debug)
    previous = signal.signal(signal.SIGTERM, _raise_cancel)
    err: HqrsError
    try:
        with rasterio.Env():  # GDAL messages go through Python logging, not straight to stderr
            return int(args.func(args, progress))
    except KeyboardInterrupt:
        err = Cancelled(CANCELLED)
    except HqrsError as exc:
        err = exc
    except MemoryError:
        err = HqrsError("out of memory; use a smaller batch size or tile size, or fewer tiles per run")
    except Exception as exc:
        if write_failure(exc) is not None and not args.debug:  # full disk, read-only file system…
            err = output_error(getattr(exc, "filename", None) or "output", exc)
        elif isinstance(exc, OSError) and exc.filename and exc.strerror and not args.debug:
            # a path the user gave that the system refuses (name too long, not a folder, a loop…)
            err = InputError(f"{exc.filename}: {exc.strerror[:1].lower()}{exc.strerror[1:]}; check the path")
        else:  # an internal bug: one line unless --debug
            if args.debug:
                raise
            err = HqrsError(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
            err.exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.debug and not isinstance(err, Cancelled) and err.__cause__:
        raise err
    message = redact(" ".join(err.worded(lambda option: flag_of(option, args)).split()))
    progress.fail(message, option=err.option)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return err.exit_code


__all__ = ["build_parser", "main"]
