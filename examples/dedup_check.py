r"""Near-duplicate check between the training images and every held-out / selection set.

Each image is reduced to perceptual hashes (a 64-bit DCT hash, "pHash", of a 32 x 32 grey view)
of several *views*: the whole image at a common size, and crops at 3/4, 1/2, 1/3 and 1/4 of the
side at positions half a crop apart plus the centre (quadrants, 3 x 3 and 4 x 4 tilings, centre
and corner crops: 92 crops; none narrower than ``--min-crop`` pixels), so that an image that is
a resized copy of another, or a tile of a larger one (the AID copy is 150 px of a 600 px
original, SIRI-WHU is 200 px), is found in either direction. Three comparisons, all by Hamming
distance between hashes:

* whole held-out image (in its 8 rotations / mirror images) against whole training image;
* whole held-out image against every crop view of each training image (held-out = a piece of a
  training image);
* every crop view of each held-out image against whole training images (training = a piece of
  a held-out image).

A pair of views within ``--max-distance`` bits is a *candidate*; it is *verified* as a
near-duplicate when the two views, compared at twice the smaller one's size in pixels and best
aligned within a pixel, also correlate: their coarse structure (Pearson r >= ``--min-corr``, 0.9)
and their fine detail (r of the high-pass residuals >= ``--min-detail``, 0.7). The detail test
rejects the hash collisions of images with one dominant soft shape (a shoreline, open water),
which correlate coarsely without sharing any detail. Measured on the project's sets: of the
9,600 candidate pairs between training and held-out images (none a copy, by eye), those with
coarse r >= 0.9 reach detail r 0.66 at most; the copies ``--control`` makes reach coarse r >= 0.978
and detail r 0.54 to 1.0 (58 of 61 at 0.7 or more).
A pHash survives resizing and re-compression, not a shift: measured on AID images, a crop
shifted by 5 % of its side is already 18 bits away. So a crop is found only where it lies on
(within about 2 % of) one of the crop views: tilings and centre crops, the ways data sets are
cut from larger images, not arbitrary windows. Views that are almost uniform (grey standard
deviation below ``--min-std``) carry no usable hash and are left out of the comparison (their
count is reported).

    python examples/dedup_check.py \
        --train train=DATA/hqrs19/train_clip.json@train \
        --held siri=DATA/hqrs19/holdout_siri.json --held ucm-val=DATA/hqrs19/train_clip.json@val \
        --held eurosat-val=DATA/hqrs19/val_eurosat.json --held sydney9=DATA/sydney9/dataset.json \
        --scene demo=examples/data/urban_river_025m_epsg28992.tif \
        --sheets shots/dedup -o shots/dedup/report.json

``NAME=PATH[@SPLIT]``: ``PATH`` is a Karpathy-style JSON (its images of split ``SPLIT``, all
splits without one) or a folder (every image under it). Training images are grouped by the
``source`` field of their JSON record where there is one (ucm, aid, eurosat), else by ``NAME``.
A ``--scene`` raster is tiled as the demo does (``--scene-tile`` 64m, ``--scene-overlap`` 50%).
Writes a JSON report (``-o``) and, with ``--sheets``, one contact sheet PNG per held-out set:
its candidate pairs nearest to passing both correlation tests (verified ones first), then the
closest hashes, the held-out image left, the training image right, each view's box in red.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hqrs_geo.atomic import write_bytes, write_json  # noqa: E402
from hqrs_geo.errors import OutputError  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
SIDE = 32  # grey view size the DCT is taken of
LOW = 8  # low-frequency block: LOW x LOW = 64 bits
ORIENTATIONS = 8  # view ids 0..7: the whole image, rotated k*90 degrees (k = id % 4), mirrored when id >= 4
DEFAULT_SCALES = (0.75, 0.5, 1 / 3, 0.25)
DEFAULT_STEP = 0.5
DEFAULT_MIN_CROP = 40
DEFAULT_MAX_DISTANCE = 10
DEFAULT_MIN_CORR = 0.9
DEFAULT_MIN_DETAIL = 0.7


def crop_views(scales: Sequence[float] = DEFAULT_SCALES,
               step: float = DEFAULT_STEP) -> list[tuple[float, float, float]]:
    """(scale, left, top) of each crop view, as fractions of the image's side: per scale, a
    lattice of positions ``step`` crop sides apart from the top-left corner, plus the centre and
    the far edge, so the quadrants and the 3 x 3 / 4 x 4 tilings of an image, its centre crops
    and the crops halfway between them are all views."""
    if not 0 < step <= 1:
        raise SystemExit(f"crop step {step}: give a fraction of the crop side between 0 and 1 (e.g. 0.5)")
    views = []
    for scale in scales:
        if not 0 < scale < 1:
            raise SystemExit(f"crop scale {scale}: give fractions between 0 and 1 (e.g. 0.5)")
        room = 1.0 - scale
        lattice = [min(room, k * step * scale) for k in range(int(room / (step * scale) + 1e-6) + 1)]
        positions = {round(x, 6): x for x in [*lattice, room / 2, room]}  # one of nearly equal positions
        ordered = [positions[k] for k in sorted(positions)]
        views += [(float(scale), x, y) for y in ordered for x in ordered]
    return views


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``m @ x`` is the DCT of the columns of ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(SIDE)


def phash(views: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes (uint64) of grey ``[N, 32, 32]`` views: bit k is whether the k-th
    coefficient of the 8 x 8 lowest-frequency DCT block lies above the median of the block's 63
    AC coefficients (the DC bit is then almost always 1)."""
    coeffs = _DCT @ views.astype(np.float64) @ _DCT.T
    low = coeffs[:, :LOW, :LOW].reshape(len(views), LOW * LOW)
    bits = low > np.median(low[:, 1:], axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between every hash of ``a`` [N] and every hash of ``b`` [M]: [N, M] uint8."""
    return np.bitwise_count(a[:, None] ^ b[None, :]).astype(np.uint8)


def grey_view(image: Image.Image, view: int, crops: Sequence[tuple[float, float, float]],
              side: int = SIDE) -> np.ndarray:
    """The ``side`` x ``side`` grey view ``view`` of ``image`` (mode L): ids below 8 the whole
    image in one of its 8 orientations, id 8 + k the crop ``crops[k]``."""
    w, h = image.size
    if view < ORIENTATIONS:
        out = np.asarray(image.resize((side, side), Image.Resampling.BOX), np.float32)
        out = np.rot90(out, view % 4)
        return np.ascontiguousarray(out[:, ::-1] if view >= 4 else out)
    scale, left, top = crops[view - ORIENTATIONS]
    box = (left * w, top * h, min(float(w), (left + scale) * w), min(float(h), (top + scale) * h))
    return np.asarray(image.resize((side, side), Image.Resampling.BOX, box=box), np.float32)


def view_pixels(image: Image.Image, view: int, crops: Sequence[tuple[float, float, float]]) -> float:
    """Side in pixels of the image that ``view`` covers."""
    side = float(min(image.size))
    return side if view < ORIENTATIONS else side * crops[view - ORIENTATIONS][0]


def lowpass(view: np.ndarray, factor: int) -> np.ndarray:
    """A grey view reduced ``factor`` times (area mean) and enlarged back (bilinear)."""
    n = view.shape[0]
    small = Image.fromarray(view).resize((max(2, n // factor),) * 2, Image.Resampling.BOX)
    return np.asarray(small.resize((n, n), Image.Resampling.BILINEAR), np.float32)


SHIFT = 2  # alignment search of verify(): up to 2 half-pixels (of the comparison size) each way


def aligned_correlations(a: np.ndarray, b: np.ndarray, factor: int = 8) -> tuple[float, float]:
    """(coarse r, detail r) of two grey views of the same size at their best alignment: ``b``
    shifted by up to ``SHIFT`` pixels each way (the views are rendered at twice the comparison
    size, so that is up to one pixel), the shift that maximises the detail r. Coarse: the
    low-pass (``factor`` times reduced) views; detail: what the low-pass leaves out."""
    low_a, low_b = lowpass(a, factor), lowpass(b, factor)
    high_a, high_b = a - low_a, b - low_b
    n, m = a.shape[0], SHIFT
    inner = (slice(m, n - m), slice(m, n - m))
    best = (0.0, -1.0)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            moved = (slice(m + dy, n - m + dy), slice(m + dx, n - m + dx))
            r = correlation(high_a[inner], high_b[moved])
            if r > best[1]:
                best = (correlation(low_a[inner], low_b[moved]), r)
    return best


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two grey views (0 where one is uniform)."""
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


# -- image lists ---------------------------------------------------------------------------------

@dataclass
class Item:
    """One image: its set, the training source it belongs to, a display name, how to read it."""

    group: str
    source: str
    name: str
    path: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)  # scene tiles: RGB in memory

    def rgb(self) -> Image.Image:
        """The image as RGB."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels).convert("RGB")
        if self.path is None:
            raise SystemExit(f"{self.name}: neither pixels nor a file")
        return _open_rgb(self.path)


@lru_cache(maxsize=256)
def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _spec(text: str, option: str) -> tuple[str, Path, str | None]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"{option} {text!r}: give NAME=PATH or NAME=PATH@SPLIT")
    path, _, split = rest.rpartition("@") if "@" in rest and not Path(rest).exists() else (rest, "", "")
    return name, Path(path), split or None


def list_images(name: str, path: Path, split: str | None, option: str) -> list[Item]:
    """The images of one ``NAME=PATH[@SPLIT]``: a Karpathy-style JSON's images or a folder's files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        items = [Item(name, name, str(p.relative_to(path)), str(p)) for p in files]
    elif path.is_file():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["images"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{option} {name}: {path} is not a Karpathy-style JSON ({exc}); "
                             "give a dataset JSON or a folder of images") from None
        items, seen = [], set()
        for entry in entries:
            if split and entry.get("split") != split:
                continue
            file = Path(entry["filename"])
            file = file if file.is_absolute() else path.parent / file
            if str(file) in seen:  # a training JSON lists some images several times
                continue
            seen.add(str(file))
            source = str(entry.get("source") or name)
            items.append(Item(name, source, f"{source}:{'/'.join(file.parts[-2:])}", str(file)))
    else:
        raise SystemExit(f"{option} {name}: {path} not found; give a dataset JSON or a folder")
    if not items:
        raise SystemExit(f"{option} {name}: no images in {path}" + (f" with split {split!r}" if split else ""))
    return items


