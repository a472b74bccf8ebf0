"""Embedding throughput: the whole pipeline vs. the bare model forward, in one run.

    python benchmarks/embed.py [--arch ViT-B-32] [--device auto] [--batch 32] [--size 2048]

End-to-end = read tiles from a GeoTIFF (DataLoader workers), move to the device, batched
preprocessing (resize 256 -> 224, normalise), forward, L2-normalise, results committed and
written to the GeoPackage. Bare = ``model.encode_image`` on ready, preprocessed tensors
already on the device, same model (random weights), batch size and precision. Both process
the same number of tiles; the ratio end-to-end / bare is printed (target >= 0.9 on CPU,
>= 0.8 on CUDA with bf16).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from tiling import make_scene

    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.run import run_models
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.precision import autocast_dtype, inference_context

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=2048, help="scene size in pixels (256-px tiles)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--layer-format", default="gpkg", choices=("gpkg", "parquet"),
                        help="tile layer written and read by the end-to-end run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import open_clip

        torch.manual_seed(0)
        from hqrs_geo.models.registry import register_config_folders

        register_config_folders()  # the shipped configs (hqrs-mini-*) and $HQRS_GEO_MODEL_CONFIGS
        model = open_clip.create_model(args.arch, pretrained=None)
        ckpt = tmp / f"random-{args.arch}.pt"
        torch.save(model.state_dict(), ckpt)
        del model
        loaded = load_model(args.arch, checkpoint=str(ckpt), device=args.device)
        device = loaded.device
        amp = autocast_dtype(device)
        scene = tmp / "scene.tif"
        make_scene(scene, args.size)
        layer = tmp / f"tiles.{args.layer_format}"
        tiles = tile(scene, layer, TileConfig(tile_size=256))
        n = len(tiles)
        size = loaded.preprocess["size"]
        ready = torch.randn(args.batch, 3, *size, device=device)

        def bare() -> float:
            with inference_context(device, amp):
                loaded.model.encode_image(ready)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                done = 0
                while done < n:
                    b = min(args.batch, n - done)
                    loaded.model.encode_image(ready[:b]).float().cpu()
                    done += b
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return n / (time.perf_counter() - start)

        def end_to_end() -> float:
            start = time.perf_counter()
            run_models(str(layer), [loaded], options=RunOptions(batch_size=args.batch, workers=args.workers,
                                                               overwrite=True))
            return n / (time.perf_counter() - start)

        bare_rate = max(bare(), bare())
        e2e_rate = max(end_to_end(), end_to_end())
        where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"device {device} ({where}), "
              f"{args.arch} random weights, precision {str(amp).replace('torch.', '') if amp else 'fp32'}, "
              f"batch {args.batch}, {n} tiles of 256 px -> {size[0]} px")
        print(f"bare forward on ready tensors: {bare_rate:8.1f} tiles/s")
        print(f"end to end (read+preprocess+forward+write): {e2e_rate:8.1f} tiles/s")
        print(f"ratio end-to-end / bare: {e2e_rate / bare_rate:.2f}  (target >= 0.9 CPU, >= 0.8 CUDA bf16)")


if __name__ == "__main__":
    main()
