"""Batched inference over tile layers: parity with plain open_clip, storage, resume, CLI."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLE_SCENE, run_cli
from PIL import Image
from rasterio.windows import Window
from scale_helpers import write_crop
from tiny_models import TINY_CLIP

from hqrs_geo import TileConfig, TileDataset, read_runs, read_tiles
from hqrs_geo.api import embed, tile
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.engine.run import run_batch, run_models
from hqrs_geo.layer.columns import decode, embedding_keys, read_embeddings
from hqrs_geo.models.loader import load_model
from hqrs_geo.models.preprocess import BatchPreprocess


def reference_embeddings(loaded, layer):
    """Plain open_clip: its own PIL preprocessing, encode_image, L2 normalisation."""
    import open_clip

    preprocess = open_clip.image_transform(loaded.model.visual.image_size, is_train=False,
                                           mean=loaded.preprocess["mean"], std=loaded.preprocess["std"])
    ds = TileDataset.from_layer(layer)
    images = torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(ds[i][1]))) for i in range(len(ds))])
    with torch.no_grad():
        return [r.tile_id for r in ds.records], F.normalize(loaded.model.encode_image(images), dim=-1).numpy()


@pytest.mark.parametrize("tile_size", [64, 125])  # exactly the model size, and resized 125 -> 64
def test_embeddings_match_plain_open_clip(tmp_path, tiny_clip_checkpoint, tile_size):
    # a 500 px crop: 64 tiles of 64 px (the last row and column shifted inward), 16 of 125 px
    scene = write_crop(EXAMPLE_SCENE, tmp_path / "crop.tif", Window(250, 250, 500, 500), cog=False)
    layer = tmp_path / "t.gpkg"
    tile(scene, layer, TileConfig(tile_size=tile_size))
    loaded = load_model(TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu")
    frame = run_models(str(layer), [loaded], options=RunOptions(batch_size=7, workers=2, embedding_dtype="float32"))
    ids, expected = reference_embeddings(loaded, layer)
    frame = frame.set_index("tile_id").loc[ids].reset_index()
    present, got = read_embeddings(frame)
    assert present.all() and got.shape == expected.shape
    cosine = (got * expected).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_batch_preprocess_matches_pil_pipeline():
    import open_clip

    cfg = {"size": [64, 64], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
           "resize_mode": "shortest"}
    pil = open_clip.image_transform(64, is_train=False, mean=cfg["mean"], std=cfg["std"])
    import rasterio

    with rasterio.open(EXAMPLE_SCENE) as src:
        scene = np.moveaxis(src.read(), 0, -1)
    for h, w in ((64, 64), (125, 125), (100, 140), (200, 90), (256, 256)):
        img = np.ascontiguousarray(scene[300:300 + h, 200:200 + w])
        ref = pil(Image.fromarray(img))
        for uint8_resize in (True, False):  # the CPU's uint8 kernel, and the float path other devices take
            prep = BatchPreprocess(cfg, torch.device("cpu"))
            prep.uint8_resize = uint8_resize
            ours = prep(torch.from_numpy(img).permute(2, 0, 1)[None])[0]
            assert ours.shape == ref.shape == (3, 64, 64) and ours.is_contiguous()
            grey_levels = (ours - ref).abs().mul(torch.tensor(cfg["std"]).view(3, 1, 1) * 255)
            if (h, w) == (64, 64):
                assert grey_levels.max() < 1e-3  # no resize: identical
            if uint8_resize:  # the fixed-point kernel PIL-SIMD uses: a level or two off, rarely
                assert grey_levels.mean() < 0.05 and grey_levels.max() <= 2.001, (h, w, grey_levels.max())
            else:  # PIL's and torch's float kernels differ by rounding, rarely by a few levels
                assert grey_levels.mean() < 0.5 and grey_levels.max() <= 8, (h, w, grey_levels.mean())


def test_storage_round_trip_and_two_models(tmp_path, example_layer, tiny_clip_checkpoint):
    from tiny_models import build_tiny

    other, _, _ = build_tiny(TINY_CLIP, seed=7)
    other_ckpt = tmp_path / "other_clip.pt"
    torch.save(other.state_dict(), other_ckpt)
    embed(example_layer, model=[TINY_CLIP, TINY_CLIP], checkpoint=[str(tiny_clip_checkpoint), str(other_ckpt)],
          device="cpu", options=RunOptions(batch_size=16, workers=0))
    frame = read_tiles(example_layer)
    keys = sorted(embedding_keys(frame))
    assert keys == ["hqrs_test_tiny_clip_other_clip", "hqrs_test_tiny_clip_tiny_clip"]
    assert set(frame["emb_hqrs_test_tiny_clip_tiny_clip_model"]) == {"hqrs-test-tiny-clip:tiny_clip"}
    assert set(frame["emb_hqrs_test_tiny_clip_tiny_clip_dim"]) == {32}
    with pytest.raises(Exception, match="name the model"):
        read_embeddings(frame)
    _, a = read_embeddings(frame, keys[0])
    _, b = read_embeddings(frame, keys[1])
    assert not np.allclose(a, b)
    # GeoPackage BLOBs hold exactly 32 little-endian float16 values
    with sqlite3.connect(example_layer) as db:
        blob, kind = db.execute(f"SELECT emb_{keys[1]}, typeof(emb_{keys[1]}) FROM tiles LIMIT 1").fetchone()
    assert kind == "blob" and len(blob) == 64
    assert np.array_equal(np.frombuffer(blob, "<f2").astype(np.float32), decode([blob], 32)[0])
    run_record = read_runs(example_layer)[-1]
    task = run_record["params"]["tasks"][0]
    assert run_record["command"] == "embed" and len(task["sha256"]) == 64 and task["dtype"] == "float16"
    assert task["preprocess"]["size"] == [64, 64]
    # GeoParquet: a fixed-size list column with the same values
    import pyarrow.parquet as pq

    from hqrs_geo.layer.io import write_tiles

    write_tiles(tmp_path / "t.parquet", frame)
    schema = pq.read_schema(tmp_path / "t.parquet")
    field_type = schema.field(f"emb_{keys[1]}").type
    assert field_type.list_size == 32 and str(field_type.value_type) == "halffloat"
    _, again = read_embeddings(read_tiles(tmp_path / "t.parquet"), keys[1])
    assert np.array_equal(again, b)


class Interrupt(Exception):
    pass


class StopAfter:
    """A progress sink that interrupts the run after ``n`` batches (like Ctrl-C would)."""

    mode = "none"

    def __init__(self, batches: int):
        self.batches, self.calls, self.skipped = batches, 0, None

    def start(self, stage, total, message=""):
        self.total = total

    def advance(self, n=1):
        if self.skipped is None:
            self.skipped = n
            return
        self.calls += 1
        if self.calls >= self.batches:
            raise KeyboardInterrupt

    def message(self, text):
        pass


def test_interrupted_run_resumes_without_losing_or_repeating(example_layer, tiny_clip_checkpoint):
    loaded = load_model(TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu")
    before = example_layer.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        run_models(str(example_layer), [loaded], options=RunOptions(batch_size=10, workers=0), progress=StopAfter(2))
    assert example_layer.read_bytes() == before  # the layer is untouched
    partial = example_layer.with_name(example_layer.name + ".hqrs-partial.sqlite")
    with sqlite3.connect(partial) as db:
        assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 20
    resumed = StopAfter(10**6)
    frame = run_models(str(example_layer), [loaded], options=RunOptions(batch_size=10, workers=0), progress=resumed)
    assert resumed.skipped == 20 and resumed.calls == 5  # 44 remaining tiles in 5 batches
    assert not partial.exists()
    fresh = run_models(str(example_layer), [loaded], options=RunOptions(batch_size=64, workers=0, overwrite=True))
    a = read_embeddings(frame)[1]
    b = read_embeddings(fresh)[1]
    assert len(frame) == 64 and np.array_equal(a, b)
    skip_all = StopAfter(10**6)
    run_models(str(example_layer), [loaded], options=RunOptions(workers=0), progress=skip_all)
    assert skip_all.skipped == 64 and skip_all.calls == 0


def test_new_weights_at_the_same_path_recompute_every_tile(example_layer, tiny_clip_checkpoint, tmp_path):
    """A checkpoint retrained into the same file (or an updated shipped model) keeps the
    column name; its results must replace the old ones, never be mixed with them."""
    import shutil

    path = tmp_path / "retrained.pt"
    shutil.copy(tiny_clip_checkpoint, path)
    old = load_model(TINY_CLIP, checkpoint=str(path), device="cpu")
    # an interrupted run of the old weights leaves 20 results in the partial store
    with pytest.raises(KeyboardInterrupt):
        run_models(str(example_layer), [old], options=RunOptions(batch_size=10, workers=0), progress=StopAfter(2))
    run_models(str(example_layer), [old], options=RunOptions(batch_size=32, workers=0))

    state = torch.load(tiny_clip_checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                for k, v in state.items()}, path)
    new = load_model(TINY_CLIP, checkpoint=str(path), device="cpu")
    assert new.sha256 != old.sha256 and new.spec.key == old.spec.key
    with pytest.raises(KeyboardInterrupt):  # partial results of the new weights, beside none of the old
        run_models(str(example_layer), [new], options=RunOptions(batch_size=10, workers=0), progress=StopAfter(1))
    messages = []
    sink = StopAfter(10**6)
    sink.message = messages.append
    frame = run_models(str(example_layer), [new], options=RunOptions(batch_size=10, workers=0), progress=sink)
    assert sink.skipped == 10 and sink.calls == 6  # only the new weights' 10 results were resumed
    assert any("other weights" in m for m in messages)
    ids, expected = reference_embeddings(new, example_layer)
    got = read_embeddings(frame.set_index("tile_id").loc[ids].reset_index())[1]
    assert (got * expected).sum(axis=1).min() > 0.999  # every tile is the new model's
    assert read_runs(example_layer)[-1]["params"]["tasks"][0]["sha256"] == new.sha256


def test_out_of_memory_halves_the_batch(tmp_path):
    from hqrs_geo.engine.store import ResumeStore, partial_path

    class PickyTask:  # stands in for a model whose batches above 3 tiles exhaust GPU memory
        field = store_key = "value"

        def __call__(self, images):
            if len(images) > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return [int(x) for x in images]

    class Rec:
        def __init__(self, i):
            self.tile_id = f"t{i}"

    store = ResumeStore(partial_path(tmp_path / "x.gpkg"))
    sizes = []
    store.put(run_batch([PickyTask()], torch.arange(13), [Rec(i) for i in range(13)], sizes.append))
    assert store.load("value") == {f"t{i}": i for i in range(13)}
    assert sizes and max(sizes) <= 6


def test_cli_embed_run_and_errors(tmp_path):
    """One embedding run of a scene (tiled on the way) with no model named: the shipped demo model.
    (``embed --model NAME --checkpoint FILE`` on the command line: the fault suite's kill tests.)"""
    out = tmp_path / "run.gpkg"
    result = run_cli("embed", EXAMPLE_SCENE, "-o", out, "--tile-size", "250", "--device", "cpu", "--progress", "json",
                     "--workers", "1")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"tile", "embed", "done"} <= {e["stage"] for e in events}
    frame = read_tiles(out)
    assert len(frame) == 16 and read_embeddings(frame)[0].all()
    assert (frame["emb_hqrs_mini_clip_model"] == "hqrs-mini-clip").all()
    viewed = run_cli("embed", out, "--device", "cpu", "--views", "8", "--overwrite", "--workers", "0", "--quiet")
    assert viewed.returncode == 0, viewed.stderr
    assert read_runs(str(out))[-1]["params"]["tasks"][0]["views"] == 8
    bad = run_cli("embed", out, "--views", "3")
    assert bad.returncode == 2 and "invalid choice: 3" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("embed", out, "--model", "remoteclip-vit-b-32", "--device", "cpu")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "RemoteCLIP-ViT-B-32.pt" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    listing = run_cli("models", "--json")
    rows = {m["name"]: m for m in json.loads(listing.stdout)}
    assert listing.returncode == 0 and "rs-coca" in rows and not rows["rs-coca"]["present"]
    assert rows["hqrs-mini-clip"]["default"] and rows["hqrs-mini-clip"]["present"]


