"""Grid geometry: offsets, sizes in pixels / metres / percent, edge policies."""
from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from conftest import write_raster

from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.raster.grid import axis_offsets, plan_grid
from hqrs_geo.raster.scene import describe, open_raster
from hqrs_geo.raster.units import Length, parse_length


def reference_offsets(size: int, win: int, stride: int, edge: str) -> list[int]:
    """Brute force: every stride step, then the policy applied to steps that pass the edge."""
    steps = list(range(0, size, stride))
    if edge == "drop":
        return [x for x in steps if x + win <= size]
    if edge == "pad":
        return [x for x in steps if x == 0 or x - stride + win < size]
    return sorted({min(x, size - win) for x in steps}) if win <= size else []


@pytest.mark.parametrize("edge", ["shift", "pad", "drop"])
def test_axis_offsets_match_brute_force(edge):
    for size in (1, 7, 100, 255, 256, 257, 1000):
        for win in (1, 16, 64, 256):
            for overlap in (0, win // 4, win // 2):
                stride = win - overlap
                if edge != "pad" and win > size:
                    continue
                assert axis_offsets(size, win, stride, edge) == reference_offsets(size, win, stride, edge), (
                    size, win, stride, edge)


def test_shift_covers_every_pixel_and_stays_inside():
    offsets = axis_offsets(1000, 256, 192, "shift")
    covered = np.zeros(1000, bool)
    for x in offsets:
        assert 0 <= x and x + 256 <= 1000
        covered[x:x + 256] = True
    assert covered.all()


@pytest.mark.parametrize(
    "text, expected",
    [("256", Length(256, "px")), ("256px", Length(256, "px")), ("64m", Length(64, "m")),
     ("0.5km", Length(500, "m")), (128, Length(128, "px")), ("10ft", Length(3.048, "m"))],
)
def test_parse_length(text, expected):
    got = parse_length(text)
    assert got.unit == expected.unit and got.value == pytest.approx(expected.value)


def test_parse_length_errors():
    assert parse_length("25%", allow_percent=True) == Length(25, "%")
    for bad in ("abc", "-3", "12.5", "10%", "m"):
        with pytest.raises(OptionError):
            parse_length(bad)
    with pytest.raises(OptionError):
        parse_length("100%", allow_percent=True)


def _info(tmp_path, width=1000, height=700, transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), crs="EPSG:32633"):
    path = write_raster(tmp_path / "g.tif", np.zeros((1, height, width), np.uint8), transform=transform, crs=crs)
    with open_raster(str(path)) as src:
        return describe(src)


def test_grid_in_metres_and_percent(tmp_path):
    info = _info(tmp_path)
    grid = plan_grid(info, Length(64, "m"), Length(25, "%"), None, "shift")
    assert grid.window == (128, 128) and grid.out_size == (128, 128)
    assert grid.stride == (96, 96)
    assert grid.gsd_m == pytest.approx(0.5)
    assert len(grid) == len(reference_offsets(1000, 128, 96, "shift")) * len(reference_offsets(700, 128, 96, "shift"))


def test_grid_with_target_gsd(tmp_path):
    info = _info(tmp_path)
    grid = plan_grid(info, Length(100, "px"), Length(10, "px"), 2.0, "drop")
    # 100 output px at 2 m = 400 native px at 0.5 m; 10 px overlap = 40 native px
    assert grid.window == (400, 400) and grid.out_size == (100, 100) and grid.stride == (360, 360)
    assert grid.gsd_m == pytest.approx(2.0)
    metric = plan_grid(info, Length(200, "m"), Length(0, "px"), 2.0, "drop")
    assert metric.window == (400, 400) and metric.out_size == (100, 100)


def test_grid_in_metres_on_geographic_crs(tmp_path):
    # 0.0001 degree pixels at the equator: about 11.1 m (x) and 11.06 m (y)
    info = _info(tmp_path, transform=Affine(0.0001, 0, 10.0, 0, -0.0001, 0.05), crs="EPSG:4326")
    grid = plan_grid(info, Length(1110, "m"), Length(0, "px"), None, "shift")
    assert grid.window[0] == pytest.approx(100, abs=1)
    assert grid.window[1] == pytest.approx(100, abs=1)


def test_tile_larger_than_raster(tmp_path):
    info = _info(tmp_path, width=100, height=80)
    with pytest.raises(InputError, match="larger than the raster"):
        plan_grid(info, Length(256, "px"), Length(0, "px"), None, "shift")
    grid = plan_grid(info, Length(256, "px"), Length(0, "px"), None, "pad")
    assert len(grid) == 1


def test_units_need_a_crs(tmp_path):
    info = _info(tmp_path, crs=None, transform=Affine.identity())
    with pytest.raises(InputError, match="no CRS"):
        plan_grid(info, Length(64, "m"), Length(0, "px"), None, "shift")
    with pytest.raises(OptionError, match="overlap"):
        plan_grid(info, Length(64, "px"), Length(64, "px"), None, "shift")
