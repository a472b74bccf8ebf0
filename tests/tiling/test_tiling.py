"""Tiling against independent computations with rasterio and numpy."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from conftest import DRONE_SCENE, EXAMPLE_SCENE, NAIP_SCENE, SHARED_DATA, geographic_scene, needs_shared, write_raster
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform

from hqrs_geo import TileConfig, TileDataset, tile_rasters
from hqrs_geo.errors import InputError
from hqrs_geo.raster.stretch import StretchSpec


def expected_windows(width, height, size, stride):
    xs = sorted({min(x, width - size) for x in range(0, width, stride)})
    ys = sorted({min(y, height - size) for y in range(0, height, stride)})
    return [(x, y) for y in ys for x in xs]


def test_counts_and_footprints_match_rasterio(rgb_raster):
    tiles, _ = tile_rasters(rgb_raster, TileConfig(tile_size=256, overlap=64))
    expected = expected_windows(1000, 700, 256, 192)
    assert list(zip(tiles.x_off, tiles.y_off)) == expected
    assert tiles.tile_id.is_unique and (tiles.width == 256).all() and (tiles.height == 256).all()
    assert tiles.crs.to_epsg() == 32633
    with rasterio.open(rgb_raster) as src:
        for (x, y), geom in zip(expected, tiles.geometry):
            ref = shapely.box(*window_bounds(Window(x, y, 256, 256), src.transform))
            assert geom.equals_exact(shapely.normalize(ref), 1e-6) or geom.symmetric_difference(ref).area < 1e-6
    assert (tiles.valid_fraction == 1.0).all() and np.allclose(tiles.gsd, 0.5)


def test_rotated_transform_gives_the_quadrilateral(tmp_path, rng):
    transform = Affine.translation(300000, 5000000) * Affine.rotation(30) * Affine.scale(2, -2)
    path = write_raster(tmp_path / "rot.tif", rng.integers(0, 255, (3, 300, 300), dtype=np.uint8), transform=transform)
    tiles, _ = tile_rasters(path, TileConfig(tile_size=100))
    assert len(tiles) == 9
    for rec in tiles.itertuples():
        wt = window_transform(Window(rec.x_off, rec.y_off, 100, 100), transform)
        corners = [wt * (0, 0), wt * (100, 0), wt * (100, 100), wt * (0, 100)]
        ref = shapely.Polygon(corners)
        assert rec.geometry.symmetric_difference(ref).area < 1e-6 * ref.area
        assert rec.geometry.area == pytest.approx(200 * 200)


def test_output_crs_4326(rgb_raster):
    tiles, _ = tile_rasters(rgb_raster, TileConfig(tile_size=500, crs="EPSG:4326"))
    assert tiles.crs.to_epsg() == 4326
    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    with rasterio.open(rgb_raster) as src:
        for rec in tiles.itertuples():
            x, y = src.transform * (rec.x_off + 250, rec.y_off + 250)
            lon, lat = to_wgs.transform(x, y)
            assert rec.geometry.contains(shapely.Point(lon, lat))
            corner = to_wgs.transform(*(src.transform * (rec.x_off, rec.y_off)))
            assert shapely.Point(corner).distance(rec.geometry.boundary) < 1e-9


def test_edge_policies(rgb_raster):
    pad, _ = tile_rasters(rgb_raster, TileConfig(tile_size=300, edge="pad", min_valid=0))
    drop, _ = tile_rasters(rgb_raster, TileConfig(tile_size=300, edge="drop"))
    assert len(pad) == 4 * 3 and len(drop) == 3 * 2
    last = pad[(pad.x_off == 900) & (pad.y_off == 600)].iloc[0]
    assert last.valid_fraction == pytest.approx((100 * 100) / (300 * 300))
    ds = TileDataset.from_rasters(rgb_raster, TileConfig(tile_size=300, edge="pad", min_valid=0))
    rec, rgb = next((r, a) for r, a in (ds[i] for i in range(len(ds))) if (r.x_off, r.y_off) == (900, 600))
    with rasterio.open(rgb_raster) as src:
        ref = src.read(window=Window(900, 600, 100, 100))
    assert np.array_equal(rgb[:100, :100], np.moveaxis(ref, 0, -1))
    assert not rgb[100:].any() and not rgb[:, 100:].any()


def _nodata_scene(tmp_path, rng):
    data = rng.integers(1, 255, (3, 512, 512), dtype=np.uint8)
    yy, xx = np.mgrid[:512, :512]
    invalid = (xx - 100) ** 2 + (yy - 150) ** 2 < 180**2
    data[:, invalid] = 0
    return write_raster(tmp_path / "nd.tif", data, nodata=0), ~invalid


def test_valid_fraction_from_nodata_matches_numpy(tmp_path, rng):
    path, valid = _nodata_scene(tmp_path, rng)
    tiles, _ = tile_rasters(path, TileConfig(tile_size=128, min_valid=0))
    assert len(tiles) == 16 - int(sum(not valid[y:y + 128, x:x + 128].any()
                                       for y in range(0, 512, 128) for x in range(0, 512, 128)))
    for rec in tiles.itertuples():
        window = valid[rec.y_off:rec.y_off + 128, rec.x_off:rec.x_off + 128]
        assert rec.valid_fraction == pytest.approx(window.mean(), abs=1e-6)
    kept, _ = tile_rasters(path, TileConfig(tile_size=128))
    fractions = [valid[y:y + 128, x:x + 128].mean() for y in range(0, 512, 128) for x in range(0, 512, 128)]
    assert len(kept) == sum(f >= 0.5 for f in fractions)


def test_valid_fraction_from_alpha_internal_mask_and_msk(tmp_path, rng):
    valid = np.ones((256, 256), bool)
    valid[:64, :] = False
    valid[:, 200:] = False
    expected = valid[:128, :128].mean(), valid[:128, 128:].mean()
    rgb = rng.integers(0, 255, (3, 256, 256), dtype=np.uint8)

    alpha = write_raster(tmp_path / "alpha.tif", np.concatenate([rgb, (valid * 255).astype(np.uint8)[None]]),
                         colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha])
    internal = write_raster(tmp_path / "internal.tif", rgb)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(internal, "r+") as dst:
        dst.write_mask((valid * 255).astype(np.uint8))
    sidecar = write_raster(tmp_path / "sidecar.tif", rgb)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(sidecar, "r+") as dst:
        dst.write_mask((valid * 255).astype(np.uint8))
    assert (tmp_path / "sidecar.tif.msk").exists()
    from hqrs_geo.raster.catalog import remote_defaults

    remote_defaults()  # a remote catalog read earlier in the process must not hide local sidecars
    for path in (alpha, internal, sidecar):
        tiles, _ = tile_rasters(path, TileConfig(tile_size=128, min_valid=0))
        first = tiles[(tiles.row == 0)].sort_values("col").valid_fraction.tolist()
        assert first == pytest.approx(list(expected)), path


def test_float_nan_is_invalid_and_stretch_is_per_scene(tmp_path, rng):
    data = rng.normal(1000, 200, (3, 256, 256)).astype("float32")
    data[:, :32, :] = np.nan
    path = write_raster(tmp_path / "f.tif", data)
    tiles, scenes = tile_rasters(path, TileConfig(tile_size=128, min_valid=0))
    top = tiles[tiles.row == 0].valid_fraction.tolist()
    assert top == pytest.approx([0.75, 0.75])
    lo = np.nanpercentile(data.reshape(3, -1), 2, axis=1)
    hi = np.nanpercentile(data.reshape(3, -1), 98, axis=1)
    scale = scenes[0].scale
    assert np.allclose(scale.low, lo, rtol=1e-4) and np.allclose(scale.high, hi, rtol=1e-4)
    ds = TileDataset.from_rasters(path, TileConfig(tile_size=128, min_valid=0))
    for i in range(len(ds)):
        rec, rgb = ds[i]
        block = data[:, rec.y_off:rec.y_off + 128, rec.x_off:rec.x_off + 128]
        ref = np.clip((block - lo[:, None, None]) / (hi - lo)[:, None, None] * 255, 0, 255)
        ref = np.where(np.isnan(ref), 0, ref + 0.5).astype(np.uint8)
        assert np.abs(rgb.astype(int) - np.moveaxis(ref, 0, -1)).max() <= 1


def test_uint16_stretch_same_for_every_tile_and_overridable(tmp_path):
    ramp = np.tile(np.arange(1024, dtype=np.uint16) * 4, (3, 256, 1))
    path = write_raster(tmp_path / "u16.tif", ramp)
    ds = TileDataset.from_rasters(path, TileConfig(tile_size=256, stretch="0,4092"))
    values = np.array([ds[i][1][0, 0, 0] for i in range(len(ds))])
    expected = (np.arange(1024)[::256] * 4 / 4092 * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(values, expected)
    auto = TileDataset.from_rasters(path, TileConfig(tile_size=256))
    assert auto.reader.scenes[str(path)].scale.low[0] == pytest.approx(np.percentile(ramp[0], 2), rel=1e-3)
    # a dark tile stays dark: no per-tile stretch
    assert auto[0][1].max() < 64 and auto[3][1].min() > 190
    with pytest.raises(Exception, match="stretch"):
        TileConfig(stretch="bright").validated()
    assert str(StretchSpec.parse("p1,99")) == "p1,99"


def test_band_selection(tmp_path, rng):
    rgbn = rng.integers(0, 255, (4, 64, 64), dtype=np.uint8)
    path = write_raster(tmp_path / "rgbn.tif", rgbn, photometric="minisblack")
    _, rgb = TileDataset.from_rasters(path, TileConfig(tile_size=64))[0]
    assert np.array_equal(rgb, np.moveaxis(rgbn[:3], 0, -1))
    _, false_colour = TileDataset.from_rasters(path, TileConfig(tile_size=64, bands=(4, 1, 2)))[0]
    assert np.array_equal(false_colour, np.moveaxis(rgbn[[3, 0, 1]], 0, -1))
    bgr = write_raster(tmp_path / "bgr.tif", rgbn[:3],
                       colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red])
    _, swapped = TileDataset.from_rasters(bgr, TileConfig(tile_size=64))[0]
    assert np.array_equal(swapped, np.moveaxis(rgbn[[2, 1, 0]], 0, -1))
    gray = write_raster(tmp_path / "gray.tif", rgbn[:1])
    _, replicated = TileDataset.from_rasters(gray, TileConfig(tile_size=64))[0]
    assert (replicated == rgbn[0][..., None]).all()
    two = write_raster(tmp_path / "two.tif", rgbn[:2])
    with pytest.raises(InputError, match="bands"):
        tile_rasters(two)
    with pytest.raises(InputError, match="band 7 does not exist"):
        tile_rasters(path, TileConfig(tile_size=64, bands=(7, 1, 2)))


def test_palette_raster(tmp_path):
    idx = np.zeros((1, 64, 64), np.uint8)
    idx[:, :, 32:] = 1
    path = write_raster(tmp_path / "pal.tif", idx, photometric="palette")
    with rasterio.open(path, "r+") as dst:
        dst.write_colormap(1, {0: (10, 20, 30, 255), 1: (200, 100, 50, 255)})
    _, rgb = TileDataset.from_rasters(path, TileConfig(tile_size=64))[0]
    assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[0, 63]) == (200, 100, 50)


def test_target_gsd_resamples_and_uses_overviews(tmp_path):
    data = np.zeros((3, 1024, 1024), np.uint8)
    data[:, :, 512:] = 200
    path = write_raster(tmp_path / "ov.tif", data)
    tiles, _ = tile_rasters(path, TileConfig(tile_size=64, gsd=2.0))  # 0.5 m -> 2 m: 256 native px per tile
    assert len(tiles) == 16 and (tiles.width == 256).all() and (tiles.out_width == 64).all()
    assert np.allclose(tiles.gsd, 2.0)
    ds = TileDataset.from_rasters(path, TileConfig(tile_size=64, gsd=2.0))
    rec, rgb = ds[1]
    assert rgb.shape == (64, 64, 3)
    with rasterio.open(path) as src:
        ref = src.read(window=Window(256, 0, 256, 256), out_shape=(3, 64, 64),
                       resampling=rasterio.enums.Resampling.bilinear)
    assert np.array_equal(rgb, np.moveaxis(ref, 0, -1))
    # overviews built, then the full-resolution pixels changed: a downsampled read that shows
    # the old values proves GDAL served it from the overview
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([4], rasterio.enums.Resampling.average)
        dst.write(np.full((3, 1024, 1024), 77, np.uint8))
    _, from_overview = TileDataset.from_rasters(path, TileConfig(tile_size=64, gsd=2.0))[3]
    assert (from_overview == 200).all()
    _, native = TileDataset.from_rasters(path, TileConfig(tile_size=64))[3]
    assert (native == 77).all()


def test_tiny_raster_smaller_than_a_tile(tmp_path, rng):
    data = rng.integers(1, 255, (3, 40, 30), dtype=np.uint8)
    path = write_raster(tmp_path / "tiny.tif", data)
    with pytest.raises(InputError, match="larger than the raster"):
        tile_rasters(path, TileConfig(tile_size=64))
    tiles, _ = tile_rasters(path, TileConfig(tile_size=64, edge="pad", min_valid=0.1))
    assert len(tiles) == 1 and tiles.valid_fraction.iloc[0] == pytest.approx(40 * 30 / 64**2)
    _, rgb = TileDataset.from_rasters(path, TileConfig(tile_size=64, edge="pad", min_valid=0.1))[0]
    assert np.array_equal(rgb[:40, :30], np.moveaxis(data, 0, -1)) and not rgb[40:].any()


def test_cog_and_vrt_mosaic(tmp_path, rng):
    data = rng.integers(0, 255, (3, 256, 512), dtype=np.uint8)
    left = write_raster(tmp_path / "left.tif", data[:, :, :256])
    right = write_raster(tmp_path / "right.tif", data[:, :, 256:], transform=Affine(0.5, 0, 500128, 0, -0.5, 4000000))
    sources = "".join(
        f"""<SimpleSource><SourceFilename relativeToVRT="1">{name}</SourceFilename><SourceBand>{b}</SourceBand>
        <SrcRect xOff="0" yOff="0" xSize="256" ySize="256"/>"""
        f"""<DstRect xOff="{x}" yOff="0" xSize="256" ySize="256"/></SimpleSource>"""
        for name, x in (("left.tif", 0), ("right.tif", 256)) for b in [None])
    bands = "".join(
        f"""<VRTRasterBand dataType="Byte" band="{b}">"""
        f"""{sources.replace("<SourceBand>None</SourceBand>", f"<SourceBand>{b}</SourceBand>")}</VRTRasterBand>"""
        for b in (1, 2, 3))
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(f"""<VRTDataset rasterXSize="512" rasterYSize="256"><SRS>EPSG:32633</SRS>
        <GeoTransform>500000, 0.5, 0, 4000000, 0, -0.5</GeoTransform>{bands}</VRTDataset>""")
    ds = TileDataset.from_rasters(vrt, TileConfig(tile_size=128))
    assert len(ds) == 8
    rec, rgb = ds[2]
    assert np.array_equal(rgb, np.moveaxis(data[:, 0:128, 256:384], 0, -1))
    cog = tmp_path / "cog.tif"
    with rasterio.open(left) as src:
        profile = src.profile | {"driver": "COG", "blocksize": 128}
        profile.pop("blockxsize"), profile.pop("blockysize"), profile.pop("tiled")
        with rasterio.open(cog, "w", **profile) as dst:
            dst.write(src.read())
    assert len(tile_rasters(cog, TileConfig(tile_size=64))[0]) == 16
    assert len(TileDataset.from_rasters(right, TileConfig(tile_size=64))) == 16


def test_multiple_scenes_unique_ids_and_sources(tmp_path, rng):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder in (a, b):
        write_raster(folder / "scene.tif", rng.integers(0, 255, (3, 256, 256), dtype=np.uint8))
    tiles, scenes = tile_rasters([str(a / "scene.tif"), str(b)], TileConfig(tile_size=128))
    assert len(tiles) == 8 and tiles.tile_id.is_unique
    assert set(tiles.source) == {str(a / "scene.tif"), str(b / "scene.tif")}
    globbed, _ = tile_rasters([str(tmp_path / "*" / "*.tif")], TileConfig(tile_size=128))
    assert sorted(globbed.tile_id) == sorted(tiles.tile_id)


def test_vsi_path(tmp_path, rng):
    import zipfile

    path = write_raster(tmp_path / "z.tif", rng.integers(0, 255, (3, 128, 128), dtype=np.uint8))
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.write(path, "z.tif")
    tiles, _ = tile_rasters(f"/vsizip/{tmp_path / 'z.zip'}/z.tif", TileConfig(tile_size=64))
    assert len(tiles) == 4 and tiles.source.iloc[0].startswith("/vsizip/")


def test_scene_without_valid_pixels_gives_empty_frame(tmp_path):
    path = write_raster(tmp_path / "empty.tif", np.zeros((3, 128, 128), np.uint8), nodata=0)
    tiles, _ = tile_rasters(path, TileConfig(tile_size=64))
    assert len(tiles) == 0 and tiles.crs.to_epsg() == 32633 and "valid_fraction" in tiles.columns


@pytest.mark.parametrize("name, size, count", [
    ("example", "64m", 16),
    ("naip", 100, 9),  # R, G, B, NIR (no colour tags): the first three bands
    ("drone", 64, 9),
    ("geographic", 256, 12),  # EPSG:4326, R, G, B, alpha
    pytest.param("scenes/swellendam_3320D_epsg4326.tif", 256, 25,
                 marks=needs_shared("scenes/swellendam_3320D_epsg4326.tif")),
])
def test_real_scenes(name, size, count):
    path = {"example": EXAMPLE_SCENE, "naip": NAIP_SCENE, "drone": DRONE_SCENE}.get(name) or (
        geographic_scene() if name == "geographic" else SHARED_DATA / name)
    tiles, scenes = tile_rasters(path, TileConfig(tile_size=size, min_valid=0))
    with rasterio.open(path) as src:
        width, height = tiles.width.iloc[0], tiles.height.iloc[0]
        cols = len(sorted({min(x, src.width - width) for x in range(0, src.width, width)}))
        rows = len(sorted({min(y, src.height - height) for y in range(0, src.height, height)}))
        assert len(tiles) == cols * rows == count
        assert tiles.crs == src.crs
    assert scenes[0].bands.indexes == (1, 2, 3)
