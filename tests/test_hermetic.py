"""The suite is hermetic: what a user has installed or configured in their home cannot change a result."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HERMETIC_VARS, ROOT, TEST_HOME

BROKEN = "HQRS planted broken engine: this interpreter must never run in the tests"

# QGIS settings files that may name the engine's interpreter: the desktop's default profile, and
# those of a standalone QgsApplication (no organisation set) before and after initQgis()
SETTINGS_FILES = ("{data}/QGIS/QGIS3/profiles/default/QGIS/QGIS3.ini",
                  "{data}/profiles/default/Unknown Organization.ini",
                  "{config}/Unknown Organization.conf")


def plant_broken_engine(engine: Path) -> Path:
    """A fake engine venv at ``engine`` whose ``bin/python`` prints an error and fails."""
    python = engine / "bin" / "python"
    python.parent.mkdir(parents=True)
    (engine / "pyvenv.cfg").write_text("home = /nonexistent\n")
    python.write_text(f"#!/bin/sh\necho '{BROKEN}' >&2\nexit 3\n")
    python.chmod(0o755)
    return python


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> content)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_broken_engine_in_the_users_home_does_not_affect_the_suite(tmp_path):
    """A user's home as ``make test`` may meet it: a broken engine in the plugin's default engine
    folder (``~/.local/share/hqrs_geo/engine`` and ``$XDG_DATA_HOME/hqrs_geo/engine``) and QGIS
    settings whose ``hqrs_geo/interpreter`` names it. A child pytest runs plugin tests that drive the
    engine through Processing with that HOME and those XDG variables (and none of this session's
    isolation variables); it must pass, because conftest gives every session its own HOME, XDG
    folders, QGIS profile and an empty ``HQRS_GEO_ENGINE_DIR`` before anything reads them. Before
    that isolation the engine tests ran the planted interpreter and failed with "HQRS: the engine
    is not installed in …" (issue 22, point 2)."""
    home = tmp_path / "user"
    data, config = home / "xdg-data", home / "xdg-config"  # XDG folders away from ~/.local and ~/.config
    brokens = [plant_broken_engine(home / ".local" / "share" / "hqrs_geo" / "engine"),
               plant_broken_engine(data / "hqrs_geo" / "engine")]
    assert subprocess.run([str(brokens[0])], capture_output=True, text=True).stderr.strip() == BROKEN
    for pattern in SETTINGS_FILES:
        for base in ({"data": data, "config": config}, {"data": home / ".local" / "share", "config": home / ".config"}):
            ini = Path(pattern.format(**base))
            ini.parent.mkdir(parents=True, exist_ok=True)
            ini.write_text(f"[hqrs_geo]\ninterpreter={brokens[1]}\n")
    planted = files(home)
    env = {k: v for k, v in os.environ.items() if k not in HERMETIC_VARS}
    env.update(HOME=str(home), XDG_DATA_HOME=str(data), XDG_CONFIG_HOME=str(config))
    selection = ["tests/plugin/test_processing.py::test_tile_default_output_next_to_raster"]  # runs the engine
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *selection], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    assert BROKEN not in run.stdout + run.stderr
    assert files(home) == planted  # nothing read the user's settings back into them, nor wrote there


def test_this_session_is_isolated():
    """This process's HOME, XDG folders, QGIS profile, engine folder and caches are all under one
    temporary folder; the engine folder is empty (no engine)."""
    assert TEST_HOME.is_dir()
    for name in HERMETIC_VARS:
        assert Path(os.environ[name]).is_relative_to(TEST_HOME), name
    assert Path.home() == TEST_HOME / "home"
    assert list(Path(os.environ["HQRS_GEO_ENGINE_DIR"]).iterdir()) == []


def test_qgis_keeps_its_profile_and_settings_in_the_session_folder():
    """QGIS (a standalone QgsApplication, as the plugin tests make) reads and writes its profile
    and settings under the session's folder, not in the user's QGIS profile."""
    qgis_core = pytest.importorskip("qgis.core")
    app = qgis_core.QgsApplication.instance() or qgis_core.QgsApplication([], False)
    app.initQgis()
    assert Path(qgis_core.QgsApplication.qgisSettingsDirPath()).is_relative_to(TEST_HOME / "qgis")
    assert Path(qgis_core.QgsSettings().fileName()).is_relative_to(TEST_HOME)
