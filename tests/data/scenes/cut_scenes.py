"""Cut the committed test scenes from the originals in ``../shared/data/scenes`` (run once, by hand).

    .venv/bin/python tests/data/scenes/cut_scenes.py [SHARED_SCENES_DIR]

Each crop keeps its source's CRS, geotransform (of the window), band count and order, colour
interpretation, nodata, data type, tags, compression type and tiling/striping; see README.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import rasterio
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
CROPS = {
    # target: (source, window, profile changes)
    "naip_rgbn_5m_epsg26914_256px.tif": ("naip_rgbn_5m_epsg26914.tif", Window(0, 0, 256, 256),
                                         {"blockxsize": 256, "blockysize": 256, "predictor": 2, "zlevel": 9}),
    "drone_farm_002m_epsg32753_192px.tif": ("drone_farm_002m_epsg32753.tif", Window(280, 258, 192, 192), {}),
}


def cut(source: Path, target: Path, window: Window, changes: dict) -> None:
    """Write ``window`` of ``source`` to ``target`` with the source's layout (and ``changes``)."""
    with rasterio.open(source) as src:
        profile = {**src.profile, "width": window.width, "height": window.height,
                   "transform": src.window_transform(window), **changes}
        data, colorinterp, tags = src.read(window=window), src.colorinterp, src.tags()
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)
        dst.colorinterp = colorinterp
        dst.update_tags(**tags)


if __name__ == "__main__":
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data" / "scenes"
    for name, (source, window, changes) in CROPS.items():
        cut(shared / source, HERE / name, window, changes)
        print(name, (HERE / name).stat().st_size, "bytes")
