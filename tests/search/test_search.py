"""Search over embedded tile layers: against brute-force numpy, geopandas, real QGIS."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch

from conftest import EXAMPLE_SCENE
from fork_runner import run_cli
from hqrs_geo import TileConfig, read_embeddings, read_runs, read_tiles
from hqrs_geo.api import embed, tile
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.models.loader import load_model
from hqrs_geo.models.encode import normalise
from hqrs_geo.search.queries import combine
from hqrs_geo.search.session import SearchSession
from hqrs_geo.search.spatial import SpatialFilter
from tiny_models import TINY_CLIP

TEMPLATE = "a satellite image of {}."


@pytest.fixture(scope="module")
def searchable(tmp_path_factory, tiny_clip_checkpoint):
    """The example scene in 64 tiles with tiny-CLIP embeddings: read-only (tests that write use
    :func:`writable`)."""
    layer = tmp_path_factory.mktemp("searchable") / "s.gpkg"
    tile(EXAMPLE_SCENE, layer, TileConfig(tile_size=125))
    embed(layer, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu",
          options=RunOptions(workers=0, embedding_dtype="float32"))
    return layer


@pytest.fixture
def writable(searchable, tmp_path):
    """A private copy of :func:`searchable`."""
    return Path(shutil.copy(searchable, tmp_path / "s.gpkg"))


def brute_force(layer, query, k, keep=None):
    frame = read_tiles(layer)
    present, matrix = read_embeddings(frame)
    ids = frame.tile_id[present].to_numpy()
    scores = matrix @ query
    if keep is not None:
        scores = np.where(keep[present], scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[np.isfinite(scores[order])]
    return ids[order].tolist(), scores[order]


def encode_text(tiny_clip_checkpoint, texts):
    loaded = load_model(TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu")
    with torch.no_grad():
        feats = loaded.model.encode_text(loaded.tokenizer(texts))
    return normalise(feats.numpy())


def ensemble_query(checkpoint, phrases: list[str]) -> np.ndarray:
    """A text query worded as classes are, computed independently: each phrase in every template
    (the model's first), normalised, averaged per phrase, normalised, averaged, normalised."""
    from hqrs_geo.models.prompts import ZERO_SHOT_TEMPLATES

    templates = list(dict.fromkeys([TEMPLATE, *ZERO_SHOT_TEMPLATES]))
    per_phrase = [normalise(encode_text(checkpoint, [t.format(p) for t in templates]).mean(0)[None])[0]
                  for p in phrases]
    return normalise(np.mean(per_phrase, axis=0)[None])[0]


def test_text_search_equals_brute_force(searchable, tiny_clip_checkpoint):
    from hqrs_geo.models.prompts import CLASS_SYNONYMS

    session = SearchSession(str(searchable))
    results = session.search_text("a river with a bridge", k=10)
    query = ensemble_query(tiny_clip_checkpoint, ["a river with a bridge"])
    ids, scores = brute_force(searchable, query, 10)
    assert results.tile_id.tolist() == ids and np.allclose(results.score, scores, atol=1e-5)
    assert results["rank"].tolist() == list(range(1, 11)) and results.crs == read_tiles(searchable).crs
    # a class name is searched with its synonyms too; several texts are combined by their mean
    both = session.search_text(["river", "bridge"], k=5)
    river = ensemble_query(tiny_clip_checkpoint, ["river", *CLASS_SYNONYMS["river"]])
    bridge = ensemble_query(tiny_clip_checkpoint, ["bridge", *CLASS_SYNONYMS["bridge"]])
    combined = normalise(np.stack([river, bridge]).mean(0)[None])[0]
    assert both.tile_id.tolist() == brute_force(searchable, combined, 5)[0]
    raw = session.search_text("river", k=5, template=False)
    assert raw.tile_id.tolist() == brute_force(searchable, encode_text(tiny_clip_checkpoint, ["river"])[0], 5)[0]


def test_spatial_filters_against_geopandas(searchable, tmp_path):
    session = SearchSession(str(searchable))
    frame = read_tiles(searchable)
    # a box in the layer's CRS
    x0, y0, x1, y1 = frame.total_bounds
    box = (x0 + 40, y0 + 70, x0 + 140, y1 - 30)
    expected = frame.intersects(shapely.box(*box)).to_numpy()
    assert np.array_equal(SpatialFilter(bbox=box).mask(frame), expected) and 0 < expected.sum() < len(frame)
    # the same kind of box in lon/lat: compare with the tiles reprojected by geopandas
    wgs = frame.to_crs(4326)
    lon0, lat0, lon1, lat1 = wgs.total_bounds
    box84 = (lon0 + 0.3 * (lon1 - lon0), lat0 + 0.2 * (lat1 - lat0), lon0 + 0.7 * (lon1 - lon0), lat0 + 0.55 * (lat1 - lat0))
    ours = SpatialFilter(bbox=box84, bbox_crs="EPSG:4326").mask(frame)
    theirs = wgs.intersects(shapely.box(*box84)).to_numpy()
    differ = np.flatnonzero(ours != theirs)
    assert all(wgs.geometry.iloc[i].distance(shapely.box(*box84).boundary) < 1e-7 for i in differ)
    # within a polygon layer (EPSG:4326 polygons over an EPSG:28992 layer)
    polys = gpd.GeoDataFrame(geometry=[shapely.box(*box84).buffer(-0.0002), shapely.Point(lon0, lat1).buffer(0.0003)],
                             crs=4326)
    polys.to_file(tmp_path / "areas.gpkg", layer="areas")
    area = polys.to_crs(frame.crs).union_all()
    assert np.array_equal(SpatialFilter(within=f"{tmp_path / 'areas.gpkg'}|layername=areas").mask(frame),
                          frame.intersects(area).to_numpy())
    # near a point: distances measured by geopandas in UTM 31N
    lon, lat = wgs.geometry.iloc[27].centroid.coords[0]
    ours = SpatialFilter(near=(lon, lat), distance=60).mask(frame)
    utm = frame.to_crs(32631)
    point = gpd.GeoSeries([shapely.Point(lon, lat)], crs=4326).to_crs(32631).iloc[0]
    dist = utm.distance(point).to_numpy()
    assert np.array_equal(ours[np.abs(dist - 60) > 0.5], (dist <= 60)[np.abs(dist - 60) > 0.5]) and ours.sum() >= 4
    # the filter restricts the ranking and keeps its order
    spatial = SpatialFilter(bbox=box)
    results = session.search_text("parking", k=50, spatial=spatial)
    query = session.text_query("parking")
    assert results.tile_id.tolist() == brute_force(searchable, query, 50, keep=expected)[0]
    assert set(results.tile_id) <= set(frame.tile_id[expected])


def test_similar_tiles_positive_and_negative(searchable):
    session = SearchSession(str(searchable))
    frame = read_tiles(searchable)
    _, matrix = read_embeddings(frame)
    ids = frame.tile_id.tolist()
    pos, neg = [ids[10], ids[11]], [ids[40]]
    results = session.search_similar(positive_ids=pos, negative_ids=neg, k=8)
    query = normalise((normalise(matrix[[10, 11]]).mean(0) - 0.5 * matrix[40])[None])[0]
    keep = ~np.isin(np.array(ids), pos + neg)
    assert results.tile_id.tolist() == brute_force(searchable, query, 8, keep=keep)[0]
    assert not set(pos + neg) & set(results.tile_id)
    with_examples = session.search_similar(positive_ids=[ids[10]], k=1, include_examples=True)
    assert with_examples.tile_id.tolist() == [ids[10]] and with_examples.score.iloc[0] == pytest.approx(1.0, abs=1e-5)


def test_negative_examples_and_ensembles_on_crafted_vectors():
    e = np.eye(4, dtype=np.float32)
    a = normalise((e[0] + 0.2 * e[1])[None])[0]  # closest to the positive, a little like the negative
    b = normalise((e[0] + 0.5 * e[2])[None])[0]  # like the positive only
    candidates = np.stack([a, b])
    plain = candidates @ combine(e[[0]])
    assert plain[0] > plain[1]
    pushed = candidates @ combine(e[[0]], e[[1]], negative_weight=0.5)
    assert pushed[1] > pushed[0]  # the negative example demotes the tile that shares its direction
    # an ensemble is the normalised mean of the normalised members
    members = normalise(np.array([[1.0, 0.2, 0, 0], [0.8, -0.3, 0.1, 0]], dtype=np.float32))
    assert np.allclose(combine(members), normalise(members.mean(0)[None])[0])
    with pytest.raises(Exception, match="positive"):
        combine(np.zeros((0, 4)))


def test_classify_with_template_ensemble(writable, tiny_clip_checkpoint):
    from hqrs_geo.models.prompts import CLASS_SYNONYMS
    from hqrs_geo.models.prompts import ZERO_SHOT_TEMPLATES as RS_TEMPLATES

    session = SearchSession(str(writable))
    labels = ["river", "forest", "parking lot"]
    frame = session.classify(labels, top_k=2)
    templates = list(dict.fromkeys([TEMPLATE, *RS_TEMPLATES]))
    per_label = []
    for label in labels:  # every phrase (name + synonyms) in every template; phrases weigh the same
        phrases = [label, *CLASS_SYNONYMS[label]]
        per_phrase = [normalise(encode_text(tiny_clip_checkpoint, [t.format(p) for t in templates]).mean(0)[None])[0]
                      for p in phrases]
        per_label.append(normalise(np.mean(per_phrase, axis=0)[None])[0])
    per_label = np.stack(per_label)
    _, matrix = read_embeddings(read_tiles(writable))
    expected = np.array(labels)[np.argmax(matrix @ per_label.T, axis=1)]
    assert frame.label.tolist() == expected.tolist()
    assert frame.label_top.str.count(":").eq(2).all() and frame.label_score.between(0, 1).all()
    single = session.label_vectors(labels, [TEMPLATE])
    assert not np.allclose(single, per_label)  # the ensemble is not the single template
    result = run_cli("classify", writable, "--labels", "river,forest,parking lot", "-q")
    assert result.returncode == 0, result.stderr
    stored = read_tiles(writable)
    assert stored.label.tolist() == expected.tolist() and read_runs(writable)[-1]["command"] == "classify"


def test_result_layer_score_column_and_raster_open_in_qgis(writable, tmp_path):
    from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer

    app = QgsApplication.instance() or QgsApplication([], False)
    app.initQgis()
    raster = tmp_path / "score.tif"
    result = run_cli("search", writable, "water", "-k", "7", "--result-layer", "--score-column", "water_score",
                     "--score-raster", raster, "--json")
    assert result.returncode == 0, result.stderr
    ranked = json.loads(result.stdout)
    assert [r["rank"] for r in ranked] == list(range(1, 8))
    layer = QgsVectorLayer(f"{writable}|layername=search_water", "r", "ogr")
    assert layer.isValid() and layer.featureCount() == 7 and "score" in layer.fields().names()
    scores = {f["tile_id"]: f["score"] for f in layer.getFeatures()}
    assert scores == pytest.approx({r["tile_id"]: r["score"] for r in ranked}, abs=1e-6)
    tiles = read_tiles(writable)
    assert tiles.water_score.notna().all()
    top = tiles.sort_values("water_score", ascending=False, kind="stable").tile_id.head(7).tolist()
    assert top == [r["tile_id"] for r in ranked]
    with rasterio.open(raster) as src:
        data = src.read(1)
        assert src.crs == rasterio.open(EXAMPLE_SCENE).crs and data.shape == (8, 8)
        row = tiles.set_index("tile_id").loc[ranked[0]["tile_id"]]
        assert data[row.y_off // 125, row.x_off // 125] == pytest.approx(ranked[0]["score"], abs=1e-6)
    assert QgsRasterLayer(str(raster), "score").isValid()


def test_score_raster_averages_overlaps(tmp_path, tiny_clip_checkpoint):
    from hqrs_geo.search.output import write_score_raster

    layer = tmp_path / "o.gpkg"
    tile(EXAMPLE_SCENE, layer, TileConfig(tile_size=250, overlap="50%"))
    tiles = read_tiles(layer)
    scores = {t: float(i) for i, t in enumerate(tiles.tile_id)}
    (path,) = write_score_raster(str(layer), scores, str(tmp_path / "avg.tif"))
    with rasterio.open(path) as src:
        data = src.read(1)
    assert data.shape == (8, 8)
    covering = tiles[(tiles.x_off <= 375) & (tiles.x_off + 250 > 375) & (tiles.y_off <= 250) & (tiles.y_off + 250 > 250)]
    assert data[2, 3] == pytest.approx(np.mean([scores[t] for t in covering.tile_id]))


def test_refusals(searchable, tmp_path, tiny_clip_checkpoint):
    result = run_cli("search", searchable, "river", "--model", "remoteclip-vit-b-32")
    assert result.returncode == 2 and "not comparable" in result.stderr and "Traceback" not in result.stderr
    other = tmp_path / "other.pt"
    from tiny_models import build_tiny

    model, _, _ = build_tiny(TINY_CLIP, seed=9)
    torch.save(model.state_dict(), other)
    result = run_cli("search", searchable, "river", "--checkpoint", other)
    assert result.returncode == 2 and "sha256" in result.stderr
    plain = tmp_path / "plain.gpkg"
    tile(EXAMPLE_SCENE, plain, TileConfig(tile_size=500))
    result = run_cli("search", plain, "river")
    assert result.returncode == 2 and "has no embeddings" in result.stderr


def test_serve_search_json_lines(searchable):
    child = subprocess.Popen([sys.executable, "-m", "hqrs_geo", "serve-search", str(searchable)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = json.loads(child.stdout.readline())
    assert ready["ready"] and ready["tiles"] == 64

    def ask(obj) -> dict:
        child.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    first = ask({"id": 1, "text": "a river with a bridge", "k": 5})
    assert first["id"] == 1 and len(first["results"]) == 5
    expected = SearchSession(str(searchable)).search_text("a river with a bridge", k=5).tile_id.tolist()
    assert [r["tile_id"] for r in first["results"]] == expected
    assert "error" in ask("this is not json")
    assert "error" in ask({"id": 3, "text": ""})
    bad = ask({"id": 4, "similar": ["no_such_tile"]})
    assert bad["id"] == 4 and "no_such_tile" in bad["error"]
    start = time.perf_counter()
    similar = ask({"id": 5, "similar": [expected[0]], "k": 3, "bbox": [0, 0, 1e9, 1e9]})
    assert len(similar["results"]) == 3 and time.perf_counter() - start < 1.0
    assert ask({"id": 6, "op": "ping"})["pong"]
    assert ask({"op": "quit"})["bye"]
    child.wait(timeout=30)
    assert child.returncode == 0