def scene_tiles(name: str, path: Path, tile_size: str, overlap: str) -> list[Item]:
    """The tiles of a raster, tiled as the product tiles it (``hqrs_geo`` TileDataset)."""
    from hqrs_geo import TileConfig
    from hqrs_geo.tiling.dataset import TileDataset

    tiles = TileDataset.from_rasters(str(path), TileConfig(tile_size=tile_size, overlap=overlap))
    items = []
    for index in range(len(tiles)):
        record, rgb = tiles[index]
        items.append(Item(name, name, record.tile_id, None, np.ascontiguousarray(rgb[..., :3])))
    return items


# -- hashing ---------------------------------------------------------------------------------------

@dataclass
class Hashes:
    """Hashes of the views of a list of images: parallel arrays, one row per usable view."""

    hashes: np.ndarray
    owner: np.ndarray  # index of the image
    view: np.ndarray  # view id (see grey_view)
    featureless: int  # views left out: almost uniform

    def select(self, mask: np.ndarray) -> Hashes:
        """The views where ``mask`` is true."""
        return Hashes(self.hashes[mask], self.owner[mask], self.view[mask], self.featureless)


def hash_images(items: Sequence[Item], view_ids: Sequence[int], crops: Sequence[tuple[float, float, float]],
                min_std: float, min_crop: int = DEFAULT_MIN_CROP,
                progress: Callable[[int], None] | None = None) -> Hashes:
    """Hash views ``view_ids`` of every image (crops narrower than ``min_crop`` pixels of the
    image are skipped); an unreadable image is refused in one line."""
    hashes, owners, views, featureless = [], [], [], 0
    for index, item in enumerate(items):
        try:
            grey = _grey(item)
        except OSError as exc:
            raise SystemExit(f"{item.path or item.name}: cannot read the image ({exc}); check the file") from None
        side = min(grey.size)
        ids = np.asarray([v for v in view_ids
                          if v < ORIENTATIONS or crops[v - ORIENTATIONS][0] * side >= min_crop])
        stack = np.stack([grey_view(grey, int(v), crops) for v in ids])
        usable = stack.reshape(len(stack), -1).std(axis=1) >= min_std
        featureless += int((~usable).sum())
        if usable.any():
            hashes.append(phash(stack[usable]))
            owners.append(np.full(int(usable.sum()), index, np.int32))
            views.append(ids[usable].astype(np.int16))
        if progress and index % 2000 == 1999:
            progress(index + 1)
    if not hashes:
        return Hashes(np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int16), featureless)
    return Hashes(np.concatenate(hashes), np.concatenate(owners), np.concatenate(views), featureless)


