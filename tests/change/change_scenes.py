"""Two dates of the example scene for the change tests: the AFTER date is the BEFORE date with a
global colour and brightness shift (every tile moves), and a few tiles replaced by other real
content (UC Merced samples of tests/data: forest, beach, farmland), the tiles that truly changed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from conftest import EXAMPLE_SCENE, TEST_DATA, write_raster
from PIL import Image

TILE = 125  # the 1000 px scene in 8 x 8 tiles
#: (row, col) of the tiles given new content, and which UC Merced sample it is
PASTED = {(1, 2): "forest80", (3, 5): "forest80", (2, 3): "forest80", (6, 1): "beach80", (5, 6): "agricultural90"}
FOREST = [rc for rc, name in PASTED.items() if name == "forest80"]
GAIN = np.array([0.9, 0.95, 0.85])[:, None, None]  # a colour cast and darker...
OFFSET = 10  # ...and hazier


def tile_id(stem: str, row: int, col: int) -> str:
    """The id of tile (row, col) of a scene tiled at :data:`TILE` px from ``<stem>.tif``."""
    return f"{stem}_r{row:04d}_c{col:04d}"


def shifted(pixels: np.ndarray) -> np.ndarray:
    """The global shift of every pixel."""
    return np.clip(pixels * GAIN + OFFSET, 0, 255).astype(np.uint8)


def write_dates(folder: Path, pasted: dict = PASTED, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[Path, Path]:
    """``before.tif`` (the example scene) and ``after.tif`` (shifted, ``pasted`` tiles replaced)
    in ``folder``; ``offset`` moves the AFTER scene (metres east, north)."""
    with rasterio.open(EXAMPLE_SCENE) as src:
        pixels, transform, crs = src.read(), src.transform, src.crs.to_string()
    before = write_raster(folder / "before.tif", pixels, transform=transform, crs=crs)
    after = shifted(pixels)
    for (row, col), name in pasted.items():
        image = Image.open(TEST_DATA / "ucm_val_samples" / f"{name}.jpg").convert("RGB").resize((TILE, TILE))
        after[:, row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE] = np.asarray(image).transpose(2, 0, 1)
    moved = transform * transform.translation(offset[0] / transform.a, -offset[1] / transform.a) if any(offset) \
        else transform
    return before, write_raster(folder / "after.tif", after, transform=moved, crs=crs)
