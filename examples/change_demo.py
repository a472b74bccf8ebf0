"""What changed between two dates: a real Landsat pair of the same place, compared tile by tile.

Pucallpa, Peru, and the meandering Ucayali river in 1985 and in 2020 (Landsat composites in
examples/data, SWIR1/NIR/Red shown as RGB). ``hqrs_geo.change`` tiles the 1985 scene, tiles the
2020 scene on the same footprints, embeds (hqrs-mini-clip) and captions (hqrs-mini-coca) every
tile of both dates, classifies both dates zero-shot and scores each tile pair: the embedding
distance as a robust z-score within the pair of scenes (so a global colour shift between the two
sensors does not light everything up). The change layer is written to ``change.gpkg``, and
``change_demo.png`` draws both dates, the change map over 2020 with a legend, and the most
changed tiles as 1985/2020 chip pairs with their captions and classes. Nothing is downloaded.

Run with ``make demo-change`` (sets everything up) or
``python examples/change_demo.py [OUTPUT_DIR]`` (default: demo-output/change).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import hqrs_geo as hg
from hqrs_geo import TileConfig
from hqrs_geo.atomic import atomic_path
from hqrs_geo.progress import Progress
from hqrs_geo.raster.scene import describe, open_raster

HERE = Path(__file__).resolve().parent
BEFORE = HERE / "data" / "pucallpa_landsat_1985.tif"
AFTER = HERE / "data" / "pucallpa_landsat_2020.tif"
DATES = ("1985", "2020")
# 32 px of ~90 m: tiles of about 2.9 km; bands 1-3 are SWIR1, NIR, Red (a false-colour composite
# in which forest is green, water dark blue, bare soil and town pink)
TILING = TileConfig(tile_size=32, bands=(1, 2, 3))
CLASSES = ("river", "forest", "meadow", "farmland", "bare land", "residential area")
BECAME = "a river"
TOP = 5

# a yellow-orange-red ramp for change scores (robust z): faint yellow near the noise level, dark red far above it
RAMP = ((255, 255, 178), (254, 204, 92), (253, 141, 60), (240, 59, 32), (189, 0, 38))
NOT_COMPARED = (150, 150, 150)
BECAME_COLOUR = (0, 90, 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        return ImageFont.load_default()


def _ramp(t: float) -> tuple[int, int, int]:
    """Colour of ``t`` in 0..1 along :data:`RAMP`."""
    t = min(max(t, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(t), len(RAMP) - 2)
    f = t - i
    return tuple(int(round(a + (b - a) * f)) for a, b in zip(RAMP[i], RAMP[i + 1]))  # type: ignore[return-value]


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def _hatch(draw, box: tuple[int, int, int, int], step: int = 6) -> None:
    """Diagonal hatching inside ``box`` (x0, y0, x1, y1): the mark of a tile pair not compared."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    for t in range(-h, w, step):  # the line x - y = t, clipped to the box
        start = (x0 + max(t, 0), y0 + max(-t, 0))
        end = (x0 + min(t + h, w), y0 + min(w - t, h))
        draw.line((*start, *end), fill=(90, 90, 90, 200), width=1)


def _scene_pixels(before: Path, after: Path) -> tuple[np.ndarray, np.ndarray, object, object]:
    """Both dates as 8-bit RGB on the BEFORE scene's pixel grid (the after scene resampled onto
    it, whatever its CRS), one stretch for both so colours compare; also the grid's transform and CRS."""
    import rasterio
    from rasterio.warp import Resampling, reproject

    bands = TILING.bands or (1, 2, 3)
    with rasterio.open(before) as src:
        first = src.read(bands).astype(np.float32)
        valid_first = src.read_masks(1) > 0
        transform, crs, shape = src.transform, src.crs, (src.height, src.width)
    with rasterio.open(after) as src:
        second = np.zeros((len(bands), *shape), np.float32)
        for i, band in enumerate(bands):
            reproject(rasterio.band(src, band), second[i], dst_transform=transform, dst_crs=crs,
                      resampling=Resampling.bilinear)
    both = np.concatenate([first[:, valid_first], second[:, second[0] > 0]], axis=1)
    low, high = np.percentile(both, 1, axis=1), np.percentile(both, 99, axis=1)

    def stretch(data: np.ndarray) -> np.ndarray:
        scaled = (data - low[:, None, None]) / np.maximum(high - low, 1e-6)[:, None, None]
        return np.moveaxis(np.clip(scaled * 255, 0, 255).astype(np.uint8), 0, -1)

    return stretch(first), stretch(second), transform, crs


