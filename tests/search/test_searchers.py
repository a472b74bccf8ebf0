"""Every Searcher (exact, VectorIndex, FAISS HNSW / IVF, IVF-PQ, a dataset's parts, and the IVF-PQ
index over those parts) answers one set of vectors like brute-force numpy, with and without a
mask; a mask too selective for an approximate index is answered exactly, without asking the index;
the sessions' one entry refuses what is not a tile layer."""
from __future__ import annotations

import numpy as np
import pytest

from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.search.ann import AnnIndex
from hqrs_geo.search.base import ANN_MAX_FETCH, ApproximateSearcher, Searcher
from hqrs_geo.search.exact import ExactSearch
from hqrs_geo.search.index import VectorIndex
from hqrs_geo.search.ivfpq import CompressedIndex, CompressedSearch, EmbeddingPart
from hqrs_geo.search.partitioned import DatasetIndex, PartVectors
from hqrs_geo.search.sessions import open_session

N, D, K = 1200, 16, 10
CUTS = (0, 500, 530, 1200)  # three parts of a dataset, one of them small


def brute(matrix: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None):
    """The reference: float64 numpy scores of every row, best first, ties by row."""
    scores = np.asarray(queries, np.float64) @ np.asarray(matrix, np.float64).T
    if mask is not None:
        scores[:, ~mask] = -np.inf
    k = min(k, len(matrix) if mask is None else int(mask.sum()))
    rows = np.stack([np.lexsort((np.arange(len(matrix)), -s))[:k] for s in scores])
    return np.take_along_axis(scores, rows, axis=1), rows


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, D))
    x = centres[rng.integers(0, 12, N)] + 0.4 * rng.standard_normal((N, D))
    matrix = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    q = matrix[rng.choice(N, 6, replace=False)].astype(np.float32) + 0.05 * rng.standard_normal((6, D)).astype(
        np.float32)
    return matrix, q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def searchers(data, tmp_path_factory) -> dict[str, Searcher]:
    """One of each implementation over the same rows; the approximate ones set to search exhaustively
    (every list probed, every candidate re-ranked), so their answers must equal brute force."""
    pytest.importorskip("faiss")
    matrix, _ = data
    exact = ExactSearch(matrix)
    pieces = [PartVectors(f"p{i}", tmp_path_factory.mktemp("part"), f"sha{i}", matrix[a:b],
                          np.arange(a, b).astype("S"), np.zeros((b - a, 4)), np.arange(b - a))
              for i, (a, b) in enumerate(zip(CUTS, CUTS[1:]))]
    dataset = DatasetIndex(tmp_path_factory.mktemp("dataset"), "m", None, pieces)  # type: ignore[arg-type]
    params = {"nlist": 8, "m": 4, "nprobe": 8, "rerank": N, "train_size": N, "opq": 0}
    one = CompressedIndex.build([EmbeddingPart("all", 1, matrix)], tmp_path_factory.mktemp("ivfpq") / "one", **params)
    parts = [p.as_embedding_part() for p in pieces]
    over_parts = CompressedIndex.build(parts, tmp_path_factory.mktemp("ivfpq") / "parts", **params)
    return {
        "exact": exact,
        "vector index": VectorIndex.from_matrix(matrix),
        "hnsw": AnnIndex.build(exact, "hnsw", efSearch=N),
        "ivf": AnnIndex.build(exact, "ivf", nlist=8, nprobe=8),
        "ivfpq": CompressedSearch(one, [EmbeddingPart("all", 1, matrix)], exact),
        "dataset": dataset,
        "dataset ivfpq": CompressedSearch(over_parts, parts, dataset),
    }


KINDS = ["exact", "vector index", "hnsw", "ivf", "ivfpq", "dataset", "dataset ivfpq"]


class Asked:
    """Counts the calls of an approximate searcher's index (its ``candidates``)."""

    def __init__(self, searcher: ApproximateSearcher):
        self.calls = 0
        self.real = type(searcher).candidates.__get__(searcher)

    def __call__(self, *args):
        self.calls += 1
        return self.real(*args)


