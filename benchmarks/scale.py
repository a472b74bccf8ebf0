"""Scale-out: the Ray engine against the single-process engine, and the driver's memory.

    python benchmarks/scale.py [--scenes 32] [--size 2048] [--arch hqrs-mini-clip] [--memory-scenes 1000]
    python benchmarks/scale.py --gpu [--gpu-scenes 40] [--caption-tiles 512]     # on a machine with a CUDA GPU

CPU mode (this machine), in one run:

1. throughput: ``--scenes`` synthetic scenes (``--size`` px, 256-px tiles, real aerial pixels)
   embedded with ``--arch`` by the single-process engine (``hqrs_geo.run`` into a GeoPackage)
   and by the Ray engine (a local Ray instance with the same CPUs, one model worker; into a
   dataset). Printed: tiles/s end to end (model loading and writing included) and steady
   (from the first finished scene to the last), and Ray ÷ single-process (target >= 0.9).
2. driver memory: the Ray engine's driver, in a fresh process, on ``--memory-scenes`` small
   scenes and on a tenth of them (one 128-px tile each, ``hqrs-mini-clip``): peak RSS above
   the driver's RSS before the job. Flat in the number of scenes is the target.

GPU mode (``--gpu``; one CUDA GPU, e.g. 16 cores): tiles/s per GPU through the Ray engine
(one model worker on the GPU, read tasks on the CPUs) against the bare forward on ready
tensors on the same GPU, for ViT-B-32 embeddings (bf16) and coca_ViT-B-32 captions (greedy,
``--caption-tokens``), random weights. Target >= 0.8. Prints the card's name.
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


def cpu_mode(args) -> None:
    import torch
    from tiling import make_scene

    import hqrs_geo as hg
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.partitioned import ScaleOptions

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = random_checkpoint(args.arch, tmp) if args.arch not in ("hqrs-mini-clip",) else None
        base = tmp / "base.tif"
        make_scene(base, args.size)
        sources = scenes_from(base, tmp / "scenes", args.scenes)
        common = dict(embed_models=[args.arch], embed_checkpoints=[checkpoint] if checkpoint else [],
                      device="cpu", tiling=hg.TileConfig(tile_size=256), options=RunOptions(batch_size=args.batch))
        single = Rate()
        start = time.perf_counter()
        frame = hg.run(sources, tmp / "single.gpkg", progress=single, **common)
        single_time = time.perf_counter() - start
        n = len(frame)
        start_ray(cpus)
        ray_rate = SceneRate()
        start = time.perf_counter()
        report = hg.run(sources, f"{tmp}/ds/", progress=ray_rate, scale=ScaleOptions(engine="ray"), **common)
        ray_time = time.perf_counter() - start
        assert report.tiles == n and not report.failed, report.summary()
        print(f"{cpus} CPU cores (torch {torch.get_num_threads()} threads), {args.arch}, batch {args.batch}, "
              f"{args.scenes} scenes of {args.size} px, {n} tiles of 256 px")
        print(f"single-process engine: {n / single_time:8.1f} tiles/s end to end, {single.steady():8.1f} steady")
        print(f"Ray engine (1 worker): {n / ray_time:8.1f} tiles/s end to end, {ray_rate.steady():8.1f} steady")
        print(f"ratio Ray / single-process: end to end {single_time / ray_time:.2f}, steady "
              f"{ray_rate.steady() / single.steady():.2f}  (target >= 0.9)")
        address = __import__("ray").get_runtime_context().gcs_address
        if args.memory_scenes:
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
        __import__("ray").shutdown()


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
    parser.add_argument("--scenes", type=int, default=32, help="CPU mode: scenes")
    parser.add_argument("--size", type=int, default=2048, help="CPU mode: scene size in px (256-px tiles)")
    parser.add_argument("--arch", default="hqrs-mini-clip", help="CPU mode: embedding model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memory-scenes", type=int, default=1000, help="CPU mode: scenes of the memory test (0: off)")
    parser.add_argument("--gpu", action="store_true", help="GPU mode (one CUDA GPU)")
    parser.add_argument("--gpu-scenes", type=int, default=40)
    parser.add_argument("--gpu-size", type=int, default=4096, help="GPU mode: scene size (256 tiles at 4096 px)")
    parser.add_argument("--caption-tiles", type=int, default=1024)
    parser.add_argument("--caption-batch", type=int, default=64)
    parser.add_argument("--caption-tokens", type=int, default=20)
    args = parser.parse_args()
    ray_env()
    if args.gpu:
        if args.batch == 32:
            args.batch = 256
        gpu_mode(args)
    else:
        cpu_mode(args)


if __name__ == "__main__":
    main()