def test_auto_device_and_precision(example_layer, tiny_clip_checkpoint):
    """On a CUDA machine this runs the CUDA path (bf16/fp16 autocast, pinned memory); on CPU, fp32."""
    loaded = load_model(TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="auto")
    frame = run_models(str(example_layer), [loaded],
                       options=RunOptions(batch_size=16, workers=1, embedding_dtype="float32"))
    task = read_runs(example_layer)[-1]["params"]["tasks"][0]
    assert task["precision"] == ("fp32" if loaded.device.type == "cpu" else task["precision"])
    assert read_runs(example_layer)[-1]["params"]["device"].startswith(loaded.device.type)
    cpu = load_model(TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu")
    ids, expected = reference_embeddings(cpu, example_layer)
    got = read_embeddings(frame.set_index("tile_id").loc[ids].reset_index())[1]
    tolerance = 0.9999 if loaded.device.type == "cpu" else 0.99  # bf16 autocast on GPUs
    assert (got * expected).sum(axis=1).min() >= tolerance


def test_captions_match_direct_decoding(tmp_path, tiny_coca_checkpoint):
    import open_clip
    from tiny_models import TINY_COCA

    from hqrs_geo.models.decoding import DecodingConfig, generate_captions

    scene = write_crop(EXAMPLE_SCENE, tmp_path / "crop.tif", Window(300, 200, 256, 256), cog=False)
    layer = tmp_path / "c.gpkg"
    tile(scene, layer, TileConfig(tile_size=64))  # 16 tiles: batches of 5, 5, 5 and 1
    loaded = load_model(TINY_COCA, checkpoint=str(tiny_coca_checkpoint), device="cpu")
    config = DecodingConfig(method="greedy", min_length=3, max_length=12)
    frame = run_models(str(layer), captioner=loaded, decoding=config, options=RunOptions(batch_size=5, workers=0),
                       command="caption")
    preprocess = open_clip.image_transform(64, is_train=False, mean=loaded.preprocess["mean"],
                                           std=loaded.preprocess["std"])
    ds = TileDataset.from_layer(layer)
    assert len(ds) == len(frame) == 16
    images = torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(ds[i][1]))) for i in range(len(ds))])
    with torch.inference_mode():
        expected = generate_captions(loaded.model, loaded.tokenizer, images, config)
    got = frame.set_index("tile_id").loc[[r.tile_id for r in ds.records], "caption"].tolist()
    assert got == expected and all(len(c) > 0 for c in got)
    assert "<end_of_text>" not in " ".join(got) and "<start_of_text>" not in " ".join(got)
    assert set(frame["caption_model"]) == {loaded.spec.name}
    record = read_runs(layer)[-1]
    assert record["command"] == "caption" and record["params"]["tasks"][0]["decoding"]["method"] == "greedy"