def _search(searcher: Searcher, q: np.ndarray, k: int, mask: np.ndarray | None, monkeypatch) -> tuple:
    asked = None
    if isinstance(searcher, ApproximateSearcher):
        asked = Asked(searcher)
        monkeypatch.setattr(searcher, "candidates", asked)
    scores, rows = searcher.search(q, k, mask)
    return scores, rows, None if asked is None else asked.calls


@pytest.mark.parametrize("kind", KINDS)
def test_every_searcher_equals_brute_force_with_and_without_a_mask(kind, searchers, data, monkeypatch):
    matrix, q = data
    searcher = searchers[kind]
    assert searcher.n == N and searcher.dim == D
    mask = np.random.default_rng(1).random(N) < 0.9  # leaves enough rows for the index to answer
    for m in (None, mask):
        scores, rows, asked = _search(searcher, q, K, m, monkeypatch)
        ref_scores, ref_rows = brute(matrix, q, K, m)
        np.testing.assert_array_equal(rows, ref_rows, err_msg=f"{kind}, mask {m is not None}")
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6, rtol=0)
        assert asked in (None, 1), (kind, asked)  # the approximate ones answered from their index
    one, one_rows = searcher.search(q[0], K)  # one vector: one row of results
    assert one.shape == one_rows.shape == (1, K) and np.array_equal(one_rows[0], brute(matrix, q[:1], K)[1][0])


@pytest.mark.parametrize("kind", KINDS)
def test_a_too_selective_mask_is_answered_exactly(kind, searchers, data, monkeypatch):
    matrix, q = data
    searcher = searchers[kind]
    few = np.zeros(N, bool)
    few[[3, 499, 500, 529, 1100, 1199]] = True  # rows at the ends of every part
    scores, rows, asked = _search(searcher, q, K, few, monkeypatch)
    assert rows.shape == (len(q), 6) and set(rows[0]) == set(np.flatnonzero(few))
    np.testing.assert_array_equal(rows, brute(matrix, q, K, few)[1])
    np.testing.assert_allclose(scores, brute(matrix, q, K, few)[0], atol=1e-6, rtol=0)
    if isinstance(searcher, ApproximateSearcher):
        assert searcher.fetch(K, 6) > searcher.fetch_limit() and asked == 0  # the index was not asked
    none, none_rows = searcher.search(q, K, np.zeros(N, bool))
    assert none.shape == none_rows.shape == (len(q), 0)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_are_one_line_errors(kind, searchers, data):
    _, q = data
    searcher = searchers[kind]
    for args, message in [((q, 0), "invalid k"), ((q[:, :3], 5), "query vectors have shape"),
                          ((q, 5, np.ones(7, bool)), "mask must be a boolean array")]:
        with pytest.raises(OptionError, match=message):
            searcher.search(*args)


def test_fetch_grows_with_the_mask_up_to_the_limit(searchers):
    hnsw = searchers["hnsw"]
    assert isinstance(hnsw, ApproximateSearcher)
    assert hnsw.fetch(K, N) == K and hnsw.fetch(K, N // 2) == 4 * K
    assert hnsw.fetch_limit() == min(ANN_MAX_FETCH, N)
    with pytest.raises(OptionError, match="no approximate"):
        searchers["exact"].search(np.ones(D, np.float32), 3, use_ann=True)


def test_open_session_refuses_what_is_not_a_tile_layer(tmp_path):
    """The one entry of the search sessions names what is wrong with its path in one line."""
    (tmp_path / "scene.tif").write_bytes(b"II*\x00")
    (tmp_path / "folder").mkdir()
    for path, message in [(tmp_path / "scene.tif", "not a tile layer"),
                          (tmp_path / "folder", "not an hqrs_geo dataset"),
                          (tmp_path / "gone.gpkg", "file not found")]:
        with pytest.raises(InputError, match=message):
            open_session(str(path))
