"""Streaming: a 40000 x 40000 scene tiles and reads with flat memory."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

PROBE = """
import json, sys

def peak_rss_mb():
    # VmHWM belongs to this process image; ru_maxrss would include the parent's RSS at fork time
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from hqrs_geo import TileConfig, TileDataset, read_tiles
from hqrs_geo.cli import main
assert main(["tile", sys.argv[1], "-o", sys.argv[2], "--tile-size", "256", "-q"]) == 0
ds = TileDataset.from_layer(sys.argv[2])
checksum = 0
for i in range(len(ds)):
    checksum += int(ds[i][1][::64, ::64].sum())
print(json.dumps({"tiles": len(ds), "checksum": checksum,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def test_40000_square_scene_peak_rss(tmp_path):
    path = tmp_path / "huge.tif"
    size, block = 40000, 512
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", nodata=0,
                       tiled=True, blockxsize=block, blockysize=block, compress="deflate", sparse_ok=True,
                       crs="EPSG:32633", transform=Affine(0.5, 0, 400000, 0, -0.5, 5000000)) as dst:
        # a gradient, not noise: deflating 676 random blocks took most of the test's time (a 506 MB
        # file); memory is about the 4.8 GB of pixels the scene decodes to, the same either way
        patch = np.broadcast_to((np.arange(block) % 200 + 20).astype(np.uint8), (3, block, block)).copy()
        written = 0
        for by in range(0, size // block):
            for bx in range(0, size // block):
                if (bx + by) % 9 == 0:  # a diagonal pattern of real blocks; the rest stays nodata
                    dst.write(patch, window=Window(bx * block, by * block, block, block))
                    written += 1
    result = subprocess.run([sys.executable, "-c", PROBE, str(path), str(tmp_path / "huge.gpkg")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    # independent count on a 64-pixel cell grid: a cell is valid when its 512 block was written
    cells = np.zeros((size // 64, size // 64), bool)
    for by in range(size // block):
        for bx in range(size // block):
            if (bx + by) % 9 == 0:
                cells[by * 8:(by + 1) * 8, bx * 8:(bx + 1) * 8] = True
    offsets = sorted({min(x, size - 256) for x in range(0, size, 256)})
    expected = sum(cells[y // 64:y // 64 + 4, x // 64:x // 64 + 4].mean() >= 0.5 for y in offsets for x in offsets)
    assert report["tiles"] == expected >= written * 4
    assert report["checksum"] > 0
    assert report["peak_rss_mb"] < 512, report  # measured about 220 MB
