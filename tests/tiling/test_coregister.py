"""Co-registered tiling (``tile_like`` / ``hqrs-geo tile --like``): a later date on the grid of a tile layer.

The later dates are made here with plain rasterio (crops, ``rasterio.warp.reproject`` to another CRS and
pixel size), so what the tiles must hold is known independently of the code under test.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from conftest import EXAMPLE_SCENE, write_raster
from fork_runner import run_cli
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window
from scale_helpers import write_crop
from tiny_models import TINY_CLIP

from hqrs_geo import TileConfig, read_runs, read_tiles
from hqrs_geo.api import embed, tile
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.layer.columns import embedding_columns, read_embeddings
from hqrs_geo.layer.io import open_layer, write_tiles
from hqrs_geo.tiling.coregister import aligned_folder, tile_like
from hqrs_geo.tiling.dataset import TileDataset

BEFORE = Window(300, 300, 400, 400)  # of the example scene: 16 tiles of 100 px (25 m)


@pytest.fixture
def before(tmp_path):
    """The earlier date: a 400 px crop of the example scene (EPSG:28992, 0.25 m) tiled at 100 px."""
    raster = write_crop(EXAMPLE_SCENE, tmp_path / "before.tif", BEFORE, cog=False)
    layer = tmp_path / "before.gpkg"
    tile(raster, layer, TileConfig(tile_size=100))
    return raster, layer


def warp_to_4326(path, window: Window, res: float = 2e-6):
    """The example scene's ``window`` (with 50 px around it) warped to EPSG:4326 at ``res`` degrees
    (about 0.14 m x 0.22 m) with plain rasterio; an alpha band marks the warped footprint."""
    with rasterio.open(EXAMPLE_SCENE) as src:
        big = Window(window.col_off - 50, window.row_off - 50, window.width + 100, window.height + 100)
        data = src.read(window=big)
        src_transform = src.window_transform(big)
        bounds = rasterio.windows.bounds(big, src.transform)
        left, bottom, right, top = transform_bounds(src.crs, "EPSG:4326", *bounds)
        transform = Affine(res, 0, left, 0, -res, top)
        width, height = int(np.ceil((right - left) / res)), int(np.ceil((top - bottom) / res))
        out = np.zeros((4, height, width), np.uint8)
        source = np.concatenate([data, np.full((1, *data.shape[1:]), 255, np.uint8)])
        for band in range(4):
            reproject(source[band], out[band], src_transform=src_transform, src_crs=src.crs, dst_transform=transform,
                      dst_crs="EPSG:4326", resampling=Resampling.bilinear if band < 3 else Resampling.nearest)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=4, dtype="uint8",
                       crs="EPSG:4326", transform=transform, photometric="RGB", alpha="YES", tiled=True) as dst:
        dst.write(out)
    return path


def tile_pixels(layer):
    """``{tile_id: (rgb, valid)}`` of every tile of ``layer``, read as the engine reads them."""
    opened = open_layer(layer)
    dataset = TileDataset.from_frame(opened.frame, opened.scenes())
    with dataset.reader as reader:
        return {rec.tile_id: reader.read(rec) for rec in dataset.records}


def test_another_crs_and_resolution_gives_the_same_tiles_and_close_pixels(tmp_path, before):
    _, before_layer = before
    after_raster = warp_to_4326(tmp_path / "after_4326.tif", BEFORE)
    after_layer = tmp_path / "after.gpkg"
    report = tile_like(before_layer, after_raster, after_layer)

    ref, new = read_tiles(before_layer), read_tiles(after_layer)
    assert len(ref) == 16 and new["tile_id"].tolist() == ref["tile_id"].tolist()
    assert new.crs == ref.crs
    assert all(a.equals_exact(b, 1e-9) for a, b in zip(new.geometry, ref.geometry))
    for column in ("row", "col", "x_off", "y_off", "width", "height", "out_width", "out_height"):
        assert new[column].tolist() == ref[column].tolist(), column
    assert (new["valid_fraction"] == 1.0).all()
    assert len(report.tiles) == 16 and report.examined == 16

    # the aligned scene: the reference scene's own pixel grid, tiled, DEFLATE, an internal mask
    (aligned,) = aligned_folder(after_layer).glob("*.tif")
    with rasterio.open(aligned) as src, rasterio.open(before[0]) as ref_src:
        assert (src.crs, src.transform, src.shape) == (ref_src.crs, ref_src.transform, ref_src.shape)
        assert src.compression.name.lower() == "deflate" and src.profile["tiled"]
        assert [f.name for f in src.mask_flag_enums[0]] == ["per_dataset"]
    assert set(new["source"]) == {str(aligned.resolve())}
    run = read_runs(after_layer)[-1]
    assert run["command"] == "tile" and run["params"]["like"] == str(before_layer.resolve())

    # pixels: twice resampled (0.25 m -> 4326 -> 0.25 m), yet close to the reference's own tiles, and
    # registered: no shift of a pixel or two matches the reference's tile better than none
    before_px, after_px = tile_pixels(before_layer), tile_pixels(after_layer)
    for tile_id, (rgb, valid) in before_px.items():
        got, got_valid = after_px[tile_id]
        assert got_valid.all() and valid.all()
        assert np.abs(got.astype(int) - rgb.astype(int)).mean() < 5, tile_id
        assert best_shift(got, rgb) == (0, 0), tile_id


def best_shift(moved: np.ndarray, fixed: np.ndarray, most: int = 2) -> tuple[int, int]:
    """The (rows, columns) shift of ``moved`` that matches ``fixed`` best (mean absolute difference)."""
    h, w = fixed.shape[:2]
    core = fixed[most:h - most, most:w - most].astype(float)
    scores = {(dy, dx): np.abs(moved[most + dy:h - most + dy, most + dx:w - most + dx].astype(float) - core).mean()
              for dy in range(-most, most + 1) for dx in range(-most, most + 1)}
    return min(scores, key=scores.__getitem__)


def test_partial_overlap_leaves_out_tiles_and_measures_valid_fractions(tmp_path, before):
    before_raster, before_layer = before
    # the later date covers columns 170.. and rows ..330 of the earlier one, on the same pixel grid
    part = Window(BEFORE.col_off + 170, BEFORE.row_off, 230, 330)
    after_raster = write_crop(EXAMPLE_SCENE, tmp_path / "part.tif", part, cog=False)
    with rasterio.open(after_raster) as src:
        covered = shapely.box(*src.bounds)
    ref = read_tiles(before_layer)
    expected = {t: g.intersection(covered).area / g.area for t, g in zip(ref["tile_id"], ref.geometry)}
    assert not any(0.4 < f < 0.6 for f in expected.values())  # no tile on the fence

    layer = tmp_path / "after.gpkg"
    new = tile_like(before_layer, after_raster, layer).layer
    assert set(new["tile_id"]) == {t for t, f in expected.items() if f >= 0.5}
    for tile_id, fraction in zip(new["tile_id"], new["valid_fraction"]):
        assert fraction == pytest.approx(expected[tile_id], abs=0.01)

    # a lower min_valid keeps the partly covered tiles too (valid fractions as measured)
    low = tile_like(before_layer, after_raster, tmp_path / "low.gpkg", TileConfig(min_valid=0.2)).layer
    assert set(low["tile_id"]) == {t for t, f in expected.items() if f >= 0.2}
    for tile_id, fraction in zip(low["tile_id"], low["valid_fraction"]):
        assert fraction == pytest.approx(expected[tile_id], abs=0.01)

    # same grid, same pixels: a fully covered tile holds exactly the reference's pixels
    before_px, after_px = tile_pixels(before_layer), tile_pixels(layer)
    full = [t for t, f in expected.items() if f == 1.0]
    assert full
    for tile_id in full:
        assert np.array_equal(after_px[tile_id][0], before_px[tile_id][0])


def test_mosaic_first_valid_pixel_wins_and_rerun_reuses_aligned_file(tmp_path, before):
    before_raster, before_layer = before
    with rasterio.open(before_raster) as src:
        transform, crs = src.transform, src.crs
    left = np.full((3, 400, 200), 40, np.uint8)  # the left half of the scene, value 40
    everywhere = np.full((3, 400, 400), 200, np.uint8)  # all of it, value 200
    first = write_raster(tmp_path / "left.tif", left, transform=transform, crs=crs)
    second = write_raster(tmp_path / "all.tif", everywhere, transform=transform, crs=crs)
    layer = tmp_path / "mosaic.gpkg"
    tile_like(before_layer, [first, second], layer, TileConfig(stretch="none"))
    (aligned,) = aligned_folder(layer).glob("*.tif")
    with rasterio.open(aligned) as src:
        data = src.read(1)
    assert (data[:, :200] == 40).all() and (data[:, 200:] == 200).all()

    # a result column (as the model engine writes one), then a rerun with the same inputs: the aligned
    # file is reused and the results are kept
    tiles = read_tiles(layer)
    write_tiles(layer, tiles.assign(caption="a river"))
    stamp = aligned.stat().st_mtime_ns
    tile_like(before_layer, [first, second], layer, TileConfig(stretch="none"))
    assert aligned.stat().st_mtime_ns == stamp
    assert (read_tiles(layer)["caption"] == "a river").all()
    # another order of the inputs: other pixels, so a new aligned file, the old one removed, and the
    # results of the old pixels not carried over; no duplicate tiles
    tile_like(before_layer, [second, first], layer, TileConfig(stretch="none"))
    (again,) = aligned_folder(layer).glob("*.tif")
    assert again != aligned and not aligned.exists()
    with rasterio.open(again) as src:
        assert (src.read(1) == 200).all()
    tiles = read_tiles(layer)
    assert len(tiles) == 16 and tiles["caption"].isna().all() and set(tiles["source"]) == {str(again.resolve())}


def test_output_embeds_unchanged(tmp_path, before, tiny_clip_checkpoint):
    _, before_layer = before
    after_raster = write_crop(EXAMPLE_SCENE, tmp_path / "after.tif", Window(250, 250, 500, 500), cog=False)
    layer = tmp_path / "after.gpkg"
    tile(after_raster, layer, like=before_layer)
    frame = embed(layer, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu",
                  options=RunOptions(workers=0, embedding_dtype="float32"))
    present, vectors = read_embeddings(frame)
    assert present.all() and vectors.shape[0] == 16
    assert frame["tile_id"].tolist() == read_tiles(before_layer)["tile_id"].tolist()


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hqrs-geo: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_tile_like_and_its_errors(tmp_path, before):
    before_raster, before_layer = before
    after_raster = warp_to_4326(tmp_path / "after_4326.tif", BEFORE)
    out = tmp_path / "after.gpkg"
    result = run_cli("tile", after_raster, "-o", out, "--like", before_layer, "--progress", "json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    stages = [e["stage"] for e in events]
    assert stages[0] == "align" and "tile" in stages and stages[-1] == "done", stages
    assert events[-1]["tiles"] == 16 and events[-1]["output"] == str(out)
    assert "left out below valid fraction 0.5" in events[-1]["message"]
    assert read_tiles(out)["tile_id"].tolist() == read_tiles(before_layer)["tile_id"].tolist()

    # the reference is a raster, not a tile layer
    assert_one_line_error(run_cli("tile", after_raster, "-o", tmp_path / "x.gpkg", "--like", before_raster),
                          "before.tif", "not a tile layer")
    # a layer without scene records (made by another tool or an old version)
    foreign = tmp_path / "foreign.gpkg"
    read_tiles(before_layer)[["tile_id", "geometry"]].to_file(foreign, layer="tiles")
    assert_one_line_error(run_cli("tile", after_raster, "-o", tmp_path / "y.gpkg", "--like", foreign),
                          "foreign.gpkg", "no record")
    # rasters of another place
    far = write_raster(tmp_path / "far.tif", np.ones((3, 64, 64), np.uint8),
                       transform=Affine(0.25, 0, 10_000, 0, -0.25, 300_000), crs="EPSG:28992")
    assert_one_line_error(run_cli("tile", far, "-o", tmp_path / "z.gpkg", "--like", before_layer),
                          "far.tif", "do(es) not overlap")
    # a raster without CRS while the reference has one, and the other way round
    plain = write_raster(tmp_path / "plain.tif", np.ones((3, 64, 64), np.uint8), transform=Affine.identity(),
                         crs=None)
    assert_one_line_error(run_cli("tile", plain, "-o", tmp_path / "w.gpkg", "--like", before_layer),
                          "plain.tif", "has no CRS")
    pixel_layer = tmp_path / "pixels.gpkg"
    tile(write_raster(tmp_path / "plain_big.tif", np.ones((3, 200, 200), np.uint8), transform=Affine.identity(),
                      crs=None), pixel_layer, TileConfig(tile_size=100))
    assert_one_line_error(run_cli("tile", after_raster, "-o", tmp_path / "v.gpkg", "--like", pixel_layer),
                          "after_4326.tif", "have no CRS")
    assert not any((tmp_path / name).exists() for name in ("x.gpkg", "y.gpkg", "z.gpkg", "w.gpkg", "v.gpkg"))


def test_rasters_without_crs_follow_a_pixel_layer(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 255, (3, 200, 200), dtype=np.uint8)
    before_raster = write_raster(tmp_path / "b.tif", data, transform=Affine.identity(), crs=None)
    layer = tmp_path / "b.gpkg"
    tile(before_raster, layer, TileConfig(tile_size=100))
    # the later date: the right half only, placed by its transform (no CRS on either)
    after_raster = write_raster(tmp_path / "a.tif", data[:, :, 100:], transform=Affine(1, 0, 100, 0, 1, 0), crs=None)
    new = tile_like(layer, after_raster, tmp_path / "a.gpkg").layer
    assert new["tile_id"].tolist() == [t for t in read_tiles(layer)["tile_id"] if t.endswith("c0001")]
    pixels, reference = tile_pixels(tmp_path / "a.gpkg"), tile_pixels(layer)
    for tile_id in new["tile_id"]:
        assert np.array_equal(pixels[tile_id][0], reference[tile_id][0])


def test_reference_errors_in_python(tmp_path, before):
    _, before_layer = before
    with pytest.raises(InputError, match="file not found"):
        tile_like(tmp_path / "missing.gpkg", EXAMPLE_SCENE, tmp_path / "o.gpkg")
    with pytest.raises(InputError, match="dataset not found|not a tile layer"):
        tile_like(tmp_path / "missing", EXAMPLE_SCENE, tmp_path / "o.gpkg")
    with pytest.raises(OptionError, match="give a name ending in .gpkg"):
        tile_like(before_layer, EXAMPLE_SCENE, tmp_path / "folder/")
    assert not (tmp_path / "o.gpkg").exists() and not (tmp_path / "folder").exists()
    # rasters over the reference whose pixels are all nodata: refused, nothing left behind
    with rasterio.open(before[0]) as src:
        transform, crs = src.transform, src.crs
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 400, 400), np.uint8), transform=transform, crs=crs,
                         nodata=0)
    with pytest.raises(InputError, match="no valid pixel"):
        tile_like(before_layer, empty, tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists() and not aligned_folder(tmp_path / "o.gpkg").exists()
    with pytest.raises(OptionError, match="reference layer itself"):
        tile_like(before_layer, empty, before_layer)
    # a mosaic of rasters of different kinds
    wide = write_raster(tmp_path / "wide.tif", np.ones((3, 400, 400), np.uint16), transform=transform, crs=crs)
    with pytest.raises(InputError, match="wide.tif: its bands .* differ from those of .*empty.tif"):
        tile_like(before_layer, [empty, wide], tmp_path / "o.gpkg")
    # a damaged raster (truncated): one line, and neither a layer nor aligned pixels are left behind
    damaged = write_raster(tmp_path / "damaged.tif", np.random.default_rng(1).integers(0, 255, (3, 400, 400),
                           dtype=np.uint8), transform=transform, crs=crs, compress="deflate")
    with open(damaged, "r+b") as handle:
        handle.truncate(damaged.stat().st_size * 2 // 3)
    with pytest.raises(InputError, match="damaged.tif"):
        tile_like(before_layer, damaged, tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists() and not aligned_folder(tmp_path / "o.gpkg").exists()
    # a reference without tiles
    tile(empty, tmp_path / "none.gpkg")
    with pytest.raises(InputError, match="holds no tiles"):
        tile_like(tmp_path / "none.gpkg", before[0], tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists()


def test_palette_rasters_keep_their_colours(tmp_path):
    rng = np.random.default_rng(8)
    classes = rng.integers(0, 4, (1, 200, 200), dtype=np.uint8)
    colours = {0: (0, 0, 0, 255), 1: (200, 30, 30, 255), 2: (30, 200, 30, 255), 3: (30, 30, 200, 255)}

    def palette(path, data, transform):
        write_raster(path, data, transform=transform, photometric="palette")
        with rasterio.open(path, "r+") as dst:
            dst.write_colormap(1, colours)
        return path

    origin = Affine(0.5, 0, 500000, 0, -0.5, 4000000)
    layer = tmp_path / "b.gpkg"
    tile(palette(tmp_path / "b.tif", classes, origin), layer, TileConfig(tile_size=100))
    # the later date: the same classes, starting 50 px (25 m) further east
    later = palette(tmp_path / "a.tif", np.ascontiguousarray(classes[:, :, 50:]), origin * Affine.translation(50, 0))
    out = tmp_path / "a.gpkg"
    new = tile_like(layer, later, out).layer
    assert new["tile_id"].tolist() == read_tiles(layer)["tile_id"].tolist()
    assert new["valid_fraction"].tolist() == pytest.approx([0.5, 1.0, 0.5, 1.0])
    before_px, after_px = tile_pixels(layer), tile_pixels(out)
    for tile_id in new["tile_id"]:
        got, valid = after_px[tile_id]
        assert np.array_equal(got[valid], before_px[tile_id][0][valid])  # the class colours, exactly


def test_dataset_reference_gives_a_dataset_with_the_same_parts(tmp_path, tiny_clip_checkpoint):
    from hqrs_geo.engine.partitioned import ScaleOptions
    from hqrs_geo.layer.dataset import open_manifest

    west = write_crop(EXAMPLE_SCENE, tmp_path / "west.tif", Window(100, 300, 400, 400), cog=False)
    east = write_crop(EXAMPLE_SCENE, tmp_path / "east.tif", Window(500, 300, 400, 400), cog=False)
    reference = tmp_path / "before_ds"
    tile([west, east], reference, TileConfig(tile_size=100), scale=ScaleOptions(block_tiles=8))
    ref_manifest = open_manifest(reference)
    assert len(ref_manifest.part_files()) == 4  # two scenes, two blocks of rows each
    # the later date, in EPSG:4326: all of the east scene, and half of the west scene's last column of tiles
    after_raster = warp_to_4326(tmp_path / "after.tif", Window(500, 300, 400, 400))
    out = tmp_path / "after_ds"
    report = tile_like(reference, after_raster, out, TileConfig(min_valid=0.6))
    manifest = open_manifest(out)
    assert set(manifest.parts) == set(ref_manifest.parts)
    east_parts = sorted(n for n, p in ref_manifest.parts.items() if p["scene"] == "east")
    assert sorted(p.name for p in manifest.part_files()) == east_parts  # west's parts: no tile reached 0.6
    assert report.examined == 32 and len(report.tiles) == 16 and (report.tiles["valid_fraction"] == 1.0).all()
    low = tile_like(reference, after_raster, tmp_path / "low_ds", TileConfig(min_valid=0.3)).tiles
    west = low[low["tile_id"].str.startswith("west")]
    assert west["tile_id"].str.endswith("c0003").all() and len(west) == 4
    assert west["valid_fraction"].between(0.45, 0.55).all()
    ref_tiles, new = read_tiles(reference), read_tiles(out)
    ref_tiles = ref_tiles[ref_tiles["tile_id"].isin(new["tile_id"])].reset_index(drop=True)
    assert new["tile_id"].tolist() == ref_tiles["tile_id"].tolist() and len(new) == 16
    assert all(a.equals_exact(b, 1e-9) for a, b in zip(new.geometry, ref_tiles.geometry))
    assert len(list((out / "_aligned").glob("east.*.tif"))) == 1
    # the dataset embeds as any dataset does, part by part
    embed(out, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu",
          options=RunOptions(workers=0, embedding_dtype="float32"))
    present, _ = read_embeddings(read_tiles(out))
    assert present.all()
    # pixels are those of the reference's tiles (one resampling there and back)
    before_px, after_px = tile_pixels(reference), tile_pixels(out)
    for tile_id in new["tile_id"]:
        assert np.abs(after_px[tile_id][0].astype(int) - before_px[tile_id][0].astype(int)).mean() < 5
    # the reference merged into one GeoPackage (the run records of the dataset travel with it) works too
    from hqrs_geo.layer.dataset import merge_dataset

    merge_dataset(reference, tmp_path / "merged.gpkg")
    from_merged = tile_like(tmp_path / "merged.gpkg", after_raster, tmp_path / "m.gpkg", TileConfig(min_valid=0.6))
    assert from_merged.layer["tile_id"].tolist() == new["tile_id"].tolist()
    # again with another resampling: new aligned pixels replace the old (file and tiles), results dropped
    tile_like(reference, after_raster, out, TileConfig(min_valid=0.6, resampling="nearest"))
    assert len(list((out / "_aligned").glob("east.*.tif"))) == 1
    again = read_tiles(out)
    assert again["tile_id"].tolist() == new["tile_id"].tolist() and not embedding_columns(list(again.columns))


def test_large_reference_scene_small_later_raster_writes_a_sparse_aligned_file(tmp_path):
    big = write_raster(tmp_path / "big.tif", np.full((3, 4096, 4096), 90, np.uint8), compress="deflate")
    layer = tmp_path / "big.gpkg"
    tile(big, layer, TileConfig(tile_size=512))
    with rasterio.open(big) as src:
        corner = src.window_transform(Window(3000, 100, 300, 300))
    small = write_raster(tmp_path / "small.tif", np.full((3, 300, 300), 7, np.uint8), transform=corner)
    out = tmp_path / "small.gpkg"
    new = tile_like(layer, small, out, TileConfig(min_valid=0.05)).layer
    # the later raster (columns 3000-3300, rows 100-400) meets two 512 px tiles: 8 % and 26 % of them
    assert new["tile_id"].str[-11:].tolist() == ["r0000_c0005", "r0000_c0006"]
    (aligned,) = aligned_folder(out).glob("*.tif")
    with rasterio.open(aligned) as src:  # blocks without pixels are not written (a sparse GeoTIFF), and masked
        assert src.get_tag_item("BLOCK_OFFSET_0_8", "TIFF", bidx=1) is None  # rows 2048-2304, columns 0-256
        assert src.get_tag_item("BLOCK_OFFSET_12_0", "TIFF", bidx=1) is not None  # rows 0-256, columns 3072-3328
        assert src.read_masks(1, window=Window(0, 2048, 1024, 1024)).max() == 0
        assert (src.read(1, window=Window(3000, 100, 300, 300)) == 7).all()
    with pytest.raises(OptionError, match="reference layer itself"):
        tile_like(layer, small, layer)
    assert new["valid_fraction"].tolist() == pytest.approx([72 * 300 / 512**2, 228 * 300 / 512**2], abs=0.005)


def test_bands_of_the_reference_and_a_stretch_of_its_own(tmp_path):
    from rasterio.enums import ColorInterp

    rng = np.random.default_rng(5)
    pixels = rng.integers(100, 3000, (4, 256, 256), dtype=np.uint16)
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
    before_raster = write_raster(tmp_path / "b.tif", pixels, colorinterp=interp)
    layer = tmp_path / "b.gpkg"
    tile(before_raster, layer, TileConfig(tile_size=128, bands=(4, 3, 2)))  # false colour, 2-98 % stretch
    # the later date: the same ground, twice as bright plus an offset (another sensor gain / season)
    after_raster = write_raster(tmp_path / "a.tif", pixels * 2 + 200, colorinterp=interp)
    out = tmp_path / "a.gpkg"
    tile_like(layer, after_raster, out)
    (reading,) = read_runs(out).scenes().values()
    (reference,) = read_runs(layer).scenes().values()
    assert reading.bands.indexes == (1, 2, 3)  # the aligned file holds input bands 4, 3, 2 as R, G, B
    with rasterio.open(reading.source) as src:
        assert np.array_equal(src.read(), pixels[[3, 2, 1]] * 2 + 200)
    assert reading.scale.low == pytest.approx(tuple(2 * v + 200 for v in reference.scale.low), abs=2)
    before_px, after_px = tile_pixels(layer), tile_pixels(out)
    assert sorted(after_px) == sorted(before_px)
    for tile_id, (rgb, _) in before_px.items():  # each date through its own stretch: the same picture
        assert np.abs(after_px[tile_id][0].astype(int) - rgb.astype(int)).max() <= 1


def test_options_of_the_later_date(caplog, monkeypatch):
    from hqrs_geo.tiling.coregister import effective_config

    # the command line, run earlier in this worker, may have stopped "hqrs_geo" passing records up
    monkeypatch.setattr(logging.getLogger("hqrs_geo"), "propagate", True)

    reference = {"tile_size": "64m", "overlap": "25%", "min_valid": 0.3, "bands": [4, 3, 2], "stretch": "p1,99",
                 "edge": "pad", "resampling": "cubic", "old_option": 1}
    same = effective_config(reference, None)
    assert (same.tile_size, same.overlap, same.min_valid, same.bands, same.stretch, same.edge, same.resampling) == \
        ("64m", "25%", 0.3, (4, 3, 2), "p1,99", "pad", "cubic")
    mine = effective_config(reference, TileConfig(min_valid=0.8, stretch="0,3000"))
    assert (mine.min_valid, mine.stretch, mine.bands, mine.tile_size) == (0.8, "0,3000", (4, 3, 2), "64m")
    with caplog.at_level("WARNING", logger="hqrs_geo.tiling.coregister"):  # whatever level a CLI run left
        grid = effective_config(reference, TileConfig(tile_size=128, overlap="25%"))
    assert grid.tile_size == "64m" and "tile_size: ignored" in caplog.text and "overlap" not in caplog.text
