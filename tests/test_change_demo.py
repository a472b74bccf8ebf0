"""The change demo (examples/change_demo.py) on the real Landsat pair of Pucallpa, 1985 and 2020.

The demo's most changed tiles are checked against an independent reference made from the pixels
alone: each pixel of each date is put in one of three covers by simple band rules (water: dark in
the near infrared; bare soil or town: bright in SWIR relative to NIR; vegetation: the rest), and a
tile's share of pixels whose cover differs between the dates says how much really changed there
(the river moved, forest was cleared, the town grew).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from examples import change_demo
from hqrs_geo import read_runs, read_tiles

FIXED_COLUMNS = ("tile_id", "geometry", "after_tile_id", "overlap", "compared", "change_cosine", "change_score",
                 "change_pct", "changed", "change_rank", "caption_before", "caption_after", "class_before",
                 "class_after", "class_change", "became_score", "became_rank")


def _cover(path: Path) -> np.ndarray:
    """Per pixel: 0 water, 1 bare soil or town, 2 vegetation, -1 nodata (bands SWIR1, NIR, Red, Green)."""
    with rasterio.open(path) as src:
        swir, nir = src.read((1, 2)).astype(float)
    cover = np.full(nir.shape, 2)
    cover[swir / np.maximum(nir, 1.0) > 0.8] = 1
    cover[nir < 80] = 0
    cover[nir == 0] = -1
    return cover


def _switched_share(layer) -> np.ndarray:
    """Each tile's share of pixels whose cover differs between 1985 and 2020 (the scenes share one grid)."""
    before, after = _cover(change_demo.BEFORE), _cover(change_demo.AFTER)
    with rasterio.open(change_demo.BEFORE) as src:
        inverse = ~src.transform
    shares = []
    for minx, miny, maxx, maxy in layer.geometry.bounds.itertuples(index=False):
        x0, y0 = (int(round(v)) for v in inverse * (minx, maxy))
        x1, y1 = (int(round(v)) for v in inverse * (maxx, miny))
        shares.append(float((before[y0:y1, x0:x1] != after[y0:y1, x0:x1]).mean()))
    return np.array(shares)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("change-demo")
    start = time.perf_counter()
    change_demo.main(out)
    return out, time.perf_counter() - start


def test_change_demo_writes_the_layer_and_picture_and_finds_real_changes(demo):
    out, seconds = demo
    picture = out / "change_demo.png"
    with Image.open(picture) as image:
        assert image.width > 1000 and image.height > 900  # both dates, the change map, the chip pairs
    layer = read_tiles(out / "change.gpkg")
    assert [run["command"] for run in read_runs(out / "change.gpkg")][-1] == "change"
    missing = [c for c in FIXED_COLUMNS if c not in layer.columns]
    assert not missing, missing
    compared = layer[layer["compared"].astype(bool)]
    assert len(compared) >= 0.9 * len(layer) > 200  # one grid, both dates valid almost everywhere
    assert compared["change_rank"].min() == 1 and compared["change_score"].notna().all()
    assert all(c and a for c, a in zip(compared["caption_before"], compared["caption_after"]))
    assert set(compared["class_before"]) <= set(change_demo.CLASSES)

    switched = _switched_share(layer)
    top = compared.sort_values("change_rank").head(change_demo.TOP).index
    median = float(np.median(switched[layer["compared"].astype(bool).to_numpy()]))
    assert median < 0.1
    assert (switched[top] >= 0.15).all(), switched[top]  # each shown tile really changed
    scores = layer["change_score"].to_numpy(dtype=float, na_value=np.nan)
    changed = layer["changed"].fillna(False).astype(bool).to_numpy()
    assert switched[changed].mean() > 3 * median  # tiles flagged changed switched cover far more than usual
    ok = ~np.isnan(scores)
    rank_corr = np.corrcoef(np.argsort(np.argsort(scores[ok])), np.argsort(np.argsort(switched[ok])))[0, 1]
    assert rank_corr > 0.5, rank_corr
    print(f"change demo: {seconds:.1f} s, {int(changed.sum())} changed of {int(ok.sum())}, "
          f"Spearman(score, switched cover) {rank_corr:.2f}")
