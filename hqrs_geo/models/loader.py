"""Building an open_clip model from a registry spec and loading its checkpoint strictly."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, OptionError
from .checkpoints import checkpoint_sha256, read_state_dict, resolve_checkpoint
from .device import pick_device
from .preprocess import preprocess_config
from .registry import REGISTRY, ModelSpec, get_spec, register_config_folders
from .tokenizers import build_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A ready model: the network (eval mode, on its device), tokenizer and provenance."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    preprocess: dict
    device: Any
    checkpoint: str | None = None
    sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``clip`` or ``coca``."""
        return self.spec.kind

    @property
    def embed_dim(self) -> int:
        """Dimension of the image/text embeddings."""
        proj = getattr(self.model, "text_projection", None)
        if proj is not None and hasattr(proj, "shape"):
            return int(proj.shape[-1])
        return int(self.model.visual.output_dim)

    def describe(self) -> dict:
        """Provenance recorded with every result."""
        return {
            "name": self.spec.name, "kind": self.spec.kind, "arch": self.spec.arch,
            "description": self.spec.description,
            "demo_model": bool(self.spec.bundled),
            "quick_gelu": self.spec.quick_gelu, "checkpoint": self.checkpoint, "sha256": self.sha256,
            "preprocess": self.preprocess, "template": self.spec.template, "embed_dim": self.embed_dim,
        }


class quiet_open_clip:
    """Silence open_clip's root-logger warnings inside the block ("No pretrained weights
    loaded… initialized randomly" is expected: our weights are loaded right after)."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def _check_keys(model, state: dict, path: Path, spec: ModelSpec, strict: bool) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if shapes:
        k = shapes[0]
        raise InputError(
            f"{path}: checkpoint does not fit architecture {spec.arch} ({len(shapes)} tensor(s) differ, e.g. "
            f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}); give the architecture it was "
            "trained with («arch»)"
        )
    if strict and (missing or unexpected):
        def names(keys):
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {names(unexpected)}")
        raise InputError(
            f"{path}: checkpoint does not match architecture {spec.arch} ({'; '.join(parts)}); "
            "give the architecture it was trained with («arch»)"
        )


def weights_sha256(name: str, checkpoint: str | None = None, arch: str | None = None,
                   download: bool = True) -> str:
    """sha256 of the weights :func:`load_model` would load for these arguments, without
    building the model (what a result cache keys on, so new weights invalidate it)."""
    register_config_folders()
    spec = get_spec(name, arch=arch, checkpoint=checkpoint)
    return checkpoint_sha256(resolve_checkpoint(spec, checkpoint, download=download))


def load_model(
    name: str,
    checkpoint: str | None = None,
    arch: str | None = None,
    device: str = "auto",
    trust_checkpoint: bool = False,
    strict: bool = True,
    download: bool = True,
) -> LoadedModel:
    """Build the model ``name`` (registry entry or open_clip architecture) and load its weights.

    Returns a :class:`LoadedModel` in eval mode on the chosen device, with the checkpoint's
    sha256 and the preprocessing it expects.
    """
    if arch or not (REGISTRY.get(name) or REGISTRY.get(str(name).lower())):
        register_config_folders()  # the shipped configs (hqrs-mini-*) and $HQRS_GEO_MODEL_CONFIGS
    spec = get_spec(name, arch=arch, checkpoint=checkpoint)
    path = resolve_checkpoint(spec, checkpoint, download=download)  # before the heavy imports: fails fast
    register_config_folders()
    import open_clip

    state = read_state_dict(path, trust=trust_checkpoint)
    with quiet_open_clip():
        model = open_clip.create_model(spec.arch, pretrained=None, force_quick_gelu=spec.quick_gelu)
    own_keys = set(model.state_dict())
    transient = {name for name, _ in model.named_buffers()} - own_keys  # e.g. attn_mask (TorchScript keeps it)
    state = {k: v for k, v in state.items() if k not in transient}
    _check_keys(model, state, path, spec, strict)
    model.load_state_dict(state, strict=strict)
    target = pick_device(device)
    model = model.to(target).eval()
    return LoadedModel(
        spec=spec, model=model, tokenizer=build_tokenizer(spec.arch), preprocess=preprocess_config(model),
        device=target, checkpoint=str(path), sha256=checkpoint_sha256(path),
    )


def load_models(names: Sequence[str], checkpoints: Sequence[str | None] = (), arches: Sequence[str | None] = (),
                device: str = "auto", trust: bool = False) -> list[LoadedModel]:
    """Load every model of ``names``, each with the checkpoint and architecture of the same
    position (fewer of those than models: the rest use the registry's; more: one-line OptionError)."""
    if len(checkpoints) > len(names) or len(arches) > len(names):
        raise OptionError("more checkpoints or architectures than models: give one per model, in order",
                          option="checkpoint")
    checkpoints = list(checkpoints) + [None] * (len(names) - len(checkpoints))
    arches = list(arches) + [None] * (len(names) - len(arches))
    return [load_model(n, checkpoint=c, arch=a, device=device, trust_checkpoint=trust)
            for n, c, a in zip(names, checkpoints, arches)]
