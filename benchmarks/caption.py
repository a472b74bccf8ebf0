"""Caption throughput: the cached decoder vs a full forward per token, and the engine vs the bare decoder.

    python benchmarks/caption.py [--device auto|cpu|cuda] [--batch 32] [--tokens 30]
                                 [--arch coca_ViT-B-32] [--engine-tiles 64] [--repeats 3] [--json]
    python benchmarks/caption.py --methods beam,consensus --arch hqrs-mini-coca
                                 [--dataset KARPATHY.json --split val --limit 64] [--samples 4] [--json]

Builds an open_clip CoCa with random weights (default ``coca_ViT-B-32``: ViT-B/32 image tower
at 224 px, 12-layer 512-wide text tower, 12-layer 512-wide multimodal decoder, 49408-token
vocabulary; ~254 M parameters) and decodes the same batch of random "preprocessed" images
with

  * ``generate_tokens`` (greedy): the image is encoded once, cross-attention keys/values are
    computed once per image and each step runs one token through the towers (key/value cache);
  * ``naive_greedy_tokens``: ``model(images, prefix)`` for every token, i.e. the image encoder,
    the text tower and the decoder over the whole prefix at every step.

End-of-text is forbidden until ``--tokens`` tokens exist and decoding stops there
(``min_length = max_length = tokens``), so both generate exactly ``batch * tokens`` tokens.
Runs under ``torch.inference_mode``; on CUDA under bf16 autocast, synchronising before each
clock read. Prints tokens/s both ways and their ratio (target >= 3x).

Then the engine against the bare decoder loop, side by side (``--engine-tiles`` tiles of
256 px, 0 to skip): bare = ``generate_captions`` in batches of ``--batch`` on ready,
preprocessed tensors on the device; engine = ``run_models`` captioning a tile layer (read,
preprocess on the device, decode, store, write the layer), same model, decoding, batch and
precision. ``--repeats`` paired runs after one warm-up each; medians with min-max and the
ratio in captions/s (target >= 0.9). On CUDA the peak GPU memory is printed.

With ``--methods`` only the decoding methods are compared instead: seconds per image of
``generate_captions`` with each method (beam: ``--beams``; consensus: ``--beams``, ``--samples``,
``--temperature``; natural caption lengths: ``min_length`` 5, ``max_length`` 30) over the first
``--limit`` images of a ``--dataset`` split (random images without one), in batches of ``--batch``,
``--repeats`` rounds after a warm-up (median, min-max), and each method's time over the first one's.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hqrs_geo.models.decoding import DecodingConfig, generate_tokens, naive_greedy_tokens  # noqa: E402


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """Run ``fn`` once and return its result and wall-clock seconds (device synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--arch", default="coca_ViT-B-32",
                        help="an open_clip CoCa architecture or registry name (shipped weights where present)")
    parser.add_argument("--engine-tiles", type=int, default=64,
                        help="tiles captioned by the engine and by the bare decoder loop (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; 1 gives steadier figures on a busy shared machine)")
    parser.add_argument("--json", action="store_true", help="print one JSON line with the figures at the end")
    parser.add_argument("--methods", default=None,
                        help="compare these decoding methods' seconds per image instead (e.g. beam,consensus)")
    parser.add_argument("--dataset", default=None, help="--methods: Karpathy JSON of real images (default random)")
    parser.add_argument("--split", default="val", help="--methods: split of --dataset")
    parser.add_argument("--limit", type=int, default=64, help="--methods: images")
    parser.add_argument("--beams", type=int, default=3, help="--methods: beam width of beam and consensus")
    parser.add_argument("--samples", type=int, default=4, help="--methods: consensus samples")
    parser.add_argument("--temperature", type=float, default=1.0, help="--methods: consensus sample temperature")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from embed import load_for_benchmark

    device = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    loaded, weights = load_for_benchmark(args.arch, str(device), tmp)
    if args.methods:
        result = compare_methods(loaded, weights, args)
        shutil.rmtree(tmp, ignore_errors=True)
        if args.json:
            print(json.dumps(result))
        return
    model = loaded.model
    from hqrs_geo.models.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(args.arch)  # the architecture's own vocabulary (hqrs-mini has a small one)
    sot, eos = tokenizer.sot_token_id, tokenizer.eot_token_id
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    config = DecodingConfig(method="greedy", min_length=args.tokens, max_length=args.tokens)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}), {precision}, torch {torch.__version__}")
    print(f"model: {args.arch}, {weights}, {n_params:.1f} M parameters, images {size[0]}x{size[1]}")
    print(f"batch {args.batch}, {args.tokens} tokens per caption (min_length = max_length = {args.tokens})")

    cached = lambda imgs, n: generate_tokens(  # noqa: E731
        model, imgs, DecodingConfig(method="greedy", min_length=n, max_length=n), sot, eos, model.pad_id)
    naive = lambda imgs, n: naive_greedy_tokens(model, imgs, n, sot, eos, min_length=n)  # noqa: E731
    with torch.inference_mode(), autocast:
        cached(images[:2], 2), naive(images[:2], 2)  # warm-up (kernels, allocator)
        _, encode_s = timed(lambda: model._encode_image(images), device)
        fast, fast_s = timed(lambda: generate_tokens(model, images, config, sot, eos, model.pad_id), device)
        slow, slow_s = timed(lambda: naive(images, args.tokens), device)

    total = args.batch * args.tokens
    assert all(len(ids) == args.tokens for ids in fast + slow)
    fast_tps, slow_tps = total / fast_s, total / slow_s
    same = sum(a == b for a, b in zip(fast, slow))
    print(f"cached greedy : {fast_tps:9.1f} tokens/s  ({fast_s:.2f} s; image encoding alone {encode_s:.2f} s)")
    print(f"naive greedy  : {slow_tps:9.1f} tokens/s  ({slow_s:.2f} s)")
    print(f"speed-up      : {fast_tps / slow_tps:9.1f}x  (target >= 3x)")
    print(f"identical captions: {same}/{args.batch}")
    result: dict = {"device": str(device), "card": where, "model": args.arch, "batch": args.batch,
                    "tokens": args.tokens, "cached_tokens_s": fast_tps, "naive_tokens_s": slow_tps}
    if args.engine_tiles > 0:
        result.update(engine_vs_bare(loaded, args, tmp))
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))


