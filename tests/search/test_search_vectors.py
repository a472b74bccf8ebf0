"""VectorIndex: exact search equals brute force; FAISS ANN recall and masks; the cache beside a layer."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

from hqrs_geo import read_tiles, write_tiles
from hqrs_geo.layer.columns import encode
from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.search import cache as cache_module
from hqrs_geo.search.index import VectorIndex

N, D = 20000, 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute(matrix: np.ndarray, queries: np.ndarray, k: int, mask=None):
    """Reference: plain numpy float32 scores, stable sort (ties by row)."""
    scores = np.atleast_2d(np.asarray(queries, np.float32)) @ np.asarray(matrix, np.float32).T
    allowed = len(matrix)
    if mask is not None:
        scores[:, ~mask] = -np.inf
        allowed = int(mask.sum())
    rows = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, allowed)]
    return np.take_along_axis(scores, rows, axis=1), rows


def clustered(n: int, dim: int, clusters: int = 50, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """``clusters`` Gaussian clusters on the unit sphere."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    labels = rng.integers(0, clusters, n)
    return unit(centres[labels] + rng.standard_normal((n, dim)) * spread / np.sqrt(dim))


def noisy_rows(matrix: np.ndarray, count: int, seed: int, noise: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.asarray(matrix[rng.choice(len(matrix), count, replace=False)], np.float32)
    return unit(rows + rng.standard_normal(rows.shape) * noise / np.sqrt(rows.shape[1]))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def random_unit() -> np.ndarray:
    return unit(np.random.default_rng(0).standard_normal((N, D)))


@pytest.fixture(scope="module")
def clustered_index() -> VectorIndex:
    return VectorIndex.from_matrix(clustered(N, D).astype(np.float16))


# ---------------------------------------------------------------- exact search


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_queries", [0, 3, 40])  # 0: one (D,) query; 3: per-query kernel; 40: batched GEMM pass
@pytest.mark.parametrize("mask_kind", [None, "half", "small"])
def test_exact_equals_brute_force(random_unit, dtype, n_queries, mask_kind):
    matrix = random_unit.astype(dtype)
    index = VectorIndex.from_matrix(matrix)
    rng = np.random.default_rng(1)
    queries = unit(rng.standard_normal((max(n_queries, 1), D)))
    if n_queries == 0:
        queries = queries[0]
    mask = {None: None, "half": rng.random(N) < 0.5, "small": rng.random(N) < 0.01}[mask_kind]
    scores, rows = index.search(queries, k=15, mask=mask)
    ref_scores, ref_rows = brute(matrix, queries, 15, mask)
    assert scores.shape == rows.shape == (max(n_queries, 1), 15)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-6, rtol=0)
    if mask is not None:
        assert mask[rows].all()


@pytest.mark.parametrize("n_queries", [1, 40])
def test_exact_without_torch(random_unit, monkeypatch, n_queries):
    """torch is optional (models extra): the numpy fallback gives the same results."""
    from hqrs_geo.search import exact as exact_module

    monkeypatch.setattr(exact_module, "torch_or_none", lambda: None)
    index = VectorIndex.from_matrix(random_unit.astype(np.float16))
    queries = unit(np.random.default_rng(9).standard_normal((n_queries, D)))
    mask = np.random.default_rng(10).random(N) < 0.5
    for m in (None, mask):
        scores, rows = index.search(queries, k=10, mask=m)
        ref_scores, ref_rows = brute(index.matrix, queries, 10, m)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, atol=2e-6, rtol=0)


def test_clustered_float16_matches_brute_force(clustered_index):
    """Near-duplicate scores (clustered data) are where float16 fast scores could reorder rows."""
    queries = noisy_rows(clustered_index.matrix, 20, seed=5)
    for batch in (queries[:2], queries):
        scores, rows = clustered_index.search(batch, k=10)
        ref_scores, ref_rows = brute(clustered_index.matrix, batch, 10)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, atol=2e-6, rtol=0)


