"""The model engine on a CUDA GPU against the same job on the CPU (skipped without CUDA).

Run on a GPU machine: embeddings under bf16 autocast stay within cosine 0.99 of the CPU's fp32
ones, fp32 on the GPU (TF32 off) gives the CPU's captions, and the run record says which
precision and device were used. GeoParquet layers, so the check needs no GDAL vector driver."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLE_SCENE
from tiny_models import TINY_CLIP, TINY_COCA

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _job(tmp_path, name, device, precision, clip_ckpt, coca_ckpt):
    import hqrs_geo as hg
    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.models.decoding import DecodingConfig

    layer = tmp_path / f"{name}.parquet"
    return hg.run(str(EXAMPLE_SCENE), layer, embed_models=[TINY_CLIP], embed_checkpoints=[str(clip_ckpt)],
                  caption_model=TINY_COCA, caption_checkpoint=str(coca_ckpt), device=device,
                  decoding=DecodingConfig(method="greedy", max_length=12), tiling=hg.TileConfig(tile_size=125),
                  options=RunOptions(batch_size=16, precision=precision, workers=2)), layer


def test_cuda_engine_matches_the_cpu(tmp_path, tiny_clip_checkpoint, tiny_coca_checkpoint):
    import hqrs_geo as hg

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, _ = _job(tmp_path, "cpu", "cpu", "fp32", tiny_clip_checkpoint, tiny_coca_checkpoint)
    gpu32, _ = _job(tmp_path, "gpu32", "cuda", "fp32", tiny_clip_checkpoint, tiny_coca_checkpoint)
    bf16, layer = _job(tmp_path, "bf16", "cuda", "auto", tiny_clip_checkpoint, tiny_coca_checkpoint)
    key = hg.read_embeddings(cpu)[1]
    for frame, floor in ((gpu32, 0.99999), (bf16, 0.99)):
        vectors = hg.read_embeddings(frame)[1]
        cosine = np.sum(vectors * key, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(key, axis=1)
        assert cosine.min() >= floor
    assert list(gpu32.caption) == list(cpu.caption)
    assert np.mean(np.asarray(bf16.caption) == np.asarray(cpu.caption)) >= 0.5
    task = hg.read_runs(layer)[-1]["params"]["tasks"][0]
    assert hg.read_runs(layer)[-1]["params"]["device"].startswith("cuda")
    assert task["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
