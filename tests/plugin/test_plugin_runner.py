"""The plugin's one process runner and error parser (qgis_plugin.core.runner), the engine probe
and the generated model registry, with real child processes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import EXAMPLE_SCENE, ROOT, write_sparse_scene

from qgis_plugin.core import runner
from qgis_plugin.core.runner import EngineError, humanize, parse_error, run_cli

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin", "error::ResourceWarning")


def test_parse_error_reads_the_engine_line_and_words_it_for_qgis():
    error = parse_error(["Traceback…\n", "hqrs-geo: error: /d/t.gpkg: has no embeddings; run 'hqrs-geo embed "
                                          "/d/t.gpkg --model NAME' first\n"], 2)
    assert error.kind == "user"
    assert str(error) == "/d/t.gpkg: has no embeddings; run Processing ▸ HQRS ▸ Models ▸ Embed tiles first"
    assert humanize("tile larger than the raster: use a smaller --tile-size or --gsd") == \
        "tile larger than the raster: use a smaller 'Tile size' or 'Resample to ground resolution'"
    assert humanize("choose one with --model") == "choose one with 'Model'"
    assert parse_error(["hqrs-geo: error: cancelled; outputs were left as they were\n"], 130).kind == "cancelled"
    missing = parse_error(["Traceback (most recent call last):\n", "ModuleNotFoundError: No module named 'hqrs_geo'\n"],
                          1, "/usr/bin/python3")
    assert missing.kind == "engine" and "hqrs_geo" in str(missing) and "/usr/bin/python3" in str(missing)
    assert "Set up engine" in missing.text
    network = parse_error(["ERROR: Could not find a version that satisfies the requirement torch\n"], 1)
    assert network.kind == "network"
    assert str(parse_error(["", "boom\n"], 1)) == "boom"
    assert str(parse_error([], 9)) == "the process ended with status 9"


def test_run_cli_reports_tile_counts_and_the_final_event(tmp_path):
    events = []
    result = run_cli(["tile", EXAMPLE_SCENE, "-o", tmp_path / "t.gpkg", "--tile-size", "250"], sys.executable,
                     events.append)
    assert result.ok and result.final["stage"] == "done" and result.error is None
    assert events and events[-1].text == "tiling: 16 / 16 tiles" and events[-1].percent == 100.0
    failed = run_cli(["tile", tmp_path / "missing.tif", "-o", tmp_path / "x.gpkg"], sys.executable)
    assert not failed.ok and failed.returncode == 2 and failed.error.kind == "user"
    assert "missing.tif" in str(failed.error) and "\n" not in str(failed.error)
    nowhere = run_cli(["tile", EXAMPLE_SCENE, "-o", tmp_path / "y.gpkg"], str(tmp_path / "no-python"))
    assert nowhere.returncode == 127 and nowhere.error.kind == "engine"


def test_run_cli_cancel_stops_the_child(tmp_path):
    big = write_sparse_scene(tmp_path / "big.tif")
    out = tmp_path / "big.gpkg"
    seen = []
    started = time.monotonic()
    result = run_cli(["tile", big, "-o", out, "--tile-size", "64"], sys.executable, seen.append,
                     is_cancelled=lambda: bool(seen))
    assert result.cancelled and result.returncode == 130 and result.error.kind == "cancelled"
    assert time.monotonic() - started < 60 and not out.exists()


def test_probe_names_versions_and_device(tmp_path):
    from qgis_plugin.core import engine

    info = engine.probe(sys.executable, "cpu", use_cache=False)
    assert info.ok and info.hqrs_geo and info.torch
    assert info.device.startswith("cpu, ") and info.device.endswith(" threads")
    assert f"on {info.device}" in info.summary
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = engine.probe(str(tmp_path / "bare" / "bin" / "python"), use_cache=False)
    assert not bare.ok and bare.problem.kind == "engine" and "hqrs_geo" in str(bare.problem)
    assert engine.cached(str(tmp_path / "bare" / "bin" / "python")) is None
    if not info.device.startswith("cuda"):  # this machine has no GPU: asking for one is a settings problem
        wrong = engine.probe(sys.executable, "cuda:1", use_cache=False)
        assert not wrong.ok and wrong.problem.kind == "user" and "HQRS settings" in wrong.problem.text
        assert "cuda:1 was chosen" in str(wrong.problem) and wrong.torch  # torch itself is fine
    gone = engine.probe(str(tmp_path / "nothing"), use_cache=False)
    assert not gone.ok and "does not exist" in str(gone.problem)


def test_no_resource_warnings_from_processes(tmp_path):
    """Child processes, search sessions and probes close every pipe (checked in a fresh Python
    with -X dev, where unclosed files are reported)."""
    layer = tmp_path / "tiles.gpkg"
    assert subprocess.run([sys.executable, "-m", "hqrs_geo", "tile", EXAMPLE_SCENE, "-o", layer, "--tile-size", "500",
                           "-q"]).returncode == 0
    script = textwrap.dedent(f"""
        import gc, sys
        sys.path.insert(0, {str(ROOT)!r})
        from qgis.core import QgsApplication
        app = QgsApplication([], False)
        from qgis_plugin.core import engine, runner, sessions
        runner.run_cli(["info", {str(EXAMPLE_SCENE)!r}], sys.executable)
        runner.run_cli(["tile", "/no/such.tif", "-o", {str(tmp_path / 'x.gpkg')!r}], sys.executable)
        engine.probe(sys.executable, use_cache=False)
        session = sessions.SearchSession(sessions.SessionKey(sys.executable, {str(layer)!r}))
        try:
            session.start()
        except runner.EngineError as exc:
            print("expected:", exc)
        session.close()
        gc.collect()
        print("finished")
    """)
    env = dict(os.environ, PYTHONWARNINGS="error::ResourceWarning", QT_QPA_PLATFORM="offscreen")
    child = subprocess.run([sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, env=env,
                           timeout=300)
    assert "finished" in child.stdout, child.stderr[-3000:]
    assert "has no embeddings" in child.stdout
    assert "ResourceWarning" not in child.stderr, child.stderr[-3000:]


def test_generated_registry_is_up_to_date():
    """The committed qgis_plugin/core/registry.py is what the generator writes from the engine's registry now
    (``make plugin`` packages it as it is)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HQRS_GEO_")}
    check = subprocess.run([sys.executable, "-m", "qgis_plugin.tools.generate_registry", "--check"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    from hqrs_geo.models.registry import list_models
    from qgis_plugin.core.registry import CLIP_MODELS, COCA_MODELS, DEFAULT_CLIP, DEFAULT_COCA

    built_in = [m for m in list_models() if not m.name.startswith("hqrs-test")]
    assert sorted(CLIP_MODELS) == sorted(m.name for m in built_in if m.kind == "clip")
    assert sorted(COCA_MODELS) == sorted(m.name for m in built_in if m.kind == "coca")
    assert (DEFAULT_CLIP, DEFAULT_COCA) == ("hqrs-mini-clip", "hqrs-mini-coca")


def test_engine_errors_carry_their_fix():
    error = EngineError("the engine is not installed", "engine", runner.SET_UP_ENGINE)
    assert error.text.startswith("the engine is not installed; set it up with Raster ▸ HQRS ▸ Set up engine…")
