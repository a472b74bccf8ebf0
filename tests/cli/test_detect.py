"""``hqrs-geo detect`` and ``hqrs_geo.detect`` on a real embedded layer (tiny open_clip, the example
GeoTIFF): detection columns and detection layers against the engine's own detection, saved labels
reused and exported as a training set, one-line errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import EXAMPLE_SCENE
from fork_runner import run_cli
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo import TileConfig, read_runs, read_tiles
from hqrs_geo.api import embed, tile
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.search import fewshot
from hqrs_geo.search.session import SearchSession


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_clip_checkpoint):
    path = tmp_path_factory.mktemp("detect") / "s.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size=125))
    embed(path, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu",
          options=RunOptions(workers=0, embedding_dtype="float32"))
    return path


@pytest.fixture
def layer(embedded, tmp_path):
    return shutil.copy(embedded, tmp_path / "s.gpkg")


def test_detect_writes_columns_and_a_detection_layer(layer, tmp_path):
    ids = list(SearchSession(str(layer)).index.ids)
    pos, neg = ids[:3], ids[60:62]
    expected, detection = fewshot.detect(SearchSession(str(layer)), pos, neg, k=None, threshold=0.0)
    probability = dict(zip(expected.tile_id, expected.score))
    result = run_cli("detect", layer, "--pos", *pos, "--neg", *neg, "--save-labels", "demo")
    assert result.returncode == 0, result.stderr
    above = sum(p >= 0.5 for p in probability.values())
    assert detection.above == 64 and f"{above} of 64 tiles at or above 0.5 (logistic, 3 positive, 2 negative" \
        in result.stderr and "written:" in result.stderr
    tiles = read_tiles(layer).set_index("tile_id")
    assert np.allclose(tiles.loc[list(probability), "detect_prob"], list(probability.values()), atol=1e-5)
    assert tiles.detect_rank.loc[expected.tile_id[0]] == 1 and sorted(tiles.detect_rank) == list(range(1, 65))
    assert [r["command"] for r in read_runs(layer)][-2:] == ["detect", "labels"]
    assert fewshot.saved_labels(layer) == {"positive": pos, "negative": neg, "name": "demo"}
    # again, from the saved labels: the detect columns may be replaced (a detect run wrote them)
    again = run_cli("detect", layer, "--labels-from", "--json", "--threshold", "0.5")
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    above = [t for t, p in probability.items() if p >= 0.5]
    assert answer["detector"]["positives"] == 3 and [r["tile_id"] for r in answer["results"]] == \
        [t for t in expected.tile_id if t in above]
    # a detection layer: the tiles at or above the threshold, at most k
    out = tmp_path / "found.gpkg"
    written = run_cli("detect", layer, "--labels-from", str(layer), "-o", out, "-k", "4", "--threshold", "0.2")
    assert written.returncode == 0, written.stderr
    import geopandas as gpd

    found = gpd.read_file(out, layer="detections")
    keep = [t for t in expected.tile_id if probability[t] >= 0.2][:4]
    assert list(found.tile_id) == keep and list(found.detect_rank) == list(range(1, len(keep) + 1))
    assert np.allclose(found.detect_prob, [probability[t] for t in keep], atol=1e-5)
    assert found.crs == read_tiles(layer).crs and {"detect_label", "geometry"} <= set(found.columns)
    assert not any(c.startswith("emb_") for c in found.columns)
    # the Python API: the same tiles
    api = hg.detect(str(layer), pos, neg, k=4, threshold=0.2)
    assert list(api.tile_id) == keep


def test_query_method_to_parquet_and_refusals(layer, tmp_path):
    ids = list(SearchSession(str(layer)).index.ids)
    out = tmp_path / "q.parquet"
    result = run_cli("detect", layer, "--pos", ids[5], "--method", "query", "-o", out, "--threshold", "0")
    assert result.returncode == 0, result.stderr
    found = read_tiles(out)
    expected, _ = fewshot.detect(SearchSession(str(layer)), [ids[5]], method="query", k=None, threshold=0.0)
    assert list(found.sort_values("detect_rank").tile_id) == list(expected.tile_id) and len(found) == 64
    for args, message in [(["--pos", "nope"], "unknown tile id 'nope'"),
                          ([], "no positive tile"),
                          (["--pos", ids[0], "--neg", ids[0]], "both positive and negative"),
                          (["--labels-from"], "has no saved labels"),
                          (["--pos", ids[0], "--threshold", "2"], "--threshold"),
                          (["--pos", ids[0], "--method", "svm"], "invalid choice")]:
        refused = run_cli("detect", layer, *args)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    plain = tmp_path / "plain.gpkg"
    tile(EXAMPLE_SCENE, plain, TileConfig(tile_size=500))
    refused = run_cli("detect", plain, "--pos", "x")
    assert refused.returncode == 2 and "has no embeddings" in refused.stderr


def test_export_dataset_of_saved_labels(layer, tmp_path):
    ids = list(SearchSession(str(layer)).index.ids)
    refused = run_cli("export-dataset", layer, "-o", tmp_path / "none", "--captions", "labels")
    assert refused.returncode == 2 and "has no saved labels" in refused.stderr
    assert not (tmp_path / "none").exists()
    fewshot.save_labels(SearchSession(str(layer)), ids[:4], ids[10:13], "trees")
    result = run_cli("export-dataset", layer, "-o", tmp_path / "set", "--captions", "labels", "--format", "png")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "set" / "dataset.json").read_text())
    classes = {i["tile_id"]: i["class"] for i in data["images"]}
    assert classes == {**{t: "positive" for t in ids[:4]}, **{t: "negative" for t in ids[10:13]}}
    assert all((tmp_path / "set" / i["filename"]).is_file() for i in data["images"])
    rows = (tmp_path / "set" / "labels.csv").read_text().splitlines()
    assert rows[0] == "filepath,tile_id,class,split" and len(rows) == 8