def compare_methods(loaded, weights: str, args: argparse.Namespace) -> dict:
    """Seconds per image of each decoding method in ``args.methods`` (see the module docstring)."""
    from hqrs_geo.models.decoding import generate_captions
    from hqrs_geo.models.precision import autocast_dtype, inference_context, precision_name
    from hqrs_geo.models.preprocess import BatchPreprocess

    device = loaded.device
    if args.dataset:
        from hqrs_geo.evaluation import load_karpathy, read_image

        preprocess = BatchPreprocess(loaded.preprocess, device)
        records = load_karpathy(args.dataset, args.split, args.limit)
        images = torch.cat([preprocess(torch.from_numpy(read_image(r["image"])).permute(2, 0, 1)[None].to(device))
                            for r in records])
        where = f"{len(records)} images of {Path(args.dataset).name} {args.split}"
    else:
        images = torch.randn(args.limit, 3, *loaded.preprocess["size"], generator=torch.Generator().manual_seed(0))
        images = images.to(device)
        where = f"{args.limit} random images"
    settings = {"num_beams": args.beams, "samples": args.samples, "temperature": args.temperature}
    configs = {m: DecodingConfig(method=m, **settings).validated() for m in args.methods.split(",")}
    amp = autocast_dtype(device, "auto")

    def run(config: DecodingConfig) -> float:
        def all_batches() -> None:
            with inference_context(device, amp):
                for start in range(0, len(images), args.batch):
                    generate_captions(loaded.model, loaded.tokenizer, images[start:start + args.batch], config)
        return timed(all_batches, device)[1] / len(images)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"decoding methods: {args.arch} ({weights}) on {device} ({card}), {precision_name(amp)}, {where}, "
          f"batch {args.batch}, {args.repeats} rounds after a warm-up (median, min-max)")
    for config in configs.values():
        run(config)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in configs}
    for _ in range(args.repeats):
        for method, config in configs.items():
            times[method].append(run(config))
    first = statistics.median(next(iter(times.values())))
    for method, values in times.items():
        print(f"{method:<10} {statistics.median(values) * 1000:8.1f} ms/image ({min(values) * 1000:.1f}-"
              f"{max(values) * 1000:.1f})  x{statistics.median(values) / first:.2f}  {configs[method].as_dict()}")
    return {"device": str(device), "card": card, "model": args.arch, "weights": weights, "images": where,
            "batch": args.batch, "s_per_image": {m: statistics.median(v) for m, v in times.items()},
            "runs": times, "settings": {m: c.as_dict() for m, c in configs.items()}}


