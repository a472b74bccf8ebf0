"""The hqrs-geo command line: real child processes, real files."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.windows import Window

from conftest import EXAMPLE_SCENE, run_cli, write_raster, write_sparse_scene
from hqrs_geo import read_runs, read_tiles


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("hqrs-geo: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert all(l.startswith("hqrs-geo: warning: ") for l in lines[:-1]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_console_script_and_module_agree():
    script = Path(sys.executable).parent / "hqrs-geo"  # installed by pip beside the interpreter
    assert script.exists()
    a = subprocess.run([script, "--version"], capture_output=True, text=True)
    b = run_cli("--version")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "hqrs-geo 0." in a.stdout


def test_info_text_and_json():
    text = run_cli("info", EXAMPLE_SCENE)
    assert text.returncode == 0 and "EPSG:28992" in text.stdout and "1000 x 1000 px" in text.stdout
    data = json.loads(run_cli("info", EXAMPLE_SCENE, "--json").stdout)
    with rasterio.open(EXAMPLE_SCENE) as src:
        assert (data["width"], data["height"], data["count"]) == (src.width, src.height, src.count)
        assert data["pixel_size_m"] == pytest.approx([0.25, 0.25])
        assert data["colorinterp"] == [c.name for c in src.colorinterp]


def test_tile_writes_layer_and_json_progress(tmp_path):
    out = tmp_path / "tiles.gpkg"
    result = run_cli("tile", EXAMPLE_SCENE, "-o", out, "--tile-size", "64m", "--overlap", "25%", "--progress", "json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert all({"stage", "done", "total", "message"} <= set(e) for e in events)
    assert events[0]["stage"] == "tile" and events[0]["done"] == 0
    assert events[-1]["stage"] == "done" and events[-1]["tiles"] == 25
    assert max(e["done"] for e in events) == events[0]["total"] == 25
    tiles = read_tiles(out)
    assert len(tiles) == 25 and (tiles.width == 256).all()
    run = read_runs(out)[-1]
    assert run["params"]["tiling"]["overlap"] == "25%" and run["params"]["scenes"][0]["key"] == "urban_river_025m_epsg28992"
    again = run_cli("tile", EXAMPLE_SCENE, "-o", out, "--tile-size", "64m", "--overlap", "25%", "-q")
    assert again.returncode == 0 and again.stderr == "" and again.stdout == ""
    assert len(read_tiles(out)) == 25 and len(read_runs(out)) == 2


def test_export_chips_from_raster_and_from_layer(tmp_path):
    out = tmp_path / "chips"
    result = run_cli("export-chips", EXAMPLE_SCENE, "-o", out, "--tile-size", "250", "--format", "jpg", "-q")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert len(rows) == 16 and rows[0].keys() == {"filepath", "tile_id"}
    first = Image.open(out / rows[0]["filepath"])
    assert first.size == (250, 250) and first.format == "JPEG"
    assert len(read_tiles(out / "index.gpkg")) == 16
    layer = tmp_path / "t.gpkg"
    assert run_cli("tile", EXAMPLE_SCENE, "-o", layer, "--tile-size", "200", "-q").returncode == 0
    png = tmp_path / "png"
    assert run_cli("export-chips", layer, "-o", png, "-q").returncode == 0
    with rasterio.open(EXAMPLE_SCENE) as src:
        ref = np.moveaxis(src.read(window=Window(200, 0, 200, 200)), 0, -1)
    chip = np.asarray(Image.open(png / "urban_river_025m_epsg28992_r0000_c0001.png"))
    assert np.array_equal(chip, ref)
    # re-running with the same parameters keeps existing chips (resume)
    stamp = (png / "urban_river_025m_epsg28992_r0000_c0001.png").stat().st_mtime_ns
    assert run_cli("export-chips", layer, "-o", png, "-q").returncode == 0
    assert (png / "urban_river_025m_epsg28992_r0000_c0001.png").stat().st_mtime_ns == stamp


def test_user_errors_are_one_line(tmp_path):
    assert_one_line_error(run_cli("info", tmp_path / "nope.tif"), "nope.tif", "file not found")
    text = tmp_path / "notes.tif"
    text.write_text("this is not a raster")
    assert_one_line_error(run_cli("tile", text, "-o", tmp_path / "t.gpkg"), "notes.tif", "not a raster")
    assert_one_line_error(run_cli("tile", EXAMPLE_SCENE, "-o", tmp_path / "t.gpkg", "--tile-size", "2000"),
                          "larger than the raster", "--edge pad")
    assert_one_line_error(run_cli("tile", EXAMPLE_SCENE, "-o", tmp_path / "missing" / "t.gpkg"), "does not exist")
    assert_one_line_error(run_cli("tile", EXAMPLE_SCENE, "-o", tmp_path / "t.shp"), "unsupported layer format")
    assert_one_line_error(run_cli("tile", EXAMPLE_SCENE, "-o", tmp_path / "t.gpkg", "--tile-size", "big"), "tile size")
    assert_one_line_error(run_cli("tile", EXAMPLE_SCENE, "-o", tmp_path / "t.gpkg", "--bands", "5,6,7"), "band 5")
    two = write_raster(tmp_path / "two.tif", np.ones((2, 64, 64), np.uint8))
    assert_one_line_error(run_cli("tile", two, "-o", tmp_path / "t.gpkg", "--tile-size", "32"), "two.tif", "--bands")
    readonly = tmp_path / "ro"
    readonly.mkdir(mode=0o555)
    if not __import__("os").access(readonly, __import__("os").W_OK):  # root can write anywhere
        assert_one_line_error(run_cli("tile", EXAMPLE_SCENE, "-o", readonly / "t.gpkg"), "not writable")
    assert not list(tmp_path.glob("*.gpkg"))


def test_corrupt_raster(tmp_path):
    good = write_raster(tmp_path / "good.tif", np.random.default_rng(0).integers(0, 255, (3, 512, 512), dtype=np.uint8),
                        nodata=0, compress="deflate")
    data = bytearray(good.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4000] = b"\x00" * 4000  # break compressed blocks
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    result = run_cli("tile", bad, "-o", tmp_path / "t.gpkg", "--tile-size", "128")
    assert_one_line_error(result, "bad.tif", "corrupt")
    assert not (tmp_path / "t.gpkg").exists()
    truncated = tmp_path / "trunc.tif"
    truncated.write_bytes(good.read_bytes()[:300])
    assert_one_line_error(run_cli("tile", truncated, "-o", tmp_path / "t.gpkg"), "trunc.tif")


def test_gcp_only_and_no_crs(tmp_path):
    gcps = [GroundControlPoint(0, 0, 10, 50), GroundControlPoint(0, 64, 10, 49), GroundControlPoint(64, 0, 11, 50)]
    gcp_path = tmp_path / "gcp.tif"
    with rasterio.open(gcp_path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as dst:
        dst.write(np.ones((3, 64, 64), np.uint8))
        dst.gcps = (gcps, rasterio.crs.CRS.from_epsg(4326))
    assert_one_line_error(run_cli("tile", gcp_path, "-o", tmp_path / "t.gpkg", "--tile-size", "32"), "GCPs", "gdalwarp")
    plain = write_raster(tmp_path / "plain.tif", np.ones((3, 64, 64), np.uint8), crs=None, transform=Affine(1, 0, 0, 0, 1, 0))
    result = run_cli("tile", plain, "-o", tmp_path / "p.gpkg", "--tile-size", "32")
    assert result.returncode == 0 and "has no CRS" in result.stderr and "Traceback" not in result.stderr
    tiles = read_tiles(tmp_path / "p.gpkg")
    assert len(tiles) == 4 and tiles.crs is None
    assert tiles.geometry.iloc[0].bounds == (0.0, 0.0, 32.0, 32.0)
    assert_one_line_error(run_cli("tile", plain, "-o", tmp_path / "q.gpkg", "--tile-size", "10m"), "no CRS", "pixels")


def test_empty_scene_gives_empty_layer_and_message(tmp_path):
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 128, 128), np.uint8), nodata=0)
    result = run_cli("tile", empty, "-o", tmp_path / "e.gpkg", "--tile-size", "64")
    assert result.returncode == 0 and "empty tile layer" in result.stderr
    assert len(read_tiles(tmp_path / "e.gpkg")) == 0


def test_sigterm_cancels_cleanly(tmp_path):
    big = write_sparse_scene(tmp_path / "big.tif")
    out = tmp_path / "big.gpkg"
    child = subprocess.Popen([sys.executable, "-m", "hqrs_geo", "tile", str(big), "-o", str(out),
                              "--tile-size", "64", "--progress", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(child.stdout.readline())
    assert first["stage"] == "tile" and first["total"] > 200000
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert "cancelled" in stderr and "Traceback" not in stderr
    assert json.loads(stdout.splitlines()[-1])["stage"] == "error"
    assert not out.exists() and not list(tmp_path.glob(".big.gpkg*"))
