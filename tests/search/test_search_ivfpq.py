"""The compressed (OPQ + IVF-PQ, on-disk lists, exact re-ranking) index against brute force,
its incremental updates and invalidation, and its use through VectorIndex."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hqrs_geo.errors import OptionError
from hqrs_geo.search.index import VectorIndex
from hqrs_geo.search.ivfpq import PART_SHIFT, CompressedIndex, EmbeddingPart

D = 64
PARAMS = {"nlist": 32, "m": 8, "nprobe": 8, "rerank": 200, "train_size": 10000, "opq": 0}


def clustered(n: int, seed: int, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def queries_near(matrix: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = matrix[rng.choice(len(matrix), count, replace=False)].astype(np.float32)
    q += 0.05 * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(D)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def brute(parts: list[EmbeddingPart], numbers: dict, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([(np.int64(numbers[p.name]) << PART_SHIFT) + np.arange(len(p.matrix)) for p in parts])
    scores = np.concatenate([p.matrix.astype(np.float32) @ q for p in parts])
    order = np.lexsort((ids, -scores))[:k]
    return scores[order], ids[order]


@pytest.fixture(scope="module")
def parts():
    return [EmbeddingPart(f"part{i}", {"v": 1}, clustered(4000, seed=i)) for i in range(3)]


@pytest.fixture(scope="module")
def built(parts, tmp_path_factory):
    return CompressedIndex.build(parts, tmp_path_factory.mktemp("ivfpq") / "idx", **{**PARAMS, "opq": 1})


def test_recall_and_exact_scores_against_brute_force(parts, built):
    numbers = built.part_numbers
    q = queries_near(np.concatenate([p.matrix for p in parts]), 100, seed=7)
    results = built.search({p.name: p for p in parts}, q, 10)
    hits = 0
    for qi, (scores, ids) in zip(q, results):
        ref_scores, ref_ids = brute(parts, numbers, qi, 10)
        hits += len(np.intersect1d(ids, ref_ids))
        found = dict(zip(ref_ids.tolist(), ref_scores.tolist()))
        for score, gid in zip(scores, ids):  # every score returned is the exact float32 dot product
            part = parts[[p.name for p in parts].index(next(n for n, v in numbers.items() if v == gid >> PART_SHIFT))]
            exact = float(part.matrix[gid & ((1 << PART_SHIFT) - 1)].astype(np.float32) @ qi)
            assert abs(score - exact) < 1e-5
            if gid in found:
                assert abs(score - found[gid]) < 1e-5
        assert np.all(np.diff(scores) <= 0)
    assert hits / 1000 >= 0.95
    assert (built.folder / f"merged-{built.meta['generation']}.ivfdata").stat().st_size > 0


def test_ties_are_broken_by_id(tmp_path):
    base = clustered(3000, seed=11)
    base[100] = base[200] = base[300]  # three identical rows: equal exact scores
    part = EmbeddingPart("p", 1, base)
    index = CompressedIndex.build([part], tmp_path / "idx", **PARAMS)
    q = base[300].astype(np.float32) / np.linalg.norm(base[300].astype(np.float32))
    scores, ids = index.search({"p": part}, q[None], 3)[0]
    assert ids.tolist() == [100, 200, 300] and scores[0] == scores[1] == scores[2]


def test_incremental_add_rewrite_and_remove(parts, tmp_path):
    index = CompressedIndex.build(parts[:2], tmp_path / "idx", **PARAMS)
    shard0 = index.folder / index.meta["parts"][0]["shard"]
    stamp = shard0.stat().st_mtime_ns
    added = EmbeddingPart("part9", {"v": 1}, clustered(3000, seed=9))
    change = index.update([*parts[:2], added])
    assert change == {"added": ["part9"], "removed": [], "rewritten": []}
    assert shard0.stat().st_mtime_ns == stamp  # unchanged parts are not encoded again
    q = added.matrix[[5, 50]].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    by_name = {p.name: p for p in [*parts[:2], added]}
    top = index.search(by_name, q, 1)
    assert [int(ids[0] >> PART_SHIFT) for _, ids in top] == [index.part_numbers["part9"]] * 2

    rewritten = EmbeddingPart("part1", {"v": 2}, clustered(4000, seed=21))
    change = index.update([parts[0], rewritten, added])
    assert change["rewritten"] == ["part1"] and shard0.stat().st_mtime_ns == stamp
    q = rewritten.matrix[[3]].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, ids = index.search({"part0": parts[0], "part1": rewritten, "part9": added}, q, 1)[0]
    assert ids[0] == (np.int64(index.part_numbers["part1"]) << PART_SHIFT) + 3

    change = index.update([rewritten, added])
    assert change["removed"] == ["part0"]
    gone = index.part_numbers.get("part0")
    assert gone is None
    q = parts[0].matrix[:20].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for _, ids in index.search({"part1": rewritten, "part9": added}, q, 10):
        assert set((ids >> PART_SHIFT).tolist()) <= {index.part_numbers["part1"], index.part_numbers["part9"]}
    reopened = CompressedIndex.open(index.folder)
    assert reopened is not None and reopened.stale_parts([rewritten, added]) == []
    assert reopened.stale_parts([parts[0], added]) == ["part0", "part1"]
    generations = sorted(p.name for p in index.folder.glob("merged-*"))
    assert generations == [f"merged-{index.meta['generation']}{suffix}" for suffix in (".crc32", ".index", ".ivfdata")]


def test_an_interrupted_update_leaves_the_previous_index_usable(parts, tmp_path, monkeypatch):
    index = CompressedIndex.build(parts[:1], tmp_path / "idx", **PARAMS)
    generation = index.meta["generation"]

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CompressedIndex, "_merge", staticmethod(boom))
    with pytest.raises(KeyboardInterrupt):
        index.update(parts[:2])
    monkeypatch.undo()
    again = CompressedIndex.open(tmp_path / "idx")
    assert again is not None and again.meta["generation"] == generation
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["parts"][0]["name"] == "part0"
    q = parts[0].matrix[:3].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert len(again.search({"part0": parts[0]}, q, 5)) == 3


def test_parameters_are_checked(parts, tmp_path):
    with pytest.raises(OptionError, match="must divide"):
        CompressedIndex.build(parts, tmp_path / "a", **{**PARAMS, "m": 5})
    with pytest.raises(OptionError, match="opq=-1"):
        CompressedIndex.build(parts, tmp_path / "a", **{**PARAMS, "opq": -1})
    with pytest.raises(OptionError, match="too few"):
        CompressedIndex.build([EmbeddingPart("s", 1, parts[0].matrix[:300])], tmp_path / "b", **PARAMS)
    with pytest.raises(OptionError, match="unknown ivfpq parameter"):
        CompressedIndex.build(parts, tmp_path / "c", efSearch=3)


def test_vector_index_builds_loads_and_masks_ivfpq(tmp_path):
    matrix = clustered(12000, seed=3)
    index = VectorIndex.from_matrix(matrix)
    report = index.build_ann("ivfpq", path=tmp_path / "m.ivfpq", **{**PARAMS, "rerank": 500})
    assert report["recall_at_10"] >= 0.95 and report["bytes_on_disk"] > 0
    q = queries_near(matrix, 20, seed=5)
    exact = index.search(q, k=10)
    approx = index.search(q, k=10, use_ann=True)
    assert np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx[1], exact[1])]) >= 0.95
    mask = np.zeros(len(matrix), bool)
    mask[::3] = True
    scores, rows = index.search(q, k=10, mask=mask, use_ann=True)
    assert mask[rows].all()
    tiny = np.zeros(len(matrix), bool)
    tiny[[10, 20, 30]] = True  # too selective for the index: exact over the allowed rows
    _, rows = index.search(q[:2], k=2, mask=tiny, use_ann=True)
    assert set(rows.ravel().tolist()) <= {10, 20, 30}
    again = VectorIndex.from_matrix(matrix)
    assert again.load_ann(tmp_path / "m.ivfpq") and again.ann_info["kind"] == "ivfpq"
    changed = VectorIndex.from_matrix(matrix[::-1].copy())
    assert not changed.load_ann(tmp_path / "m.ivfpq")


def test_auto_kind_follows_size_and_memory():
    from hqrs_geo.search.choose import choose_kind

    gib = 1 << 30
    assert choose_kind(100_000, 512, 16 * gib)[0] == "exact"
    kind, reason = choose_kind(2_000_000, 512, 24 * gib)
    assert kind == "ivf" and "3.8 GiB" in reason
    kind, reason = choose_kind(10_000_000, 512, 24 * gib)
    assert kind == "ivfpq" and "19.1 GiB" in reason


def test_index_command_auto_and_ivfpq(example_layer, tiny_clip_checkpoint):
    import json as _json

    from conftest import run_cli
    from tiny_models import TINY_CLIP

    from hqrs_geo.api import embed

    embed(example_layer, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu")
    auto = run_cli("index", example_layer, "--progress", "none")
    assert auto.returncode == 0, auto.stderr
    report = _json.loads(auto.stdout.strip().splitlines()[-1])
    assert report["kind"] == "exact" and "no index is needed" in report["reason"]
    bad = run_cli("index", example_layer, "--kind", "ivfpq", "--param", "nprobe=x")
    assert bad.returncode == 2 and "--param" in bad.stderr and "Traceback" not in bad.stderr
    few = run_cli("index", example_layer, "--kind", "ivfpq", "--param", "m=8")
    assert few.returncode == 2 and "too few" in few.stderr  # 64 tiles cannot train 256-centroid codes


def test_nprobe_and_rerank_are_calibrated_to_the_target_recall_unless_given(tmp_path):
    """nprobe doubles from its default until the measured recall reaches the target (and stops at
    the lists there are); with rerank free too, each step keeps the doubling that gains more; the
    choice is stored and used when the index is opened again; an nprobe
    the user gave stays, even below the target."""
    matrix = clustered(40000, seed=11, clusters=200)
    params = {"nlist": 1024, "m": 16, "rerank": 100, "train_size": 40000, "opq": 0}
    report = VectorIndex.from_matrix(matrix).build_ann("ivfpq", path=tmp_path / "auto", **params)
    assert report["recall_at_10"] >= 0.95
    index = CompressedIndex.open(tmp_path / "auto")
    assert index is not None and index.nprobe == report["nprobe"] >= 48

    seen = []

    def recall() -> float:  # a stand-in measurement: recall grows with the lists probed
        seen.append(index.nprobe)
        return min(1.0, index.nprobe / 200)

    index.set_search(48, 100)
    assert index.calibrate(recall) == 0.96 and seen == [48, 96, 192]
    assert CompressedIndex.open(tmp_path / "auto").nprobe == 192  # kept in index.json
    seen.clear()  # recall that saturates below the target: doubling stops and the cheaper setting stays
    index.set_search(48, 100)
    assert index.calibrate(lambda: (seen.append(index.nprobe), min(0.9, index.nprobe / 200))[1]) == 0.9
    assert seen == [48, 96, 192, 384, 192] and index.nprobe == 192
    seen.clear()  # up to every list when each doubling helps
    index.set_search(48, 100)
    assert index.calibrate(lambda: (seen.append(index.nprobe), index.nprobe / 2048)[1]) == 0.5
    assert seen == [48, 96, 192, 384, 768, 1024]

    given = VectorIndex.from_matrix(matrix).build_ann("ivfpq", path=tmp_path / "given", nprobe=1, **params)
    assert given["nprobe"] == 1 and given["recall_at_10"] < report["recall_at_10"]
    index.meta["rerank_given"] = False  # both knobs free: each step keeps the doubling that gains more
    seen.clear()
    index.set_search(48, 100)

    def near_duplicates() -> float:  # a stand-in: only more candidates help
        seen.append((index.nprobe, index.rerank))
        return min(1.0, 0.5 + index.rerank / 1000)

    assert index.calibrate(near_duplicates) == 1.0
    assert seen == [(48, 100), (96, 100), (48, 200), (96, 200), (48, 400), (96, 400), (48, 800)]
    again = CompressedIndex.open(tmp_path / "auto")
    assert (again.nprobe, again.rerank) == (48, 800)


def test_near_duplicates_raise_rerank_until_the_exact_top_10_is_found(tmp_path):
    """A quarter of the rows are jittered copies of 10 vectors (1,000 each: overlapping tiles,
    water, forest); 8-bit codes cannot order them, so the exact top 10 of a query among them is
    found only when the re-ranked candidates hold them all: calibration doubles ``rerank`` from
    256, not ``nprobe``, and reaches the target recall against brute force."""
    rng = np.random.default_rng(5)
    matrix = clustered(40000, seed=12, clusters=200).astype(np.float32)
    originals = rng.standard_normal((10, D)).astype(np.float32)
    rows = rng.choice(len(matrix), 10000, replace=False)
    copies = originals[np.arange(10000) % 10] + 0.15 / np.sqrt(D) * rng.standard_normal((10000, D)).astype(np.float32)
    matrix[rows] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    matrix = matrix.astype(np.float16)
    params = {"nlist": 256, "m": 16, "train_size": 40000, "opq": 0}
    vectors = VectorIndex.from_matrix(matrix)
    report = vectors.build_ann("ivfpq", path=tmp_path / "dup", **params)
    assert report["rerank"] >= 1024 and report["nprobe"] == 48 and report["recall_at_10"] >= 0.95
    tried = json.loads((tmp_path / "dup" / "index.json").read_text())["calibrated"]["tried"]
    assert tried[0]["rerank"] == 256 and tried[0]["recall_at_10"] < 0.95  # the default missed
    queries = queries_near(matrix, 40, seed=3)
    exact = matrix.astype(np.float32) @ queries.T
    hits = 0
    for j, q in enumerate(queries):
        rows_found = vectors.search(q, 10, use_ann=True)[1][0]
        hits += len(set(rows_found) & set(np.argsort(-exact[:, j], kind="stable")[:10]))
    assert hits / 400 >= 0.95


def test_passes_over_a_memory_map_keep_memory_flat(tmp_path):
    """row_blocks, the training sample and the re-ranking of an ivfpq search hand read pages back
    or read by file: reading a 256 MB map leaves far less than that resident."""
    from hqrs_geo.search.exact import row_blocks

    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(262144, 512))
    rng = np.random.default_rng(0)
    for s in range(0, len(big), 65536):  # distinct rows (first column 1, counted below)
        # uniform, not normal, values: drawing 134 M normal samples was a third of this test's time
        rows = rng.random((65536, 512), dtype=np.float32) - np.float32(0.5)
        big[s:s + 65536] = rows.astype(np.float16) * np.float16(0.1)
        big[s:s + 65536, 0] = 1
    big.flush()
    del big

    def rss_mb() -> float:  # resident pages of the map itself (libraries paged in meanwhile do not count)
        resident, ours = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                ours = line.rstrip().endswith(str(path))
            elif ours and head and head[0] == "Rss:":
                resident += int(head[1])
        return resident / 1024

    matrix = np.load(path, mmap_mode="r")
    before = rss_mb()
    total = sum(float(rows[:, 0].sum()) for _, rows in row_blocks(matrix, 16384))
    assert total == len(matrix)
    assert rss_mb() - before < 64  # without dropping pages: about 256 MB more
    queries = rng.standard_normal((16, 512)).astype(np.float32)
    part = EmbeddingPart("big", "f", matrix)
    index = CompressedIndex.__new__(CompressedIndex)  # only the re-ranking of search(): candidates given
    index.meta, index.rerank = {"parts": [{"name": "big", "number": 0}]}, 4096
    index.part_rows = {0: len(matrix)}
    index.candidates = lambda q, fetch: np.random.default_rng(0).choice(len(matrix), (len(q), fetch))  # scattered
    found = index.search({"big": part}, queries[:8], 10)
    assert len(found) == 8 and rss_mb() - before < 64  # 32,768 scattered rows: up to 256 MB mapped around them
    from hqrs_geo.search.ivfpq import _sample

    assert _sample([part], 8000).shape == (8000, 512)  # the training sample: scattered rows too
    assert rss_mb() - before < 64
    for s in range(0, len(matrix), 16384):  # the same pass without dropping pages, for contrast
        float(np.asarray(matrix[s:s + 16384])[:, 0].sum())
    assert rss_mb() - before > 128


def test_read_rows_equals_indexing_for_maps_their_slices_and_arrays(tmp_path):
    """Rows read by pread from a memory map's file are the rows the map holds, also for a slice
    of the map (row 0 elsewhere in the file) and for maps and arrays it does not read by file."""
    from hqrs_geo.search.exact import _file_position, read_rows

    data = clustered(5000, seed=4)
    np.save(tmp_path / "m.npy", data)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    rows = np.array([0, 1, 17, 2500, 4999])
    for matrix in (mapped, mapped[1000:4000], mapped[1234:], np.load(tmp_path / "m.npy", mmap_mode="c"), data,
                   data.astype(np.float32), mapped[::2]):
        picked = rows[rows < len(matrix)]
        assert np.array_equal(read_rows(matrix, picked), np.asarray(matrix[picked], dtype=np.float32))
    assert _file_position(mapped[1000:4000])[:2] == (str(tmp_path / "m.npy"), _file_position(mapped)[1] + 1000 * D * 2)
    assert _file_position(mapped[::2]) is None and _file_position(data) is None
    assert read_rows(mapped, np.array([], dtype=np.int64)).shape == (0, D)
    every = np.random.default_rng(0).permutation(5000)  # dense enough to go through the map
    assert np.array_equal(read_rows(mapped, every), np.asarray(data[every], dtype=np.float32))
    newer = tmp_path / "newer.npy"  # the cache rebuilt under the same name (atomic rename): the map keeps
    np.save(newer, data[::-1].copy())  # the old file, and so must the rows read for it
    newer.replace(tmp_path / "m.npy")
    assert np.array_equal(read_rows(mapped, rows), np.asarray(data[rows], dtype=np.float32))
    assert np.array_equal(read_rows(mapped[1000:4000], rows[:3]), np.asarray(data[1000:4000][rows[:3]], np.float32))
