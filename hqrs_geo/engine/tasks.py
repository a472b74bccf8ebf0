"""What the engine computes per batch of tiles: image embeddings and captions.

A task is called with a uint8 ``[B, 3, H, W]`` batch on the model's device (or a list of
``[3, H, W]`` images of different sizes) and returns one value per image: embedding BLOBs
(:class:`EmbedTask`) or caption texts (:class:`CaptionTask`). :class:`CaptionTask` is the one
caption path of the project: the batched engine, the MpGI pipeline and caption evaluation all
use it.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from ..layer.columns import CAPTION, CAPTION_MODEL, embedding_column, embedding_dim_column, embedding_model_column
from ..layer.columns import encode as encode_embeddings
from ..models.loader import LoadedModel
from ..models.precision import autocast_dtype, inference_context, precision_name
from ..models.preprocess import BatchPreprocess
from .options import RunOptions


def store_key(field: str, loaded: LoadedModel) -> str:
    """The resume-store key of a task: its field and its weights, so results of other weights
    saved under the same field (a retrained checkpoint at the same path, an updated shipped
    model) are never resumed into this run."""
    return f"{field}@{(loaded.sha256 or '')[:16]}"


class _Task:
    """What embedding and caption tasks share: the model, its preprocessing and precision."""

    field = ""

    def __init__(self, loaded: LoadedModel, options: RunOptions):
        self.loaded = loaded
        self.store_key = store_key(self.field, loaded)
        self.preprocess = BatchPreprocess(loaded.preprocess, loaded.device)
        self.amp = autocast_dtype(loaded.device, options.precision)

    def inputs(self, images: Any) -> Any:
        """Model input for a uint8 batch, or a list of images of different sizes."""
        import torch

        if isinstance(images, (list, tuple)):
            return torch.cat([self.preprocess(image[None].to(self.loaded.device)) for image in images])
        return self.preprocess(images)

    def describe(self) -> dict:
        """Run metadata of this task."""
        return {**self.loaded.describe(), "field": self.field, "precision": precision_name(self.amp)}


class EmbedTask(_Task):
    """L2-normalised image embeddings of one CLIP (or CoCa) model, stored as BLOBs."""

    def __init__(self, loaded: LoadedModel, options: RunOptions):
        self.field = embedding_column(loaded.spec.key)
        super().__init__(loaded, options)
        self.dtype = options.embedding_dtype

    def vectors(self, images: Any) -> np.ndarray:
        """Normalised float32 embeddings; non-finite outputs are refused (nothing is stored)."""
        import torch.nn.functional as F

        with inference_context(self.loaded.device, self.amp):
            features = self.loaded.model.encode_image(self.inputs(images))
        vectors = F.normalize(features.float(), dim=-1).cpu().numpy()
        if not np.isfinite(vectors).all():
            raise InputError(f"model {self.loaded.spec.name} ({self.loaded.checkpoint}) produced NaN or infinite "
                             "embeddings; its weights are corrupt or unusable at this precision: check the "
                             "checkpoint, or use fp32")
        return vectors

    def __call__(self, images: Any) -> list:
        """Embedding BLOBs (see :mod:`hqrs_geo.layer.columns`), one per image."""
        return encode_embeddings(self.vectors(images), self.dtype)

    def columns(self) -> dict[str, object]:
        """Constant columns written beside the embedding."""
        key = self.loaded.spec.key
        return {embedding_model_column(key): self.loaded.spec.name, embedding_dim_column(key): self.loaded.embed_dim}

    def describe(self) -> dict:
        """Run metadata of this task."""
        return {**super().describe(), "dtype": self.dtype}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_caption(text: str) -> str:
    """A caption without control characters (byte-level BPE can decode to any byte; a NUL would
    cut the text short in a GeoPackage and not in GeoParquet), tabs and newlines as spaces."""
    return _CONTROL.sub("", text.replace("\t", " ").replace("\n", " ")).strip()


class CaptionTask(_Task):
    """Captions from a CoCa model with the project's own cached decoder."""

    field = CAPTION

    def __init__(self, loaded: LoadedModel, options: RunOptions | None = None, decoding: Any = None):
        from ..models.decoding import DecodingConfig

        if loaded.kind != "coca":
            raise OptionError(f"model {loaded.spec.name} is a {loaded.kind} model; captions need a CoCa model",
                              option="model")
        super().__init__(loaded, options or RunOptions())
        self.decoding = (decoding or DecodingConfig()).validated()

    def __call__(self, images: Any) -> list:
        """Caption texts, one per image."""
        from ..models.decoding import generate_captions

        with inference_context(self.loaded.device, self.amp):
            texts = generate_captions(self.loaded.model, self.loaded.tokenizer, self.inputs(images), self.decoding)
        return [clean_caption(t) for t in texts]

    def columns(self) -> dict[str, object]:
        """Constant columns written beside the caption."""
        return {CAPTION_MODEL: self.loaded.spec.name}

    def describe(self) -> dict:
        """Run metadata of this task."""
        return {**super().describe(), "decoding": self.decoding.as_dict()}