def _grey_cached(item: Item) -> Image.Image:
    return _grey_file(item.path) if item.path is not None else _grey(item)


@lru_cache(maxsize=1024)
def _grey_file(path: str) -> Image.Image:
    return _grey(Item("", "", path, path))


def _grey(item: Item) -> Image.Image:
    if item.pixels is not None:
        return Image.fromarray(item.pixels).convert("L")
    if item.path is None:
        raise SystemExit(f"{item.name}: neither pixels nor a file")
    with Image.open(item.path) as image:
        image.draft("L", (256, 256))  # JPEG: decode at a reduced size where that is enough
        return image.convert("L")


# -- comparison ------------------------------------------------------------------------------------

@dataclass
class Match:
    """The closest pair of views found for one held-out image."""

    held: int
    train: int
    held_view: int
    train_view: int
    distance: int
    corr: float | None = None
    detail: float | None = None

    def verified(self, min_corr: float, min_detail: float) -> bool:
        """Whether both correlations reach their thresholds."""
        return (self.corr or 0.0) >= min_corr and (self.detail or 0.0) >= min_detail


def compare(held: Hashes, train: Hashes, max_distance: int, best: dict[int, Match],
            pairs: dict[tuple[int, int], Match]) -> None:
    """Every held-out view against every training view: keeps each held-out image's closest pair
    in ``best`` and every image pair within ``max_distance`` bits (its closest views) in ``pairs``."""
    if not len(held.hashes) or not len(train.hashes):
        return
    chunk = max(1, (1 << 21) // len(train.hashes))  # rows per step: about 2 M distances (16 MB)
    for start in range(0, len(held.hashes), chunk):
        dist = hamming(held.hashes[start:start + chunk], train.hashes)
        column = dist.argmin(axis=1)
        for row, col in enumerate(column):
            h = start + row
            d = int(dist[row, col])
            owner = int(held.owner[h])
            if owner not in best or d < best[owner].distance:
                best[owner] = Match(owner, int(train.owner[col]), int(held.view[h]), int(train.view[col]), d)
        for row, col in zip(*np.nonzero(dist <= max_distance)):
            h = start + int(row)
            key = (int(held.owner[h]), int(train.owner[col]))
            d = int(dist[row, col])
            if key not in pairs or d < pairs[key].distance:
                pairs[key] = Match(key[0], key[1], int(held.view[h]), int(train.view[col]), d)


def verify(match: Match, held: Sequence[Item], train: Sequence[Item],
           crops: Sequence[tuple[float, float, float]]) -> float:
    """Correlations of a pair's two views (:func:`aligned_correlations`), compared at the smaller
    view's size in pixels (16 to 64) rendered twice as large: ``match.corr`` of their coarse
    structure, ``match.detail`` of their fine detail (the band a 4x reduction removes)."""
    image_a, image_b = _grey_cached(held[match.held]), _grey_cached(train[match.train])
    side = 2 * int(np.clip(min(view_pixels(image_a, match.held_view, crops),
                               view_pixels(image_b, match.train_view, crops)), 16, 64))
    match.corr, match.detail = aligned_correlations(grey_view(image_a, match.held_view, crops, side),
                                                    grey_view(image_b, match.train_view, crops, side))
    return match.corr


# -- contact sheet ---------------------------------------------------------------------------------

CELL = 200


def _panel(item: Item, view: int, crops: Sequence[tuple[float, float, float]]) -> Image.Image:
    image = item.rgb()
    if view < ORIENTATIONS:  # show the held-out image as it was compared
        image = image.rotate(90 * (view % 4), expand=True)
        if view >= 4:
            image = ImageOps.mirror(image)
    panel = image.resize((CELL, CELL), Image.Resampling.BILINEAR)
    if view >= ORIENTATIONS:
        scale, left, top = crops[view - ORIENTATIONS]
        draw = ImageDraw.Draw(panel)
        draw.rectangle([left * CELL, top * CELL, (left + scale) * CELL - 1, (top + scale) * CELL - 1],
                       outline=(255, 0, 0), width=2)
    return panel


def contact_sheet(title: str, matches: Sequence[Match], held: Sequence[Item], train: Sequence[Item],
                  crops: Sequence[tuple[float, float, float]], min_corr: float, min_detail: float) -> bytes:
    """PNG bytes: one row per pair (held-out image | training image | distance, correlation, names)."""
    text_w, row_h, head = 420, CELL + 8, 28
    sheet = Image.new("RGB", (2 * CELL + text_w + 24, head + row_h * max(1, len(matches))), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), title, fill="black")
    for n, m in enumerate(matches):
        y = head + n * row_h
        sheet.paste(_panel(held[m.held], m.held_view, crops), (8, y))
        sheet.paste(_panel(train[m.train], m.train_view, crops), (16 + CELL, y))
        verdict = "VERIFIED near-duplicate" if m.verified(min_corr, min_detail) else "not a duplicate"
        lines = [f"hash distance {m.distance} bits, r = {m.corr or 0:.3f}, detail r = {m.detail or 0:.3f}", verdict,
                 f"held: {held[m.held].name}", f"  view {describe_view(m.held_view, crops)}",
                 f"train: {train[m.train].name}", f"  view {describe_view(m.train_view, crops)}"]
        for k, line in enumerate(lines):
            draw.text((24 + 2 * CELL, y + 8 + 16 * k), line[:64], fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def describe_view(view: int, crops: Sequence[tuple[float, float, float]]) -> str:
    """Readable view id: 'whole', 'whole rot90 mirrored', 'crop 0.50 at (0.25, 0.00)'."""
    if view < ORIENTATIONS:
        text = "whole" + (f" rot{90 * (view % 4)}" if view % 4 else "") + (" mirrored" if view >= 4 else "")
        return text
    scale, left, top = crops[view - ORIENTATIONS]
    return f"crop {scale:.2f} at ({left:.2f}, {top:.2f})"


# -- control set -----------------------------------------------------------------------------------

#: Copies the control set makes of training images: (name, crop box as fractions or None, quarter
#: turns, mirrored, JPEG re-encoded, whether the crop views can find it).
CONTROL_EDITS = (
    ("resized 0.8x, JPEG q70", None, 0, False, True, True),
    ("mirrored", None, 0, True, False, True),
    ("rotated 90", None, 1, False, False, True),
    ("quadrant, enlarged 2x", (0.5, 0.5, 0.0), 0, False, False, True),
    ("centre third, enlarged 3x", (1 / 3, 1 / 3, 1 / 3), 0, False, True, True),
    ("centre half, enlarged 2x", (0.5, 0.25, 0.25), 0, False, True, True),
    ("half crop 10 % off the grid", (0.5, 0.3, 0.3), 0, False, False, False),
)


def control_set(train: Sequence[Item], count: int, min_crop: int = DEFAULT_MIN_CROP,
                seed: int = 0) -> tuple[list[Item], list[tuple[int, str, bool]]]:
    """``count`` derived copies of training images (resized, mirrored, rotated, tiles, centre
    crops, one crop off the crop grid), as an extra held-out set that the check must find: its
    items and, per item, (training image index, edit, whether the check is built to find it)."""
    rng = np.random.default_rng(seed)
    items, truth = [], []
    for n, index in enumerate(rng.choice(len(train), size=count, replace=count > len(train))):
        source = train[int(index)].rgb()
        name, box, turns, mirror, jpeg, findable = CONTROL_EDITS[n % len(CONTROL_EDITS)]
        w, h = source.size
        if box is not None and box[0] * min(w, h) < min_crop:  # too small to crop: resize instead
            name, box, turns, mirror, jpeg, findable = CONTROL_EDITS[0]
        image = source
        if box is not None:
            scale, left, top = box
            image = source.crop((round(left * w), round(top * h), round((left + scale) * w),
                                 round((top + scale) * h))).resize((w, h), Image.Resampling.BICUBIC)
        elif jpeg:
            image = source.resize((max(8, round(w * 0.8)), max(8, round(h * 0.8))), Image.Resampling.LANCZOS)
        image = image.rotate(90 * turns, expand=True) if turns else image
        image = ImageOps.mirror(image) if mirror else image
        if jpeg:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=70)
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        items.append(Item("control", "control", f"control {n}: {name} of {train[int(index)].name}", None,
                          np.asarray(image)))
        truth.append((int(index), name, findable))
    return items, truth


