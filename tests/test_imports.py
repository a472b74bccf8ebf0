"""Importing the CLI, the package root and every QGIS plugin module must not import torch:
QGIS never loads torch, and ``hqrs-geo --help`` / one-line errors stay fast."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, pkgutil, sys
import hqrs_geo, hqrs_geo.cli
from hqrs_geo.cli import build_parser
build_parser()
import qgis_plugin
for info in pkgutil.walk_packages(qgis_plugin.__path__, "qgis_plugin."):
    importlib.import_module(info.name)
heavy = sorted(m for m in ("torch", "open_clip", "transformers", "ray", "faiss") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_cli_and_plugin_do_not_import_torch():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "none"


OPTIONS_PROBE = r"""
import argparse, sys
import hqrs_geo
from hqrs_geo.cli.options import add_decoding_options, add_engine_options, decoding_config
from hqrs_geo.engine.options import RunOptions
parser = argparse.ArgumentParser()
add_decoding_options(parser)
add_engine_options(parser)
args = parser.parse_args(["--decoding", "greedy", "--max-length", "12"])
config = decoding_config(args)
assert config.method == "greedy" and config.max_length == 12, config
assert hqrs_geo.DecodingConfig is type(config)
RunOptions(batch_size=8, precision="bf16").validated()
print("torch" if "torch" in sys.modules else "none")
"""


def test_decoding_and_engine_options_do_not_import_torch():
    """The caption settings of ``caption``/``run`` (and a Ray driver handing them to its workers) are
    read and checked without loading torch (about 1 GB of memory)."""
    result = subprocess.run([sys.executable, "-c", OPTIONS_PROBE], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "none"
