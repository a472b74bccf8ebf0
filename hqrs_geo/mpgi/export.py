"""``hqrs-geo export-dataset``: a captioned tile layer as an image-text dataset.

Writes image chips (``images/``), ``captions.csv`` (open_clip CSV: ``filepath``, ``caption``;
one row per caption) and ``dataset.json`` (Karpathy style: ``images[].filename``, ``split``,
``sentences[].raw``, plus ``tile_id`` and ``class`` when the layer has a ``label``), which is
exactly what ``hqrs-geo finetune`` reads. The split is a fixed function of the tile id, so
re-exporting a grown layer keeps every tile in its split.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

from ..errors import InputError, OptionError

CAPTION_SOURCES = ("mpgi", "caption")


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
        out += [s for s in json.loads(short) if s.strip()]
    return out


def export_dataset(layer: str, out_dir: str, captions: str = "mpgi", image_format: str = "jpg",
                   val_fraction: float = 0.1, progress=None) -> dict:
    """Export the captioned tiles of ``layer`` (see the module docstring); returns counts."""
    from ..layer.io import read_tiles
    from ..tiling.chips import export_chips

    if captions not in CAPTION_SOURCES:
        raise OptionError(f"must be one of {', '.join(CAPTION_SOURCES)}", option="captions")
    if not 0.0 <= val_fraction < 1.0:
        raise OptionError("must lie in [0, 1)", option="val_fraction")
    frame = read_tiles(layer)
    column = "mpgi_caption" if captions == "mpgi" else "caption"
    if column not in frame.columns:
        hint = "caption it with MpGI first" if captions == "mpgi" else "caption it first"
        raise InputError(f"{layer}: has no {column} column; {hint}")
    out = Path(out_dir)
    index = export_chips(layer, out / "images", image_format=image_format, progress=progress)
    files = dict(zip(index["tile_id"], index["filepath"]))
    images, rows, skipped = [], [], 0
    for row in frame.to_dict("records"):
        texts = _captions(row, captions)
        if not texts:
            skipped += 1
            continue
        filename = f"images/{files[row['tile_id']]}"
        item = {"filename": filename, "tile_id": row["tile_id"], "split": split_of(row["tile_id"], val_fraction),
                "sentences": [{"raw": t} for t in texts]}
        if isinstance(row.get("label"), str):
            item["class"] = row["label"]
        images.append(item)
        rows += [(filename, t) for t in texts]
    if not images:
        raise InputError(f"{layer}: no tile has captions in {column}; nothing to export")
    _write_atomic(out / "dataset.json", json.dumps({"dataset": f"hqrs_geo export of {Path(layer).name}",
                                                    "images": images}, indent=1, ensure_ascii=False))
    tmp = out / ".captions.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    os.replace(tmp, out / "captions.csv")
    splits = {s: sum(1 for i in images if i["split"] == s) for s in ("train", "val")}
    return {"images": len(images), "captions": len(rows), "skipped": skipped, **splits, "folder": str(out)}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
