"""Query vectors in a layer's embedding space: text, example tiles, image files.

The text (or image) encoder must be the model that made the layer's image embeddings: it is
read from the layer's run record (name, architecture, checkpoint, sha256) and loaded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..embeddings import embedding_keys
from ..errors import InputError, OptionError
from ..layers import read_runs

# Prompt ensemble for zero-shot classification (the model's own template comes first).
RS_TEMPLATES = (
    "a satellite image of {}.",
    "an aerial photograph of {}.",
    "a remote sensing image of {}.",
    "an aerial view of {}.",
    "{} seen from above.",
)


@dataclass
class EmbeddingSource:
    """Which model made embedding column ``emb_<key>`` of a layer, as its run record says."""

    key: str
    model: str
    arch: str
    checkpoint: Optional[str]
    sha256: Optional[str]
    template: str


def embedding_source(layer: str, frame, model: Optional[str] = None) -> EmbeddingSource:
    """The embedding set to search: the only one, or the one made by ``model`` (name or key).

    A model that did not make any of the layer's embeddings is refused.
    """
    keys = embedding_keys(frame)
    if not keys:
        raise InputError(f"{layer}: has no embeddings; run 'hqrs-geo embed {layer} --model NAME' first")
    tasks = {}
    for run in read_runs(layer):
        for task in run.get("params", {}).get("tasks", []):
            if str(task.get("field", "")).startswith("emb_"):
                tasks[task["field"][len("emb_"):]] = task
    if model is None:
        if len(keys) > 1:
            raise OptionError(f"{layer}: holds embeddings of several models ({', '.join(keys)}); choose one with --model")
        key = keys[0]
    else:
        wanted = {model, model.lower()}
        matches = [k for k in keys if k in wanted or tasks.get(k, {}).get("name") in wanted]
        if not matches:
            made_by = ", ".join(tasks[k]["name"] for k in keys if k in tasks) or ", ".join(keys)
            raise OptionError(
                f"{layer}: has no embeddings made by {model} (it has: {made_by}); vectors of different models are "
                f"not comparable: search with one of those, or run 'hqrs-geo embed {layer} --model {model}' first"
            )
        key = matches[0]
    task = tasks.get(key)
    if task is None:
        raise InputError(f"{layer}: no run record says which model made emb_{key}; embed the layer again")
    return EmbeddingSource(key=key, model=task["name"], arch=task["arch"], checkpoint=task.get("checkpoint"),
                           sha256=task.get("sha256"), template=task.get("template") or "{}")


def load_source_model(source: EmbeddingSource, checkpoint: Optional[str] = None, device: str = "cpu"):
    """Load the model of ``source``, checking that the weights are the ones that made the layer."""
    from ..models.loader import load_model
    from ..models.registry import REGISTRY

    path = checkpoint or source.checkpoint
    if path and not Path(path).is_file():
        if checkpoint is None:
            raise InputError(
                f"the layer's embeddings were made by {source.model} with checkpoint {path}, which is missing; "
                "pass --checkpoint PATH to that file"
            )
    name = source.model if source.model in REGISTRY else source.arch
    loaded = load_model(name, checkpoint=path, arch=source.arch, device=device)
    if source.sha256 and loaded.sha256 != source.sha256:
        raise InputError(
            f"{loaded.checkpoint}: sha256 {loaded.sha256[:12]}… differs from the checkpoint that embedded the layer "
            f"({source.sha256[:12]}…); use that checkpoint, or embed the layer again"
        )
    return loaded


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def apply_template(text: str, template: str) -> str:
    """Fill the model's prompt template, unless the text is already a sentence with ``{}`` filled."""
    return template.format(text) if "{}" in template else text


def text_vectors(loaded, texts: Sequence[str], templates: Sequence[str] = ("{}",)) -> np.ndarray:
    """One normalised vector per text: the mean over ``templates`` of the normalised text embeddings."""
    import torch

    prompts = [apply_template(t, tpl) for t in texts for tpl in templates]
    tokens = loaded.tokenizer(prompts).to(loaded.device)
    with torch.inference_mode():
        features = loaded.model.encode_text(tokens).float()
    per_prompt = normalise(features.cpu().numpy()).reshape(len(texts), len(templates), -1)
    return normalise(per_prompt.mean(axis=1))


def image_vectors(loaded, paths: Sequence[str]) -> np.ndarray:
    """Normalised image embeddings of image files (any format Pillow reads), preprocessed as tiles are."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..models.preprocess import BatchPreprocess

    preprocess = BatchPreprocess(loaded.preprocess, loaded.device)
    vectors = []
    for path in paths:
        try:
            image = np.array(Image.open(path).convert("RGB"))
        except (OSError, UnidentifiedImageError):
            raise InputError(f"{path}: cannot read as an image; give a PNG, JPEG or TIFF file") from None
        batch = torch.from_numpy(image).permute(2, 0, 1)[None].to(loaded.device)
        with torch.inference_mode():
            vectors.append(loaded.model.encode_image(preprocess(batch)).float().cpu().numpy()[0])
    return normalise(np.stack(vectors))


def combine(positives: np.ndarray, negatives: Optional[np.ndarray] = None, negative_weight: float = 0.5) -> np.ndarray:
    """Query from examples: mean of positives minus ``negative_weight`` x mean of negatives, normalised."""
    if len(positives) == 0:
        raise OptionError("give at least one positive example (tile id or image)")
    query = normalise(positives).mean(axis=0)
    if negatives is not None and len(negatives):
        query = query - negative_weight * normalise(negatives).mean(axis=0)
    return normalise(query[None])[0]
