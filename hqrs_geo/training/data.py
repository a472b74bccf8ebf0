"""Image-caption training data: open_clip CSV files and Karpathy-style JSON.

A :class:`CaptionSet` is a list of images, each with its captions and (optionally) a class
name. Images are decoded once, resized to a square of ``load_size`` pixels and kept as uint8
tensors in memory, so epochs after the first cost no JPEG decoding. Random crops, flips and
the other augmentations are applied to whole batches (:mod:`hqrs_geo.training.augment`).
"""
from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, OptionError
from ..evaluation import load_karpathy
from ..models.encode import read_image
from ..models.prompts import CLASS_CAPTION_TEMPLATES, class_phrases
from ..safe_paths import csv_uncell, inside


@dataclass
class CaptionRecord:
    """One training image: its file, captions and class (if known)."""

    image: str
    captions: list[str]
    label: str | None = None


@dataclass
class CaptionSet:
    """Records plus their decoded pixels (``pixels[i]`` is a uint8 CHW tensor)."""

    records: list[CaptionRecord]
    source: str
    pixels: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def classes(self) -> list[str]:
        """Sorted class names present in the records."""
        return sorted({r.label for r in self.records if r.label})


def _sniff_delimiter(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.readline()
    return "\t" if "\t" in head else ","


def read_csv(path: str, image_key: str = "filepath", caption_key: str = "caption") -> list[CaptionRecord]:
    """Records of an open_clip CSV/TSV file (one row per image-caption pair; tab or comma separated).

    Relative image paths are taken relative to the file's folder and must stay inside it
    (:func:`hqrs_geo.safe_paths.inside`; absolute paths are used as they are); cells that
    hqrs_geo neutralised against spreadsheet formulas are read back as written.
    """
    file = Path(path)
    delimiter = _sniff_delimiter(file)
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames or []
            missing = [k for k in (image_key, caption_key) if k not in columns]
            if missing:
                raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(columns) or 'none'}); "
                                 f"name the columns with «csv_img_key» and «csv_caption_key»")
            grouped: dict[str, CaptionRecord] = {}
            for row in reader:
                image, caption = csv_uncell(row.get(image_key) or ""), csv_uncell(row.get(caption_key) or "")
                image = str(inside(file.parent, image, "image path", allow_absolute=True))
                label = csv_uncell(row.get("class") or "") or None
                record = grouped.setdefault(image, CaptionRecord(image, [], label))
                if caption.strip():
                    record.captions.append(caption.strip())
    except UnicodeDecodeError:
        raise InputError(f"{path}: is not UTF-8 text; give an open_clip CSV/TSV file") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc}); fix the file") from None
    return list(grouped.values())


def read_karpathy(path: str, splits: Sequence[str]) -> list[CaptionRecord]:
    """Records of the given splits of a Karpathy-style JSON (``images[].filename``, ``split``,
    ``sentences[].raw``, optional ``class``, optional top-level ``image_root``)."""
    records: list[CaptionRecord] = []
    for split in splits:
        try:
            found = load_karpathy(path, split)
        except InputError as exc:
            if "no images in split" in str(exc) and len(splits) > 1:
                continue  # one empty split among several is fine
            raise
        records += [CaptionRecord(r["image"], list(r["captions"]), r["class"]) for r in found]
    if not records:
        raise InputError(f"{path}: no images in split(s) {', '.join(splits)}")
    return records


def read_records(path: str, splits: Sequence[str] = ("train",), image_key: str = "filepath",
                 caption_key: str = "caption") -> list[CaptionRecord]:
    """Records of a dataset file: ``.csv``/``.tsv`` (open_clip) or ``.json`` (Karpathy)."""
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{path}: is a folder; give the dataset's .csv, .tsv or .json file")
    if not file.is_file():
        raise InputError(f"{path}: dataset file not found; check the path")
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return read_csv(path, image_key, caption_key)
    if suffix == ".json":
        return read_karpathy(path, splits)
    raise InputError(f"{path}: unknown dataset format; use an open_clip .csv/.tsv or a Karpathy-style .json")


def _decode(path: str, size: int) -> Any:
    """A training image as a ``[3, size, size]`` uint8 tensor (one-line errors worded for training)."""
    return torch.from_numpy(read_image(path, size, use="training")).permute(2, 0, 1).contiguous()


def load_caption_set(path: str, splits: Sequence[str], load_size: int, progress=None,
                     image_key: str = "filepath", caption_key: str = "caption",
                     require_captions: bool = True) -> CaptionSet:
    """Read a dataset file and decode its images at ``load_size`` pixels."""
    records = read_records(path, splits, image_key, caption_key)
    if require_captions:
        records = [r for r in records if r.captions or r.label]
    if not records:
        raise InputError(f"{path}: split(s) {', '.join(splits)} hold no captioned images")
    data = CaptionSet(records, path)
    if progress is not None:
        progress.start("decode", len(records), f"decoding {len(records)} images of {Path(path).name}")
    for record in records:
        data.pixels.append(_decode(record.image, load_size))
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.close_bar()
    return data


class CaptionSampler:
    """Picks one caption per image per visit: a random reference sentence or, with probability
    ``class_prompt_prob`` (always, for images with a class but no sentences), a class prompt
    built from a template and one phrase of the class (its name or a synonym,
    :func:`~hqrs_geo.models.prompts.class_phrases`, the wording zero-shot classification uses)."""

    def __init__(self, data: CaptionSet, class_prompt_prob: float = 0.0,
                 templates: Sequence[str] = CLASS_CAPTION_TEMPLATES):
        if not 0.0 <= class_prompt_prob <= 1.0:
            raise OptionError("must lie in [0, 1]", option="class_prompt_prob")
        self.data, self.prob, self.templates = data, class_prompt_prob, tuple(templates)

    def caption(self, index: int, rng: random.Random) -> str:
        """A caption for image ``index``."""
        record = self.data.records[index]
        if record.label and (not record.captions or rng.random() < self.prob):
            return rng.choice(self.templates).format(rng.choice(class_phrases([record.label])[0]))
        return rng.choice(record.captions)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The image order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    visits the same batches."""
    order = list(range(n))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return order


def describe_set(data: CaptionSet) -> dict:
    """Counts for the run record."""
    return {"source": data.source, "images": len(data), "captions": sum(len(r.captions) for r in data.records),
            "classes": len(data.classes)}
