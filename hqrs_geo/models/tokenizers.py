"""Tokenizers for registry architectures, including configs that ship their own BPE file.

open_clip builds a :class:`~open_clip.tokenizer.SimpleTokenizer` from ``text_cfg.tokenizer_kwargs``
of an architecture's config. A config shipped with hqrs_geo may name its BPE merges file
relative to the config folder (the project's small demo model uses a reduced 16000-merge
vocabulary); this module resolves that path, so the tokenizer is found wherever the package
is installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from .registry import register_config_folders

CONFIG_FOLDER = Path(__file__).with_name("configs")


def bpe_path_for(arch: str) -> Path | None:
    """The BPE file a config names in ``tokenizer_kwargs.bpe_path``, resolved, or None."""
    import open_clip

    register_config_folders()
    config = open_clip.get_model_config(arch) or {}
    name = (config.get("text_cfg", {}).get("tokenizer_kwargs") or {}).get("bpe_path")
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute():
        path = CONFIG_FOLDER / name
    return path


def build_tokenizer(arch: str) -> Any:
    """The tokenizer of an open_clip architecture (config-local BPE files resolved)."""
    import open_clip

    register_config_folders()
    bpe = bpe_path_for(arch)
    if bpe is None:
        return open_clip.get_tokenizer(arch)
    if not bpe.is_file():
        raise InputError(f"{bpe}: BPE file of architecture {arch} is missing; reinstall hqrs_geo")
    context = open_clip.get_model_config(arch)["text_cfg"].get("context_length", 77)
    return open_clip.get_tokenizer(arch, bpe_path=str(bpe), context_length=context)
