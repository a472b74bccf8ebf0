"""The shipped demo models (hqrs-mini-clip / hqrs-mini-coca): offline, default, and useful."""
from __future__ import annotations

import json
import re

import numpy as np

from conftest import EXAMPLE_SCENE, ROOT, run_cli

SAMPLES = ROOT / "tests" / "data" / "ucm_val_samples" / "dataset.json"  # one UCM val image per class
WEIGHTS = ROOT / "hqrs_geo" / "models" / "weights"


def test_shipped_weights_are_small_and_registered_as_defaults(monkeypatch):
    from hqrs_geo.models.registry import REGISTRY, default_caption_model, default_embed_model

    files = [WEIGHTS / "hqrs-mini-clip.safetensors", WEIGHTS / "hqrs-mini-coca.safetensors"]
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20  # the issue-17 budget: 40 MB in all
    monkeypatch.delenv("HQRS_GEO_EMBED_MODEL", raising=False)
    monkeypatch.delenv("HQRS_GEO_CAPTION_MODEL", raising=False)
    assert (default_embed_model(), default_caption_model()) == ("hqrs-mini-clip", "hqrs-mini-coca")
    for name in ("hqrs-mini-clip", "hqrs-mini-coca"):
        assert "DEMO" in REGISTRY[name].description and "not HQRS-CLIP" in REGISTRY[name].description
    monkeypatch.setenv("HQRS_GEO_EMBED_MODEL", "remoteclip-vit-b-32")
    assert default_embed_model() == "remoteclip-vit-b-32"

    import hashlib

    from hqrs_geo.models.loader import weights_sha256

    assert weights_sha256("hqrs-mini-coca") == hashlib.sha256(files[1].read_bytes()).hexdigest()


def test_mini_clip_loads_offline_and_matches_plain_open_clip():
    """Our loader + batched preprocessing vs open_clip's own factory, transform and forward."""
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from hqrs_geo.evaluation import image_embeddings
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.tokenizers import bpe_path_for

    loaded = load_model("hqrs-mini-clip", device="cpu")  # HF_HUB_OFFLINE=1 (conftest)
    assert loaded.tokenizer.vocab_size == 16514 and loaded.embed_dim == 256
    reference = open_clip.create_model("hqrs-mini-clip", pretrained=None)
    reference.load_state_dict({k: v.float() for k, v in load_file(str(WEIGHTS / "hqrs-mini-clip.safetensors")).items()})
    reference.eval()
    transform = open_clip.image_transform(reference.visual.image_size, is_train=False)
    tokenizer = open_clip.SimpleTokenizer(bpe_path=str(bpe_path_for("hqrs-mini-clip")), context_length=40)

    paths = [str(SAMPLES.parent / name) for name in ("airplane00.jpg", "river00.jpg")
             if (SAMPLES.parent / name).exists()] or [str(p) for p in sorted(SAMPLES.parent.glob("*.jpg"))[:2]]
    ours = image_embeddings(loaded, paths)
    with torch.no_grad():
        theirs = reference.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]),
                                        normalize=True).numpy()
        text_ref = reference.encode_text(tokenizer(["a river"]), normalize=True).numpy()
        text_ours = loaded.model.encode_text(loaded.tokenizer(["a river"]), normalize=True).numpy()
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.995
    assert np.allclose(text_ours, text_ref, atol=1e-5)


def test_mini_clip_zero_shot_on_held_out_ucm_images_beats_chance_widely():
    from hqrs_geo.evaluation import evaluate_zeroshot
    from hqrs_geo.models.loader import load_model

    metrics = evaluate_zeroshot(load_model("hqrs-mini-clip", device="cpu"), str(SAMPLES), "val")
    assert metrics["classes"] == 21
    # measured 76.2 % (16 of 21) with the shipped weights; chance is 4.8 %
    assert metrics["top1"] >= 60.0, metrics


def test_mini_coca_captions_mention_what_the_references_mention():
    from hqrs_geo.evaluation import load_karpathy
    from hqrs_geo.models.loader import load_model

    records = load_karpathy(str(SAMPLES), "val")
    loaded = load_model("hqrs-mini-coca", device="cpu")
    import torch
    from PIL import Image

    from hqrs_geo.models.decoding import DecodingConfig, generate_captions
    from hqrs_geo.models.preprocess import BatchPreprocess

    prep = BatchPreprocess(loaded.preprocess, "cpu")
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(r["image"]).convert("RGB"))).permute(2, 0, 1)
                          for r in records])
    with torch.inference_mode():
        captions = generate_captions(loaded.model, loaded.tokenizer, prep(pixels), DecodingConfig(method="greedy"))
    stop = {"a", "an", "the", "of", "is", "are", "there", "some", "and", "in", "with", "on", "many", "it", "lots",
            "this", "here", "to", "by", "two", "sides", "side", "next", "near", "which"}

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z]+", text.lower())) - stop

    hits = sum(bool(words(c) & set().union(*(words(r) for r in rec["captions"]))) for c, rec in zip(captions, records))
    assert all(c.strip() for c in captions)
    # measured with the shipped weights: 17 of 21 captions share a content word with their own
    # references (greedy); a random-weight CoCa shares none
    assert hits >= 12, list(zip(captions, [r["class"] for r in records]))


def test_embed_and_caption_use_the_shipped_models_by_default(tmp_path):
    """`hqrs-geo run` on the example scene with no model named: both columns, demo provenance."""
    layer = tmp_path / "tiles.gpkg"
    done = run_cli("run", str(EXAMPLE_SCENE), "-o", str(layer), "--tile-size", "256", "--quiet")
    assert done.returncode == 0, done.stderr
    from hqrs_geo import read_runs, read_tiles

    frame = read_tiles(layer)
    assert (frame["emb_hqrs_mini_clip_model"] == "hqrs-mini-clip").all()
    assert (frame["caption_model"] == "hqrs-mini-coca").all() and frame["caption"].str.len().min() > 0
    record = json.dumps(read_runs(layer))
    assert '"demo_model": true' in record and "small DEMO model" in record