def test_caption_batches_follow_the_memory_limit(tiny_coca_checkpoint):
    """Captions decoded in batches of a (measured, here imposed) limit equal one batch's; the limit
    is what the free memory holds after the fixed share, at least 1."""
    from tiny_models import TINY_COCA

    from hqrs_geo.engine.tasks import MEMORY_SHARE, CaptionTask, caption_batch_limit
    from hqrs_geo.models.decoding_options import DecodingConfig

    mib = 1 << 20
    assert caption_batch_limit(int(1000 * mib / MEMORY_SHARE), 110 * mib, 120 * mib) == 90  # (1000 - 100) / 10
    assert caption_batch_limit(10 * mib, 500 * mib, 900 * mib) == 1  # nothing fits: one at a time, never 0
    assert caption_batch_limit(10**12, 100, 100) == int(10**12 * MEMORY_SHARE) // mib  # at least 1 MiB an image
    loaded = load_model(TINY_COCA, checkpoint=str(tiny_coca_checkpoint), device="cpu")
    ds = TileDataset.from_rasters(EXAMPLE_SCENE, TileConfig(tile_size=125))
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(ds[i][1])).permute(2, 0, 1) for i in range(7)])
    task = CaptionTask(loaded, RunOptions(), DecodingConfig(method="greedy", max_length=10))
    assert task.measure_batch_limit(images) == 0  # no limit off CUDA
    whole = task.decode(images)
    task.batch_limit = 3  # batches of 3, 3 and 1
    assert task(images) == whole and len(whole) == 7