def test_k_larger_than_candidates(random_unit):
    index = VectorIndex.from_matrix(random_unit[:30].astype(np.float16))
    q = random_unit[3]
    scores, rows = index.search(q, k=100)
    assert rows.shape == (1, 30)
    np.testing.assert_array_equal(rows, brute(index.matrix, q, 100)[1])
    mask = np.zeros(30, bool)
    mask[[2, 7, 11]] = True
    scores, rows = index.search(np.stack([q, -q]), k=10, mask=mask)
    assert rows.shape == (2, 3) and set(rows[0]) == {2, 7, 11}
    assert np.all(np.diff(scores, axis=1) <= 0)
    scores, rows = index.search(q, k=5, mask=np.zeros(30, bool))
    assert rows.shape == scores.shape == (1, 0)


@pytest.mark.parametrize("n_queries", [1, 8])
def test_ties_broken_by_row_order(random_unit, n_queries):
    matrix = random_unit[:2000].copy()
    for row in (40, 7, 1500, 901):
        matrix[row] = matrix[300]
    index = VectorIndex.from_matrix(matrix.astype(np.float16))
    scores, rows = index.search(np.repeat(matrix[300][None], n_queries, 0), k=5)
    assert list(rows[0][:5]) == [7, 40, 300, 901, 1500]
    assert np.all(scores[:, :5] == scores[:, :1])
    zero_scores, zero_rows = index.search(np.zeros(D, np.float32), k=4)
    assert list(zero_rows[0]) == [0, 1, 2, 3] and not zero_scores.any()


def test_scores_of_every_row(random_unit):
    index = VectorIndex.from_matrix(random_unit.astype(np.float16))
    q = random_unit[9]
    mask = np.random.default_rng(2).random(N) < 0.3
    out = index.scores(q, mask=mask)
    expected = np.asarray(index.matrix, np.float32) @ q
    assert out.shape == (N,)
    np.testing.assert_allclose(out[mask], expected[mask], atol=2e-6)
    assert np.isnan(out[~mask]).all()


def test_fast_kernel_out_of_bound_falls_back(random_unit, monkeypatch):
    """If the float16 kernel ever broke its error bound, results would stay exact (with a warning)."""
    index = VectorIndex.from_matrix(random_unit.astype(np.float16))
    noise = np.random.default_rng(3).standard_normal(N).astype(np.float32) * 0.05
    from hqrs_geo.search.exact import ExactSearch

    real = ExactSearch._mv
    monkeypatch.setattr(ExactSearch, "_mv", lambda self, q, norm: real(self, q, norm) + noise)
    q = random_unit[11]
    with pytest.warns(RuntimeWarning, match="error bound"):
        scores, rows = index.search(q, k=10)
    np.testing.assert_array_equal(rows, brute(index.matrix, q, 10)[1])


def test_invalid_arguments(random_unit):
    index = VectorIndex.from_matrix(random_unit[:100])
    with pytest.raises(OptionError, match="invalid k"):
        index.search(random_unit[0], k=0)
    with pytest.raises(OptionError, match="expected"):
        index.search(np.ones(D + 1, np.float32))
    with pytest.raises(OptionError, match="boolean array of 100"):
        index.search(random_unit[0], mask=np.ones(99, bool))
    with pytest.raises(OptionError, match="no approximate"):
        index.search(random_unit[0], use_ann=True)
    with pytest.raises(OptionError, match="one id per row"):
        VectorIndex.from_matrix(random_unit[:10], ids=["a"])
    with pytest.raises(OptionError, match="2-D"):
        VectorIndex.from_matrix(random_unit[0])
    broken = random_unit[:100].copy()
    broken[50, 3] = np.nan
    with pytest.raises(OptionError, match="NaN"):
        VectorIndex.from_matrix(broken).search(random_unit[0])


