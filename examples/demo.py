"""The main job on the example scene: describe it, tile it into a GeoPackage, export chips.

Run with ``make demo`` (sets everything up) or ``python examples/demo.py [OUTPUT_DIR]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hqrs_geo import TileConfig, TileDataset, read_runs, read_tiles, tile_rasters, write_tiles
from hqrs_geo.chips import export_chips
from hqrs_geo.layers import new_run
from hqrs_geo.progress import Progress
from hqrs_geo.scene import describe, open_raster

HERE = Path(__file__).resolve().parent
SCENE = HERE / "data" / "urban_river_025m_epsg28992.tif"


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_raster(str(SCENE)) as src:
        info = describe(src)
    print(f"scene   {SCENE.name}: {info.width}x{info.height} px, {info.crs}, "
          f"{info.pixel_size_m[0]:.2f} m/px, bands {', '.join(info.colorinterp)}")

    config = TileConfig(tile_size="64m", overlap="25%")
    tiles, scenes = tile_rasters(SCENE, config, progress=Progress("auto"))
    layer = out_dir / "tiles.gpkg"
    params = {"tiling": config.as_dict(), "scenes": [s.as_dict() for s in scenes]}
    write_tiles(layer, tiles, new_run("tile", "tiles", params), replace_sources=[str(SCENE)])
    back = read_tiles(layer)
    print(f"layer   {layer}: {len(back)} tiles of 64 m ({back.width.iloc[0]} px), "
          f"CRS {back.crs.to_string()}, runs recorded: {len(read_runs(layer))}")
    print(back[["tile_id", "x_off", "y_off", "valid_fraction", "gsd"]].head(5).to_string(index=False))

    wgs84, _ = tile_rasters(SCENE, TileConfig(tile_size="64m", overlap="25%", crs="EPSG:4326"))
    parquet = out_dir / "tiles_wgs84.parquet"
    write_tiles(parquet, wgs84, new_run("tile", "tiles", params))
    lon, lat = wgs84.geometry.iloc[0].centroid.coords[0]
    print(f"layer   {parquet}: first tile centre at {lat:.5f} N, {lon:.5f} E")

    dataset = TileDataset.from_layer(layer)
    rec, rgb = dataset[0]
    print(f"reader  {len(dataset)} tiles as {rgb.shape} {rgb.dtype} arrays, first: {rec.tile_id}")

    chips = export_chips(layer, out_dir / "chips", image_format="jpg")
    print(f"chips   {len(chips)} JPEG chips + index.csv + index.gpkg in {out_dir / 'chips'}")
    print("open the GeoPackage in QGIS over the scene to see the tile grid.")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-output"))
