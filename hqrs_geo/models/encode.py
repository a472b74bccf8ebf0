"""Image and text encoders of a loaded model, as normalised numpy vectors.

Every place that turns text or images into embedding vectors outside the batched tile engine
(search queries, zero-shot classes, evaluation, training validation) goes through here, so
templates, preprocessing and normalisation are the same everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError, OptionError
from .preprocess import BatchPreprocess
from .prompts import ZERO_SHOT_TEMPLATES, apply_template, class_phrases, query_phrases
from .views import mean_view_features

#: Largest image (pixels) read for an image query or for training; bigger files are refused, never decoded.
MAX_IMAGE_PIXELS = 64_000_000


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def text_features(model: Any, tokenizer: Any, texts: Sequence[str], device: Any, batch: int = 256) -> np.ndarray:
    """Normalised text embeddings of ``texts`` (no template applied) from a raw open_clip model."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            tokens = tokenizer(list(texts[start:start + batch])).to(device)
            out.append(normalise(model.encode_text(tokens).float().cpu().numpy()))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def text_vectors(loaded: Any, texts: Sequence[str], templates: Sequence[str] = ("{}",)) -> np.ndarray:
    """One normalised vector per text: the mean over ``templates`` of the normalised text embeddings."""
    prompts = [apply_template(t, tpl) for t in texts for tpl in templates]
    per_prompt = text_features(loaded.model, loaded.tokenizer, prompts, loaded.device)
    return normalise(per_prompt.reshape(len(texts), len(templates), -1).mean(axis=1))


def ensemble_vectors(model: Any, tokenizer: Any, labels: Sequence[str], templates: Sequence[str], device: Any,
                     synonyms: bool = True) -> np.ndarray:
    """One normalised vector per label from a raw open_clip model: each phrase of the label
    (:func:`~hqrs_geo.models.prompts.class_phrases`: its name, then its synonyms) in every
    template, embedded and normalised; the mean per phrase, then the mean over the phrases,
    normalised (every phrase weighs the same)."""
    phrases = class_phrases(labels, synonyms)
    flat = [p for group in phrases for p in group]
    prompts = [apply_template(p, t) for p in flat for t in templates]
    per_prompt = text_features(model, tokenizer, prompts, device).reshape(len(flat), len(templates), -1)
    per_phrase = normalise(per_prompt.mean(axis=1))
    ends = np.cumsum([len(group) for group in phrases])
    return normalise(np.stack([per_phrase[end - len(group):end].mean(axis=0) for end, group in zip(ends, phrases)]))


def ensemble_templates(loaded: Any, templates: Sequence[str] | None = None) -> list[str]:
    """The templates of a prompt ensemble: ``templates`` when given, else the model's own
    template, then :data:`~hqrs_geo.models.prompts.ZERO_SHOT_TEMPLATES`."""
    if templates:
        return list(templates)
    own = [loaded.spec.template] if getattr(loaded, "spec", None) is not None else []
    return list(dict.fromkeys([*own, *ZERO_SHOT_TEMPLATES]))


def class_vectors(loaded: Any, labels: Sequence[str], templates: Sequence[str] | None = None,
                  synonyms: bool = True) -> np.ndarray:
    """One normalised vector per class label from the prompt ensemble
    (:func:`ensemble_templates`) and the class-name synonyms (:func:`ensemble_vectors`)."""
    return ensemble_vectors(loaded.model, loaded.tokenizer, labels, ensemble_templates(loaded, templates),
                            loaded.device, synonyms)


def query_vectors(loaded: Any, texts: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
    """One normalised vector per search text, worded as classes are: the text (plus its synonyms
    when it is a class name, :func:`~hqrs_geo.models.prompts.query_phrases`) in every template of
    the ensemble."""
    chosen = ensemble_templates(loaded, templates)
    vectors = []
    for text in texts:
        phrases = query_phrases(text)
        vectors.append(normalise(text_vectors(loaded, phrases, chosen).mean(axis=0)[None])[0])
    return np.stack(vectors)


class ImageUse(NamedTuple):
    """What an image file is read for: the words of its one-line errors."""

    purpose: str      # "too large for {purpose}"
    too_large: str    # what to do with a too large image
    missing: str      # the message of a file that is not there
    unreadable: str   # what to do with a file that is not an image


#: The uses of :func:`read_image`: query images (search, evaluation) and training images.
IMAGE_USES = {
    "query": ImageUse("a query", "crop the area of interest first", "image file not found; check the path",
                      "give a PNG, JPEG or TIFF file"),
    "training": ImageUse("training", "resize it or remove it from the dataset",
                         "image of the dataset not found; check the paths in the dataset file",
                         "remove it from the dataset"),
}


def read_image(path: str, size: int | None = None, use: str = "query") -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB, resized to ``size`` x ``size`` (bicubic) when
    given. Files declaring more than :data:`MAX_IMAGE_PIXELS` are refused before any pixel is
    decoded; every failure is a one-line :class:`~hqrs_geo.errors.InputError` worded for ``use``
    (a key of :data:`IMAGE_USES`)."""
    words = IMAGE_USES[use]
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InputError(f"{path}: image of {image.width} x {image.height} px is too large for "
                                 f"{words.purpose} (at most {MAX_IMAGE_PIXELS:,} px); {words.too_large}")
            rgb = image.convert("RGB")
            if size is not None:
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            return np.array(rgb)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: {words.missing}") from None
    except Image.DecompressionBombError:
        raise InputError(f"{path}: image is too large for {words.purpose}; {words.too_large}") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise InputError(f"{path}: cannot read this image ({reason}); {words.unreadable}") from None


def image_batch_vectors(loaded: Any, images: Any, views: int = 1) -> np.ndarray:
    """Normalised embeddings of a uint8 ``[B, 3, H, W]`` tensor, preprocessed as tiles are; with
    ``views`` > 1 the normalised mean over test-time views (:mod:`hqrs_geo.models.views`), as
    ``embed --views`` stores it."""
    import torch

    preprocess = BatchPreprocess(loaded.preprocess, loaded.device)
    with torch.inference_mode():
        features = mean_view_features(lambda view: loaded.model.encode_image(preprocess(view)),
                                      images.to(loaded.device), views)
        return normalise(features.cpu().numpy())


def image_vectors(loaded: Any, paths: Sequence[str], batch: int = 64, views: int = 1) -> np.ndarray:
    """Normalised image embeddings of image files (any size), preprocessed as tiles are; runs of
    consecutive images of one size are encoded together, up to ``batch`` at a time; ``views``:
    see :func:`image_batch_vectors`."""
    import torch

    if not paths:
        raise OptionError("give at least one image file")
    vectors: list[np.ndarray] = []
    run: list[Any] = []
    for path in paths:
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        if run and (image.shape != run[0].shape or len(run) == batch):
            vectors.append(image_batch_vectors(loaded, torch.stack(run), views))
            run = []
        run.append(image)
    vectors.append(image_batch_vectors(loaded, torch.stack(run), views))
    return np.concatenate(vectors)
