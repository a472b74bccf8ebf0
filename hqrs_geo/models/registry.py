"""The one place that knows every model: name -> architecture, weights, preprocessing, prompt.

Entries name an open_clip architecture and where the weights come from. Weights are never
bundled, except the project's own small demo models (``hqrs-mini-clip``, ``hqrs-mini-coca``,
trained on UC Merced, AID and EuroSAT by ``hqrs-geo finetune``), which ship inside the package and are the
defaults when no other model is configured. Other weights are resolved by
:mod:`hqrs_geo.models.checkpoints` from a local path, the cache folder, or the Hugging Face
hub when online.

Any open_clip architecture name (``ViT-L-14``, ``coca_ViT-B-32``…) is also accepted as a
custom model together with a checkpoint path.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from ..errors import OptionError
from .prompts import DEFAULT_TEMPLATE

Kind = Literal["clip", "coca"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build and load one model."""

    name: str
    kind: Kind
    arch: str
    description: str
    filename: str | None = None  # the checkpoint file users put in the cache folder
    hf_repo: str | None = None  # Hugging Face hub repository, when the weights are published there
    hf_file: str | None = None
    quick_gelu: bool = False  # OpenAI-initialised CLIPs trained with QuickGELU
    template: str = DEFAULT_TEMPLATE
    obtain: str = ""  # how a user gets the weights when they are not on the hub
    arch_from_filename: bool = False  # the authors' file names carry the architecture
    bundled: str | None = None  # file in hqrs_geo/models/weights (the shipped demo models)
    sha256: str | None = None  # when set, the resolved (downloaded or cached) file must have this sha256
    # text-image cosine scores: (at or below: no real match, at or above: a strong match), measured
    # (benchmarks/fewshot.py --calibrate); None: DEFAULT_SCORE_SCALE
    score_scale: tuple[float, float] | None = None
    # softmax scale of zero-shot class probabilities, fitted by NLL on the selection sets
    # (benchmarks/prompts.py --calibrate); None: the model's own logit scale
    zero_shot_scale: float | None = None

    @property
    def key(self) -> str:
        """Column-safe identifier (``remoteclip_vit_b_32``)."""
        return re.sub(r"[^0-9a-z]+", "_", self.name.lower()).strip("_")

    def as_dict(self) -> dict:
        """JSON-friendly form (run metadata, ``hqrs-geo models --json``)."""
        return asdict(self)


MINI_NOTE = ("small DEMO model trained by hqrs_geo on UC Merced captions and {sets} scene classes ({classes} "
             "classes, {gsd} aerial/satellite RGB); ships with the package, no download; not HQRS-CLIP/RS-CoCa")


def _entries() -> list[ModelSpec]:
    specs = [
        ModelSpec("hqrs-mini-clip", "clip", "hqrs-mini-clip", "hqrs-mini CLIP (ResNet 128 px): "
                  + MINI_NOTE.format(sets="AID and EuroSAT", classes=42, gsd="0.3-10 m"),
                  bundled="hqrs-mini-clip.safetensors", template="an aerial image of {}.", score_scale=(0.45, 0.66),
                  zero_shot_scale=14.6),
        ModelSpec("hqrs-mini-coca", "coca", "hqrs-mini-coca", "hqrs-mini CoCa (ViT 96 px): "
                  + MINI_NOTE.format(sets="AID", classes=40, gsd="0.3-8 m"),
                  bundled="hqrs-mini-coca.safetensors", template="an aerial image of {}."),
        ModelSpec(
            "hqrs-clip", "clip", "ViT-B-32",
            "HQRS-CLIP (MpGI): OpenAI-initialised CLIP fine-tuned on HQRS-IT-2.1M high-quality captions",
            filename="hqrs-clip.pt", quick_gelu=True, arch_from_filename=True,
            obtain="download the HQRS-CLIP checkpoint from the MpGI authors' release",
        ),
        ModelSpec(
            "rs-coca", "coca", "coca_ViT-L-14",
            "RS-CoCa (MpGI): CoCa fine-tuned on HQRS-IT-2.1M for remote-sensing captioning",
            filename="rs-coca.pt", arch_from_filename=True,
            obtain="download the RS-CoCa checkpoint from the MpGI authors' release",
        ),
        ModelSpec("openai-vit-b-32", "clip", "ViT-B-32", "OpenAI CLIP ViT-B/32 (baseline)",
                  filename="openai-ViT-B-32.safetensors", hf_repo="timm/vit_base_patch32_clip_224.openai",
                  hf_file="open_clip_model.safetensors", quick_gelu=True, template="a photo of {}."),
        ModelSpec("openai-vit-l-14", "clip", "ViT-L-14", "OpenAI CLIP ViT-L/14 (baseline)",
                  filename="openai-ViT-L-14.safetensors", hf_repo="timm/vit_large_patch14_clip_224.openai",
                  hf_file="open_clip_model.safetensors", quick_gelu=True, template="a photo of {}."),
    ]
    for arch in ("RN50", "ViT-B-32", "ViT-L-14"):
        specs.append(ModelSpec(
            f"remoteclip-{arch.lower()}", "clip", arch, f"RemoteCLIP {arch} (Liu et al., 2024)",
            filename=f"RemoteCLIP-{arch}.pt", hf_repo="chendelong/RemoteCLIP", hf_file=f"RemoteCLIP-{arch}.pt",
        ))
    for arch in ("ViT-B-32", "ViT-L-14", "ViT-H-14"):
        specs.append(ModelSpec(
            f"georsclip-{arch.lower()}", "clip", arch, f"GeoRSCLIP {arch} trained on RS5M (Zhang et al., 2024)",
            filename=f"RS5M_{arch}.pt", hf_repo="Zilun/GeoRSCLIP", hf_file=f"ckpt/RS5M_{arch}.pt", quick_gelu=True,
        ))
    for arch in ("ViT-B-32", "ViT-L-14"):
        specs.append(ModelSpec(
            f"skyclip-{arch.lower()}", "clip", arch, f"SkyCLIP {arch} trained on SkyScript (Wang et al., 2024)",
            filename=f"SkyCLIP-{arch}.pt", quick_gelu=True,
            obtain="download the SkyCLIP checkpoint from the SkyScript project's release",
        ))
    return specs


REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _entries()}

#: Score scale of models without a measured one: typical of CLIP ViT-B text-image cosines
#: (unrelated pairs about 0.1-0.2, matching captions about 0.25-0.35).
DEFAULT_SCORE_SCALE = (0.2, 0.3)


def score_scale(name: str | None) -> dict:
    """``{"none": a, "good": b}``: text-image cosine scores of model ``name`` at or below ``a``
    mean no real match, at or above ``b`` a strong one (the registry's measured calibration;
    :data:`DEFAULT_SCORE_SCALE` for models without one, custom models included)."""
    spec = REGISTRY.get(str(name)) or REGISTRY.get(str(name).lower()) if name else None
    none, good = (spec.score_scale if spec is not None and spec.score_scale else None) or DEFAULT_SCORE_SCALE
    return {"none": float(none), "good": float(good)}

DEFAULT_EMBED_ENV = "HQRS_GEO_EMBED_MODEL"
DEFAULT_CAPTION_ENV = "HQRS_GEO_CAPTION_MODEL"


def default_embed_model() -> str:
    """The embedding model used when none is named: ``$HQRS_GEO_EMBED_MODEL``, else the
    shipped demo model ``hqrs-mini-clip``."""
    return os.environ.get(DEFAULT_EMBED_ENV) or "hqrs-mini-clip"


def default_caption_model() -> str:
    """The caption model used when none is named: ``$HQRS_GEO_CAPTION_MODEL``, else the
    shipped demo model ``hqrs-mini-coca``."""
    return os.environ.get(DEFAULT_CAPTION_ENV) or "hqrs-mini-coca"


def register(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a registry entry; returns it."""
    REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """Every registry entry, in a stable order."""
    return list(REGISTRY.values())


CONFIG_ENV = "HQRS_GEO_MODEL_CONFIGS"
_registered_folders: set[str] = set()


def register_config_folders() -> None:
    """Register open_clip architecture configs (JSON) shipped with the package and from the
    folders in ``$HQRS_GEO_MODEL_CONFIGS`` (``os.pathsep``-separated), once per folder."""
    import open_clip

    folders = [Path(__file__).with_name("configs")]
    folders += [Path(p) for p in os.environ.get(CONFIG_ENV, "").split(os.pathsep) if p]
    for folder in folders:
        if folder.is_dir() and str(folder) not in _registered_folders:
            open_clip.add_model_config(folder)
            _registered_folders.add(str(folder))


def open_clip_arch(name: str) -> str | None:
    """The open_clip architecture called ``name`` (case and ``/`` insensitive), or None."""
    import open_clip

    register_config_folders()
    lowered = {m.lower(): m for m in open_clip.list_models()}
    return lowered.get(name.replace("/", "-").lower())


def arch_in_filename(filename: str) -> str | None:
    """The longest open_clip architecture name found in a checkpoint file name, if any."""
    import open_clip

    text = filename.replace("/", "-").replace("_", "-").lower()
    found = [m for m in open_clip.list_models() if m.lower() in text]
    return max(found, key=len) if found else None


def get_spec(name: str, arch: str | None = None, checkpoint: str | None = None) -> ModelSpec:
    """The spec for ``name``: a registry entry or an open_clip architecture (custom model).

    ``arch`` overrides the entry's architecture; for entries whose authors put the
    architecture in the file name, it is read from ``checkpoint`` when ``arch`` is not given.
    """
    spec = REGISTRY.get(name) or REGISTRY.get(name.lower())
    if spec is None:
        custom_arch = open_clip_arch(name)
        if custom_arch is None:
            known = ", ".join(REGISTRY)
            raise OptionError(
                f"unknown model {str(name)[:60]!r}; use one of {known}, or an open_clip architecture with a "
                "«checkpoint»", option="model"
            )
        kind: Kind = "coca" if "coca" in custom_arch.lower() else "clip"
        # the checkpoint's name is part of a custom model's name, so two checkpoints of one
        # architecture get distinct result columns
        label = f"{custom_arch}:{Path(str(checkpoint)).stem}" if checkpoint else custom_arch
        spec = ModelSpec(name=label, kind=kind, arch=custom_arch, description=f"custom {custom_arch}",
                         obtain="give its «checkpoint» file")
    if arch:
        resolved = open_clip_arch(arch)
        if resolved is None:
            raise OptionError(f"unknown architecture {str(arch)[:60]!r}; use an open_clip model name such as "
                              "ViT-L-14", option="arch")
        spec = replace(spec, arch=resolved)
    elif spec.arch_from_filename and checkpoint:
        from_file = arch_in_filename(str(checkpoint).rsplit("/", 1)[-1])
        if from_file:
            spec = replace(spec, arch=from_file)
    return spec
