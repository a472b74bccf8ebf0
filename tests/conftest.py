"""Shared fixtures: rasters written with rasterio in the tests, and the real scenes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCENES = ROOT.parent / "shared" / "data" / "scenes"
EXAMPLE_SCENE = ROOT / "examples" / "data" / "urban_river_025m_epsg28992.tif"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def write_raster(
    path: Path,
    data: np.ndarray,
    transform: Affine = Affine(0.5, 0, 500000, 0, -0.5, 4000000),
    crs: Optional[str] = "EPSG:32633",
    nodata: Optional[float] = None,
    colorinterp=None,
    tiled: bool = True,
    **profile,
) -> Path:
    """Write ``data`` (bands, H, W) as a GeoTIFF and return its path."""
    count, height, width = data.shape
    opts = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
        transform=transform, crs=CRS.from_user_input(crs) if crs else None, nodata=nodata,
    )
    if tiled and width >= 16 and height >= 16:
        opts.update(tiled=True, blockxsize=16 * max(1, min(width, 256) // 16), blockysize=16 * max(1, min(height, 256) // 16))
    opts.update(profile)
    with rasterio.open(path, "w", **opts) as dst:
        dst.write(data)
        if colorinterp:
            dst.colorinterp = colorinterp
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def rgb_raster(tmp_path, rng) -> Path:
    """1000 x 700 uint8 RGB in UTM 33N, 0.5 m pixels."""
    data = rng.integers(0, 255, size=(3, 700, 1000), dtype=np.uint8)
    return write_raster(tmp_path / "rgb.tif", data)


def run_cli(*args: str, cwd: Optional[Path] = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m hqrs_geo ARGS`` in a child process and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "hqrs_geo", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, **kwargs,
    )


@pytest.fixture(scope="session", autouse=True)
def model_environment(tmp_path_factory):
    """Tiny architectures visible to this process and to CLI child processes; no hub access."""
    from tiny_models import register_tiny_configs

    configs = tmp_path_factory.mktemp("model_configs")
    register_tiny_configs(configs)
    os.environ["HQRS_GEO_MODEL_CONFIGS"] = str(configs)
    os.environ["HQRS_GEO_HOME"] = str(tmp_path_factory.mktemp("hqrs_home"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield configs


def _save_tiny(factory, name: str) -> Path:
    import torch
    from tiny_models import build_tiny

    model, _, _ = build_tiny(name, seed=0)
    path = factory.mktemp("ckpt") / f"{'tiny_coca' if 'coca' in name else 'tiny_clip'}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory, model_environment):
    """A tiny CLIP's weights saved as a plain state_dict file."""
    from tiny_models import TINY_CLIP

    return _save_tiny(tmp_path_factory, TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_coca_checkpoint(tmp_path_factory, model_environment):
    """A tiny CoCa's weights saved as a plain state_dict file."""
    from tiny_models import TINY_COCA

    return _save_tiny(tmp_path_factory, TINY_COCA)


@pytest.fixture
def example_layer(tmp_path) -> Path:
    """The example scene tiled at 125 px (64 tiles) into a GeoPackage."""
    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile

    out = tmp_path / "tiles.gpkg"
    tile(EXAMPLE_SCENE, out, TileConfig(tile_size=125))
    return out


def write_sparse_scene(path: Path, size: int = 30000) -> Path:
    """A huge, almost empty GeoTIFF (nodata 0, one written block): slow to tile, quick to make."""
    from rasterio.windows import Window

    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", nodata=0,
                       tiled=True, blockxsize=256, blockysize=256, sparse_ok=True, crs="EPSG:32633",
                       transform=Affine(1, 0, 500000, 0, -1, 4000000)) as dst:
        dst.write(np.full((3, 256, 256), 7, np.uint8), window=Window(0, 0, 256, 256))
    return path


def pytest_terminal_summary(terminalreporter):
    """The fuzz/fault suite's counts (tests/test_faults.py), when it ran."""
    faults = sys.modules.get("test_faults")
    report = getattr(faults, "REPORT", None)
    if report and report["tried"]:
        terminalreporter.write_line(
            "fault suite: {tried} cases tried, {clean} clean errors, {internal} tracebacks/internal errors, "
            "{data_lost} data lost, {recovered} faults recovered".format(**report))