def control_recall(rows: Sequence[dict], items: Sequence[Item], train: Sequence[Item],
                   truth: Sequence[tuple[int, str, bool]]) -> dict:
    """How many control copies the check found, per edit (from the set's ``verified`` rows)."""
    found = {(row["held"], row["train"]) for row in rows}
    by_edit: dict[str, list[int]] = {}
    for item, (index, edit, _) in zip(items, truth):
        by_edit.setdefault(edit, [0, 0])
        by_edit[edit][1] += 1
        by_edit[edit][0] += (item.name, train[index].name) in found
    findable = [(item.name, train[i].name) in found for item, (i, _, ok) in zip(items, truth) if ok]
    return {"found": sum(v[0] for v in by_edit.values()), "copies": len(items),
            "found_of_findable": f"{sum(findable)}/{len(findable)}",
            "by_edit": {k: f"{v[0]}/{v[1]}" for k, v in by_edit.items()}}


# -- main ------------------------------------------------------------------------------------------

def check(train: Sequence[Item], held_sets: dict[str, list[Item]], crops: Sequence[tuple[float, float, float]],
          max_distance: int, min_corr: float, min_detail: float, min_std: float, min_crop: int = DEFAULT_MIN_CROP,
          sheet_rows: int = 8, all_candidates: bool = False,
          log: Callable[[str], None] = lambda _: None) -> tuple[dict, dict[str, bytes]]:
    """Run the check; returns the report and a contact sheet (PNG bytes) per held-out set."""
    crop_ids = list(range(ORIENTATIONS, ORIENTATIONS + len(crops)))
    t0 = time.monotonic()
    train_hashes = hash_images(train, [0, *crop_ids], crops, min_std, min_crop,
                               lambda n: log(f"  hashed {n}/{len(train)} training images"))
    log(f"training: {len(train)} images, {len(train_hashes.hashes)} views hashed, "
        f"{train_hashes.featureless} featureless left out ({time.monotonic() - t0:.0f} s)")
    train_whole = train_hashes.select(train_hashes.view == 0)
    report: dict = {
        "method": {"hash": "64-bit DCT pHash of 32x32 grey views", "max_distance": max_distance,
                   "min_corr": min_corr, "min_detail": min_detail, "min_std": min_std, "min_crop_px": min_crop,
                   "crops": [[round(v, 4) for v in c] for c in crops],
                   "orientations": ORIENTATIONS},
        "training": {"images": len(train), "views": len(train_hashes.hashes),
                     "featureless_views": train_hashes.featureless,
                     "by_source": dict(sorted(Counter(i.source for i in train).items()))},
        "held_out": {},
    }
    sheets = {}
    for name, held in held_sets.items():
        t1 = time.monotonic()
        held_hashes = hash_images(held, [*range(ORIENTATIONS), *crop_ids], crops, min_std, min_crop)
        whole_all = held_hashes.select(held_hashes.view < ORIENTATIONS)
        whole = held_hashes.select(held_hashes.view == 0)
        held_crops = held_hashes.select(held_hashes.view >= ORIENTATIONS)
        best: dict[int, Match] = {}
        pairs: dict[tuple[int, int], Match] = {}
        compare(whole_all, train_whole, max_distance, best, pairs)  # whole vs whole, 8 orientations
        compare(whole, train_hashes.select(train_hashes.view >= ORIENTATIONS), max_distance, best, pairs)
        compare(held_crops, train_whole, max_distance, best, pairs)
        for match in pairs.values():
            verify(match, held, train, crops)
        verified = sorted((m for m in pairs.values() if m.verified(min_corr, min_detail)),
                          key=lambda m: -(m.detail or 0))
        ranked = sorted(best.values(), key=lambda m: (m.distance, m.held))
        # the sheet: the candidates nearest to passing both correlation tests, then the closest hashes
        nearest = sorted(pairs.values(), key=lambda m: -min((m.corr or 0) / min_corr, (m.detail or 0) / min_detail))
        shown = nearest[:sheet_rows]
        for m in ranked:
            if len(shown) >= sheet_rows:
                break
            if (m.held, m.train) not in {(s.held, s.train) for s in shown}:
                if m.corr is None:
                    verify(m, held, train, crops)
                shown.append(m)
        report["held_out"][name] = {
            "images": len(held), "views": len(held_hashes.hashes), "featureless_views": held_hashes.featureless,
            "candidate_pairs": len(pairs),
            "candidate_pairs_by_source": dict(sorted(Counter(train[m.train].source for m in pairs.values()).items())),
            "near_duplicates": len(verified),
            "near_duplicates_by_source": dict(sorted(Counter(train[m.train].source for m in verified).items())),
            "held_images_with_a_near_duplicate": len({m.held for m in verified}),
            "max_detail_not_verified": max((round(m.detail or 0, 4) for m in pairs.values()
                                            if not m.verified(min_corr, min_detail)), default=None),
            "closest_distance": ranked[0].distance if ranked else None,
            "verified": [_row(m, held, train, crops) for m in verified],
            "closest": [_row(m, held, train, crops) for m in shown],
        }
        if all_candidates:
            report["held_out"][name]["candidates"] = [_row(m, held, train, crops) for m in nearest]
        sheets[name] = contact_sheet(
            f"{name}: closest pairs of {len(held)} held-out images vs {len(train)} training images "
            f"(candidates <= {max_distance} bits: {len(pairs)}, verified: {len(verified)})",
            shown, held, train, crops, min_corr, min_detail)
        log(f"{name}: {len(held)} images, {len(pairs)} candidate pairs, {len(verified)} verified "
            f"({time.monotonic() - t1:.0f} s)")
    return report, sheets


