"""``hqrs-geo info`` on a GeoTIFF cut short or garbled: its facts, an integrity line, then a
one-line error and exit 2 (counted in the archive fault suite); an intact file says ok."""
from __future__ import annotations

import os
import shutil

import pytest
from archive_report import record
from conftest import EXAMPLE_SCENE
from fork_runner import run_cli


def cut(path, fraction):
    os.truncate(path, int(path.stat().st_size * fraction))


def garble(path):
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start:start + 20000] = bytes(b ^ 0x5A for b in data[start:start + 20000])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [lambda p: cut(p, 0.5), lambda p: cut(p, 0.9), garble, lambda p: cut(p, 0.002)],
                         ids=["cut to 50%", "cut to 90%", "garbled", "header only"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_info_on_a_damaged_geotiff_exits_2_with_one_error_line(tmp_path, damage, as_json):
    path = tmp_path / "scene.tif"
    shutil.copy(EXAMPLE_SCENE, path)
    damage(path)
    done = run_cli("info", path, *(["--json"] if as_json else []))
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    ok = done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and errors and "scene.tif" in errors[0]
    record(clean=int(bool(ok)), data_lost=int(done.returncode == 0),
           internal=int("Traceback" in done.stderr or "internal error" in done.stderr))
    assert ok, (done.returncode, done.stdout[-300:], done.stderr)


def test_info_on_an_intact_geotiff_says_ok():
    done = run_cli("info", EXAMPLE_SCENE)
    assert done.returncode == 0 and "integrity:   ok" in done.stdout, done.stderr
