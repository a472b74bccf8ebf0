"""The model engine on a CUDA GPU (skipped without CUDA; ``benchmarks/gpu.sh`` runs these).

Run on a GPU machine: embeddings under bf16 autocast stay within cosine 0.99 of the CPU's fp32
ones, fp32 on the GPU (TF32 off) gives the CPU's captions, and the run record says which
precision and device were used (GeoParquet layers, so the check needs no GDAL vector driver);
``auto`` precision follows the card; a batch that does not fit in GPU memory is halved until it
does, and every tile still gets its embedding; caption batches are sized by free GPU memory."""
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
    assert task["precision"] == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16")


def test_auto_precision_follows_the_card():
    """bf16 on cards that compute in it natively (compute capability 8.0, Ampere, and newer), fp16
    on older ones, where torch reports bf16 as supported but only emulates it."""
    from hqrs_geo.models.precision import autocast_dtype, precision_name

    device = torch.device("cuda")
    major = torch.cuda.get_device_capability(device)[0]
    assert autocast_dtype(device, "auto") == (torch.bfloat16 if major >= 8 else torch.float16)
    assert precision_name(autocast_dtype(device, "fp16")) == "fp16"
    assert precision_name(autocast_dtype(device, "bf16")) == "bf16"


def test_out_of_memory_halves_a_real_batch(tiny_clip_checkpoint):
    """A batch that does not fit the GPU memory (a per-process cap set just above what is in use)
    is split in halves until the pieces fit; every tile gets the embedding a small batch gives."""
    from tiny_models import TINY_CLIP

    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.run import run_batch
    from hqrs_geo.engine.tasks import EmbedTask
    from hqrs_geo.layer.columns import decode
    from hqrs_geo.models.loader import load_model

    class Rec:
        def __init__(self, i):
            self.tile_id = f"t{i}"

    loaded = load_model(TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cuda")
    task = EmbedTask(loaded, RunOptions(precision="fp32", embedding_dtype="float32"))
    count = 8192
    images = torch.randint(0, 256, (count, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = images.cuda()
    expected = np.concatenate([task.vectors(images[i:i + 256]) for i in range(0, count, 256)])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_reserved() + 96 * 2**20  # the batch's float input alone is 384 MiB
    torch.cuda.set_per_process_memory_fraction(cap / total)
    sizes: list[int] = []
    try:
        rows = run_batch([task], images, [Rec(i) for i in range(count)], sizes.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert sizes and min(sizes) < count // 2  # halved, more than once
    got = {tile_id: value for tile_id, _, value in rows}
    assert len(got) == count
    vectors = decode([got[f"t{i}"] for i in range(count)], loaded.embed_dim)
    assert (vectors * expected).sum(axis=1).min() >= 0.9999


def test_caption_batches_are_sized_by_free_gpu_memory(tiny_coca_checkpoint):
    """The caption task measures one image's decoding memory on its first batch and decodes in
    batches that fit; the captions are those of one batch."""
    from tiny_models import TINY_COCA

    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.tasks import CaptionTask
    from hqrs_geo.models.decoding_options import DecodingConfig
    from hqrs_geo.models.loader import load_model

    loaded = load_model(TINY_COCA, checkpoint=str(tiny_coca_checkpoint), device="cuda")
    task = CaptionTask(loaded, RunOptions(precision="fp32"), DecodingConfig(method="beam", num_beams=3, max_length=10))
    images = torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1)).cuda()
    whole = task.decode(images)
    assert task(images) == whole
    free = torch.cuda.mem_get_info()[0]
    assert isinstance(task.batch_limit, int) and task.batch_limit >= 1000  # a tiny model: thousands fit
    assert task.batch_limit * 2**20 <= free  # never more than one MiB an image beyond what is free
    task.batch_limit = 5
    assert task(images) == whole
