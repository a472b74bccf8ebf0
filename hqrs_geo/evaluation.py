"""Standard evaluations of CLIP-style models on image-caption data (Karpathy-style JSON).

* retrieval: image->text and text->image Recall@1/5/10 and their mean (mR), the protocol of
  the RemoteCLIP / GeoRSCLIP / HQRS retrieval tables: an image query succeeds when any of its
  captions is in the top K; a caption query when its image is.
* zero-shot: top-1 / top-5 accuracy over the dataset's classes, each class embedded as the
  mean of a prompt-template ensemble.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .engine.tasks import CaptionTask
from .errors import InputError, OptionError
from .models.encode import class_vectors, image_vectors, read_image, text_vectors
from .models.views import check_views
from .safe_paths import inside

KS = (1, 5, 10)


def load_karpathy(path: str, split: str | None = "val", limit: int | None = None) -> list[dict]:
    """Records ``{"image": path, "class": str|None, "captions": [str]}`` of one split.

    Relative image file names are taken relative to the JSON's folder and must stay inside it
    (:func:`hqrs_geo.safe_paths.inside`); absolute ones are used as they are (the rule of an
    open_clip CSV); a malformed file is refused in one line.
    """
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{path}: is a folder; give the dataset's .json file")
    usage = "needs images[].filename, split and sentences[].raw"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; check the path") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{path}: not valid JSON; give a Karpathy-style dataset ({usage})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc}); check the file") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"{path}: not a Karpathy-style dataset: 'images' must be a list ({usage})")
    records = []
    for number, item in enumerate(images):
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
            raise InputError(f"{path}: images[{number}] is not an object with a filename ({usage})")
        if split and item.get("split") != split:
            continue
        sentences = item.get("sentences", [])
        label = item.get("class")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences) \
                or not all(isinstance(s.get("raw", ""), str) for s in sentences) \
                or not (label is None or isinstance(label, (str, int))):
            raise InputError(f"{path}: images[{number}] has malformed sentences or class ({usage})")
        records.append({
            "image": str(inside(file.parent, item["filename"], "image file name", allow_absolute=True)),
            "class": None if label is None else str(label),
            "captions": [s["raw"].strip() for s in sentences if s.get("raw", "").strip()],
        })
    if limit:
        records = records[:limit]
    if not records:
        raise InputError(f"{path}: no images in split {split!r}; check the split names")
    return records


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int]) -> dict:
    """Recall@K (percent) both ways and mR for normalised embeddings; ``text_image[t]`` is the
    image of caption ``t``."""
    owner = np.asarray(text_image)
    sims = image_emb @ text_emb.T  # (images, texts)
    out = {}
    i2t_order = np.argsort(-sims, axis=1, kind="stable")
    first_hit = np.array([np.flatnonzero(owner[row] == i)[0] for i, row in enumerate(i2t_order)])
    t2i_order = np.argsort(-sims.T, axis=1, kind="stable")
    t2i_rank = np.array([np.flatnonzero(row == owner[t])[0] for t, row in enumerate(t2i_order)])
    for k in KS:
        out[f"i2t_R@{k}"] = 100.0 * float(np.mean(first_hit < k))
    for k in KS:
        out[f"t2i_R@{k}"] = 100.0 * float(np.mean(t2i_rank < k))
    out["mR"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS]))
    return out


def zeroshot_metrics(image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[int]) -> dict:
    """Top-1 / top-5 accuracy (percent) of nearest-class-embedding classification."""
    order = np.argsort(-(image_emb @ class_emb.T), axis=1, kind="stable")
    truth = np.asarray(labels)[:, None]
    return {"top1": 100.0 * float(np.mean(order[:, :1] == truth)),
            "top5": 100.0 * float(np.mean((order[:, :5] == truth).any(axis=1)))}


def image_embeddings(loaded: Any, paths: Sequence[str], views: int = 1) -> np.ndarray:
    """Normalised image embeddings of image files, preprocessed like tiles (``views``: test-time
    views, as ``embed --views``)."""
    return image_vectors(loaded, list(paths), views=check_views(views))


def evaluate_retrieval(loaded, dataset: str, split: str = "val", limit: int | None = None, views: int = 1) -> dict:
    """Retrieval metrics of a loaded CLIP model on one split."""
    records = load_karpathy(dataset, split, limit)
    texts = [c for r in records for c in r["captions"]]
    owners = [i for i, r in enumerate(records) for _ in r["captions"]]
    if not texts:
        raise InputError(f"{dataset}: split {split!r} has no captions")
    images = image_embeddings(loaded, [r["image"] for r in records], views)
    text = np.concatenate([text_vectors(loaded, texts[i:i + 256]) for i in range(0, len(texts), 256)])
    return {"images": len(records), "texts": len(texts), **retrieval_metrics(images, text, owners)}


def evaluate_zeroshot(loaded, dataset: str, split: str = "val", templates: Sequence[str] | None = None,
                      limit: int | None = None, views: int = 1) -> dict:
    """Zero-shot accuracy over the classes of a split, with a template ensemble."""
    records = load_karpathy(dataset, split, limit)
    if any(r["class"] is None for r in records):
        raise InputError(f"{dataset}: images need a 'class' for zero-shot evaluation")
    classes = sorted({r["class"] for r in records})
    if len(classes) < 2:
        raise OptionError(f"{dataset}: split {split!r} has fewer than two classes")
    class_emb = class_vectors(loaded, classes, templates)
    images = image_embeddings(loaded, [r["image"] for r in records], views)
    labels = [classes.index(r["class"]) for r in records]
    return {"images": len(records), "classes": len(classes), **zeroshot_metrics(images, class_emb, labels)}


def caption_metrics(references: dict, candidates: dict) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (x100) with the standard COCO caption evaluation code
    (pycocoevalcap; its PTB tokenizer and METEOR need Java)."""
    if shutil.which("java") is None:
        raise InputError("caption metrics need Java (PTB tokenizer, METEOR): apt-get install default-jre-headless")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise InputError("caption metrics need pycocoevalcap: pip install 'hqrs_geo[eval]'") from None
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": candidates[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{i + 1}": 100.0 * b for i, b in enumerate(bleu)}
    scores["METEOR"] = 100.0 * Meteor().compute_score(gts, res)[0]
    scores["ROUGE-L"] = 100.0 * Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = 100.0 * Cider().compute_score(gts, res)[0]
    return scores


def evaluate_captions(loaded: Any, dataset: str, split: str = "val", decoding: Any = None,
                      limit: int | None = None, batch_size: int = 32) -> dict:
    """Caption a split with a CoCa model (the engine's caption task) and score the captions
    against the references."""
    import torch

    task = CaptionTask(loaded, decoding=decoding)
    records = [r for r in load_karpathy(dataset, split, limit) if r["captions"]]
    candidates: dict = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [torch.from_numpy(read_image(r["image"])).permute(2, 0, 1) for r in chunk]  # any image size
        candidates.update({str(start + i): c for i, c in enumerate(task(images))})
    references = {str(i): r["captions"] for i, r in enumerate(records)}
    return {"images": len(records), **caption_metrics(references, candidates),
            "examples": [candidates[str(i)] for i in range(min(3, len(records)))]}