def test_one_coca_embeds_and_captions_with_one_pass_of_its_image_tower(tiny_coca_checkpoint):
    """The same CoCa as embedding and caption model: its image tower runs once per batch, and both
    results are those of the tasks run apart (also for halves of a batch and decoder batches)."""
    from tiny_models import TINY_COCA

    from hqrs_geo.engine.run import make_tasks
    from hqrs_geo.engine.tasks import CaptionTask, EmbedTask
    from hqrs_geo.models.decoding_options import DecodingConfig

    loaded = load_model(TINY_COCA, checkpoint=str(tiny_coca_checkpoint), device="cpu")
    other = load_model(TINY_COCA, checkpoint=str(tiny_coca_checkpoint), device="cpu")  # same file, loaded again
    ds = TileDataset.from_rasters(EXAMPLE_SCENE, TileConfig(tile_size=125))
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(ds[i][1])).permute(2, 0, 1) for i in range(6)])
    records = ds.records[:6]
    config = DecodingConfig(method="beam", num_beams=2, max_length=8)
    options = RunOptions(embedding_dtype="float32")
    alone = {EmbedTask(loaded, options).store_key: EmbedTask(loaded, options)(images),
             "caption": CaptionTask(loaded, options, config)(images)}
    passes = []
    loaded.model.visual.register_forward_hook(lambda *_: passes.append(1))
    for embedder in (loaded, other):
        tasks = make_tasks([embedder], loaded, config, options)
        assert tasks[1].tower is tasks[0]
        tasks[1].batch_limit = 4  # decoder batches of 4 and 2 from the shared tokens
        passes.clear()
        rows = run_batch(tasks, images, records)
        assert len(passes) == (1 if embedder is loaded else 0)  # `other`'s tower ran instead of loaded's
        got: dict[str, list] = {}
        for _, key, value in rows:
            got.setdefault(key.split("@")[0] if key.startswith("caption") else key, []).append(value)
        key = tasks[0].store_key
        assert got["caption"] == alone["caption"]
        assert np.allclose(decode(got[key], loaded.embed_dim), decode(alone[key], loaded.embed_dim), atol=1e-6)
    assert make_tasks([], loaded, config, options)[0].tower is None


