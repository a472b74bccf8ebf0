"""What the engine computes per batch of tiles: image embeddings and captions.

A task is called with a uint8 ``[B, 3, H, W]`` batch on the model's device (or a list of
``[3, H, W]`` images of different sizes) and returns one value per image: embedding BLOBs
(:class:`EmbedTask`) or caption texts (:class:`CaptionTask`). :class:`CaptionTask` is the one
caption path of the project: the batched engine, the MpGI pipeline and caption evaluation all
use it.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from ..layer.columns import CAPTION, CAPTION_MODEL, embedding_column, embedding_dim_column, embedding_model_column
from ..layer.columns import encode as encode_embeddings
from ..models.decoding_options import DecodingConfig
from ..models.loader import LoadedModel
from ..models.precision import autocast_dtype, inference_context, precision_name
from ..models.preprocess import BatchPreprocess
from ..models.views import mean_view_features
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
        self.views = options.views  # test-time views averaged per embedding (1: the tile as it is)
        if self.views > 1:  # another embedding: a run with other views never resumes into this one
            self.store_key += f"+views{self.views}"
        self.keep_tower_tokens = False  # set by share_image_tower: a caption task reuses the tokens
        self.tower_tokens: tuple[Any, Any] | None = None  # (the images, their image tower tokens)

    def vectors(self, images: Any) -> np.ndarray:
        """Normalised float32 embeddings; non-finite outputs are refused (nothing is stored)."""
        return self.launch_vectors(images)()

    def launch_vectors(self, images: Any) -> Callable[[], np.ndarray]:
        """Start the forward pass of ``images``; the returned call waits for it and gives
        :meth:`vectors`. On CUDA the result is copied to pinned host memory without waiting, so
        the next batch can be queued on the GPU while this one is finished on the host."""
        import torch
        import torch.nn.functional as F

        with inference_context(self.loaded.device, self.amp):
            if self.views > 1:
                features = mean_view_features(lambda view: self.loaded.model.encode_image(self.inputs(view)), images,
                                              self.views)
            elif self.keep_tower_tokens:  # a CoCa: the pooled embedding and the tokens captions attend to
                pooled, tokens = self.loaded.model._encode_image(self.inputs(images))
                self.tower_tokens = (images, tokens)
                features = F.normalize(pooled.float(), dim=-1)
            else:
                features = F.normalize(self.loaded.model.encode_image(self.inputs(images)).float(), dim=-1)
        if features.device.type == "cuda":
            host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            host.copy_(features, non_blocking=True)
            done = torch.cuda.Event()
            done.record()

            def finish() -> np.ndarray:
                done.synchronize()
                return self._checked(host.numpy())
            return finish
        vectors = self._checked(features.cpu().numpy())
        return lambda: vectors

    def _checked(self, vectors: np.ndarray) -> np.ndarray:
        if not np.isfinite(vectors).all():
            raise InputError(f"model {self.loaded.spec.name} ({self.loaded.checkpoint}) produced NaN or infinite "
                             "embeddings; its weights are corrupt or unusable at this precision: check the "
                             "checkpoint, or use fp32")
        return vectors

    def __call__(self, images: Any) -> list:
        """Embedding BLOBs (see :mod:`hqrs_geo.layer.columns`), one per image."""
        return self.launch(images)()

    def launch(self, images: Any) -> Callable[[], list]:
        """:meth:`__call__` in two steps: start the work now, get the BLOBs from the returned call."""
        finish = self.launch_vectors(images)
        return lambda: encode_embeddings(finish(), self.dtype)

    def columns(self) -> dict[str, object]:
        """Constant columns written beside the embedding."""
        key = self.loaded.spec.key
        return {embedding_model_column(key): self.loaded.spec.name, embedding_dim_column(key): self.loaded.embed_dim}

    def describe(self) -> dict:
        """Run metadata of this task."""
        return {**super().describe(), "dtype": self.dtype, "views": self.views}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_caption(text: str) -> str:
    """A caption without control characters (byte-level BPE can decode to any byte; a NUL would
    cut the text short in a GeoPackage and not in GeoParquet), tabs and newlines as spaces."""
    return _CONTROL.sub("", text.replace("\t", " ").replace("\n", " ")).strip()


#: Share of the free GPU memory that one caption batch's decoding may take.
MEMORY_SHARE = 0.8


def caption_batch_limit(free_bytes: int, peak_one: int, peak_two: int) -> int:
    """Images per decoder batch that fit :data:`MEMORY_SHARE` of ``free_bytes``, from the peak memory
    of decoding one image (``peak_one``) and two images (``peak_two``): the difference is one
    image's share, the rest is fixed. At least 1."""
    per_image = max(peak_two - peak_one, 1 << 20)
    fixed = max(peak_one - per_image, 0)
    return max(1, int((free_bytes * MEMORY_SHARE - fixed) // per_image))


class CaptionTask(_Task):
    """Captions from a CoCa model with the project's own cached decoder."""

    field = CAPTION

    def __init__(self, loaded: LoadedModel, options: RunOptions | None = None, decoding: Any = None):
        if loaded.kind != "coca":
            raise OptionError(f"model {loaded.spec.name} is a {loaded.kind} model; captions need a CoCa model",
                              option="model")
        super().__init__(loaded, options or RunOptions())
        self.decoding = (decoding or DecodingConfig()).validated()
        self.batch_limit: int | None = None  # measured on the first batch (see measure_batch_limit)
        self.candidate_limit: int | None = None  # the same for candidates()
        self.tower: EmbedTask | None = None  # the same model's embedding task (see share_image_tower)

    def decode(self, images: Any, image_embs: Any = None) -> list[str]:
        """Caption texts of ``images`` in one decoder batch (``image_embs``: their image tower
        tokens when already computed)."""
        from ..models.decoding import generate_captions

        with inference_context(self.loaded.device, self.amp):
            texts = generate_captions(self.loaded.model, self.loaded.tokenizer, self.inputs(images), self.decoding,
                                      image_embs=image_embs)
        return [clean_caption(t) for t in texts]

    def __call__(self, images: Any) -> list:
        """Caption texts, one per image; on CUDA decoded in batches that fit the free GPU memory.
        When the same model's embedding task has just encoded these images, its image tower
        tokens are used (the tower runs once per tile)."""
        tokens = None
        if self.tower is not None and self.tower.tower_tokens is not None:
            encoded, tokens = self.tower.tower_tokens
            self.tower.tower_tokens = None
            if encoded is not images:
                tokens = None
        if self.batch_limit is None:
            self.batch_limit = self.measure_batch_limit(images)
        step = max(1, self.batch_limit or len(images))
        return [text for start in range(0, len(images), step)
                for text in self.decode(images[start:start + step],
                                        None if tokens is None else tokens[start:start + step])]

    def candidates(self, images: Any) -> list[list[str]]:
        """Several distinct captions per image, the consensus pick first (see
        :func:`~hqrs_geo.models.decoding.caption_candidates`): the pool the consensus method decodes
        with this task's settings (beams, samples, sampling, seed; for a task of another method, at
        the consensus method's default temperature). With the consensus method the first of each
        list is the caption :meth:`__call__` gives."""
        from ..models.decoding import caption_candidates

        config = self.decoding
        if config.method != "consensus":  # the consensus pool with the consensus method's own temperature
            config = replace(config, method="consensus", temperature=None).validated()

        def decode(batch: Any) -> list[list[str]]:
            with inference_context(self.loaded.device, self.amp):
                ranked = caption_candidates(self.loaded.model, self.loaded.tokenizer, self.inputs(batch), config)
            return [list(dict.fromkeys(clean_caption(t) for t in texts)) for texts in ranked]

        if self.candidate_limit is None:  # the pool has more rows than one caption: its own limit
            self.candidate_limit = self.measure_batch_limit(images, decode)
        step = max(1, self.candidate_limit or len(images))
        return [texts for start in range(0, len(images), step) for texts in decode(images[start:start + step])]

    def measure_batch_limit(self, images: Any, decode: Callable[[Any], Any] | None = None) -> int:
        """How many images one decoder batch may hold: on CUDA, what ``MEMORY_SHARE`` of the free GPU
        memory holds, measured by decoding one and two of ``images`` with ``decode`` (default
        :meth:`decode`; the difference is one image's decoding state: cached keys/values, beams,
        logits); elsewhere no limit (0)."""
        import torch

        device = self.loaded.device
        if device.type != "cuda" or isinstance(images, (list, tuple)) or len(images) == 0:
            return 0
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - base  # + torch's cache
        peaks = []
        for count in (1, 2):
            torch.cuda.reset_peak_memory_stats(device)
            (decode or self.decode)(images[[0] * count])
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        return caption_batch_limit(free, peaks[0], peaks[1])

    def columns(self) -> dict[str, object]:
        """Constant columns written beside the caption."""
        return {CAPTION_MODEL: self.loaded.spec.name}

    def describe(self) -> dict:
        """Run metadata of this task."""
        return {**super().describe(), "decoding": self.decoding.as_dict()}


def share_image_tower(tasks: list) -> list:
    """Let a caption task use the image tower tokens of an embedding task of the same CoCa weights
    on the same device (run before it on each batch), so the tower runs once per tile for both
    results. Returns ``tasks`` (the embedding tasks come first, as the engines order them)."""
    captions = [t for t in tasks if isinstance(t, CaptionTask)]
    for caption in captions:
        for task in tasks[:tasks.index(caption)]:
            if isinstance(task, EmbedTask) and task.loaded.kind == "coca" and task.amp == caption.amp \
                    and task.views == 1 and same_weights(task.loaded, caption.loaded):
                task.keep_tower_tokens = True
                caption.tower = task
                break
    return tasks


def same_weights(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether two loaded models compute the same thing: one object, or the same architecture and
    checkpoint digest on the same device."""
    if a is b:
        return True
    return bool(a.sha256) and a.sha256 == b.sha256 and a.spec.arch == b.spec.arch and a.device == b.device \
        and a.preprocess == b.preprocess
