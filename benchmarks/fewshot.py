"""Few-shot detection: average precision with 1, 3 and 10 positive tiles against the text query of
the same class, and the time to refit and rescore every tile of a large layer.

    python benchmarks/fewshot.py [--model hqrs-mini-clip] [--shots 1,3,10] [--draws 20]
                                 [--heldout swellendam|none] [--timing 100000,10000000] [--json OUT]

AP (what :mod:`hqrs_geo.search.fewshot` does in the product, through a real tile layer and
:class:`hqrs_geo.SearchSession`):

* the demo scene (``examples/data/urban_river_025m_epsg28992.tif``, tiled as ``examples/demo.py``
  does: 49 tiles) with its per-tile labels (``examples/data/urban_river_labels.json``; classes
  water, buildings, parking, trees and the demo's text query of each, as in
  ``benchmarks/demo_ap.py``);
* a held-out labelled set the shipped models never saw (they were trained on UC Merced, AID and
  EuroSAT): the Swellendam aerial scene ``swellendam_3420B_epsg4326.tif`` (~2.5 m, South Africa,
  ``../shared/data/scenes``) in 64-px tiles (~160 m), labelled from the OpenStreetMap layers of
  ``swellendam_osm.gpkg``: *buildings* (at least one mapped building footprint in the
  tile), *roads* (at least 100 m of mapped road in the tile) and *open land* (no mapped building
  and no road); only tiles inside the extent of the mapped buildings are used. Text queries:
  "buildings", "a road", "farmland".

For each class and each number of positives n, ``--draws`` random draws of n positive tiles of
that class (seeded); no negatives are given, so the detector draws unlabelled background tiles as
weak negatives, as the dock's first "Find all like these" does. AP is computed over the tiles
that were not given as examples, for the logistic detector, the query-vector baseline and the
text query (the same tiles, so the numbers compare), averaged over the draws. Classes with fewer
than n + 1 positive tiles are left out at that n. "reviewed": one round of the review loop, the
logistic detector's best ``--review`` hits (10) judged by the labels, true ones accepted as
positives and false ones rejected as negatives, refitted, AP over the tiles still unlabelled
(beside it, the text query's AP on those same tiles).

Timing: refit (3 positives, weak negatives drawn) and rescore of every row (best 1,000 kept, the
detect request's default) on ``--timing`` sizes of synthetic unit float16 vectors of the model's
dimension in a memory-mapped ``.npy`` (as the layer cache is), median of ``--repeat`` runs
after one warm-up. Target: under a second on 100k tiles.

``--calibrate`` (on by default when UC Merced is in ``../shared/data``) prints the model's
text-image score scale, the numbers of :func:`hqrs_geo.models.registry.score_scale`: cosine of
each UCM val image with its class prompt (the model's template) against the other classes'
prompts; ``none`` = the 95th percentile of non-matching pairs, ``good`` = the median of matching.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from demo_ap import LABELS, average_precision, tile_scene  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SWELLENDAM = SHARED / "scenes" / "swellendam_3420B_epsg4326.tif"
OSM = SHARED / "scenes" / "swellendam_osm.gpkg"
UCM = SHARED / "ucm" / "dataset_ucm.json"
HELDOUT_QUERIES = {"buildings": "buildings", "roads": "a road", "open land": "farmland"}


# ---------------------------------------------------------------------------------- labelled sets
def demo_set(folder: Path, model: str) -> tuple[str, dict, dict]:
    """(layer, {class: {tile_id: 0/1}}, {class: text query}) of the demo scene."""
    import hqrs_geo as hg

    labels = json.loads(LABELS.read_text())
    layer = tile_scene(folder)
    hg.embed(str(layer), model=model)
    classes = {label: {t: int(v[label]) for t, v in labels["tiles"].items()} for label in labels["labels"]}
    queries = {label: query for query, label in labels["queries"].items()}
    return str(layer), classes, queries


def swellendam_set(folder: Path, model: str) -> tuple[str, dict, dict]:
    """(layer, {class: {tile_id: 0/1}}, {class: text query}) of the held-out Swellendam scene."""
    import geopandas as gpd
    import shapely

    import hqrs_geo as hg

    layer = folder / "swellendam.gpkg"
    hg.tile(str(SWELLENDAM), layer, hg.TileConfig(tile_size=64))
    hg.embed(str(layer), model=model)
    tiles = hg.read_tiles(layer)
    metric = "EPSG:32734"  # UTM 34S: areas and lengths in metres
    cells = tiles.to_crs(metric)
    buildings = gpd.read_file(OSM, layer="buildings").to_crs(metric)
    roads = gpd.read_file(OSM, layer="roads").to_crs(metric)
    inside = cells.geometry.within(shapely.box(*buildings.total_bounds))
    built = np.zeros(len(cells))
    road_m = np.zeros(len(cells))
    building_tree, road_tree = shapely.STRtree(buildings.geometry.values), shapely.STRtree(roads.geometry.values)
    for i, cell in enumerate(cells.geometry.values):
        hits = building_tree.query(cell, predicate="intersects")
        if len(hits):
            built[i] = shapely.area(shapely.intersection(buildings.geometry.values[hits], cell)).sum() / cell.area
        hits = road_tree.query(cell, predicate="intersects")
        if len(hits):
            road_m[i] = shapely.length(shapely.intersection(roads.geometry.values[hits], cell)).sum()
    keep = inside.to_numpy()
    ids = tiles.tile_id.to_numpy()[keep]
    built, road_m = built[keep], road_m[keep]
    classes = {"buildings": dict(zip(ids, (built > 0).astype(int))),
               "roads": dict(zip(ids, (road_m >= 100).astype(int))),
               "open land": dict(zip(ids, ((built == 0) & (road_m == 0)).astype(int)))}
    return str(layer), classes, dict(HELDOUT_QUERIES)


# ---------------------------------------------------------------------------------- AP
def fewshot_ap(layer: str, classes: dict, queries: dict, shots: list[int], draws: int, seed: int = 0,
               review: int = 10) -> dict:
    """Per class and number of positives: mean AP of logistic, query and the text query, and of
    the logistic detector after one review round of its best ``review`` hits (true ones accepted
    as positives, false ones rejected as negatives), with the text query on the same tiles."""
    import hqrs_geo as hg
    from hqrs_geo.search import fewshot

    session = hg.SearchSession(layer)
    ids = np.asarray(session.index.ids)
    matrix = np.asarray(session.index.matrix, dtype=np.float32)
    evaluated = np.isin(ids, list(next(iter(classes.values()))))
    out: dict = {}
    rng = np.random.default_rng(seed)
    for label, truth in classes.items():
        text_scores = matrix @ session.text_query(queries[label])
        positive = np.asarray([truth.get(t, 0) for t in ids]) == 1
        row = {"query": queries[label], "positives": int(positive[evaluated].sum()),
               "tiles": int(evaluated.sum()), "text_AP_all": average_precision(text_scores[evaluated],
                                                                             positive[evaluated])}
        for n in shots:
            pool = np.flatnonzero(positive & evaluated)
            if len(pool) < n + 1:
                continue
            results: dict[str, list[float]] = {"logistic": [], "query": [], "text": [], "reviewed": [],
                                               "text_reviewed": []}
            for _ in range(draws):
                picks = rng.choice(pool, size=n, replace=False)
                rest = evaluated.copy()
                rest[picks] = False
                results["text"].append(average_precision(text_scores[rest], positive[rest]))
                for method in ("logistic", "query"):
                    detector = fewshot.fit(session, list(ids[picks]), method=method)
                    prob = np.concatenate([p for _, p in fewshot.probabilities(session, detector)])
                    results[method].append(average_precision(prob[rest], positive[rest]))
                    if method == "logistic" and review:
                        ranked = [int(i) for i in np.argsort(-prob, kind="stable") if rest[i]][:review]
                        accepted = list(picks) + [i for i in ranked if positive[i]]
                        rejected = [i for i in ranked if not positive[i]]
                        refit = fewshot.fit(session, list(ids[accepted]), list(ids[rejected]))
                        again = np.concatenate([p for _, p in fewshot.probabilities(session, refit)])
                        left = rest.copy()
                        left[ranked] = False
                        if positive[left].any():
                            results["reviewed"].append(average_precision(again[left], positive[left]))
                            results["text_reviewed"].append(average_precision(text_scores[left], positive[left]))
            row[n] = {k: float(np.mean(v)) if v else float("nan") for k, v in results.items()}
        out[label] = row
    return out


def print_ap(title: str, table: dict, shots: list[int]) -> None:
    print(f"\n{title}: few-shot vs text AP (mean over draws; AP over the tiles not given as examples)")
    head = f"{'class':<11} {'pos/tiles':>9}  {'text(all)':>9}"
    for n in shots:
        head += f"  | {n:>2}-shot logistic  query   text  reviewed   text"
    print(head)
    means: dict = {}
    for label, row in table.items():
        line = f"{label:<11} {row['positives']:>4}/{row['tiles']:<4}  {row['text_AP_all']:9.3f}"
        for n in shots:
            if n in row:
                r = row[n]
                line += (f"  |        {r['logistic']:7.3f} {r['query']:6.3f} {r['text']:6.3f}  "
                         f"{r['reviewed']:8.3f} {r['text_reviewed']:6.3f}")
                for k in ("logistic", "query", "text", "reviewed", "text_reviewed"):
                    means.setdefault((n, k), []).append(r[k])
            else:
                line += "  |            (too few positives)                  "
        print(line)
    line = f"{'mean':<11} {'':>9}  {np.mean([r['text_AP_all'] for r in table.values()]):9.3f}"
    for n in shots:
        if (n, "logistic") in means:
            line += (f"  |        {np.mean(means[(n, 'logistic')]):7.3f} {np.mean(means[(n, 'query')]):6.3f} "
                     f"{np.mean(means[(n, 'text')]):6.3f}  {np.nanmean(means[(n, 'reviewed')]):8.3f} "
                     f"{np.nanmean(means[(n, 'text_reviewed')]):6.3f}")
    print(line)


# ---------------------------------------------------------------------------------- timing
class MatrixSession:
    """The part of a search session few-shot detection uses, over a bare memory-mapped matrix
    whose tile ids are the row numbers."""

    def __init__(self, matrix: np.ndarray):
        from hqrs_geo.search.index import VectorIndex

        self.index = VectorIndex.from_matrix(matrix, np.arange(len(matrix)).astype(str))

    def tile_vectors(self, tile_ids):
        """Rows of the tiles (ids are row numbers)."""
        from hqrs_geo.search.exact import read_rows

        return read_rows(self.index.matrix, np.asarray([int(t) for t in tile_ids]))

    def mask(self, spatial, exclude=()):
        """Every row (no spatial filter in the benchmark)."""
        return None

    def blocks(self):
        """The one embedding matrix (a layer file's session has one block)."""
        from hqrs_geo.search.session import Block

        return [Block(None, self.index.ids, self.index.matrix, self.index.exact)]

    def block_masks(self, spatial):
        """Every row of the one block."""
        return [self.mask(spatial)]


def synthetic(path: Path, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` unit float16 vectors with some structure (64 clusters), written chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for s in range(0, n, 1 << 18):
        m = min(1 << 18, n - s)
        x = centres[rng.integers(0, 64, m)] + rng.standard_normal((m, dim), dtype=np.float32)
        out[s:s + m] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def timing(sizes: list[int], dim: int, repeat: int, folder: Path) -> list[dict]:
    from hqrs_geo.search import fewshot

    rows = []
    for n in sizes:
        path = folder / f"synthetic_{n}.npy"
        begin = time.perf_counter()
        matrix = synthetic(path, n, dim)
        made = time.perf_counter() - begin
        session = MatrixSession(matrix)
        rng = np.random.default_rng(1)
        fits, scores, totals = [], [], []
        for i in range(repeat + 1):
            positives = [str(v) for v in rng.choice(n, size=3, replace=False)]
            start = time.perf_counter()
            detector = fewshot.fit(session, positives)
            detection = fewshot.score(session, detector, k=1000, threshold=0.5)
            if i:  # the first run warms the page cache
                totals.append(time.perf_counter() - start)
                fits.append(detector.fit_seconds)
                scores.append(detection.score_seconds)
        rows.append({"tiles": n, "dim": dim, "gib": round(path.stat().st_size / 2**30, 2),
                     "write_seconds": round(made, 1), "fit_s": float(np.median(fits)),
                     "score_s": float(np.median(scores)), "refit_and_score_s": float(np.median(totals))})
        del session, matrix
        path.unlink()
    return rows


# ---------------------------------------------------------------------------------- calibration
def calibrate(model: str) -> dict:
    """Text-image cosine of UCM val images with their own class's text query and the other
    classes' (worded as text search words them: :func:`hqrs_geo.models.encode.query_vectors`)."""
    from hqrs_geo.models.encode import image_vectors, query_vectors
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.prompts import class_prompt_name

    data = json.loads(UCM.read_text())
    val = [i for i in data["images"] if i["split"] == "val"]
    loaded = load_model(model, device="cpu")
    images = image_vectors(loaded, [str(UCM.parent / i["filename"]) for i in val])
    classes = sorted({i["class"] for i in val})
    prompts = query_vectors(loaded, [class_prompt_name(c) for c in classes])
    scores = images @ prompts.T
    own = np.asarray([classes.index(i["class"]) for i in val])
    matching = scores[np.arange(len(val)), own]
    other = np.ones_like(scores, dtype=bool)
    other[np.arange(len(val)), own] = False
    return {"model": model, "images": len(val), "classes": len(classes),
            "matching_p25_p50_p75": [round(float(v), 3) for v in np.percentile(matching, [25, 50, 75])],
            "non_matching_p50_p95_p99": [round(float(v), 3) for v in np.percentile(scores[other], [50, 95, 99])],
            "none": round(float(np.percentile(scores[other], 95)), 2), "good": round(float(np.median(matching)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hqrs-mini-clip")
    parser.add_argument("--shots", default="1,3,10", help="numbers of positive tiles, comma-separated")
    parser.add_argument("--draws", type=int, default=20, help="random draws of positives per class and number")
    parser.add_argument("--review", type=int, default=10, help="hits reviewed in the review round (0: none)")
    parser.add_argument("--heldout", choices=("swellendam", "none"), default="swellendam")
    parser.add_argument("--timing", default="100000,10000000", help="synthetic layer sizes to time ('' for none)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per size (after one warm-up)")
    parser.add_argument("--calibrate", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    shots = [int(v) for v in args.shots.split(",") if v]
    result: dict = {"model": args.model, "draws": args.draws, "shots": shots}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        layer, classes, queries = demo_set(folder, args.model)
        result["demo"] = fewshot_ap(layer, classes, queries, shots, args.draws, review=args.review)
        print_ap(f"demo scene ({args.model})", result["demo"], shots)
        if args.heldout == "swellendam":
            if SWELLENDAM.exists() and OSM.exists():
                layer, classes, queries = swellendam_set(folder, args.model)
                result["swellendam"] = fewshot_ap(layer, classes, queries, shots, args.draws, review=args.review)
                print_ap(f"held-out Swellendam 3420B, OSM labels ({args.model})", result["swellendam"], shots)
            else:
                print(f"\nheld-out set skipped: {SWELLENDAM} or {OSM} missing")
        sizes = [int(float(v)) for v in args.timing.split(",") if v]
        if sizes:
            import hqrs_geo as hg

            dim = hg.SearchSession(str(folder / "tiles.gpkg")).index.dim  # the model's, from the demo layer
            result["timing"] = timing(sizes, dim, args.repeat, folder)
            print("\nrefit + rescore (3 positives, weak negatives drawn, best 1,000 kept; median)")
            for row in result["timing"]:
                print(f"  {row['tiles']:>11,} x {row['dim']} float16 ({row['gib']} GiB memory-mapped): fit "
                      f"{row['fit_s'] * 1000:.1f} ms, score {row['score_s'] * 1000:.0f} ms, refit + rescore "
                      f"{row['refit_and_score_s']:.3f} s")
    if args.calibrate == "yes" or (args.calibrate == "auto" and UCM.exists()):
        result["calibration"] = calibrate(args.model)
        c = result["calibration"]
        print(f"\nscore scale of {args.model} on UCM val ({c['images']} images, {c['classes']} class prompts): "
              f"matching p25/p50/p75 {c['matching_p25_p50_p75']}, non-matching p50/p95/p99 "
              f"{c['non_matching_p50_p95_p99']} -> none {c['none']}, good {c['good']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if not math.isfinite(sum(r["text_AP_all"] for r in result["demo"].values())):
        raise SystemExit("a class of the demo labels has no positive tile")


if __name__ == "__main__":
    main()