def test_cli_run_tiles_embeds_and_captions_in_one_pass(tmp_path, tiny_clip_checkpoint, tiny_coca_checkpoint):
    from tiny_models import TINY_COCA

    out = tmp_path / "all.parquet"
    result = run_cli("run", EXAMPLE_SCENE, "-o", out, "--tile-size", "250", "--embed-model", TINY_CLIP,
                     "--embed-checkpoint", tiny_clip_checkpoint, "--caption-model", TINY_COCA,
                     "--caption-checkpoint", tiny_coca_checkpoint, "--decoding", "beam", "--beams", "2",
                     "--max-length", "8", "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr
    frame = read_tiles(out)
    assert len(frame) == 16 and frame["caption"].map(lambda c: isinstance(c, str) and len(c) > 0).all()
    assert read_embeddings(frame)[0].all()
    tasks = read_runs(out)[-1]["params"]["tasks"]
    assert [t["field"] for t in tasks] == ["emb_hqrs_test_tiny_clip_tiny_clip", "caption"]
    wrong = run_cli("caption", out, "--model", TINY_CLIP, "--checkpoint", tiny_clip_checkpoint, "--device", "cpu")
    assert wrong.returncode == 2 and "captions need a CoCa model" in wrong.stderr


def test_test_time_views_average_what_plain_open_clip_gives_for_each_view(tmp_path, tiny_clip_checkpoint):
    """``views=16``: each stored embedding is the normalised mean of plain open_clip's normalised
    embeddings of the 8 rotations/flips of the tile and of its central 3/4 crop (computed here
    with PIL, independently of hqrs_geo.models.views)."""
    import open_clip

    from hqrs_geo.errors import OptionError
    from hqrs_geo.models.views import image_views

    scene = write_crop(EXAMPLE_SCENE, tmp_path / "crop.tif", Window(250, 250, 256, 256), cog=False)
    layer = tmp_path / "t.gpkg"
    tile(scene, layer, TileConfig(tile_size=128))
    loaded = load_model(TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu")
    frame = run_models(str(layer), [loaded], options=RunOptions(batch_size=3, workers=0, embedding_dtype="float32",
                                                               views=16))
    preprocess = open_clip.image_transform(loaded.model.visual.image_size, is_train=False,
                                           mean=loaded.preprocess["mean"], std=loaded.preprocess["std"])
    ds = TileDataset.from_layer(layer)
    expected = []
    for i in range(len(ds)):
        full = Image.fromarray(np.ascontiguousarray(ds[i][1]))
        side = full.width
        crop = full.crop((16, 16, 16 + round(side * 0.75), 16 + round(side * 0.75)))  # (128 - 96) / 2 = 16
        views = [image.rotate(90 * k, expand=True).transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip
                 else image.rotate(90 * k, expand=True) for image in (full, crop) for k in range(4) for flip in (0, 1)]
        with torch.no_grad():
            features = F.normalize(loaded.model.encode_image(torch.stack([preprocess(v) for v in views])), dim=-1)
        expected.append(F.normalize(features.sum(0), dim=-1).numpy())
    frame = frame.set_index("tile_id").loc[[r.tile_id for r in ds.records]].reset_index()
    present, got = read_embeddings(frame)
    assert present.all() and len(got) == 4
    cosine = (got * np.stack(expected)).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine
    single = run_models(str(layer), [loaded], options=RunOptions(embedding_dtype="float32", overwrite=True))
    assert ((read_embeddings(single)[1] * got).sum(axis=1) < 0.99999).any()  # views change the embedding
    assert read_runs(str(layer))[-2]["params"]["tasks"][0]["views"] == 16
    batch = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    assert [len(image_views(batch, n)) for n in (1, 8, 16)] == [1, 8, 16]
    assert image_views(batch, 16)[8].shape[-1] == 6  # the central 3/4
    mixed = image_views([torch.zeros((3, 8, 8), dtype=torch.uint8), torch.zeros((3, 12, 12), dtype=torch.uint8)], 16)
    assert [tuple(x.shape) for x in mixed[9]] == [(3, 6, 6), (3, 9, 9)]  # tiles of two sizes: a list per view
    with pytest.raises(OptionError, match="invalid view count 3: use 1, 8, 16"):
        RunOptions(views=3).validated()
