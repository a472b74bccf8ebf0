"""Caption decoding throughput: cached greedy decoder vs a full forward per token, in one run.

    python benchmarks/caption.py [--device auto|cpu|cuda] [--batch 32] [--tokens 30]
                                 [--arch coca_ViT-B-32]

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
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hqrs_geo.models.decoding import DecodingConfig, generate_tokens, naive_greedy_tokens  # noqa: E402


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def build_model(arch: str, device: torch.device) -> torch.nn.Module:
    """A random-weight CoCa in eval mode.

    open_clip leaves the decoder's ``text_projection`` uninitialised (``torch.empty``), which can
    hold NaN/inf garbage, so it is given the usual ``width ** -0.5`` normal init.
    """
    import open_clip

    torch.manual_seed(0)
    from hqrs_geo.models.registry import register_config_folders

    register_config_folders()  # the shipped configs (hqrs-mini-*) and $HQRS_GEO_MODEL_CONFIGS
    model = open_clip.create_model(arch, pretrained=None)
    proj = model.text_decoder.text_projection
    torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
    return model.to(device).eval()


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
    parser.add_argument("--arch", default="coca_ViT-B-32", help="an open_clip CoCa architecture name")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    model = build_model(args.arch, device)
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
    print(f"model: {args.arch}, random weights, {n_params:.1f} M parameters, images {size[0]}x{size[1]}")
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


if __name__ == "__main__":
    main()