# ---------------------------------------------------------------- ANN (FAISS)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_recall_on_clustered_vectors(clustered_index, kind):
    pytest.importorskip("faiss")
    report = clustered_index.build_ann(kind)
    assert report["kind"] == kind and report["n"] == N and report["dim"] == D and report["path"] is None
    assert report["build_seconds"] > 0 and report["query_p50_ms"] > 0
    assert report["recall_at_10"] >= 0.9
    # independent measurement on other queries
    queries = noisy_rows(clustered_index.matrix, 200, seed=11)
    truth = brute(clustered_index.matrix, queries, 10)[1]
    scores, found = clustered_index.search(queries, k=10, use_ann=True)
    measured = recall(found, truth)
    assert measured >= 0.9
    assert abs(measured - report["recall_at_10"]) <= 0.05
    # returned scores are exact float32 scores of the returned rows, best first
    exact = np.einsum("qd,qkd->qk", queries, np.asarray(clustered_index.matrix, np.float32)[found])
    np.testing.assert_allclose(scores, exact, atol=2e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_respects_masks(clustered_index, kind):
    pytest.importorskip("faiss")
    index = VectorIndex.from_matrix(clustered_index.matrix)
    index.build_ann(kind)
    queries = noisy_rows(index.matrix, 30, seed=12)
    rng = np.random.default_rng(4)
    for fraction in (0.5, 0.05, 0.001):  # over-fetch and filter, ... , exact fallback
        mask = rng.random(N) < fraction
        scores, rows = index.search(queries, k=10, mask=mask, use_ann=True)
        assert rows.shape == (30, min(10, int(mask.sum())))
        assert mask[rows].all()
        truth = brute(index.matrix, queries, 10, mask)[1]
        assert recall(rows, truth) >= 0.9
    # a mask that keeps the rows the ANN index finds least: the fallback keeps it exact
    mask = np.ones(N, bool)
    _, near = index.search(queries[:1], k=50, use_ann=True)
    mask[near[0]] = False
    _, rows = index.search(queries[:1], k=10, mask=mask, use_ann=True)
    assert mask[rows].all()


def test_ann_saved_and_validated_with_matrix_digest(tmp_path, clustered_index):
    pytest.importorskip("faiss")
    path = tmp_path / "m.hnsw.faiss"
    index = VectorIndex.from_matrix(clustered_index.matrix[:3000])
    report = index.build_ann("hnsw", path=path, M=16, efSearch=64)
    assert report["path"] == str(path) and report["M"] == 16 and report["efSearch"] == 64
    assert path.exists() and json.loads((tmp_path / "m.hnsw.faiss.json").read_text())["params"]["M"] == 16
    again = VectorIndex.from_matrix(np.array(clustered_index.matrix[:3000]))
    assert again.load_ann(path) and again.ann_info["efSearch"] == 64
    assert np.array_equal(again.search(index.matrix[5], use_ann=True)[1], index.search(index.matrix[5], use_ann=True)[1])
    changed = np.array(clustered_index.matrix[:3000])
    changed[17] = changed[18]
    assert not VectorIndex.from_matrix(changed).load_ann(path)
    assert not VectorIndex.from_matrix(changed).load_ann(tmp_path / "missing.faiss")
    with pytest.raises(OptionError, match="unknown hnsw parameter 'nprobe'"):
        index.build_ann("hnsw", nprobe=3)
    with pytest.raises(OptionError, match="hnsw, ivf"):
        index.build_ann("lsh")


def test_missing_faiss_says_how_to_install(random_unit, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes "import faiss" raise ImportError
    index = VectorIndex.from_matrix(random_unit[:100])
    with pytest.raises(OptionError) as err:
        index.build_ann("hnsw")
    assert "pip install faiss-cpu" in str(err.value) and "\n" not in str(err.value)
    assert index.load_ann() is False  # nothing saved: no need for FAISS to say so


# ---------------------------------------------------------------- tile layer cache


def _add_embeddings(path, vectors, missing=()):
    frame = read_tiles(path)
    blobs = encode(vectors[: len(frame)], "float16")
    frame["emb_test"] = [None if i in missing else b for i, b in enumerate(blobs)]
    frame["emb_test_dim"] = vectors.shape[1]
    frame["emb_test_model"] = "test"
    write_tiles(path, frame)
    return frame


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_open_layer_caches_and_follows_changes(example_layer, suffix, monkeypatch):
    layer = example_layer
    if suffix != ".gpkg":
        layer = example_layer.with_suffix(suffix)
        write_tiles(layer, read_tiles(example_layer))
    rng = np.random.default_rng(6)
    first = unit(rng.standard_normal((64, 32)))
    frame = _add_embeddings(layer, first, missing={5, 40})
    tile_ids = frame["tile_id"].tolist()

    index = VectorIndex.open(layer, "test")
    cache = layer.parent / f"{layer.name}.emb_test.npy"
    assert index.cache_path == cache and cache.exists()
    assert (layer.parent / f"{layer.name}.emb_test.ids.npy").exists()
    meta = json.loads((layer.parent / f"{layer.name}.emb_test.json").read_text())
    assert meta["fingerprint"]["key"] == "test" and meta["n"] == 62 and meta["dtype"] == "float16"
    assert isinstance(index.matrix, np.memmap) and index.matrix.dtype == np.float16
    assert index.n == 62 and tile_ids[5] not in index.ids and tile_ids[40] not in index.ids
    keep = [i for i in range(64) if i not in (5, 40)]
    assert list(index.ids) == [tile_ids[i] for i in keep]
    np.testing.assert_array_equal(index.matrix, first[keep].astype(np.float16))
    _, rows = index.search(first[12], k=3)
    assert index.ids[rows[0][0]] == tile_ids[12]
    pytest.importorskip("faiss")
    report = index.build_ann("hnsw")
    ann_path = layer.parent / f"{layer.name}.emb_test.hnsw.faiss"
    assert report["path"] == str(ann_path) and ann_path.exists()

    # reopened: the cache is memory-mapped again, not rewritten, and the layer is not read
    before = _stat(cache)
    time.sleep(0.01)
    monkeypatch.setattr("hqrs_geo.layer.io.read_tiles", lambda *a, **k: pytest.fail("layer read again"))
    again = VectorIndex.open(layer, "test")
    assert _stat(cache) == before and isinstance(again.matrix, np.memmap)
    assert again.load_ann() and again.ann_info["kind"] == "hnsw"
    _, rows = again.search(first[12], k=3, use_ann=True)
    assert again.ids[rows[0][0]] == tile_ids[12]
    monkeypatch.undo()

    # the layer changes: the cache is rebuilt, results follow the new vectors, the ANN index is stale
    second = unit(rng.standard_normal((64, 32)))
    frame = _add_embeddings(layer, second)
    changed = VectorIndex.open(layer, "test", frame=read_tiles(layer))
    assert _stat(cache) != before and changed.n == 64
    np.testing.assert_array_equal(changed.matrix, second.astype(np.float16))
    _, rows = changed.search(second[30], k=1)
    assert changed.ids[rows[0][0]] == tile_ids[30]
    assert not changed.load_ann()
    changed.build_ann("hnsw")
    assert changed.load_ann() and not index.load_ann()  # the old index object is not matched by the new file
    # the old index object maps the replaced cache file and keeps answering from the old vectors
    assert index.ids[index.search(first[12], k=1)[1][0][0]] == tile_ids[12]


def test_open_layer_errors(example_layer, tmp_path):
    with pytest.raises(InputError, match="file not found"):
        VectorIndex.open(tmp_path / "missing.gpkg", "test")
    with pytest.raises(InputError, match=r"tiles\.gpkg: layer has no embeddings of model key 'test'"):
        VectorIndex.open(example_layer, "test")
    assert not list(tmp_path.glob("*.npy"))


def test_cache_paths_use_safe_key(example_layer):
    frame = read_tiles(example_layer)
    vectors = unit(np.random.default_rng(8).standard_normal((len(frame), 8)))
    frame["emb_a/b"] = encode(vectors, "float32")
    frame["emb_a/b_dim"] = 8
    index = VectorIndex.open(example_layer, "a/b", frame=frame)
    assert index.cache_path.name == f"{example_layer.name}.emb_a_b.npy"
    assert index.matrix.dtype == np.float32
    assert cache_module.safe_key("a/b") == "a_b"
    vectors[3, 1] = np.inf
    frame["emb_bad"] = encode(vectors, "float32")
    frame["emb_bad_dim"] = 8
    with pytest.raises(InputError, match="tiles.gpkg: embeddings of bad contain NaN or infinite"):
        VectorIndex.open(example_layer, "bad", frame=frame)
