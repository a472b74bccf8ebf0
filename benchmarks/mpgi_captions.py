"""Offline MpGI captions against references on held-out images, next to the caption model alone.

    python benchmarks/mpgi_captions.py [--per-class 4] [--skip 0] [--lead clip|consensus]
                                       [--baseline-checkout DIR] [--json out.json]

Images: the first ``--per-class`` 256 x 256 images (after the first ``--skip``) of each class of the
UCM-captions **val** split (``--dataset``, Karpathy JSON; 21 classes, so 4 per class = 84 images). The JPEGs carry no
georeference, so each is written unchanged as a small GeoTIFF in an arbitrary projected CRS
(UTM 11N, 0.3 m pixels, one image per square kilometre), tiled with the project's tiler (one
256-px tile per image, no stretch; the tile pixels are checked to equal the JPEG's), and the real
pipeline (``run_mpgi``) runs on that layer with the offline default recipe: no VLM, the shipped
caption model (hqrs-mini-coca, the recipe's decoding) and SmolLM2-135M-Instruct for integration.

Scored with :func:`hqrs_geo.evaluation.caption_metrics` (pycocoevalcap, PTB tokenizer, Java) on the
same images, against the five UCM references of each image:

* ``caption model alone``: the engine's caption task on the JPEG pixels with the recipe's decoding
  (what ``hqrs-geo eval caption`` scores);
* ``MpGI short #1``: the first short caption of each tile (``mpgi_short[0]``);
* ``MpGI short, mean of #1..#N``: each position scored as its own system, then averaged;
* ``MpGI detailed``: the detailed caption (long, so BLEU's brevity penalty does not hurt it but
  its precision does, and CIDEr's length penalty costs it: UCM references are one short sentence);
* ``MpGI detailed [parts]`` (``--variants``): the same run again from its call cache (no new model
  call) with another ``[output] detailed`` list, e.g. ``--variants ",verified,class+cover"`` scores
  the lead alone, the lead plus one checked fact when it names none (``ensure_verified``), and
  lead + class + cover (``verified`` is the ``ensure_verified`` switch, off when not named).

Verified facts: per tile, the facts the detailed caption states that a check confirms (the
``verified`` rows of the sources table: the zero-shot class named by the caption, a cover share, a
vector fact); the run reports how many tiles have at least one, and of which kind.

Sentence counts: every sentence of the detailed and short captions is classified by the checks of
:mod:`hqrs_geo.mpgi.integrate` (coordinates, ground size, pixel size, dates, praise/boilerplate,
content no source supports). ``--baseline-checkout DIR`` also runs the CLI of another checkout
(e.g. ``git worktree add /tmp/main main``) on the same layer with the same overrides and counts its
captions with the same classifier: the before/after comparison. The baseline starts from this
run's call cache (:func:`seed_cache`), so both post-process the very same LLM answers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = Path(os.environ.get("HQRS_UCM", str(ROOT.parent / "shared" / "data" / "ucm" / "dataset_ucm.json")))
PIXEL_M = 0.3048  # UCM: one foot per pixel


def select(dataset: str, split: str, per_class: int, skip: int = 0) -> list[dict]:
    """``per_class`` 256 x 256 images of each class of ``split`` (file order), after its first ``skip``."""
    from PIL import Image

    from hqrs_geo.evaluation import load_karpathy

    taken: Counter = Counter()
    skipped: Counter = Counter()
    out = []
    for record in load_karpathy(dataset, split):
        if taken[record["class"]] >= per_class or not record["captions"]:
            continue
        with Image.open(record["image"]) as image:
            if image.size != (256, 256):
                continue
        if skipped[record["class"]] < skip:
            skipped[record["class"]] += 1
            continue
        taken[record["class"]] += 1
        out.append(record)
    return out


def write_geotiffs(records: list[dict], folder: Path) -> list[Path]:
    """Each image unchanged as a 3-band GeoTIFF in UTM 11N, one per square kilometre."""
    import rasterio
    from rasterio.transform import from_origin

    from hqrs_geo.models.encode import read_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, record in enumerate(records):
        rgb = read_image(record["image"])
        path = folder / f"img{i:04d}.tif"
        transform = from_origin(400000 + 1000 * (i % 30), 3800000 - 1000 * (i // 30), PIXEL_M, PIXEL_M)
        with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[1], height=rgb.shape[0], count=3,
                           dtype="uint8", crs="EPSG:32611", transform=transform, photometric="RGB") as dst:
            dst.write(rgb.transpose(2, 0, 1))
        paths.append(path)
    return paths


def overrides(path: Path, batch: int, max_tokens: int | None, detailed: list[str] | None = None,
              lead: str | None = None) -> Path:
    """A recipe that only changes how the LLM is run (batch size, optionally max_tokens) and,
    with ``detailed``, the parts of the detailed caption (the part ``verified`` sets
    ``ensure_verified``, which is off otherwise); ``lead``: ``[caption_model] lead``."""
    text = f"[llm]\nbatch_size = {batch}\n" + (f"max_tokens = {max_tokens}\n" if max_tokens else "")
    if lead:
        text += f"[caption_model]\nlead = {json.dumps(lead)}\n"
    if detailed is not None:
        parts = [p for p in detailed if p != "verified"]
        text += ("[output]\ndetailed = [" + ", ".join(json.dumps(p) for p in parts) + "]\n"
                 f"ensure_verified = {'true' if 'verified' in detailed else 'false'}\n")
    path.write_text(text)
    return path


def seed_cache(done: Path, other: Path) -> None:
    """Give the baseline run this run's call cache: both send the same prompts (the facts, the caption
    model and the integration prompt are unchanged), so the baseline gets the same LLM answers and
    only the checks after the LLM differ; this also halves the CPU time."""
    import sqlite3

    target = Path(f"{other}.hqrs-mpgi.sqlite")
    if target.exists():
        return
    with sqlite3.connect(f"{done}.hqrs-mpgi.sqlite") as source, sqlite3.connect(target) as copy:
        source.backup(copy)


def captions_of(layer: Path, tile_of: dict[str, int]) -> dict[int, dict]:
    """Per image: the detailed and short captions and the source texts (facts + descriptions)."""
    import pyogrio

    from hqrs_geo import read_tiles

    frame = read_tiles(layer)
    sources = pyogrio.read_dataframe(layer, layer="mpgi_sources")
    out = {}
    for row in frame.itertuples():
        mine = sources[sources.tile_id == row.tile_id]
        out[tile_of[row.tile_id]] = {
            "detailed": row.mpgi_caption or "", "short": json.loads(row.mpgi_short),
            "sources": list(mine[mine.stage.isin(["facts", "caption", "perspectives", "relay"])].text),
            "caption_stage": list(mine[mine.stage == "caption"].text),
            "classes": list(mine[mine.stage == "classes"].text),
            "candidates": [json.loads(t) for t in mine[mine.stage == "candidates"].text],
            "verified": list(mine[mine.stage == "verified"].text),
        }
    return out


def verified_counts(result: dict[int, dict]) -> dict:
    """Tiles whose detailed caption states at least one confirmed fact, and of which kinds."""
    kinds: Counter = Counter()
    for item in result.values():
        kinds.update({v.split(" ", 1)[0].rstrip(":") for v in item.get("verified", [])})
    return {"tiles": len(result), "with a verified fact": sum(bool(i.get("verified")) for i in result.values()),
            "by kind": dict(kinds)}


def classify(result: dict[int, dict]) -> dict[str, Counter]:
    """Sentence counts of the detailed and short captions, by what the checks find in them (against
    the tile's sources and the caption model's candidate pool, as the pipeline checks its lead)."""
    from hqrs_geo.mpgi.integrate import issue_category, sentence_issue, sentences

    counts = {"detailed": Counter(), "short": Counter()}
    for item in result.values():
        inputs = [*item["sources"], *(c for pool in item.get("candidates", []) for c in pool)]
        for part, texts in (("detailed", [item["detailed"]]), ("short", item["short"])):
            for text in texts:
                for sentence in sentences(text):
                    counts[part]["sentences"] += 1
                    counts[part][issue_category(sentence_issue(sentence, inputs))] += 1
    return counts


def score(references: dict[str, list[str]], candidates: dict[str, str]) -> dict:
    """BLEU-4, METEOR, ROUGE-L and CIDEr (x100) of one system."""
    from hqrs_geo.evaluation import caption_metrics

    metrics = caption_metrics(references, {k: candidates.get(k) or "." for k in references})
    return {k: round(metrics[k], 1) for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")}


def score_mpgi(references: dict[str, list[str]], result: dict[int, dict], n_short: int) -> dict[str, dict]:
    """The MpGI systems: short #1, mean over short positions, detailed."""
    rows = {"MpGI short #1": score(references, {k: (result[int(k)]["short"] or [""])[0] for k in references})}
    positions = [score(references, {k: (result[int(k)]["short"][i] if i < len(result[int(k)]["short"]) else "")
                                    for k in references}) for i in range(n_short)]
    rows[f"MpGI short, mean of #1..#{n_short}"] = {m: round(sum(p[m] for p in positions) / n_short, 1)
                                                   for m in positions[0]}
    rows["MpGI detailed"] = score(references, {k: result[int(k)]["detailed"] for k in references})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DATASET))
    parser.add_argument("--split", default="val")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N images of each class")
    parser.add_argument("--lead", choices=("clip", "consensus"), default=None,
                        help="[caption_model] lead (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=4, help="LLM batch size")
    parser.add_argument("--max-tokens", type=int, default=None, help="LLM max_tokens (default: the recipe's)")
    parser.add_argument("--baseline-checkout", default=None,
                        help="another checkout (e.g. main) whose CLI runs the same images for the before/after counts")
    parser.add_argument("--work", default=None, help="keep the layers and caches in this folder (default: temporary)")
    parser.add_argument("--json", default=None, help="write the numbers and all captions to this file")
    parser.add_argument("--variants", default=None,
                        help="comma-separated [output] detailed lists to score as well, parts joined by + "
                             "(an empty item: the lead alone; 'verified': ensure_verified on), "
                             "e.g. ',verified,class+cover'")
    args = parser.parse_args()

    import numpy as np
    import torch

    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile
    from hqrs_geo.engine.tasks import CaptionTask
    from hqrs_geo.models.decoding import DecodingConfig
    from hqrs_geo.models.encode import read_image
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.mpgi.pipeline import run_mpgi
    from hqrs_geo.mpgi.recipe import load_recipe
    from hqrs_geo.tiling.dataset import TileDataset

    records = select(args.dataset, args.split, args.per_class, args.skip)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    try:
        layer = work / "tiles.gpkg"
        if not layer.exists():
            tile(write_geotiffs(records, work / "tifs"), layer, TileConfig(tile_size=256, stretch="none"))
        dataset = TileDataset.from_layer(layer)
        tile_of = {rec.tile_id: int(Path(rec.source).stem[3:]) for rec in dataset.records}
        assert sorted(tile_of.values()) == list(range(len(records))), "one tile per image expected"
        for i, rec in enumerate(dataset.records):  # the pipeline sees exactly the JPEG's pixels
            assert np.array_equal(dataset[i][1], read_image(records[tile_of[rec.tile_id]]["image"]))
        dataset.reader.close()
        recipe_file = overrides(work / "overrides.toml", args.batch, args.max_tokens, lead=args.lead)
        recipe = load_recipe(str(recipe_file))
        n_short = int(recipe.output["short_captions"])

        start = time.perf_counter()
        new_layer = work / "mpgi_new.gpkg"
        run_mpgi(str(layer), recipe, output=str(new_layer))
        new_seconds = time.perf_counter() - start
        new = captions_of(new_layer, tile_of)

        variant_results: dict[str, dict[int, dict]] = {}
        for spec in ([v.strip() for v in args.variants.split(",")] if args.variants is not None else []):
            parts = [p for p in spec.split("+") if p]
            variant_layer = work / f"mpgi_variant_{'_'.join(parts) or 'lead'}.gpkg"
            seed_cache(new_layer, variant_layer)
            variant_recipe = load_recipe(str(overrides(work / "variant.toml", args.batch, args.max_tokens, parts,
                                                       args.lead)))
            run_mpgi(str(layer), variant_recipe, output=str(variant_layer))
            variant_results["+".join(parts) or "lead only"] = captions_of(variant_layer, tile_of)

        old = None
        if args.baseline_checkout:
            old_layer = work / "mpgi_baseline.gpkg"
            seed_cache(new_layer, old_layer)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(args.baseline_checkout).resolve()),
                                                                os.environ.get("PYTHONPATH", "")])}
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "hqrs_geo", "mpgi", str(layer), "-o", str(old_layer),
                                   "--recipe", str(recipe_file), "--quiet"], env=env, cwd=args.baseline_checkout,
                                  capture_output=True, text=True)
            old_seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"baseline run failed: {done.stderr.strip()[-500:]}")
            old = captions_of(old_layer, tile_of)
            from hqrs_geo import read_runs

            old_fresh = read_runs(old_layer)[-1]["params"]["fresh_calls"]  # 0: the same answers as this run

        decoding = DecodingConfig(method=recipe.raw["caption_model"].get("decoding", "beam")).validated()
        task = CaptionTask(load_model(recipe.caption_model, device="cpu"), decoding=decoding)
        alone: dict[str, str] = {}
        for begin in range(0, len(records), 32):
            chunk = records[begin:begin + 32]
            images = torch.stack([torch.from_numpy(read_image(r["image"])).permute(2, 0, 1) for r in chunk])
            alone.update({str(begin + i): c for i, c in enumerate(task(images))})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    references = {str(i): r["captions"] for i, r in enumerate(records)}
    same = sum(alone[str(i)] in new[i]["caption_stage"] for i in range(len(records)))
    systems = {f"caption model alone ({recipe.caption_model}, {decoding.method})": score(references, alone)}
    systems.update({f"{k} (this branch)": v for k, v in score_mpgi(references, new, n_short).items()})
    for name, result in variant_results.items():
        systems[f"MpGI detailed [{name}]"] = score(references, {k: result[int(k)]["detailed"] for k in references})
    if old is not None:
        systems.update({f"{k} (baseline)": v for k, v in score_mpgi(references, old, n_short).items()})
    counts = {"this branch": classify(new), **({"baseline": classify(old)} if old is not None else {})}

    classes = len({r["class"] for r in records})
    print(f"{len(records)} images of UCM-captions {args.split} ({args.per_class} per class after {args.skip}, "
          f"{classes} classes); "
          f"offline default recipe (no VLM, {recipe.caption_model} {decoding.method}, SmolLM2-135M); "
          f"CPU {torch.get_num_threads()} threads")
    print(f"pipeline {new_seconds:.0f} s" + (f"; baseline {old_seconds:.0f} s ({old_fresh} fresh model calls)"
                                             if old is not None else "")
          + f"; caption stage equals the caption model alone on {same}/{len(records)} images")
    print(f"{'system':58s} {'BLEU-4':>7s} {'METEOR':>7s} {'ROUGE-L':>7s} {'CIDEr':>7s}")
    for name, m in systems.items():
        print(f"{name:58s} {m['BLEU-4']:7.1f} {m['METEOR']:7.1f} {m['ROUGE-L']:7.1f} {m['CIDEr']:7.1f}")
    print("sentences by issue (coordinates, ground size, pixel size, date, praise, unsupported, clean):")
    for name, by_part in counts.items():
        for part, c in by_part.items():
            detail = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "sentences")
            print(f"  {name:12s} {part:8s} {c['sentences']:4d} sentences: {detail}")
    verified = {"this branch": verified_counts(new),
                **{f"detailed [{name}]": verified_counts(r) for name, r in variant_results.items()}}
    for name, v in verified.items():
        print(f"verified facts, {name}: {v['with a verified fact']}/{v['tiles']} tiles ({v['by kind']})")
    examples = [(records[i]["class"], alone[str(i)], new[i]["short"][:2], new[i]["detailed"])
                for i in range(0, len(records), max(1, len(records) // 4))]
    for cls, coca, shorts, detailed in examples:
        print(f"  e.g. {cls}: caption model: {coca!r}; MpGI short: {shorts!r}; detailed: {detailed[:160]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "images": len(records), "split": args.split, "per_class": args.per_class, "systems": systems,
            "counts": {k: {p: dict(c) for p, c in v.items()} for k, v in counts.items()}, "verified": verified,
            "variants": {name: {str(i): r[i]["detailed"] for i in r} for name, r in variant_results.items()},
            "captions": [{"image": r["image"], "class": r["class"], "caption_model": alone[str(i)],
                          "mpgi": new[i], **({"baseline": old[i]} if old is not None else {})}
                         for i, r in enumerate(records)]}, indent=1))


if __name__ == "__main__":
    main()
