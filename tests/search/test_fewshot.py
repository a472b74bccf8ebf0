"""Few-shot detection: the Newton solver against scikit-learn, detection on a real embedded layer
(tiny open_clip, the example GeoTIFF) against an independent computation, partitioned datasets
and their compressed index, saved labels, and serve-search's new operations in a real child
process."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_SCENE, ROOT
from sklearn.linear_model import LogisticRegression
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo import TileConfig, read_embeddings, read_runs, read_tiles
from hqrs_geo.api import embed, tile
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.search import fewshot
from hqrs_geo.search.partitioned import DatasetIndex, DatasetSession
from hqrs_geo.search.serve import RequestError, parse_request
from hqrs_geo.search.session import SearchSession
from hqrs_geo.search.sessions import open_session


@pytest.fixture(scope="module")
def layer(tmp_path_factory, tiny_clip_checkpoint):
    """The example scene in 64 tiles with tiny-CLIP embeddings (read-only; copy to write)."""
    path = tmp_path_factory.mktemp("fewshot") / "s.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size=125))
    embed(path, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu",
          options=RunOptions(workers=0, embedding_dtype="float32"))
    return path


@pytest.fixture
def writable(layer, tmp_path):
    return shutil.copy(layer, tmp_path / "s.gpkg")


def _matrix(path):
    frame = read_tiles(path)
    present, matrix = read_embeddings(frame)
    return frame.tile_id[present].to_numpy(), np.asarray(matrix, dtype=np.float64)


@pytest.mark.parametrize("n, d, positives", [(13, 32, 3), (40, 512, 5), (700, 64, 60), (300, 300, 1)])
def test_newton_solver_equals_scikit_learn(n, d, positives):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.zeros(n)
    y[:positives] = 1
    x[y == 1] += 0.3 * rng.standard_normal(d) / np.sqrt(d)
    weights = fewshot.balanced_weights(y)
    assert weights[y == 1].sum() == pytest.approx(weights[y == 0].sum())
    for c in (0.1, 10.0, 1000.0):
        w, b = fewshot.fit_logistic(x, y, weights, c)
        reference = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x, y, sample_weight=weights)
        scale = max(1.0, float(np.abs(reference.coef_).max()))
        assert np.abs(w - reference.coef_[0]).max() < 1e-4 * scale
        assert b == pytest.approx(reference.intercept_[0], abs=1e-4 * scale)


def test_logistic_detection_equals_an_independent_fit(layer):
    session = SearchSession(str(layer))
    ids, matrix = _matrix(layer)
    pos, neg = list(ids[[3, 4, 12]]), list(ids[[40, 50]])
    frame, detection = fewshot.detect(session, pos, neg, k=10, threshold=0.3, background=0)
    x = np.concatenate([matrix[[3, 4, 12]], matrix[[40, 50]]])
    y = np.array([1, 1, 1, 0, 0])
    reference = LogisticRegression(C=fewshot.DEFAULT_C, tol=1e-12, max_iter=100_000)
    reference.fit(x, y, sample_weight=fewshot.balanced_weights(y))
    expected = reference.predict_proba(matrix)[:, 1]
    # with weak negatives (the default): real and weak negatives weigh half of the negative class each
    weak = fewshot.background_vectors(session, fewshot.BACKGROUND, pos + neg, fewshot.BACKGROUND_SEED)
    assert len(weak) == 59 and not any(np.allclose(w, matrix[i]) for w in weak for i in (3, 4, 12, 40, 50))
    total = 3 + 2 + 59
    weights = np.concatenate([np.full(3, total / 6), np.full(2, total / 8), np.full(59, total / 4 / 59)])
    both = LogisticRegression(C=fewshot.DEFAULT_C, tol=1e-12, max_iter=100_000).fit(
        np.concatenate([x, weak]), np.concatenate([y, np.zeros(59)]), sample_weight=weights)
    detector = fewshot.fit(session, pos, neg)
    assert detector.background == 59
    assert np.allclose(detector.probability(matrix @ detector.vector), both.predict_proba(matrix)[:, 1], atol=1e-5)
    order = np.lexsort((np.arange(len(ids)), -expected))
    above = int((expected >= 0.3).sum())
    assert detection.tiles == 64 and detection.above == above and detection.detector.background == 0
    assert list(frame.tile_id) == list(ids[order][:min(10, above)])
    assert np.allclose(frame.score, expected[order][:len(frame)], atol=1e-5)
    assert list(frame["rank"]) == list(range(1, len(frame) + 1))
    labels = dict(zip(frame.tile_id, frame.train_label))
    assert all(labels[t] == 1 for t in pos if t in labels) and all(labels[t] == -1 for t in neg if t in labels)
    assert all(v is None for t, v in labels.items() if t not in pos + neg)
    # the threshold and k bound the answer; the count of tiles above does not depend on k
    everything = fewshot.score(session, detection.detector, k=None, threshold=0.0)
    assert everything.above == everything.tiles == 64
    assert np.allclose(sorted(p for p, _, _ in everything.hits), sorted(expected), atol=1e-5)


def test_query_method_and_weak_negatives(layer):
    session = SearchSession(str(layer))
    ids, matrix = _matrix(layer)
    pos, neg = list(ids[[0, 1]]), list(ids[[63]])
    frame, detection = fewshot.detect(session, pos, neg, method="query", k=64, threshold=0.0)
    q = 2 * matrix[[0, 1]].mean(axis=0) - matrix[[63]].mean(axis=0)
    q /= np.linalg.norm(q)
    cosine = matrix @ q
    assert list(frame.tile_id) == list(ids[np.lexsort((np.arange(64), -cosine))])
    prob = dict(zip(frame.tile_id, frame.score))
    # the stated rule: 1/2 halfway between the mean scores, 0.9 at the positives' mean, 0.1 at the negatives'
    mean_pos, mean_neg = cosine[[0, 1]].mean(), cosine[63]
    assert detection.detector.probability(np.array([mean_pos, mean_neg, (mean_pos + mean_neg) / 2])) == \
        pytest.approx([0.9, 0.1, 0.5], abs=1e-4)
    assert prob[ids[63]] < 0.5 < min(prob[ids[0]], prob[ids[1]])
    # no negatives: unlabelled tiles stand in (all but the positives on this small layer), drawn the same each time
    first = fewshot.fit(session, pos)
    again = fewshot.fit(session, pos)
    assert first.background == 62 and first.negatives == [] and np.array_equal(first.vector, again.vector)
    weak = fewshot.score(session, first, k=64, threshold=0.0)
    weak_prob = {session.index.ids[r]: p for p, _, r in weak.hits}
    others = np.median([p for t, p in weak_prob.items() if t not in pos])
    assert min(weak_prob[t] for t in pos) > max(others, 0.5)  # the positives are found


def test_one_line_errors(layer):
    session = SearchSession(str(layer))
    first = session.index.ids[0]
    for args, message in [(([],), "no positive"), ((["nope"],), "unknown tile id 'nope'"),
                          (([first], [first]), "both positive and negative")]:
        with pytest.raises(hg.OptionError, match=message):
            fewshot.fit(session, *args)
    with pytest.raises(hg.OptionError, match="no negative to learn from"):
        fewshot.fit(session, [first], background=0)
    with pytest.raises(hg.OptionError, match="background must be a whole number"):
        fewshot.fit(session, [first], background=-1)
    with pytest.raises(hg.OptionError, match="unknown method"):
        fewshot.fit(session, [first], method="svm")
    with pytest.raises(hg.OptionError, match="threshold must be a probability"):
        fewshot.score(session, fewshot.fit(session, [first]), threshold=1.5)
    for line, message in [('{"op": "detect"}', "needs 'positive'"),
                          ('{"op": "detect", "positive": "a", "negative": ["a"]}', "both positive and negative"),
                          ('{"op": "detect", "positive": "a", "threshold": 2}', "'threshold' must be a number"),
                          ('{"op": "detect", "positive": "a", "method": "svm"}', "'method' must be one of"),
                          ('{"op": "detect", "positive": "a", "k": 0}', "'k' must be a whole number"),
                          ('{"op": "open"}', "needs 'layer'"), ('{"op": "labels", "layer": 3}', "'layer' must be"),
                          ('{"op": "save_labels", "name": ["x"]}', "'name' must be a text")]:
        with pytest.raises(RequestError, match=message):
            parse_request(line)
    assert parse_request('{"op": "detect", "positive": "a"}').k == 1000  # the detect default


def test_labels_round_trip_and_reopen(writable):
    session = SearchSession(str(writable))
    ids = list(session.index.ids)
    assert fewshot.saved_labels(writable) == {"positive": [], "negative": [], "name": None}
    assert fewshot.save_labels(session, ids[:3], ids[60:62], "river banks") == 5
    assert read_runs(writable)[-1]["command"] == "labels"
    assert fewshot.saved_labels(writable) == {"positive": ids[:3], "negative": ids[60:62], "name": "river banks"}
    with pytest.raises(hg.OptionError, match="unknown tile id"):
        fewshot.save_labels(session, ["nope"])
    # the same session goes on, and a new one reads the layer as written (tiles and embeddings kept)
    again = SearchSession(str(writable))
    assert list(again.index.ids) == ids
    saved = fewshot.saved_labels(writable)
    a = fewshot.detect(session, saved["positive"], saved["negative"], k=5)[0]
    b = fewshot.detect(again, saved["positive"], saved["negative"], k=5)[0]
    assert list(a.tile_id) == list(b.tile_id)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_clip_checkpoint):
    """Two crops of the example scene as a partitioned dataset (several parts) and merged into one layer."""
    from rasterio.windows import Window
    from scale_helpers import write_crop

    from hqrs_geo.engine.partitioned import ScaleOptions

    folder = tmp_path_factory.mktemp("fewshot_dataset")
    crops = [write_crop(EXAMPLE_SCENE, folder / f"q{i}.tif", w, cog=False)
             for i, w in enumerate([Window(0, 0, 384, 384), Window(500, 500, 384, 384)])]
    out = folder / "tiles"
    hg.run([str(c) for c in crops], f"{out}/", tiling=TileConfig(tile_size=32), embed_models=[TINY_CLIP],
           embed_checkpoints=[str(tiny_clip_checkpoint)], device="cpu", options=RunOptions(batch_size=32),
           scale=ScaleOptions(block_tiles=60), command="embed")
    merged = folder / "merged.gpkg"
    hg.merge_dataset(str(out), str(merged))
    return out, merged


def test_dataset_and_compressed_index_give_the_merged_layers_detections(dataset):
    folder, merged = dataset
    ours, reference = DatasetSession(str(folder)), SearchSession(str(merged))
    assert len(ours.index.parts) >= 4 and ours.index.n == reference.index.n == 288
    ids = list(reference.index.ids)
    pos, neg = ids[5:8], ids[100:102]
    a, da = fewshot.detect(ours, pos, neg, k=20, threshold=0.2)
    b, db = fewshot.detect(reference, pos, neg, k=20, threshold=0.2)
    assert (da.tiles, da.above) == (db.tiles, db.above)
    assert list(a.tile_id) == list(b.tile_id) and np.allclose(a.score, b.score, atol=1e-6)
    assert set(a.part) <= set(json.loads((folder / "_manifest.json").read_text())["parts"])
    # weak negatives are drawn from the same tiles in the same order either way
    assert np.allclose(fewshot.fit(ours, pos).vector, fewshot.fit(reference, pos).vector, atol=1e-6)
    # a spatial filter: the same tiles as filtering after the fact
    box = tuple(read_tiles(merged).total_bounds)
    half = (box[0], box[1], (box[0] + box[2]) / 2, box[3])
    spatial = hg.SpatialFilter(bbox=half)
    c, dc = fewshot.detect(ours, pos, neg, k=288, threshold=0.0, spatial=spatial)
    d, _ = fewshot.detect(reference, pos, neg, k=288, threshold=0.0, spatial=spatial)
    assert 0 < dc.tiles < 288 and list(c.tile_id) == list(d.tile_id)
    # the compressed index changes nothing: detection scores the stored embeddings
    DatasetIndex.open(str(folder), ours.source.key).build_index("ivfpq", nlist=4, m=4, train_size=256, opq=0)
    compressed = open_session(str(folder), use_ann=True)
    assert compressed.use_ann
    e, de = fewshot.detect(compressed, pos, neg, k=20, threshold=0.2)
    assert list(e.tile_id) == list(a.tile_id) and np.allclose(e.score, a.score, atol=1e-6)
    # labels saved with a dataset live in its manifest
    fewshot.save_labels(compressed, pos, neg, "d")
    assert fewshot.saved_labels(str(folder)) == {"positive": pos, "negative": neg, "name": "d"}


def _serve(path):
    return subprocess.Popen([sys.executable, "-m", "hqrs_geo", "serve-search", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_serve_search_detect_layers_and_labels(layer, dataset, tmp_path, tiny_clip_checkpoint):
    """One child process: the ready message's score scale, detect, save/read labels, a second layer
    and a dataset of the same model opened by a request's "layer", a layer of another model
    refused, close."""
    from tiny_models import build_tiny

    first = shutil.copy(layer, tmp_path / "first.gpkg")
    second = shutil.copy(layer, tmp_path / "second.gpkg")
    other = tmp_path / "other.gpkg"
    tile(EXAMPLE_SCENE, other, TileConfig(tile_size=250))
    model, _, _ = build_tiny(TINY_CLIP, seed=9)
    torch.save(model.state_dict(), tmp_path / "other.pt")
    embed(other, model=TINY_CLIP, checkpoint=str(tmp_path / "other.pt"), device="cpu",
          options=RunOptions(workers=0))
    child = _serve(first)
    try:
        ready = json.loads(child.stdout.readline())

        def ask(obj) -> dict:
            child.stdin.write(json.dumps(obj) + "\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())

        assert ready["ready"] and ready["score_scale"] == {"none": 0.2, "good": 0.3}  # an unmeasured model
        ids = list(SearchSession(str(first)).index.ids)
        answer = ask({"id": 1, "op": "detect", "positive": ids[:3], "negative": [ids[63]], "k": 5, "threshold": 0.1})
        expected, detection = fewshot.detect(SearchSession(str(first)), ids[:3], [ids[63]], k=5, threshold=0.1)
        assert answer["id"] == 1 and [r["tile_id"] for r in answer["results"]] == list(expected.tile_id)
        assert [r["score"] for r in answer["results"]] == pytest.approx(list(expected.score), abs=1e-5)
        hit = answer["results"][0]
        assert {"tile_id", "score", "rank", "bounds", "wkt", "source", "window", "label"} <= set(hit)
        assert all(r["label"] == (1 if r["tile_id"] in ids[:3] else -1 if r["tile_id"] == ids[63] else None)
                   for r in answer["results"])
        summary = answer["detector"]
        assert summary["method"] == "logistic" and (summary["positives"], summary["negatives"]) == (3, 1)
        assert summary["tiles"] == 64 and summary["above"] == detection.above and summary["fit_seconds"] >= 0
        assert "error" in ask({"id": 2, "op": "detect", "positive": ["nope"]})
        assert "both positive and negative" in ask({"id": 3, "op": "detect", "positive": [ids[0]],
                                                     "negative": [ids[0]]})["error"]
        assert ask({"id": 4, "op": "labels"}) == {"id": 4, "positive": [], "negative": [], "name": None,
                                                  "seconds": pytest.approx(0, abs=5)}
        assert ask({"id": 5, "op": "save_labels", "positive": ids[:2], "negative": [ids[9]], "name": "roofs"}
                   )["saved"] == 3
        assert ask({"id": 6, "op": "labels"})["positive"] == ids[:2]
        # the layer was rewritten with its labels: searching it still works
        assert len(ask({"id": 7, "text": "river", "k": 3})["results"]) == 3
        opened = ask({"id": 8, "op": "open", "layer": str(second)})["opened"]
        assert opened["layer"] == str(second) and opened["tiles"] == 64 and opened["model"] == ready["model"]
        assert opened["score_scale"] == ready["score_scale"] and "ready" not in opened
        on_second = ask({"id": 9, "op": "detect", "layer": str(second), "positive": ids[:3],
                         "negative": [ids[63]], "k": 5, "threshold": 0.1})
        assert [r["tile_id"] for r in on_second["results"]] == list(expected.tile_id)
        assert ask({"id": 10, "op": "labels", "layer": str(second)})["positive"] == []
        refused = ask({"id": 11, "text": "river", "layer": str(other)})["error"]
        assert refused.startswith(f"{other} was embedded with ") and "open it in its own session" in refused
        folder, merged = dataset
        on_dataset = ask({"id": 14, "op": "open", "layer": str(folder)})["opened"]
        assert on_dataset["kind"] == "dataset" and on_dataset["tiles"] == 288 and on_dataset["parts"] >= 4
        merged_ids = list(SearchSession(str(merged)).index.ids)
        found = ask({"id": 15, "op": "detect", "layer": str(folder), "positive": merged_ids[5:8], "k": 4,
                     "threshold": 0})
        reference, _ = fewshot.detect(SearchSession(str(merged)), merged_ids[5:8], k=4, threshold=0.0)
        assert [r["tile_id"] for r in found["results"]] == list(reference.tile_id)
        assert all("part" in r for r in found["results"]) and found["detector"]["tiles"] == 288
        assert ask({"id": 12, "op": "close", "layer": str(second)})["closed"] == str(second)
        assert "error" in ask({"id": 13, "op": "open", "layer": str(tmp_path / "missing.gpkg")})
        assert ask({"op": "quit"})["bye"]
        child.wait(timeout=30)
        assert child.returncode == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
