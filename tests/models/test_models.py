"""Registry, checkpoint formats and strict loading, through the real open_clip code path."""
from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY_CLIP, TINY_COCA, build_tiny

from hqrs_geo.atomic import sha256_file
from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.models.checkpoints import cache_dir
from hqrs_geo.models.loader import load_model
from hqrs_geo.models.registry import REGISTRY, get_spec, list_models


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_registry_entries():
    names = {s.name for s in list_models()}
    assert {"hqrs-clip", "rs-coca", "remoteclip-rn50", "remoteclip-vit-b-32", "remoteclip-vit-l-14",
            "georsclip-vit-b-32", "skyclip-vit-b-32", "skyclip-vit-l-14", "openai-vit-b-32"} <= names
    assert REGISTRY["remoteclip-vit-l-14"].hf_file == "RemoteCLIP-ViT-L-14.pt"
    assert REGISTRY["georsclip-vit-b-32"].hf_file == "ckpt/RS5M_ViT-B-32.pt"
    assert REGISTRY["rs-coca"].kind == "coca" and REGISTRY["hqrs-clip"].quick_gelu
    assert len({s.key for s in list_models()}) == len(names)
    assert get_spec("hqrs-clip", checkpoint="/x/HQRS-CLIP-ViT-L-14.pt").arch == "ViT-L-14"
    assert get_spec("hqrs-clip", arch="ViT-B-16").arch == "ViT-B-16"
    assert get_spec("ViT-L-14", checkpoint="/x/mine.pt").name == "ViT-L-14:mine"
    with pytest.raises(OptionError, match="unknown model"):
        get_spec("not-a-model")


@pytest.mark.parametrize("fmt", ["plain", "wrapped", "safetensors", "torchscript"])
def test_checkpoint_formats_load_identically(tmp_path, fmt):
    reference, _, _ = build_tiny(TINY_CLIP, seed=3)
    state = reference.state_dict()
    path = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pt")
    if fmt == "plain":
        torch.save(state, path)
    elif fmt == "wrapped":  # what open_clip training writes: epoch, optimizer, DDP "module." prefixes
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        image, text = torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)
        traced = torch.jit.trace(reference, (image, text), check_trace=False, strict=False)
        torch.jit.save(traced, str(path))
    loaded = load_model(TINY_CLIP, checkpoint=str(path), device="cpu")
    assert _same_weights(loaded.model, reference)
    assert loaded.sha256 == sha256_file(path) and len(loaded.sha256) == 64
    assert loaded.preprocess["size"] == [64, 64] and loaded.embed_dim == 32
    assert not loaded.model.training


def test_pickled_checkpoint_needs_trust(tmp_path):
    reference, _, _ = build_tiny(TINY_CLIP, seed=4)
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": reference.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(InputError, match="trust_checkpoint"):
        load_model(TINY_CLIP, checkpoint=str(path), device="cpu")
    loaded = load_model(TINY_CLIP, checkpoint=str(path), device="cpu", trust_checkpoint=True)
    assert _same_weights(loaded.model, reference)


def test_wrong_architecture_is_reported(tiny_clip_checkpoint, tmp_path):
    with pytest.raises(InputError, match="does not .* architecture hqrs-test-tiny-coca"):
        load_model(TINY_COCA, checkpoint=str(tiny_clip_checkpoint), device="cpu")
    with pytest.raises(InputError, match=r"does not fit architecture ViT-B-32 .*arch"):
        load_model("ViT-B-32", checkpoint=str(tiny_clip_checkpoint), device="cpu")
    state = torch.load(tiny_clip_checkpoint, weights_only=True)
    del state["logit_scale"]
    state["extra.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(InputError, match=r"missing 1: logit_scale; unexpected 1: extra.weight"):
        load_model(TINY_CLIP, checkpoint=str(partial), device="cpu")
    loose = load_model(TINY_CLIP, checkpoint=str(partial), device="cpu", strict=False)
    assert loose.model is not None
    not_weights = tmp_path / "notes.pt"
    torch.save({"epoch": 1}, not_weights)
    with pytest.raises(InputError, match="no model weights"):
        load_model(TINY_CLIP, checkpoint=str(not_weights), device="cpu")


def test_missing_checkpoint_messages(tiny_clip_checkpoint):
    with pytest.raises(InputError) as err:
        load_model("remoteclip-vit-b-32", device="cpu")
    message = str(err.value)
    assert "RemoteCLIP-ViT-B-32.pt" in message and "chendelong/RemoteCLIP" in message
    assert str(cache_dir() / "RemoteCLIP-ViT-B-32.pt") in message and "\n" not in message
    with pytest.raises(InputError, match="MpGI authors' release.*hqrs-clip.pt"):
        load_model("hqrs-clip", device="cpu")
    with pytest.raises(InputError, match="checkpoint file not found"):
        load_model(TINY_CLIP, checkpoint="/nowhere/x.pt", device="cpu")


def test_registry_model_found_in_cache_folder(tiny_clip_checkpoint):
    from hqrs_geo.models.registry import ModelSpec, register

    spec = register(ModelSpec("tiny-test-clip", "clip", TINY_CLIP, "test entry", filename="tiny-test-clip.pt"))
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_clip_checkpoint, cache_dir() / "tiny-test-clip.pt")
        loaded = load_model("tiny-test-clip", device="cpu")
        assert loaded.checkpoint == str(cache_dir() / "tiny-test-clip.pt") and loaded.spec.key == "tiny_test_clip"
    finally:
        REGISTRY.pop(spec.name)
        (cache_dir() / "tiny-test-clip.pt").unlink(missing_ok=True)


def test_device_choice():
    from hqrs_geo.models.device import pick_device
    from hqrs_geo.models.precision import autocast_dtype

    assert pick_device("cpu").type == "cpu"
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(OptionError):
        pick_device("gpu0")
