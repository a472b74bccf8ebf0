"""Search over a partitioned dataset, part by part: the same hits as the merged layer, spatial
filters that prune parts first and give the same rows as filtering after the fact, the
compressed index over the parts (grown part by part), classify written back, serve-search."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import shapely
from conftest import ROOT
from fork_runner import run_cli
from rasterio.windows import Window
from scale_helpers import EXAMPLE_SCENE, write_crop
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.engine.partitioned import ScaleOptions
from hqrs_geo.search.partitioned import DatasetIndex, DatasetSession
from hqrs_geo.search.session import SearchSession
from hqrs_geo.search.sessions import open_session
from hqrs_geo.search.spatial import SpatialFilter

CONFIG = hg.TileConfig(tile_size=32)
QUARTERS = [Window(0, 0, 512, 512), Window(488, 0, 512, 512), Window(0, 488, 512, 512), Window(488, 488, 512, 512)]


def _job(sources, out, ckpt):
    return hg.run([str(s) for s in sources], f"{out}/", tiling=CONFIG, embed_models=[TINY_CLIP],
                  embed_checkpoints=[str(ckpt)], device="cpu", options=RunOptions(batch_size=32),
                  scale=ScaleOptions(block_tiles=100), command="embed")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_checkpoint):
    folder = tmp_path_factory.mktemp("partitioned")
    crops = [write_crop(EXAMPLE_SCENE, folder / f"q{i}.tif", w, cog=False) for i, w in enumerate(QUARTERS)]
    dataset = folder / "tiles"
    _job(crops[:3], dataset, tiny_clip_checkpoint)
    merged = folder / "merged.gpkg"
    assert run_cli("merge", dataset, "-o", merged).returncode == 0
    return {"folder": folder, "crops": crops, "dataset": dataset, "merged": merged, "ckpt": tiny_clip_checkpoint}


def _pairs(frame):
    return [(t, round(float(s), 5)) for t, s in zip(frame.tile_id, frame.score)]


def test_dataset_search_equals_the_merged_layer(world):
    ours, reference = DatasetSession(str(world["dataset"])), SearchSession(str(world["merged"]))
    manifest = json.loads((world["dataset"] / "_manifest.json").read_text())
    assert len(manifest["parts"]) >= 6  # blocks of 40 tiles: several parts per scene
    for text in ("a river", "red roofs", "trees"):
        a, b = ours.search_text(text, k=12), reference.search_text(text, k=12)
        assert _pairs(a) == _pairs(b)
        assert set(a.part) <= set(manifest["parts"]) and list(a["rank"]) == list(range(1, 13))
    some = list(b.tile_id[:2])
    assert _pairs(ours.search_similar(some, k=8)) == _pairs(reference.search_similar(some, k=8))
    with pytest.raises(hg.OptionError, match="unknown tile id"):
        ours.search_similar(["nope"], k=3)


def test_spatial_filters_prune_parts_and_equal_filtering_after_the_fact(world, tmp_path):
    ours, reference = DatasetSession(str(world["dataset"])), SearchSession(str(world["merged"]))
    tiles = hg.read_tiles(world["merged"])
    x0, y0, x1, y1 = tiles.total_bounds
    polygon = tmp_path / "area.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(x0, y0, (x0 + x1) / 2, (y0 + y1) / 2)], crs=tiles.crs).to_file(polygon)
    centre = gpd.GeoSeries([shapely.Point(x1 - 20, y1 - 20)], crs=tiles.crs).to_crs("EPSG:4326").iloc[0]
    box4326 = gpd.GeoSeries([shapely.box(x0, y0, (x0 + x1) / 2, y1)], crs=tiles.crs).to_crs("EPSG:4326").total_bounds
    filters = [
        SpatialFilter(bbox=(x0, y0, (x0 + x1) / 2, (y0 + y1) / 2)),
        SpatialFilter(bbox=tuple(box4326), bbox_crs="EPSG:4326"),
        SpatialFilter(near=(centre.x, centre.y), distance=60.0),
        SpatialFilter(within=str(polygon)),
    ]
    query = reference.text_query("a river")
    total_parts = len(ours.index.parts)
    for i, spatial in enumerate(filters):
        expected = reference.vector_search(query, k=len(tiles), spatial=spatial)
        got = ours.vector_search(query, k=len(tiles), spatial=spatial)
        assert _pairs(got) == _pairs(expected), spatial
        assert set(got.tile_id) == set(tiles.tile_id[spatial.mask(tiles)])
        if i in (0, 2, 3):  # small areas: whole parts are left out without reading them
            assert len(ours.index.masks(spatial)) < total_parts


def test_compressed_index_over_parts_grows_part_by_part(world, tmp_path):
    import shutil

    dataset = tmp_path / "grow"
    shutil.copytree(world["dataset"], dataset)
    params = ["--kind", "ivfpq", "--param", "nlist=8", "--param", "m=8", "--param", "train_size=768",
              "--param", "rerank=256", "--param", "opq=0"]
    built = run_cli("index", dataset, *params)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout.strip().splitlines()[-1])
    assert report["kind"] == "ivfpq" and report["n"] == 768 and report["recall_at_10"] >= 0.9
    session = open_session(str(dataset), use_ann=True)
    assert isinstance(session, DatasetSession) and session.use_ann
    exact = DatasetSession(str(dataset))
    query = exact.text_query("a river")
    approx = session.vector_search(query, k=10)
    assert len(set(approx.tile_id) & set(exact.vector_search(query, k=10).tile_id)) >= 8
    # a new scene: only its parts are encoded into the index, the others keep their shards
    _job([world["crops"][3]], dataset, world["ckpt"])
    index = DatasetIndex.open(str(dataset), session.source.key)
    assert not index.load_ann()  # the index no longer covers every part: searches stay exact
    update = index.build_index("ivfpq")
    assert update["update"]["added"] and not update["update"]["removed"] and update["n"] == 1024
    assert index.load_ann()
    hits = open_session(str(dataset), use_ann=True).vector_search(query, k=5)
    assert len(hits) == 5


def test_classify_writes_every_part_like_the_layer(world, tmp_path):
    import shutil

    dataset, merged = tmp_path / "labels", tmp_path / "labels.gpkg"
    shutil.copytree(world["dataset"], dataset)
    shutil.copy(world["merged"], merged)
    labels = ["water", "buildings", "trees"]
    DatasetSession(str(dataset)).classify(labels, write=True)
    SearchSession(str(merged)).classify(labels, write=True)
    a = hg.read_tiles(dataset).set_index("tile_id")
    b = hg.read_tiles(merged).set_index("tile_id")
    assert (a.label == b.label.loc[a.index]).all()
    assert np.allclose(a.label_score.to_numpy(float), b.label_score.loc[a.index].to_numpy(float), atol=1e-5)
    assert hg.read_runs(dataset)[-1]["command"] == "classify"


def _serve(path):
    return subprocess.Popen([sys.executable, "-m", "hqrs_geo", "serve-search", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_serve_search_on_a_dataset_says_crs_part_source_and_window(world):
    """The ready message names the CRS; every result its footprint, part, raster and pixel window
    (what the QGIS dock needs to draw hits and thumbnails without the dataset loaded); the keys of
    earlier versions are unchanged."""
    requests = '{"id": 1, "text": "a river", "k": 5}\n{"id": 2, "similar": "%s", "k": 2}\n{"id": 3, "op": "quit"}\n'
    merged = hg.read_tiles(world["merged"]).set_index("tile_id")
    first = merged.index[0]
    children = [_serve(path) for path in (world["dataset"], world["merged"])]  # both load at once
    (dataset_out, dataset_err), (layer_out, layer_err) = (c.communicate(requests % first, timeout=300)
                                                          for c in children)
    assert all(c.returncode == 0 for c in children), dataset_err + layer_err
    ours, theirs = ([json.loads(line) for line in out.splitlines()] for out in (dataset_out, layer_out))
    manifest = json.loads((world["dataset"] / "_manifest.json").read_text())
    assert ours[0] == {"ready": True, "layer": str(world["dataset"]), "model": theirs[0]["model"], "tiles": 768,
                       "crs": "EPSG:28992", "kind": "dataset", "embeddings": theirs[0]["embeddings"],
                       "parts": len(manifest["parts"]), "score_scale": theirs[0]["score_scale"]}
    assert theirs[0]["crs"] == manifest["crs"] == "EPSG:28992" and theirs[0]["kind"] == "layer"
    assert theirs[0]["tiles"] == 768 and "parts" not in theirs[0]
    for mine, reference in zip(ours[1:3], theirs[1:3]):
        assert [(r["tile_id"], r["score"], r["rank"]) for r in mine["results"]] == \
            [(r["tile_id"], r["score"], r["rank"]) for r in reference["results"]]
        for hit, same in zip(mine["results"], reference["results"]):
            row = merged.loc[hit["tile_id"]]
            assert hit["part"] in manifest["parts"] and "part" not in same
            assert manifest["parts"][hit["part"]]["scene"] == hit["tile_id"].rsplit("_r", 1)[0]
            assert hit["source"] == same["source"] == row["source"] and os.path.isfile(hit["source"])
            assert hit["window"] == same["window"] == [int(row[c]) for c in ("x_off", "y_off", "width", "height")]
            assert shapely.from_wkt(hit["wkt"]).equals(row.geometry)
            assert hit["bounds"] == same["bounds"] == list(row.geometry.bounds)
            assert "caption" not in hit  # this dataset has no captions
    assert first not in [r["tile_id"] for r in ours[2]["results"]]
    assert ours[3]["bye"] and theirs[3]["bye"]