def _boxes(layer, transform, crs) -> list[tuple[int, int, int, int]]:
    """Each tile's footprint as a pixel box (x0, y0, x1, y1) on the before scene's grid."""
    inverse = ~transform
    boxes = []
    for minx, miny, maxx, maxy in layer.to_crs(crs).geometry.bounds.itertuples(index=False):
        x0, y0 = inverse * (minx, maxy)
        x1, y1 = inverse * (maxx, miny)
        boxes.append((int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))))
    return boxes


def draw_change(layer, before: Path, after: Path, path: Path, dates: tuple[str, str] = DATES,
                threshold: float = 3.0, top: int = TOP, became: str | None = None) -> list[int]:
    """The change demo picture: both dates side by side (top tiles numbered), the change map (tiles
    coloured by ``change_score`` over the after image, changed tiles outlined, legend), and the
    ``top`` most changed tiles as before/after chip pairs with captions and classes. Returns the
    layer's row positions of the top tiles, most changed first."""
    from PIL import Image, ImageDraw

    first, second, transform, crs = _scene_pixels(before, after)
    boxes = _boxes(layer, transform, crs)
    height, width = first.shape[:2]
    scores = layer["change_score"].to_numpy(dtype=float, na_value=np.nan)
    compared = layer["compared"].fillna(False).to_numpy(dtype=bool)
    ranked = [i for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf)) if compared[i]][:top]

    gap, pad = 16, 24
    big, mid, small = _font(26), _font(19), _font(15)
    canvas_w = 2 * width + gap + 2 * pad
    block_w = (canvas_w - 2 * pad - (top - 1) * gap) // max(top, 1)
    chip = (block_w - 8) // 2
    canvas = Image.new("RGB", (canvas_w, 3000), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    y = pad
    n_compared, n_changed = int(compared.sum()), int((np.nan_to_num(scores, nan=-np.inf) >= threshold).sum())
    draw.text((pad, y), f"What changed between {dates[0]} and {dates[1]}", font=big, fill=(0, 0, 0))
    y += 36
    draw.text((pad, y), f"{before.name} vs {after.name}: {n_compared} tile pairs compared, {n_changed} changed "
              f"(change score >= {threshold:g})", font=small, fill=(70, 70, 70))
    y += 21
    draw.text((pad, y), "False colour (SWIR1, NIR, Red as RGB): vegetation green, water blue, bare soil and town "
              "pink; one stretch for both dates", font=small, fill=(70, 70, 70))
    y += 30

    def numbered(image: Image.Image, colour=(255, 255, 255)) -> Image.Image:
        image = image.copy()
        d = ImageDraw.Draw(image)
        for rank, i in enumerate(ranked, 1):
            x0, y0, x1, y1 = boxes[i]
            d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=2)
            d.rectangle((x0 + 2, y0 + 2, x0 + 16, y0 + 19), fill=(0, 0, 0))
            d.text((x0 + 5, y0 + 3), str(rank), font=small, fill=colour)
        return image

    for k, (label, pixels) in enumerate(((dates[0] + " (before)", first), (dates[1] + " (after)", second))):
        x = pad + k * (width + gap)
        draw.text((x, y), label, font=mid, fill=(0, 0, 0))
        canvas.paste(numbered(Image.fromarray(pixels)), (x, y + 26))
    y += 26 + height + gap

    # the change map: tiles coloured by score over the after image (faded so the colours read)
    faded = Image.blend(Image.fromarray(second), Image.new("RGB", (width, height), (255, 255, 255)), 0.35)
    overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not compared[i]:
            odraw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(*NOT_COMPARED, 150))
            _hatch(odraw, (x0, y0, x1, y1))
        elif scores[i] >= 1.0:
            odraw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(*_ramp((scores[i] - 1.0) / (2 * threshold - 1.0)), 170))
        if compared[i] and scores[i] >= threshold:
            odraw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(120, 0, 20, 255), width=2)
    if became and "became_rank" in layer:
        for i in np.flatnonzero(layer["became_rank"].to_numpy(dtype=float, na_value=np.nan) <= 3):
            x0, y0, x1, y1 = boxes[i]
            odraw.rectangle((x0 + 3, y0 + 3, x1 - 4, y1 - 4), outline=BECAME_COLOUR, width=3)
    change_map = Image.alpha_composite(faded.convert("RGBA"), overlay).convert("RGB")
    draw.text((pad, y), f"Change map over {dates[1]}: tiles coloured by change score", font=mid, fill=(0, 0, 0))
    canvas.paste(numbered(change_map, (255, 255, 255)), (pad, y + 26))

    # the legend beside the change map
    lx, ly = pad + width + gap, y + 26
    draw.text((lx, ly), "Change score (robust z of the embedding distance", font=small, fill=(0, 0, 0))
    draw.text((lx, ly + 19), "between the two dates, within this pair of scenes)", font=small, fill=(0, 0, 0))
    bar_w, bar_y = width - 40, ly + 50
    for px in range(bar_w):
        draw.line((lx + px, bar_y, lx + px, bar_y + 22), fill=_ramp(px / (bar_w - 1)))
    draw.rectangle((lx, bar_y, lx + bar_w - 1, bar_y + 22), outline=(0, 0, 0))
    for value in (1.0, 2.0, threshold, 4.0, 5.0, 2 * threshold):
        tx = lx + int((value - 1.0) / (2 * threshold - 1.0) * (bar_w - 1))
        draw.line((tx, bar_y + 22, tx, bar_y + 28), fill=(0, 0, 0))
        text = f"{value:g}" + ("+" if value == 2 * threshold else "")
        draw.text((tx - draw.textlength(text, font=small) / 2, bar_y + 30), text, font=small, fill=(0, 0, 0))
    draw.text((lx, bar_y + 52), "no colour: score below 1 (unchanged, the usual difference)", font=small,
              fill=(0, 0, 0))
    sy = bar_y + 80
    draw.rectangle((lx, sy, lx + 26, sy + 18), fill=_ramp(0.8), outline=(120, 0, 20), width=2)
    draw.text((lx + 36, sy), f"changed: score >= {threshold:g} (dark outline)", font=small, fill=(0, 0, 0))
    sy += 28
    draw.rectangle((lx, sy, lx + 26, sy + 18), fill=(255, 255, 255), outline=(0, 0, 0), width=2)
    draw.text((lx + 36, sy), f"1..{len(ranked)}: the most changed tiles, shown below", font=small, fill=(0, 0, 0))
    if became and "became_rank" in layer:
        sy += 28
        draw.rectangle((lx + 2, sy + 2, lx + 24, sy + 16), outline=BECAME_COLOUR, width=3)
        draw.text((lx + 36, sy), f'the 3 tiles that most became "{became}" (text vs both dates)', font=small,
                  fill=(0, 0, 0))
    if not compared.all():
        sy += 28
        draw.rectangle((lx, sy, lx + 26, sy + 18), fill=NOT_COMPARED)
        draw.text((lx + 36, sy), "not compared (too little valid overlap)", font=small, fill=(0, 0, 0))
    sy += 40
    notes = [f"{len(layer)} tiles of {TILING.tile_size} px (about "
             f"{abs(transform.a) * TILING.tile_size * 111.32:.1f} km) from {dates[0]}, the {dates[1]} scene "
             "tiled on the same footprints;" if crs and crs.is_geographic else
             f"{len(layer)} tiles from {dates[0]}, the {dates[1]} scene tiled on the same footprints;",
             "embeddings: hqrs-mini-clip, captions: hqrs-mini-coca, classes: zero-shot",
             f"({', '.join(CLASSES)})."]
    for note in notes:
        for line in _wrap(draw, note, small, width - 20):
            draw.text((lx, sy), line, font=small, fill=(60, 60, 60))
            sy += 19
    y += 26 + height + gap + 8

    # the most changed tiles: before/after chips, classes and captions
    draw.text((pad, y), f"The {len(ranked)} most changed tiles ({dates[0]} left, {dates[1]} right)", font=mid,
              fill=(0, 0, 0))
    y += 32
    bottom = y
    for rank, i in enumerate(ranked, 1):
        bx = pad + (rank - 1) * (block_w + gap)
        x0, y0, x1, y1 = boxes[i]
        for k, pixels in enumerate((first, second)):
            crop = Image.fromarray(pixels).crop((x0, y0, x1, y1)).resize((chip, chip), Image.NEAREST)
            canvas.paste(crop, (bx + k * (chip + 8), y))
        row = layer.iloc[i]
        ty = y + chip + 6
        lines = [(f"#{rank}  score {scores[i]:.1f}", mid, (0, 0, 0))]
        if "class_before" in layer:
            change = row["class_change"] or f"still {row['class_before']}"
            lines.append((str(change).replace("\u2192", "->"), small, (150, 20, 20)))  # the font has no arrow
        if "caption_before" in layer:
            lines.append((f"{dates[0]}: {row['caption_before']}", small, (40, 40, 40)))
            lines.append((f"{dates[1]}: {row['caption_after']}", small, (40, 40, 40)))
        for text, font, colour in lines:
            for line in _wrap(draw, text, font, block_w):
                draw.text((bx, ty), line, font=font, fill=colour)
                ty += 24 if font is mid else 19
            ty += 3
        bottom = max(bottom, ty)
    canvas = canvas.crop((0, 0, canvas_w, bottom + pad))
    with atomic_path(path) as tmp:  # never a half-written picture
        canvas.save(tmp, format="PNG")
    return ranked


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for label, scene in zip(DATES, (BEFORE, AFTER)):
        with open_raster(str(scene)) as src:
            info = describe(src)
        print(f"scene   {label}: {scene.name}, {info.width}x{info.height} px, {info.crs}, "
              f"{info.pixel_size_m[0]:.0f} m/px")

    start = time.perf_counter()
    output = out_dir / "change.gpkg"
    layer = hg.change(str(BEFORE), str(AFTER), output, classes=CLASSES, became=BECAME, tiling=TILING,
                      progress=Progress("auto"))
    compared = layer[layer["compared"].fillna(False).astype(bool)]
    print(f"change  {output}: {len(layer)} tiles, {len(compared)} pairs compared, "
          f"{int(compared['changed'].sum())} changed (score >= 3) in {time.perf_counter() - start:.1f} s")
    for row in compared.sort_values("change_rank").head(TOP).itertuples():
        print(f"        #{int(row.change_rank)} {row.tile_id} score {row.change_score:.1f}  "
              f"{row.class_before} -> {row.class_after}")
        print(f"           {DATES[0]}: {row.caption_before}")
        print(f"           {DATES[1]}: {row.caption_after}")
    became = compared.sort_values("became_rank").head(3)
    print(f'became  "{BECAME}": ' + ", ".join(f"{r.tile_id} ({r.became_score:+.3f})" for r in became.itertuples()))

    picture = out_dir / "change_demo.png"
    draw_change(layer, BEFORE, AFTER, picture, became=BECAME)
    print(f"map     {picture}: both dates, the change map with its legend and the {TOP} most changed tiles")
    print(f"open {output} in QGIS over {AFTER.name}: style it on change_score; captions and classes are attributes.")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-output") / "change")