def _row(m: Match, held: Sequence[Item], train: Sequence[Item], crops: Sequence[tuple[float, float, float]]) -> dict:
    return {"held": held[m.held].name, "held_view": describe_view(m.held_view, crops),
            "train": train[m.train].name, "train_view": describe_view(m.train_view, crops),
            "distance": m.distance, "corr": None if m.corr is None else round(m.corr, 4),
            "detail": None if m.detail is None else round(m.detail, 4)}


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="append", default=[], metavar="NAME=PATH[@SPLIT]", required=True,
                        help="training images: a dataset JSON (its split SPLIT) or a folder; repeat for more")
    parser.add_argument("--held", action="append", default=[], metavar="NAME=PATH[@SPLIT]",
                        help="a held-out or selection set; repeat for more")
    parser.add_argument("--scene", action="append", default=[], metavar="NAME=RASTER",
                        help="a held-out scene, tiled as the demo tiles it")
    parser.add_argument("--scene-tile", default="64m", help="tile size of --scene [64m]")
    parser.add_argument("--scene-overlap", default="50%", help="tile overlap of --scene [50%%]")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                        help="crop scales, fractions of the side [0.75 0.5 0.333 0.25]")
    parser.add_argument("--step", type=float, default=DEFAULT_STEP,
                        help="distance between crop positions, in crop sides [0.5]")
    parser.add_argument("--min-crop", type=int, default=DEFAULT_MIN_CROP,
                        help="no crop views narrower than this many pixels of the image [40]")
    parser.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                        help="candidate: hash distance in bits at most [10]")
    parser.add_argument("--min-corr", type=float, default=DEFAULT_MIN_CORR,
                        help="verified: correlation of the two grey 32 px views at least [0.9]")
    parser.add_argument("--min-detail", type=float, default=DEFAULT_MIN_DETAIL,
                        help="verified: correlation of their fine details (high-pass) at least [0.7]")
    parser.add_argument("--min-std", type=float, default=4.0,
                        help="views with a grey standard deviation below this are not hashed [4]")
    parser.add_argument("--control", type=int, default=0, metavar="N",
                        help="also check N derived copies of training images (resized, mirrored, rotated, tiles, "
                             "centre crops, one off-grid crop): the report says how many were found [0]")
    parser.add_argument("--all-candidates", action="store_true",
                        help="list every candidate pair in the report (with both correlations), not only the closest")
    parser.add_argument("--sheets", type=Path, help="folder for the contact sheets (one PNG per held-out set)")
    parser.add_argument("-o", "--output", type=Path, help="the JSON report")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.held and not args.scene:
        parser.error("give at least one --held set or --scene")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    train = [item for spec in args.train for item in list_images(*_spec(spec, "--train"), "--train")]
    held_sets: dict[str, list[Item]] = {}
    for spec in args.held:
        name, path, split = _spec(spec, "--held")
        held_sets[name] = list_images(name, path, split, "--held")
    for spec in args.scene:
        name, path, _ = _spec(spec, "--scene")
        if not path.is_file():
            raise SystemExit(f"--scene {name}: {path} not found; give a GeoTIFF")
        held_sets[name] = scene_tiles(name, path, args.scene_tile, args.scene_overlap)
    crops = crop_views(args.scales, args.step)
    control: tuple[list[Item], list[tuple[int, str, bool]]] = ([], [])
    if args.control:
        control = control_set(train, args.control, args.min_crop)
        held_sets["control"] = control[0]
    started = time.monotonic()
    report, sheets = check(train, held_sets, crops, args.max_distance, args.min_corr, args.min_detail, args.min_std,
                           args.min_crop, all_candidates=args.all_candidates, log=log)
    report["seconds"] = round(time.monotonic() - started, 1)
    if args.control:
        report["control"] = control_recall(report["held_out"]["control"]["verified"], control[0], train, control[1])
    try:
        if args.sheets:
            args.sheets.mkdir(parents=True, exist_ok=True)
            for name, png in sheets.items():
                write_bytes(args.sheets / f"{name}.png", png)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.output, report)
    except (OutputError, OSError) as exc:
        raise SystemExit(str(exc)) from None
    print(f"{'held-out set':14} {'images':>7} {'candidates':>10} {'verified':>8} {'closest':>7}  verified by source")
    for name, info in report["held_out"].items():
        print(f"{name:14} {info['images']:7} {info['candidate_pairs']:10} {info['near_duplicates']:8} "
              f"{info['closest_distance'] if info['closest_distance'] is not None else '-':>7}  "
              f"{info['near_duplicates_by_source'] or '-'}")
    if args.control:
        print(f"control copies found: {report['control']['found']}/{report['control']['copies']} "
              f"(of those the crop views can find: {report['control']['found_of_findable']}) "
              f"{report['control']['by_edit']}")
    print(f"training: {report['training']['by_source']}; {report['seconds']} s")


if __name__ == "__main__":
    main()
