"""``hqrs-geo export-dataset``: a captioned tile layer as an image-text dataset.

Writes image chips (``images/``), ``captions.csv`` (open_clip CSV: ``filepath``, ``caption``;
one row per caption) and ``dataset.json`` (Karpathy style: ``images[].filename``, ``split``,
``sentences[].raw``, plus ``tile_id`` and ``class`` when the layer has a ``label``), which is
exactly what ``hqrs-geo finetune`` reads. With ``captions="labels"`` the few-shot labels saved with
the layer (``hqrs-geo detect --save-labels``, the QGIS dock) are the training set: the labelled
tiles' chips, ``class`` ``positive`` / ``negative`` in ``dataset.json`` and ``labels.csv``
(``filepath``, ``tile_id``, ``class``, ``split``), with their captions when the layer has them.
The split is a fixed function of the tile id, so
re-exporting a grown layer keeps every tile in its split. Every file is written atomically and
checked (:mod:`hqrs_geo.atomic`), chip names are checked tile ids and CSV cells are neutralised
(:mod:`hqrs_geo.safe_paths`); a failed export leaves no temporary file and no folder it made
empty.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic import output_folder, write_json
from ..errors import InputError, OptionError
from ..layer.io import read_runs, read_tiles
from ..safe_paths import write_csv
from ..tiling.chips import export_chips

CAPTION_SOURCES = ("mpgi", "caption", "labels")


def split_of(tile_id: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` share of tile ids, else ``train``."""
    bucket = int(hashlib.sha256(tile_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def _captions(row, source: str) -> list[str]:
    if source == "caption":
        text = row.get("caption")
        return [text] if isinstance(text, str) and text.strip() else []
    out = []
    detailed = row.get("mpgi_caption")
    if isinstance(detailed, str) and detailed.strip():
        out.append(detailed.strip())
    short = row.get("mpgi_short")
    if isinstance(short, str) and short.strip():
        try:
            items = json.loads(short)
        except ValueError:
            items = None
        if not isinstance(items, list):
            raise InputError(f"tile {row.get('tile_id')!r}: mpgi_short is not a JSON list of captions; "
                             "run hqrs-geo mpgi on the layer again")
        out += [s.strip() for s in items if isinstance(s, str) and s.strip()]
    return list(dict.fromkeys(out))  # a sentence twice (detailed = short) says nothing more


def export_dataset(layer: str, out_dir: str, captions: str = "mpgi", image_format: str = "jpg",
                   val_fraction: float = 0.1, progress=None) -> dict:
    """Export the captioned tiles of ``layer`` (see the module docstring); returns counts."""
    if captions not in CAPTION_SOURCES:
        raise OptionError(f"{captions!r} is not a caption source; use one of {', '.join(CAPTION_SOURCES)}",
                          option="captions")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise OptionError(f"{val_fraction!r} is not a fraction; use a number in [0, 1)", option="val_fraction")
    frame = read_tiles(layer)
    if captions == "labels":
        saved = read_runs(layer).labels()
        if not saved["positive"] and not saved["negative"]:
            raise InputError(f"{layer}: has no saved labels; mark tiles and save them first "
                             "(hqrs-geo detect LAYER --pos ID --save-labels, or the QGIS dock)")
        with output_folder(out_dir) as out:
            return _export_labels(layer, frame, saved, out, image_format, val_fraction, progress)
    column = "mpgi_caption" if captions == "mpgi" else "caption"
    if column not in frame.columns:
        hint = "caption it with MpGI first" if captions == "mpgi" else "caption it first"
        raise InputError(f"{layer}: has no {column} column; {hint}")
    with output_folder(out_dir) as out:
        return _export(layer, frame, out, captions, column, image_format, val_fraction, progress)


def _export(layer: str, frame, out: Path, captions: str, column: str, image_format: str, val_fraction: float,
            progress) -> dict:
    captioned = [(row, texts) for row in frame.to_dict("records") if (texts := _captions(row, captions))]
    if not captioned:
        raise InputError(f"{layer}: no tile has captions in {column}; nothing to export")
    index = export_chips(layer, out / "images", image_format=image_format, progress=progress)
    files = dict(zip(index["tile_id"], index["filepath"]))
    images, rows, skipped = [], [], len(frame) - len(captioned)
    for row, texts in captioned:
        filename = f"images/{files[row['tile_id']]}"
        item = {"filename": filename, "tile_id": row["tile_id"], "split": split_of(row["tile_id"], val_fraction),
                "sentences": [{"raw": t} for t in texts]}
        if isinstance(row.get("label"), str):
            item["class"] = row["label"]
        images.append(item)
        rows += [(filename, t) for t in texts]
    write_json(out / "dataset.json", {"dataset": f"hqrs_geo export of {Path(layer).name}", "images": images})
    write_csv(out / "captions.csv", ["filepath", "caption"], rows)
    splits = {s: sum(1 for i in images if i["split"] == s) for s in ("train", "val")}
    return {"images": len(images), "captions": len(rows), "skipped": skipped, **splits, "folder": str(out)}


def _export_labels(layer: str, frame, saved: dict, out: Path, image_format: str, val_fraction: float,
                   progress) -> dict:
    """The saved few-shot labels as a training set (see the module docstring)."""
    classes = {**{t: "negative" for t in saved["negative"]}, **{t: "positive" for t in saved["positive"]}}
    known = set(frame["tile_id"])
    labelled = [row for row in frame.to_dict("records") if row["tile_id"] in classes]
    if not labelled:
        raise InputError(f"{layer}: none of its saved labelled tiles is in the layer any more; label tiles again")
    index = export_chips(layer, out / "images", image_format=image_format, progress=progress)
    files = dict(zip(index["tile_id"], index["filepath"]))
    images, rows, table = [], [], []
    for row in labelled:
        filename = f"images/{files[row['tile_id']]}"
        split = split_of(row["tile_id"], val_fraction)
        texts = _captions(row, "caption")
        images.append({"filename": filename, "tile_id": row["tile_id"], "split": split,
                       "class": classes[row["tile_id"]], "sentences": [{"raw": t} for t in texts]})
        rows += [(filename, t) for t in texts]
        table.append((filename, row["tile_id"], classes[row["tile_id"]], split))
    write_json(out / "dataset.json", {"dataset": f"hqrs_geo labels of {Path(layer).name}"
                                      + (f" ({saved['name']})" if saved.get("name") else ""), "images": images})
    write_csv(out / "labels.csv", ["filepath", "tile_id", "class", "split"], table)
    write_csv(out / "captions.csv", ["filepath", "caption"], rows)
    splits = {s: sum(1 for i in images if i["split"] == s) for s in ("train", "val")}
    return {"images": len(images), "captions": len(rows), "skipped": len(set(classes) - known),
            "positive": sum(1 for i in images if i["class"] == "positive"),
            "negative": sum(1 for i in images if i["class"] == "negative"), **splits, "folder": str(out)}
