"""The main job on the example scene, end to end with the shipped demo models.

Describe the scene, tile it into a GeoPackage, embed every tile (hqrs-mini-clip) and caption
it (hqrs-mini-coca), run a few text searches and a zero-shot classification, and draw the
scene with the tile grid and the best hits to ``search_hits.png``. Nothing is downloaded.

Run with ``make demo`` (sets everything up) or ``python examples/demo.py [OUTPUT_DIR]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hqrs_geo as hg
from hqrs_geo import TileConfig, TileDataset, read_runs, read_tiles, tile_rasters, write_tiles
from hqrs_geo.layer.runs import new_run
from hqrs_geo.progress import Progress
from hqrs_geo.raster.scene import describe, open_raster
from hqrs_geo.tiling.chips import export_chips

HERE = Path(__file__).resolve().parent
SCENE = HERE / "data" / "urban_river_025m_epsg28992.tif"
QUERIES = ("a river", "buildings", "a parking lot with many cars", "dense trees")
COLOURS = ((0, 160, 255), (255, 60, 60), (40, 220, 40), (255, 200, 0))
UCM_CLASSES = ("agricultural", "airplane", "baseball diamond", "beach", "buildings", "chaparral",
               "dense residential", "forest", "freeway", "golf course", "harbor", "intersection",
               "medium residential", "mobile home park", "overpass", "parking lot", "river", "runway",
               "sparse residential", "storage tanks", "tennis court")


def draw_hits(scene: Path, tiles, hits: dict, path: Path, scale: float = 0.8) -> None:
    """The scene with the tile grid (thin) and each query's top tiles (thick, one colour per
    query, rank number in the corner), plus a legend, as a PNG."""
    import numpy as np
    import rasterio
    from PIL import Image, ImageDraw

    with rasterio.open(scene) as src:
        height, width = int(src.height * scale), int(src.width * scale)
        rgb = src.read((1, 2, 3), out_shape=(3, height, width))
    image = Image.fromarray(np.moveaxis(rgb, 0, -1).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)

    def box(row):
        x0, y0 = row.x_off * scale, row.y_off * scale
        return (x0, y0, x0 + row.width * scale - 1, y0 + row.height * scale - 1)

    for row in tiles.itertuples():
        draw.rectangle(box(row), outline=(255, 255, 255), width=1)
    for (query, frame), colour in zip(hits.items(), COLOURS):
        for row in frame.itertuples():
            x0, y0, x1, y1 = box(row)
            inset = 2 + 3 * list(hits).index(query)  # overlapping hits of several queries stay visible
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), outline=colour, width=3)
            draw.text((x0 + inset + 4, y0 + inset + 2), str(row.rank), fill=colour)
    legend = Image.new("RGB", (image.width, 18 * len(hits) + 8), (255, 255, 255))
    ldraw = ImageDraw.Draw(legend)
    for i, (query, colour) in enumerate(zip(hits, COLOURS)):
        ldraw.rectangle((6, 6 + 18 * i, 20, 18 + 18 * i), fill=colour)
        ldraw.text((28, 6 + 18 * i), f'"{query}": top {len(hits[query])} tiles (rank in the corner)', fill=(0, 0, 0))
    canvas = Image.new("RGB", (image.width, image.height + legend.height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    canvas.paste(legend, (0, image.height))
    canvas.save(path)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_raster(str(SCENE)) as src:
        info = describe(src)
    print(f"scene   {SCENE.name}: {info.width}x{info.height} px, {info.crs}, "
          f"{info.pixel_size_m[0]:.2f} m/px, bands {', '.join(info.colorinterp)}")

    config = TileConfig(tile_size="64m", overlap="50%")
    tiles, scenes = tile_rasters(SCENE, config, progress=Progress("auto"))
    layer = out_dir / "tiles.gpkg"
    params = {"tiling": config.as_dict(), "scenes": [s.as_dict() for s in scenes]}
    write_tiles(layer, tiles, new_run("tile", "tiles", params), replace_sources=[str(SCENE)])
    back = read_tiles(layer)
    print(f"layer   {layer}: {len(back)} tiles of 64 m ({back.width.iloc[0]} px), "
          f"CRS {back.crs.to_string()}, runs recorded: {len(read_runs(layer))}")
    print(back[["tile_id", "x_off", "y_off", "valid_fraction", "gsd"]].head(5).to_string(index=False))

    wgs84, _ = tile_rasters(SCENE, TileConfig(tile_size="64m", overlap="50%", crs="EPSG:4326"))
    parquet = out_dir / "tiles_wgs84.parquet"
    write_tiles(parquet, wgs84, new_run("tile", "tiles", params))
    lon, lat = wgs84.geometry.iloc[0].centroid.coords[0]
    print(f"layer   {parquet}: first tile centre at {lat:.5f} N, {lon:.5f} E")

    dataset = TileDataset.from_layer(layer)
    rec, rgb = dataset[0]
    print(f"reader  {len(dataset)} tiles as {rgb.shape} {rgb.dtype} arrays, first: {rec.tile_id}")

    chips = export_chips(layer, out_dir / "chips", image_format="jpg")
    print(f"chips   {len(chips)} JPEG chips + index.csv + index.gpkg in {out_dir / 'chips'}")

    # embed + caption with the shipped demo models (the defaults when no model is named)
    frame = hg.run(str(layer), progress=Progress("auto"))
    dim = int(frame["emb_hqrs_mini_clip_dim"].iloc[0])
    print(f"models  {frame['emb_hqrs_mini_clip_model'].iloc[0]} embeddings ({dim}-d)"
          f" and {frame['caption_model'].iloc[0]} captions on {len(frame)} tiles")
    for row in frame.head(3).itertuples():
        print(f"        {row.tile_id}: {row.caption}")

    session = hg.SearchSession(str(layer))
    hits = {}
    for query in QUERIES:
        hits[query] = session.search_text(query, k=3)
        print(f'search  "{query}":')
        for row in hits[query].itertuples():
            print(f"        #{row.rank} {row.tile_id} score {row.score:.3f}  {row.caption}")
    labels = session.classify(list(UCM_CLASSES), top_k=1)
    counts = labels["label"].value_counts().head(5)
    print("classes " + ", ".join(f"{name} {count}" for name, count in counts.items()) + " (zero-shot, UCM classes)")

    picture = out_dir / "search_hits.png"
    draw_hits(SCENE, read_tiles(layer), hits, picture)
    print(f"map     {picture}: the scene, the tile grid and the top hits of each query")
    print(f"open {layer} in QGIS over the scene: captions are attributes, embeddings searchable with the dock.")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-output"))
