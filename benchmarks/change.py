"""Tile-level change detection on labelled bi-temporal pairs: the embedding change score vs a
pixel-difference baseline, AP and ROC AUC against the change masks.

    python benchmarks/change.py [--data DIR] [--tile 64] [--limit N] [--model hqrs-mini-clip ...]
                                [--threshold 5] [--bootstrap 1000] [--json OUT]

DIR holds one or more sets, each a folder with ``A/`` (before), ``B/`` (after) and ``label/``
(change mask, non-zero = changed) of the same file names (``benchmarks/change_data.py`` prepares
them; see docs/change-data.md); DIR itself may be such a folder. Default: ``$HQRS_GEO_CHANGE_DATA``.
The pairs are used in sorted name order, the first ``--limit`` of each set.

Every image of a set is cut into ``--tile`` px tiles (``hqrs_geo.tile``, no CRS needed: the
images are not georeferenced) and embedded with each model (``hqrs_geo.embed``). A tile counts as
CHANGED when the share of changed pixels of its mask is above ``--threshold`` percent (the table
also gives 1 % and 10 %). Per tile, these scores rank the tiles:

* ``embedding z``: the change score of ``hqrs_geo.change`` (``change_score``): 1 - cosine of the
  two dates' embeddings as a robust z within the pair of images ((d - median) / (1.4826 MAD));
* ``embedding 1-cos``: the raw distance before that calibration (``change_cosine``);
* ``pixel |A-B|``: mean absolute difference of the two dates' RGB after normalising each image
  (each band to zero mean and unit deviation over the image), and the same as a robust z per pair;
* ``CVA``: change-vector-analysis magnitude, the mean over the tile of the per-pixel length of the
  normalised RGB difference vector.

AP is the non-interpolated average precision of the ranking (chance = the share of changed
tiles), AUC the ROC AUC (Mann-Whitney, ties counted half); the 95 % intervals at the main
threshold come from ``--bootstrap`` draws of whole pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from demo_ap import average_precision  # noqa: E402

DATA_ENV = "HQRS_GEO_CHANGE_DATA"
THRESHOLDS = (1.0, 5.0, 10.0)
IMAGES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: the chance that a random changed tile outranks a random unchanged one (ties half)."""
    from scipy.stats import rankdata

    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def robust_z(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The calibration of ``hqrs_geo.change`` within each group (a pair of images):
    ``(d - median) / (1.4826 MAD)`` (:class:`hqrs_geo.compare.scores.Calibration`)."""
    from hqrs_geo.compare.scores import Calibration

    out = np.zeros(len(values), dtype=np.float64)
    for g in np.unique(groups):
        sel = groups == g
        d = np.asarray(values[sel], dtype=np.float64)
        out[sel] = Calibration.of(d).z(d)
    return out


def find_sets(data: Path) -> list[Path]:
    """The folders under ``data`` (or ``data`` itself) that hold A/, B/ and label/."""
    def is_set(p: Path) -> bool:
        return all((p / sub).is_dir() for sub in ("A", "B", "label"))

    if is_set(data):
        return [data]
    return sorted(p for p in data.iterdir() if p.is_dir() and is_set(p))


def pair_names(folder: Path, limit: int | None) -> list[str]:
    """File names present in A/, B/ and label/, sorted; the first ``limit``."""
    names = sorted(p.name for p in (folder / "label").iterdir() if p.is_file() and p.suffix.lower() in IMAGES
                   and (folder / "A" / p.name).is_file() and (folder / "B" / p.name).is_file())
    return names[:limit] if limit else names


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "1") else im)


def _normalised(path: Path) -> np.ndarray:
    rgb = _read(path).astype(np.float64)
    return (rgb - rgb.mean(axis=(0, 1))) / np.maximum(rgb.std(axis=(0, 1)), 1e-6)


def pixel_scores(folder: Path, tiles) -> dict[str, np.ndarray]:
    """Changed-pixel share and the pixel baselines of every tile (rows of the BEFORE layer)."""
    share, mad, cva = (np.zeros(len(tiles)) for _ in range(3))
    for name, rows in tiles.groupby("pair").groups.items():
        a, b = _normalised(folder / "A" / name), _normalised(folder / "B" / name)
        label = _read(folder / "label" / name) > 0
        if label.ndim == 3:  # a mask saved as RGB
            label = label.any(axis=-1)
        if not label.shape == a.shape[:2] == b.shape[:2]:
            sizes = ", ".join(f"{x.shape[1]}x{x.shape[0]}" for x in (a, b, label))
            raise SystemExit(f"{folder}: {name} differs in size between A/, B/ and label/ ({sizes}); "
                             "give masks of the images' size")
        diff = a - b
        for i in rows:
            t = tiles.loc[i]
            window = np.s_[int(t.y_off):int(t.y_off + t.height), int(t.x_off):int(t.x_off + t.width)]
            k = tiles.index.get_loc(i)
            share[k] = label[window].mean()
            mad[k] = np.abs(diff[window]).mean()
            cva[k] = np.sqrt((diff[window] ** 2).sum(axis=-1)).mean()
    return {"share": share, "pixel |A-B|": mad, "CVA": cva}


def embedding_scores(before: Path, after: Path, tiles, model: str, folder: Path) -> dict[str, np.ndarray]:
    """``embedding 1-cos`` and ``embedding z`` per BEFORE tile, from the change layer that
    ``hqrs_geo.change`` writes for the two embedded date layers."""
    import hqrs_geo as hg

    layer = hg.change(str(before), str(after), str(folder / f"change-{model}.gpkg"), model=model, captions=False)
    by_id = layer.set_index("tile_id").loc[tiles.tile_id]
    if not by_id.compared.all():
        raise SystemExit(f"{before}: {int((~by_id.compared).sum())} tile pairs were not compared")
    return {"embedding 1-cos": by_id.change_cosine.to_numpy(dtype=float),
            "embedding z": by_id.change_score.to_numpy(dtype=float)}


def run_set(folder: Path, names: list[str], models: list[str], tile_px: int, workdir: Path) -> dict:
    """Tile, embed and score one set; returns per-tile arrays and timings."""
    import hqrs_geo as hg
    from hqrs_geo import TileConfig
    from hqrs_geo.layer.io import read_tiles

    config = TileConfig(tile_size=tile_px)

    def tile_dates(stem: str) -> dict[str, Path]:
        layers = {date: workdir / f"{folder.name}-{stem}-{date}.gpkg" for date in ("A", "B")}
        for date, layer in layers.items():
            hg.tile([str(folder / date / n) for n in names], layer, config)
        return layers

    started = time.perf_counter()
    layers = tile_dates("tiles")
    tiles = read_tiles(layers["A"])
    tiles["pair"] = [Path(s).name for s in tiles.source]
    after_ids = set(read_tiles(layers["B"]).tile_id)
    tiles = tiles[tiles.tile_id.isin(after_ids)].reset_index(drop=True)
    seconds = {"tile": time.perf_counter() - started}
    started = time.perf_counter()
    scores = pixel_scores(folder, tiles)
    scores["pixel |A-B| z"] = robust_z(scores["pixel |A-B|"], tiles.pair.to_numpy())
    seconds["pixel"] = time.perf_counter() - started
    for model in models:
        started = time.perf_counter()
        layers = tile_dates(model)  # a layer pair of its own per model: one model's embeddings each
        for date in ("A", "B"):
            hg.embed(str(layers[date]), model=model)
        emb = embedding_scores(layers["A"], layers["B"], tiles, model, workdir)
        for key, value in emb.items():
            scores[f"{key} [{model}]"] = value
        seconds[model] = time.perf_counter() - started
    return {"pairs": len(names), "tiles": len(tiles), "scores": scores, "seconds": seconds,
            "groups": np.array([f"{folder.name}/{p}" for p in tiles.pair])}


def metrics(scores: dict[str, np.ndarray], thresholds=THRESHOLDS) -> dict:
    """AP / AUC of every score at every changed-share threshold (percent)."""
    share = scores["share"]
    out: dict = {}
    for t in thresholds:
        positive = share > t / 100.0
        row = {"positives": int(positive.sum()), "chance_ap": float(positive.mean()), "methods": {}}
        for name, values in scores.items():
            if name == "share":
                continue
            row["methods"][name] = {"AP": average_precision(np.asarray(values, float), positive),
                                    "AUC": roc_auc(np.asarray(values, float), positive)}
        out[f"{t:g}%"] = row
    return out


def intervals(scores: dict[str, np.ndarray], groups: np.ndarray, threshold: float, draws: int,
              seed: int = 0) -> dict:
    """95 % bootstrap intervals of AP and AUC at ``threshold`` percent, resampling whole pairs of
    images (the tiles of one pair are not independent)."""
    positive = scores["share"] > threshold / 100.0
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list]] = {n: {"AP": [], "AUC": []} for n in scores if n != "share"}
    for _ in range(draws):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if positive[rows].all() or not positive[rows].any():
            continue
        for name, found in samples.items():
            values = np.asarray(scores[name], float)[rows]
            found["AP"].append(average_precision(values, positive[rows]))
            found["AUC"].append(roc_auc(values, positive[rows]))
    return {name: {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in found.items()}
            for name, found in samples.items()}


def print_table(title: str, result: dict, main: float) -> None:
    keys = list(result)
    print(f"\n{title}")
    print(f"  {'score':38}" + "".join(f"{'AP@' + k:>9}{'AUC@' + k:>9}" for k in keys))
    for name in result[keys[0]]["methods"]:
        cells = "".join(f"{result[k]['methods'][name]['AP']:9.3f}{result[k]['methods'][name]['AUC']:9.3f}"
                        for k in keys)
        print(f"  {name:38}{cells}")
    print(f"  {'chance':38}" + "".join(f"{result[k]['chance_ap']:9.3f}{0.5:9.3f}" for k in keys))
    print("  changed tiles: " + ", ".join(f"{result[k]['positives']} at > {k}" for k in keys)
          + f" (main threshold {main:g} %)")


def quiet_pixel_space() -> None:
    """The images have no CRS by design: drop the per-image 'no CRS' warnings of the tiler,
    rasterio and the GeoPackage writer (one line is printed instead)."""
    import logging
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    logging.getLogger("hqrs_geo.tiling.plan").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    warnings.filterwarnings("ignore", message=".*crs.*was not provided")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get(DATA_ENV),
                        help=f"folder of sets with A/ B/ label/ (default ${DATA_ENV})")
    parser.add_argument("--tile", type=int, default=64, help="tile size in pixels (default 64)")
    parser.add_argument("--limit", type=int, help="first N pairs (sorted by name) of each set")
    parser.add_argument("--model", action="append", help="embedding model(s) (default hqrs-mini-clip)")
    parser.add_argument("--threshold", type=float, default=5.0,
                        help="percent of changed pixels above which a tile is CHANGED (default 5)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="draws of pairs for the 95 %% intervals at the main threshold (0: none; default 1000)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not args.data:
        raise SystemExit(f"no data: give --data DIR or set ${DATA_ENV} (see docs/change-data.md)")
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"{data}: not a folder; prepare the pairs with benchmarks/change_data.py "
                         "(see docs/change-data.md)")
    sets = find_sets(data)
    if not sets:
        raise SystemExit(f"{data}: holds no folder with A/, B/ and label/; see docs/change-data.md")
    models = args.model or ["hqrs-mini-clip"]
    quiet_pixel_space()
    print(f"{data}: {len(sets)} set(s); images in pixel space (no CRS), {args.tile} px tiles, "
          f"models {', '.join(models)}")
    thresholds = tuple(sorted(set(THRESHOLDS) | {args.threshold}))
    results: dict = {"tile_px": args.tile, "threshold_pct": args.threshold, "models": models, "sets": {}}
    pooled: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sets:
            names = pair_names(folder, args.limit)
            if not names:
                continue
            r = run_set(folder, names, models, args.tile, Path(tmp))
            for key, value in r["scores"].items():
                pooled.setdefault(key, []).append(value)
            pooled.setdefault("groups", []).append(r["groups"])
            m = metrics(r["scores"], thresholds)
            results["sets"][folder.name] = {"pairs": r["pairs"], "tiles": r["tiles"], "seconds": r["seconds"],
                                            "metrics": m}
            secs = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
            print_table(f"{folder.name}: {r['pairs']} pairs, {r['tiles']} tiles of {args.tile} px ({secs})", m,
                        args.threshold)
    if not results["sets"]:
        raise SystemExit(f"{data}: no complete pairs (A, B and label of one name)")
    scores = {k: np.concatenate(v) for k, v in pooled.items()}
    groups = scores.pop("groups")
    if len(results["sets"]) > 1:
        results["all"] = {"pairs": sum(s["pairs"] for s in results["sets"].values()), "tiles": len(scores["share"]),
                          "metrics": metrics(scores, thresholds)}
        print_table(f"all sets: {results['all']['pairs']} pairs, {results['all']['tiles']} tiles",
                    results["all"]["metrics"], args.threshold)
    key = f"{args.threshold:g}%"
    last = results.get("all") or next(iter(results["sets"].values()))
    if args.bootstrap:
        last["intervals"] = intervals(scores, groups, args.threshold, args.bootstrap)
        print(f"\n  95 % intervals at > {key} ({args.bootstrap} draws of the {len(np.unique(groups))} pairs)")
        for name, ci in last["intervals"].items():
            print(f"  {name:38}  AP {ci['AP'][0]:.3f}-{ci['AP'][1]:.3f}   AUC {ci['AUC'][0]:.3f}-{ci['AUC'][1]:.3f}")
    best = last["metrics"][key]["methods"]
    emb = best[f"embedding z [{models[0]}]"]
    print(f"\nembedding z vs pixel |A-B| at > {key} changed: AP {emb['AP']:.3f} vs {best['pixel |A-B|']['AP']:.3f}, "
          f"AUC {emb['AUC']:.3f} vs {best['pixel |A-B|']['AUC']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
