"""Tiny open_clip CLIP and CoCa architectures for tests (random weights, real code paths).

The configs are registered with open_clip under real architecture names, exactly as a user's
custom architecture would be, and checkpoints are saved to files and loaded back by the same
code path a downloaded checkpoint takes.
"""
from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = "hqrs-test-tiny-clip"
TINY_COCA = "hqrs-test-tiny-coca"

CONFIGS = {
    TINY_CLIP: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    TINY_COCA: {
        "embed_dim": 64,  # CoCa's image tokens feed the decoder's cross-attention: same width
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                       "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                           "attn_pooler_heads": 2},
        "custom_text": True,
    },
}


def register_tiny_configs(folder: Path) -> None:
    """Write the tiny configs as JSON files and register them with open_clip."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)


def build_tiny(name: str, seed: int = 0):
    """A freshly initialised tiny model (eval mode) with its preprocessing and tokenizer."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:  # open_clip leaves the decoder's output projection uninitialised
        torch.nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)
