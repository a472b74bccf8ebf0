"""Embedding throughput: the single-process engine vs. the bare model forward, side by side.

    python benchmarks/embed.py [--arch ViT-B-32] [--device auto] [--batch 32] [--size 4096]
                               [--repeats 3] [--precision auto] [--breakdown] [--json]

Engine = ``run_models`` over a tile layer: read tiles (DataLoader workers), move them to the
device as uint8, batched preprocessing there (resize 256 -> 224, normalise), forward,
L2-normalise, results committed to the resume store and written to the layer. Bare =
``model.encode_image`` in a loop on ready, preprocessed tensors already on the device, same
model, batch size, precision and number of tiles. The two alternate ``--repeats`` times after
one warm-up each (on a shared machine, load changes between runs hit both alike); the median
of each and of the paired ratios is printed with the spread (min-max). Targets: >= 0.95 on
CPU, >= 0.9 on CUDA with bf16.

``--arch``: an open_clip architecture or a registry name; shipped weights are used where the
package has them (hqrs-mini-clip), else random weights (throughput does not depend on them).
``--breakdown`` times the engine's stages one by one on the same tiles (reading, copy and
preprocessing, forward, storing, layer write). ``--json`` prints one JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_for_benchmark(name: str, device: str, tmp: Path) -> tuple[Any, str]:
    """The model ``name`` with its shipped weights when present, else with random weights; and which."""
    import torch

    from hqrs_geo.errors import HqrsError
    from hqrs_geo.models.loader import load_model, quiet_open_clip
    from hqrs_geo.models.registry import get_spec, register_config_folders

    try:
        return load_model(name, device=device, download=False), "shipped weights"
    except HqrsError:
        pass
    import open_clip

    register_config_folders()  # the shipped configs (hqrs-mini-*) and $HQRS_GEO_MODEL_CONFIGS
    arch = get_spec(name).arch
    torch.manual_seed(0)
    with quiet_open_clip():
        model = open_clip.create_model(arch, pretrained=None)
    if hasattr(model, "text_decoder"):  # CoCa: open_clip leaves this projection uninitialised
        proj = model.text_decoder.text_projection
        torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
    ckpt = tmp / f"random-{arch}.pt"
    torch.save(model.state_dict(), ckpt)
    del model
    return load_model(name, checkpoint=str(ckpt), arch=arch, device=device), "random weights"


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA), so a clock read means what it says."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (DataLoader readers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def breakdown(layer: Path, loaded: Any, batch: int, workers: int | None, precision: str) -> dict[str, float]:
    """Seconds per stage of the engine on ``layer``'s tiles, each stage timed on its own."""
    from torch.utils.data import DataLoader

    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.store import ResumeStore
    from hqrs_geo.engine.tasks import EmbedTask
    from hqrs_geo.layer.io import open_layer, write_tiles
    from hqrs_geo.layer.runs import new_run
    from hqrs_geo.tiling.dataset import TileDataset, collate_tiles

    options = RunOptions(batch_size=batch, workers=workers, precision=precision).validated()
    device = loaded.device
    task = EmbedTask(loaded, options)
    out: dict[str, float] = {}
    start = time.perf_counter()
    opened = open_layer(layer)
    dataset = TileDataset.from_frame(opened.frame, opened.scenes(), where=str(layer))
    out["open layer"] = time.perf_counter() - start
    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch, num_workers=options.worker_count(device),  # type: ignore[arg-type]
                        collate_fn=collate_tiles, pin_memory=device.type == "cuda")
    batches = list(loader)
    out["read tiles"] = time.perf_counter() - start
    start = time.perf_counter()
    ready = [task.inputs(b.permute(0, 3, 1, 2).to(device, non_blocking=True)) for _, b in batches]
    sync(device)
    out["copy + preprocess"] = time.perf_counter() - start
    from hqrs_geo.models.precision import inference_context

    start = time.perf_counter()
    with inference_context(device, task.amp):
        features = [loaded.model.encode_image(x) for x in ready]
    sync(device)
    out["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    import torch.nn.functional as F

    from hqrs_geo.layer.columns import encode

    values = [encode(F.normalize(f.float(), dim=-1).cpu().numpy(), options.embedding_dtype) for f in features]
    out["normalise + encode"] = time.perf_counter() - start
    store = ResumeStore(Path(tempfile.mkdtemp()) / "breakdown.sqlite")
    start = time.perf_counter()
    for (records, _), vals in zip(batches, values):
        store.put([(r.tile_id, task.store_key, v) for r, v in zip(records, vals)])
    out["store commits"] = time.perf_counter() - start
    start = time.perf_counter()
    stored = store.load(task.store_key)
    frame = opened.frame
    frame[task.field] = frame["tile_id"].map(stored)
    for name, constant in task.columns().items():
        frame[name] = constant
    write_tiles(str(layer), frame, new_run("breakdown", "tiles", {}), replace_sources=list(frame["source"].unique()),
                known=opened)
    out["layer write"] = time.perf_counter() - start
    store.remove()
    return out


def main(argv: list[str] | None = None) -> None:
    import torch
    from tiling import make_scene

    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.run import run_models
    from hqrs_geo.models.precision import autocast_dtype, inference_context, precision_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", "--model", dest="arch", default="ViT-B-32",
                        help="open_clip architecture or registry name (default ViT-B-32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=4096, help="scene side in pixels (tiles of --tile-size px)")
    parser.add_argument("--scenes", type=int, default=1, help="number of scenes (more tiles without a larger file)")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; 1 gives steadier figures on a busy shared machine)")
    parser.add_argument("--layer-format", default="gpkg", choices=("gpkg", "parquet"),
                        help="tile layer written and read by the engine")
    parser.add_argument("--breakdown", action="store_true", help="also time the engine's stages one by one")
    parser.add_argument("--views", type=int, default=1, choices=(1, 8, 16),
                        help="also time the engine with this many test-time views per tile (embed --views)")
    parser.add_argument("--json", action="store_true", help="print one JSON line with the figures at the end")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        loaded, weights = load_for_benchmark(args.arch, args.device, tmp)
        device = loaded.device
        amp = autocast_dtype(device, args.precision)
        scenes = [tmp / "scene0.tif"]
        make_scene(scenes[0], args.size)
        for i in range(1, args.scenes):  # the same pixels under other names: more tiles, no new writing
            scenes.append(tmp / f"scene{i}.tif")
            os.link(scenes[0], scenes[-1])
        layer = tmp / f"tiles.{args.layer_format}"
        tiles = tile(scenes, layer, TileConfig(tile_size=args.tile_size))
        n = len(tiles)
        size = loaded.preprocess["size"]
        ready = torch.randn(args.batch, 3, *size, device=device)
        options = RunOptions(batch_size=args.batch, workers=args.workers, precision=args.precision, overwrite=True)

        def bare() -> tuple[float, float]:
            with inference_context(device, amp):
                sync(device)
                start, cpu = time.perf_counter(), cpu_seconds()
                done = 0
                while done < n:
                    b = min(args.batch, n - done)
                    loaded.model.encode_image(ready[:b]).float().cpu()
                    done += b
                sync(device)
            return n / (time.perf_counter() - start), n / (cpu_seconds() - cpu)

        def engine() -> tuple[float, float]:
            start, cpu = time.perf_counter(), cpu_seconds()
            run_models(str(layer), [loaded], options=options)
            return n / (time.perf_counter() - start), n / (cpu_seconds() - cpu)

        runs: dict[str, list[float]] = {"bare": [], "engine": []}
        cpu_runs: dict[str, list[float]] = {"bare": [], "engine": []}
        timed: list[tuple[str, Callable[[], tuple[float, float]]]] = [("bare", bare), ("engine", engine)]
        if args.views > 1:
            viewed = RunOptions(batch_size=args.batch, workers=args.workers, precision=args.precision, overwrite=True,
                                views=args.views)

            def engine_views() -> tuple[float, float]:
                start, cpu = time.perf_counter(), cpu_seconds()
                run_models(str(layer), [loaded], options=viewed)
                return n / (time.perf_counter() - start), n / (cpu_seconds() - cpu)
            timed.append(("views", engine_views))
            runs["views"], cpu_runs["views"] = [], []
        for _, fn in timed:
            fn()  # warm-up: kernels, allocator, the layer's new columns
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.repeats):
            for name, fn in timed:
                wall, cpu = fn()
                runs[name].append(wall)
                cpu_runs[name].append(cpu)
        ratios = [e / b for e, b in zip(runs["engine"], runs["bare"])]
        cpu_ratios = [e / b for e, b in zip(cpu_runs["engine"], cpu_runs["bare"])]
        bare_m, bare_lo, bare_hi = median_spread(runs["bare"])
        eng_m, eng_lo, eng_hi = median_spread(runs["engine"])
        ratio_m, ratio_lo, ratio_hi = median_spread(ratios)
        threads = torch.get_num_threads()
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
        workers = options.validated().worker_count(device)
        print(f"device {device} ({where}), {args.arch} {weights}, precision {precision_name(amp)}, "
              f"batch {args.batch}, {workers} reader process(es), {n} tiles of {args.tile_size} px -> {size[0]} px, "
              f"{args.layer_format} layer, {args.repeats} paired repeats (median, min-max)")
        print(f"bare forward on ready tensors: {bare_m:9.1f} tiles/s ({bare_lo:.1f}-{bare_hi:.1f})")
        print(f"single-process engine (read+preprocess+forward+store+write): {eng_m:9.1f} tiles/s "
              f"({eng_lo:.1f}-{eng_hi:.1f})")
        print(f"ratio end-to-end / bare: {ratio_m:.3f} ({ratio_lo:.3f}-{ratio_hi:.3f})  "
              "(target >= 0.95 CPU, >= 0.9 CUDA bf16)")
        cpu_m, cpu_lo, cpu_hi = median_spread(cpu_ratios)
        print(f"ratio by CPU time (this process and its readers; less sensitive to other load on a shared "
              f"machine): {cpu_m:.3f} ({cpu_lo:.3f}-{cpu_hi:.3f})")
        result: dict[str, Any] = {
            "device": str(device), "card": where, "model": args.arch, "weights": weights,
            "precision": precision_name(amp), "batch": args.batch, "tiles": n, "workers": workers,
            "bare_tiles_s": bare_m, "engine_tiles_s": eng_m, "ratio": ratio_m,
            "bare_runs": runs["bare"], "engine_runs": runs["engine"], "ratios": ratios,
            "cpu_time_ratio": cpu_m, "cpu_time_ratios": cpu_ratios,
        }
        if args.views > 1:
            view_ratios = [v / e for v, e in zip(runs["views"], runs["engine"])]
            view_m, view_lo, view_hi = median_spread(view_ratios)
            print(f"engine with {args.views} test-time views: {median_spread(runs['views'])[0]:9.1f} tiles/s; "
                  f"ratio {args.views} views / 1 view: {view_m:.3f} ({view_lo:.3f}-{view_hi:.3f})")
            result.update(views=args.views, views_tiles_s=median_spread(runs["views"])[0], views_ratio=view_m)
        if device.type == "cuda":
            result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
            print(f"peak GPU memory: {result['peak_gpu_bytes'] / 2**20:.0f} MiB")
        if args.breakdown:
            stages = breakdown(layer, loaded, args.batch, args.workers, args.precision)
            total = sum(stages.values())
            print("engine stages, each timed on its own over the same tiles:")
            for name, seconds in stages.items():
                print(f"  {name:20s} {seconds:7.3f} s  {100 * seconds / total:5.1f} %")
            result["stages_s"] = stages
        if args.json:
            print(json.dumps(result))


if __name__ == "__main__":
    main()