def engine_vs_bare(loaded, args: argparse.Namespace, tmp: Path) -> dict:
    """Captions/s of the engine over a tile layer and of the bare decoder loop, paired repeats."""
    from tiling import make_scene

    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.run import run_models
    from hqrs_geo.models.decoding import generate_captions
    from hqrs_geo.models.precision import autocast_dtype, inference_context, precision_name

    device = loaded.device
    side = 256 * math.ceil(math.sqrt(args.engine_tiles))
    make_scene(tmp / "scene.tif", side)
    layer = tmp / "captions.parquet"  # GeoParquet: no GDAL vector driver needed (a bare GPU image has none)
    n = len(tile(tmp / "scene.tif", layer, TileConfig(tile_size=256)))
    config = DecodingConfig(method="greedy", min_length=args.tokens, max_length=args.tokens)
    amp = autocast_dtype(device, "auto")
    ready = torch.randn(args.batch, 3, *loaded.preprocess["size"], generator=torch.Generator().manual_seed(0))
    ready = ready.to(device)
    options = RunOptions(batch_size=args.batch, overwrite=True)

    def bare() -> float:
        start = time.perf_counter()
        with inference_context(device, amp):
            for done in range(0, n, args.batch):
                generate_captions(loaded.model, loaded.tokenizer, ready[:min(args.batch, n - done)], config)
        return n / (time.perf_counter() - start)

    def engine() -> float:
        start = time.perf_counter()
        run_models(str(layer), captioner=loaded, decoding=config, options=options, command="caption")
        return n / (time.perf_counter() - start)

    runs: dict[str, list[float]] = {"bare": [], "engine": []}
    bare(), engine()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.repeats):
        runs["bare"].append(bare())
        runs["engine"].append(engine())
    ratios = [e / b for e, b in zip(runs["engine"], runs["bare"])]

    def fmt(values: list[float]) -> str:
        return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"

    print(f"engine vs bare decoder: {n} tiles of 256 px, greedy {args.tokens} tokens, batch {args.batch}, "
          f"precision {precision_name(amp)}, {args.repeats} paired repeats (median, min-max)")
    print(f"bare decoder loop : {fmt(runs['bare'])} captions/s")
    print(f"engine            : {fmt(runs['engine'])} captions/s")
    print(f"ratio engine / bare decoder: {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
          "  (target >= 0.9)")
    out: dict = {"caption_tiles": n, "bare_captions_s": statistics.median(runs["bare"]),
                 "engine_captions_s": statistics.median(runs["engine"]), "caption_ratio": statistics.median(ratios),
                 "caption_ratios": ratios}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        print(f"peak GPU memory: {out['peak_gpu_bytes'] / 2**20:.0f} MiB")
    return out


if __name__ == "__main__":
    main()
