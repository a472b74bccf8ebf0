"""Scale-out: the Ray engine against the single-process engine and the bare forward, side by side.

    python benchmarks/scale.py [--device cpu|cuda|auto] [--model NAME] [--unit-tiles N] [--tiles N]
                               [--repeat 3] [--batch B] [--no-cold] [--memory-scenes 1000] [--json]
    python benchmarks/scale.py --gpu [--gpu-scenes 40] [--caption-tiles 512]     # the earlier GPU mode

Default mode, on one device (CPU: this machine's cores; CUDA: one GPU and the machine's cores):
synthetic scenes of ``--unit-tiles`` 256-px tiles each (real aerial pixels, DEFLATE), about
``--tiles`` tiles in all, embedded with ``--model`` (shipped weights where the package has them,
else random weights), ``--repeat`` times in turn:

* **bare**: ``encode_image`` in a loop on ready, preprocessed tensors on the device;
* **single-process engine**: ``hqrs_geo.run`` into a GeoPackage (tiling, reading, models, write);
* **Ray engine**: ``hqrs_geo.run`` into a dataset on a local Ray instance started once before
  (``block_tiles`` = ``--unit-tiles``; one model worker, on the GPU with CUDA).

Printed, median (min-max) of the repeats: tiles/s steady (from the first finished unit or
batch to the last) and end to end (model loading and writing included), the ratios Ray / bare,
single-process / bare and Ray / single-process (targets: >= 0.9 on CPU, Ray >= 0.85 of bare
on a GPU), the time to the first finished unit with the cluster running and (unless
``--no-cold``) from a fresh start that starts its own Ray instance, and the bytes a unit's Ray
calls returned per tile, with those that went through the shared-memory object store (the
model worker reads its windows itself, so no pixel array is among them; sizes from
``ray.experimental.get_object_locations``, counted by the engine in
``hqrs_geo.engine.distributed.TRAFFIC``). ``--json`` prints the figures as one JSON line
(``bare_tiles_s``, ``single_tiles_s``, ``ray_tiles_s``, ``ray_ratio``, ``single_ratio``,
``object_store_bytes_per_tile``, ...).

``--memory-scenes N``: then the Ray driver's memory, in a fresh process, on N one-tile scenes
and on a tenth of them: peak RSS above the driver's RSS before the job (flat is the target).

``--gpu`` (one CUDA GPU): the earlier GPU mode, Ray engine steady tiles/s against the bare
forward for ViT-B-32 embeddings (bf16) and coca_ViT-B-32 captions (greedy), random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEAD_IP = "127.0.0.2"  # a loopback address Ray does not replace by the machine's address


def ray_env() -> None:
    """A local Ray instance for benchmarks: loopback only, no token file, no usage report."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_ray(cpus: int, gpus: int = 0, object_store: int | None = None) -> str:
    import logging

    import ray

    ray_env()
    ray.init(num_cpus=cpus, num_gpus=gpus, _node_ip_address=HEAD_IP, include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False, object_store_memory=object_store,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HQRS_GEO_")}})
    return ray.get_runtime_context().gcs_address


def scenes_from(base: Path, folder: Path, count: int) -> list[str]:
    """``count`` scenes: hard links to one file under different names (each read on its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        target = folder / f"scene_{i:05d}.tif"
        if not target.exists():
            os.link(base, target)
        out.append(str(target))
    return out


class Rate:
    """A progress sink that records (time, tiles) at every finished scene or batch."""

    mode = "none"
    interval = 0.0

    def __init__(self) -> None:
        self.points: list[tuple[float, int]] = []
        self.done = 0
        self.tiles = 0
        self.stage = ""

    def start(self, stage, total, message="", unit="tile", initial=0):
        """Begin a stage."""
        self.stage, self.done = stage, initial

    def advance(self, n=1):
        """Record the time and tiles done."""
        self.done += n
        if self.stage != "tile":  # tiles done by the model engine
            self.points.append((time.perf_counter(), self.done))

    def postfix(self, **values):
        """Keep the tiles count of the partitioned engine."""
        if "tiles" in values:
            self.tiles = values["tiles"]

    def message(self, text):
        """Ignored."""

    def emit(self, *a, **k):
        """Ignored."""

    def finish(self, *a, **k):
        """Ignored."""

    def close_bar(self):
        """Ignored."""

    def steady(self) -> float:
        """Tiles per second between the first and the last recorded point."""
        if len(self.points) < 2:
            return float("nan")
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


class SceneRate(Rate):
    """For the partitioned engine: tiles come with each finished scene (postfix before advance)."""

    def advance(self, n=1):
        """Record the time and the tiles of the finished scenes."""
        self.done += n
        self.points.append((time.perf_counter(), self.tiles))


def median_spread_text(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median (min-max)``."""
    from embed import median_spread

    m, lo, hi = median_spread(values)
    return f"{fmt.format(m)} ({fmt.format(lo)}-{fmt.format(hi)})"


def compare_mode(args) -> dict:
    """Bare forward, the single-process engine and the Ray engine side by side, ``--repeat``
    times on the same tiles and device; returns the figures (printed, and as JSON with ``--json``)."""
    import math

    import torch
    from embed import load_for_benchmark, median_spread, sync
    from tiling import make_scene

    import hqrs_geo as hg
    import hqrs_geo.engine.distributed as distributed
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.partitioned import ScaleOptions
    from hqrs_geo.models.precision import autocast_dtype, inference_context, precision_name

    cpus = os.cpu_count() or 1
    unit = args.unit_tiles
    side = args.size or 256 * math.ceil(math.sqrt(unit))
    per_scene = (side // 256) ** 2 or 1
    count = args.scenes or max(3, math.ceil(args.tiles / per_scene))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        loaded, weights = load_for_benchmark(args.model, args.device, tmp)
        device = loaded.device
        amp = autocast_dtype(device)
        checkpoints = [loaded.checkpoint] if weights == "random weights" else []
        base = tmp / "base.tif"
        make_scene(base, side)
        sources = scenes_from(base, tmp / "scenes", count)
        where = "cuda" if device.type == "cuda" else "cpu"
        common = dict(embed_models=[args.model], embed_checkpoints=checkpoints, device=where,
                      tiling=hg.TileConfig(tile_size=256), options=RunOptions(batch_size=args.batch))
        size = loaded.preprocess["size"]
        ready = torch.randn(args.batch, 3, *size, device=device)
        n_tiles = count * per_scene
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpus} CPU cores"
        results: dict = {"bare": [], "single": [], "single_e2e": [], "ray": [], "ray_e2e": [], "ray_first": []}

        def bare() -> None:
            with inference_context(device, amp):
                loaded.model.encode_image(ready[:2])
                sync(device)
                start = time.perf_counter()
                for done in range(0, n_tiles, args.batch):
                    loaded.model.encode_image(ready[:min(args.batch, n_tiles - done)]).float().cpu()
                sync(device)
            results["bare"].append(n_tiles / (time.perf_counter() - start))

        def single(rep: int) -> int:
            rate = Rate()
            start = time.perf_counter()
            frame = hg.run(sources, tmp / f"single{rep}.gpkg", progress=rate, **common)
            results["single_e2e"].append(len(frame) / (time.perf_counter() - start))
            results["single"].append(rate.steady())
            return len(frame)

        def ray_run(name: str) -> tuple[float, float, float, dict]:
            rate = SceneRate()
            start = time.perf_counter()
            report = hg.run(sources, f"{tmp}/{name}/", progress=rate, scale=scale, **common)
            seconds = time.perf_counter() - start
            assert not report.failed and report.tiles, report.summary()
            first = rate.points[0][0] - start if rate.points else float("nan")
            return report.tiles / seconds, rate.steady(), first, dict(getattr(distributed, "TRAFFIC", {}))

        scale = ScaleOptions(engine="ray", block_tiles=unit, gpus_per_worker=1 if where == "cuda" else None)
        cold = None
        if args.cold:  # a fresh command: the engine starts its own Ray instance (and stops it)
            e2e, steady, first, _ = ray_run("cold")
            cold = {"tiles_s": e2e, "first_unit_s": first}
        start = time.perf_counter()
        start_ray(cpus, gpus=1 if where == "cuda" else 0, object_store=(8 * 2**30 if where == "cuda" else None))
        init_s = time.perf_counter() - start
        traffic: dict = {}
        tiles = 0
        for rep in range(args.repeat):
            bare()
            tiles = single(rep)
            e2e, steady, first, traffic = ray_run(f"ray{rep}")
            results["ray_e2e"].append(e2e)
            results["ray"].append(steady)
            results["ray_first"].append(first)
        __import__("ray").shutdown()
    med = {k: median_spread(v)[0] if v else float("nan") for k, v in results.items()}
    ray_ratios = [r / b for r, b in zip(results["ray"], results["bare"])]
    single_ratios = [r / b for r, b in zip(results["single"], results["bare"])]
    vs_single = [r / s for r, s in zip(results["ray"], results["single"])]
    vs_single_e2e = [r / s for r, s in zip(results["ray_e2e"], results["single_e2e"])]
    per_tile = traffic.get("bytes", 0) / max(1, traffic.get("tiles", 0))
    store_per_tile = traffic.get("store_bytes", 0) / max(1, traffic.get("tiles", 0))
    threads = torch.get_num_threads()
    out = {
        "device": str(device), "card": card, "model": args.model, "weights": weights,
        "precision": precision_name(amp), "batch": args.batch, "tiles": tiles, "unit_tiles": unit, "scenes": count,
        "cpu_cores": cpus, "torch_threads": threads, "repeats": args.repeat,
        "bare_tiles_s": med["bare"], "single_tiles_s": med["single"], "ray_tiles_s": med["ray"],
        "single_e2e_tiles_s": med["single_e2e"], "ray_e2e_tiles_s": med["ray_e2e"],
        "ray_ratio": median_spread(ray_ratios)[0], "single_ratio": median_spread(single_ratios)[0],
        "ray_vs_single": median_spread(vs_single)[0], "ray_vs_single_e2e": median_spread(vs_single_e2e)[0],
        "ray_first_unit_s": med["ray_first"], "ray_init_s": init_s,
        "ray_cold_first_unit_s": cold["first_unit_s"] if cold else None,
        "ray_cold_tiles_s": cold["tiles_s"] if cold else None,
        "object_store_bytes_per_tile": store_per_tile, "ray_bytes_per_tile": per_tile,
        "pixel_bytes_per_tile": 3 * 256 * 256,
        "runs": results,
    }
    print(f"{card} (torch {threads} threads in this process), {args.model} {weights}, {precision_name(amp)}, batch "
          f"{args.batch}, {count} scenes of {side} px, {tiles} tiles of 256 px, units of <= {unit} tiles; "
          f"{args.repeat} repeats, median (min-max)")
    print(f"bare forward on ready tensors: {median_spread_text(results['bare'])} tiles/s")
    print(f"single-process engine:         {median_spread_text(results['single'])} tiles/s steady, "
          f"{median_spread_text(results['single_e2e'])} end to end")
    print(f"Ray engine (1 worker):         {median_spread_text(results['ray'])} tiles/s steady, "
          f"{median_spread_text(results['ray_e2e'])} end to end (cluster running; first unit done after "
          f"{median_spread_text(results['ray_first'])} s)")
    print(f"ratio single-process / bare: {median_spread_text(single_ratios, '{:.2f}')} steady")
    print(f"ratio Ray / bare: {median_spread_text(ray_ratios, '{:.2f}')} steady")
    print(f"ratio Ray / single-process: {median_spread_text(vs_single, '{:.2f}')} steady, "
          f"{median_spread_text(vs_single_e2e, '{:.2f}')} end to end  (target >= 0.9)")
    if cold:
        print(f"Ray engine from a fresh start (its own Ray instance): first unit done after "
              f"{cold['first_unit_s']:.1f} s, {cold['tiles_s']:.1f} tiles/s end to end; starting a Ray instance "
              f"here took {init_s:.1f} s")
    print(f"through Ray per tile: {per_tile:.0f} bytes returned by a unit's calls (frame, windows, results), "
          f"{store_per_tile:.0f} of them through the object store (a 256-px uint8 tile is {3 * 256 * 256} bytes; "
          "sizes from ray.experimental.get_object_locations)")
    return out


def cpu_mode(args) -> None:
    """The side-by-side comparison, then (``--memory-scenes``) the driver's memory."""
    out = compare_mode(args)
    if args.memory_scenes:
        from tiling import make_scene

        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            address = start_ray(os.cpu_count() or 1)
            small = tmp / "small.tif"
            make_scene(small, 128)
            counts = sorted({max(1, args.memory_scenes // 10), args.memory_scenes})
            results = {}
            for count in counts:
                paths = scenes_from(small, tmp / f"small_{count}", count)
                results[count] = driver_memory(address, paths, tmp / f"mem_{count}")
            for count, (base_mb, peak_mb, seconds) in results.items():
                print(f"driver, {count:5d} scenes: RSS before {base_mb:7.1f} MB, peak {peak_mb:7.1f} MB, "
                      f"growth {peak_mb - base_mb:6.1f} MB ({seconds:.0f} s)")
            growth = [peak - base for base, peak, _ in results.values()]
            print(f"driver memory growth {counts[-1]} vs {counts[0]} scenes: {growth[-1] - growth[0]:+.1f} MB "
                  f"(flat: the driver keeps references and small records only)")
            out["driver_memory_mb"] = {str(c): r[1] - r[0] for c, r in results.items()}
            __import__("ray").shutdown()
    if args.json:
        print(json.dumps(out, default=str))


DRIVER = r"""
import json, resource, sys, time  # noqa: E401
import hqrs_geo as hg
from hqrs_geo.engine.partitioned import ScaleOptions
import ray, logging
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
paths = json.loads(open(sys.argv[2]).read())
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
base = rss()
start = time.time()
report = hg.run(paths, sys.argv[3] + "/", embed_models=["hqrs-mini-clip"], device="cpu",
                tiling=hg.TileConfig(tile_size=128), scale=ScaleOptions(engine="ray", manifest_interval=5))
assert not report.failed and report.tiles == len(paths), report.summary()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0]) / 1024  # not ru_maxrss: it keeps the forking parent's peak
assert "torch" not in sys.modules, "the Ray driver imported torch"
print(json.dumps([base, peak, time.time() - start]))
"""


def driver_memory(address: str, paths: list[str], out: Path) -> tuple[float, float, float]:
    """(RSS before the job, peak RSS, seconds) of a fresh driver process running the Ray engine."""
    listing = out.with_suffix(".json")
    listing.write_text(json.dumps(paths))
    result = subprocess.run([sys.executable, "-c", DRIVER, address, str(listing), str(out)], capture_output=True,
                            text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"driver failed: {result.stderr[-2000:]}")
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))  # type: ignore[return-value]


def random_checkpoint(arch: str, folder: Path) -> str:
    """Random weights of an open_clip architecture saved as a checkpoint file."""
    import open_clip
    import torch

    from hqrs_geo.models.registry import register_config_folders

    register_config_folders()
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path = folder / f"random-{arch}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def gpu_mode(args) -> None:
    import torch
    from tiling import make_scene

    import hqrs_geo as hg
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.partitioned import ScaleOptions
    from hqrs_geo.engine.tasks import CaptionTask
    from hqrs_geo.models.decoding import DecodingConfig, generate_captions
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.precision import autocast_dtype, inference_context

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU")
    card = torch.cuda.get_device_name(0)
    cpus = os.cpu_count() or 1
    decoding = DecodingConfig(method="greedy", min_length=args.caption_tokens, max_length=args.caption_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_ckpt, coca_ckpt = random_checkpoint("ViT-B-32", tmp), random_checkpoint("coca_ViT-B-32", tmp)
        base = tmp / "base.tif"
        make_scene(base, args.gpu_size)  # (size/256)^2 tiles of 256 px per scene
        per_scene = (args.gpu_size // 256) ** 2
        sources = scenes_from(base, tmp / "scenes", args.gpu_scenes)
        n_embed = per_scene * args.gpu_scenes

        # bare forward on ready tensors, same GPU, batch and precision
        clip = load_model("ViT-B-32", checkpoint=clip_ckpt, device="cuda")
        amp = autocast_dtype(clip.device)
        ready = torch.randn(args.batch, 3, 224, 224, device="cuda")

        def bare_embed(n: int) -> float:
            with inference_context(clip.device, amp):
                clip.model.encode_image(ready)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for done in range(0, n, args.batch):
                    clip.model.encode_image(ready[:min(args.batch, n - done)]).float().cpu()
                torch.cuda.synchronize()
            return n / (time.perf_counter() - start)

        bare_e = max(bare_embed(n_embed), bare_embed(n_embed))
        coca = load_model("coca_ViT-B-32", checkpoint=coca_ckpt, device="cuda")
        task = CaptionTask(coca, RunOptions(batch_size=args.caption_batch), decoding)
        images = torch.randn(args.caption_batch, 3, 224, 224, device="cuda")

        def bare_caption(n: int) -> float:
            with inference_context(coca.device, task.amp):
                generate_captions(coca.model, coca.tokenizer, images[:2], decoding)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for done in range(0, n, args.caption_batch):
                    batch = images[:min(args.caption_batch, n - done)]
                    generate_captions(coca.model, coca.tokenizer, batch, decoding)
                torch.cuda.synchronize()
            return n / (time.perf_counter() - start)

        bare_c = bare_caption(args.caption_tiles)
        torch.cuda.empty_cache()

        start_ray(cpus, gpus=1, object_store=8 * 2**30)
        scale = ScaleOptions(engine="ray", gpus_per_worker=1, workers=1)
        rate_e = SceneRate()
        start = time.perf_counter()
        report = hg.run(sources, f"{tmp}/emb/", embed_models=["ViT-B-32"], embed_checkpoints=[clip_ckpt],
                        device="auto", tiling=hg.TileConfig(tile_size=256), options=RunOptions(batch_size=args.batch),
                        progress=rate_e, scale=scale)
        e2e_e = report.tiles / (time.perf_counter() - start)
        caption_scenes = max(1, args.caption_tiles // per_scene)
        rate_c = SceneRate()
        start = time.perf_counter()
        report_c = hg.run(sources[:caption_scenes], f"{tmp}/cap/", caption_model="coca_ViT-B-32",
                          caption_checkpoint=coca_ckpt, decoding=decoding, device="auto",
                          tiling=hg.TileConfig(tile_size=256), options=RunOptions(batch_size=args.caption_batch),
                          progress=rate_c, scale=scale)
        e2e_c = report_c.tiles / (time.perf_counter() - start)
        __import__("ray").shutdown()
    print(f"GPU: {card}; {cpus} CPU cores; random weights; 256-px tiles -> 224 px; {args.gpu_scenes} scenes of "
          f"{per_scene} tiles")
    print(f"ViT-B-32 embeddings ({str(amp).replace('torch.', '')}, batch {args.batch}): bare forward {bare_e:8.1f} "
          f"tiles/s; Ray engine {rate_e.steady():8.1f} steady ({e2e_e:.1f} end to end, {report.tiles} tiles); "
          f"ratio {rate_e.steady() / bare_e:.2f} (target >= 0.8)")
    print(f"coca_ViT-B-32 captions (greedy, {args.caption_tokens} tokens, batch {args.caption_batch}): bare "
          f"{bare_c:8.1f} tiles/s; Ray engine {rate_c.steady():8.1f} steady ({e2e_c:.1f} end to end, "
          f"{report_c.tiles} tiles); ratio {rate_c.steady() / bare_c:.2f} (target >= 0.8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--model", "--arch", dest="model", default=None,
                        help="embedding model: a registry name or open_clip architecture (random weights when none "
                             "are shipped); default hqrs-mini-clip on CPU, ViT-B-32 on CUDA")
    parser.add_argument("--unit-tiles", type=int, default=None,
                        help="tiles per unit (scenes of that many tiles; default 64 on CPU, 256 on CUDA)")
    parser.add_argument("--tiles", type=int, default=None, help="tiles in all (default 1024 on CPU, 16384 on CUDA)")
    parser.add_argument("--scenes", type=int, default=None, help="scenes (default: --tiles / --unit-tiles)")
    parser.add_argument("--size", type=int, default=None, help="scene side in px (default: from --unit-tiles)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32 on CPU, 256 on CUDA)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of the three measurements (median, spread)")
    parser.add_argument("--no-cold", dest="cold", action="store_false",
                        help="skip the run that starts its own Ray instance (time to the first unit from scratch)")
    parser.add_argument("--memory-scenes", type=int, default=0, help="scenes of the driver memory test (0: off)")
    parser.add_argument("--json", action="store_true", help="print one JSON line with the figures at the end")
    parser.add_argument("--gpu", action="store_true", help="the earlier GPU mode (embeddings and captions)")
    parser.add_argument("--gpu-scenes", type=int, default=40)
    parser.add_argument("--gpu-size", type=int, default=4096, help="GPU mode: scene size (256 tiles at 4096 px)")
    parser.add_argument("--caption-tiles", type=int, default=1024)
    parser.add_argument("--caption-batch", type=int, default=64)
    parser.add_argument("--caption-tokens", type=int, default=20)
    args = parser.parse_args()
    ray_env()
    cuda = args.gpu or args.device.startswith("cuda") or (args.device == "auto" and _has_cuda())
    args.batch = args.batch or (256 if cuda else 32)
    if args.gpu:
        gpu_mode(args)
        return
    args.model = args.model or ("ViT-B-32" if cuda else "hqrs-mini-clip")
    args.unit_tiles = args.unit_tiles or (256 if cuda else 64)
    args.tiles = args.tiles or (16384 if cuda else 1024)
    cpu_mode(args)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    main()
