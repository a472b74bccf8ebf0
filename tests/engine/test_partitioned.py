"""Partitioned GeoParquet datasets with the single-process (local) executor: the same tiles and
values as a GeoPackage job, parts DuckDB and geopandas read as they are, resume without
recomputing, failed scenes recorded and retried, every layer command on a dataset, merge."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fork_runner import run_cli
from rasterio.windows import Window
from scale_helpers import (
    EXAMPLE_SCENE,
    RangeServer,
    compare_layers,
    free_port,
    parts,
    stac_item,
    wgs84_bounds,
    write_crop,
)
from tiny_models import TINY_CLIP, TINY_COCA

import hqrs_geo as hg
from hqrs_geo.atomic import sha256_file
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.engine.partitioned import ScaleOptions
from hqrs_geo.layer.dataset import MANIFEST, Manifest
from hqrs_geo.models.decoding import DecodingConfig

CONFIG = hg.TileConfig(tile_size=128, crs="EPSG:4326")
DECODING = DecodingConfig(method="greedy", min_length=1, max_length=4)  # short: the captions only need to match


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three scenes: a local GeoTIFF, a COG by URL, a COG through a STAC item."""
    folder = tmp_path_factory.mktemp("scenes")
    served = folder / "served"
    served.mkdir()
    server = RangeServer(served)
    local = write_crop(EXAMPLE_SCENE, folder / "local.tif", Window(0, 0, 512, 384), cog=False)
    write_crop(EXAMPLE_SCENE, served / "remote.tif", Window(488, 0, 512, 384), cog=True)
    write_crop(EXAMPLE_SCENE, served / "stac.tif", Window(0, 616, 512, 384), cog=True)
    item = folder / "item.json"
    item.write_text(json.dumps(stac_item("item-7", server.url("stac.tif"), wgs84_bounds(served / "stac.tif"),
                                         "2021-06-01T00:00:00Z")))
    yield {"sources": [str(local), server.url("remote.tif"), str(item)], "folder": folder, "server": server}
    server.close()


def _models(clip, coca):
    return dict(embed_models=[TINY_CLIP], embed_checkpoints=[str(clip)], caption_model=TINY_COCA,
                caption_checkpoint=str(coca), decoding=DECODING, device="cpu")


@pytest.fixture(scope="module")
def reference(scenes, tmp_path_factory, tiny_clip_checkpoint, tiny_coca_checkpoint):
    """The single-process engine's GeoPackage of the same job."""
    out = tmp_path_factory.mktemp("ref") / "ref.gpkg"
    hg.run(scenes["sources"], out, tiling=CONFIG, options=RunOptions(batch_size=8),
           **_models(tiny_clip_checkpoint, tiny_coca_checkpoint))
    return hg.read_tiles(out)


@pytest.fixture(scope="module")
def dataset(scenes, tmp_path_factory, tiny_clip_checkpoint, tiny_coca_checkpoint):
    out = tmp_path_factory.mktemp("ds") / "tiles"
    report = hg.run(scenes["sources"], f"{out}/", tiling=CONFIG, options=RunOptions(batch_size=8),
                    scale=ScaleOptions(block_tiles=6), **_models(tiny_clip_checkpoint, tiny_coca_checkpoint))
    return out, report


def test_dataset_equals_the_single_process_layer(dataset, reference):
    out, report = dataset
    assert (report.scenes, report.done, report.failed, report.tiles) == (3, 3, {}, len(reference))
    tiles = hg.read_tiles(out)
    compare_layers(tiles, reference)
    assert set(tiles.stac_item.dropna()) == {"item-7"} and tiles.source_url.str.startswith(("/", "http")).all()
    manifest = Manifest.load(out)
    assert manifest.crs == "EPSG:4326" and manifest.failed == {}
    assert len(manifest.parts) == 9  # 3 grid rows of 4 tiles per scene, blocks of 6 cells: one row per part
    for name, part in manifest.parts.items():
        assert part["sha256"] == sha256_file(out / name) and part["tiles"] == 4
        assert part["crs"] == "EPSG:4326" and part["bounds"] == part["bounds_wgs84"]
        rows = tiles[tiles.tile_id.str.startswith(part["scene"] + "_") & tiles.row.between(*part["rows"], "left")]
        assert np.allclose(rows.total_bounds, part["bounds"])
    assert {s["blocks"] for s in manifest.scenes.values()} == {3}
    runs = hg.read_runs(out)
    assert runs[-1]["command"] == "run" and len(runs.scenes()) == 3


def test_duckdb_and_geopandas_read_the_parts(dataset):
    import duckdb
    import geopandas as gpd
    import shapely

    out, _ = dataset
    tiles = hg.read_tiles(out)
    frame = gpd.read_parquet(out).sort_values("tile_id").reset_index(drop=True)
    assert list(frame.tile_id) == list(tiles.tile_id) and frame.crs == tiles.crs
    assert frame.geometry.geom_equals_exact(tiles.geometry, 0).all()
    from hqrs_geo.layer.columns import embedding_columns

    column = embedding_columns(list(tiles.columns))[0]
    rows = duckdb.sql(f"SELECT tile_id, caption, {column} AS emb, ST_AsWKB(geometry) AS wkb "
                      f"FROM read_parquet('{out}/*.parquet') ORDER BY tile_id").fetchall()
    assert [r[0] for r in rows] == list(tiles.tile_id) and [r[1] for r in rows] == list(tiles.caption)
    _, matrix = hg.read_embeddings(tiles)
    assert np.array_equal(np.array([r[2] for r in rows], dtype=np.float32), matrix)
    assert all(shapely.from_wkb(bytes(r[3])).equals_exact(g, 0) for r, g in zip(rows, tiles.geometry))


def test_rerun_recomputes_nothing_and_adopts_parts_the_manifest_missed(dataset, scenes, tiny_clip_checkpoint,
                                                                      tiny_coca_checkpoint, reference):
    out, _ = dataset
    before = parts(out)
    # a driver killed after writing parts but before its manifest write: the parts are not listed
    manifest = Manifest.load(out)
    dropped = sorted(manifest.parts)[:3]
    for name in dropped:
        del manifest.parts[name]
    manifest.save()
    report = hg.run(scenes["sources"], out, tiling=CONFIG, options=RunOptions(batch_size=8),
                    scale=ScaleOptions(block_tiles=6), **_models(tiny_clip_checkpoint, tiny_coca_checkpoint))
    assert (report.done, report.skipped, report.tiles) == (0, 3, 0)
    assert parts(out) == before
    assert set(dropped) <= set(Manifest.load(out).parts)
    compare_layers(hg.read_tiles(out), reference)


def test_failed_scenes_are_recorded_and_only_they_are_retried(tmp_path, scenes):
    good = scenes["sources"][0]
    broken = tmp_path / "broken.tif"
    broken.write_bytes(open(good, "rb").read()[:3000])  # a truncated GeoTIFF
    dead = f"http://127.0.0.1:{free_port()}/gone.tif"
    out = tmp_path / "ds"
    args = ["tile", good, str(broken), dead, "-o", f"{out}/", "--tile-size", "128", "--progress", "json"]
    first = run_cli(*args)
    assert first.returncode == 3, first.stderr
    assert "failed scenes" in first.stderr and "broken" in first.stderr and "gone" in first.stderr
    final = json.loads(first.stdout.strip().splitlines()[-1])
    assert final["stage"] == "done" and {f["scene"] for f in final["failed"]} == {"broken", "gone"}
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["failed"]) == {"broken", "gone"}
    assert all("\n" not in f["error"] and f["error"] for f in manifest["failed"].values())
    kept = parts(out)
    write_crop(EXAMPLE_SCENE, broken, Window(0, 0, 256, 256), cog=False)  # repaired
    second = run_cli(*args)
    assert second.returncode == 3 and "1 scene(s) finished" in second.stderr and "1 already done" in second.stderr
    assert {n: i for n, i in parts(out).items() if n in kept} == kept
    assert set(json.loads((out / MANIFEST).read_text())["failed"]) == {"gone"}
    assert len(hg.read_tiles(out)) == 12 + 4


def test_layer_commands_work_on_a_dataset(tmp_path, dataset, reference, tiny_clip_checkpoint):
    import shutil

    from tiny_models import build_tiny

    src, _ = dataset
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    # embed with a second model: every part gains the column, part by part
    other, _, _ = build_tiny(TINY_CLIP, seed=3)
    import torch

    ckpt = tmp_path / "other_clip.pt"
    torch.save(other.state_dict(), ckpt)
    tiles = hg.embed(out, model=TINY_CLIP, checkpoint=str(ckpt), device="cpu",
                     options=RunOptions(batch_size=8, overwrite=True))
    assert len(tiles) == len(reference)
    runs = hg.read_runs(out)
    assert runs[-1]["command"] == "embed"
    key = "hqrs_test_tiny_clip_other_clip"  # a second embedding column, beside the run's
    assert hg.read_tiles(out)[f"emb_{key}"].notna().all()
    # search, classify (written back into the parts), index, merge, export-dataset
    hits = run_cli("search", out, "a river", "-k", "3", "--model", key)
    assert hits.returncode == 0, hits.stderr
    labels = run_cli("classify", out, "--labels", "water,buildings", "--model", key)
    assert labels.returncode == 0, labels.stderr
    assert set(hg.read_tiles(out).label.dropna()) <= {"water", "buildings"} and hg.read_tiles(out).label.notna().all()
    index = run_cli("index", out, "--kind", "auto", "--model", key)
    assert index.returncode == 0, index.stderr
    merged = tmp_path / "merged.gpkg"
    box = reference.total_bounds
    cut = (box[0], box[1], (box[0] + box[2]) / 2, box[3])
    result = run_cli("merge", out, "-o", merged, "--bbox", ",".join(map(str, cut)), "--bbox-crs", "EPSG:4326")
    assert result.returncode == 0, result.stderr
    part = hg.read_tiles(merged)
    import shapely

    assert 0 < len(part) < len(reference) and part.geometry.intersects(shapely.box(*cut)).all()
    whole = tmp_path / "whole.gpkg"
    assert run_cli("merge", out, "-o", whole).returncode == 0
    merged_tiles = hg.read_tiles(whole)
    compare_layers(merged_tiles.drop(columns=[c for c in merged_tiles.columns if c.startswith("label")]),
                   hg.read_tiles(out), atol=0)
    from hqrs_geo.search.api import search_text

    a = search_text(str(whole), "a river", k=5, model=key)
    b = search_text(str(out), "a river", k=5, model=key)
    assert list(a.tile_id) == list(b.tile_id)
    exported = run_cli("export-dataset", out, "-o", tmp_path / "export", "--captions", "caption")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "export" / "dataset.json").exists()


def test_single_process_engine_does_not_import_ray(tmp_path):
    code = ("import sys, hqrs_geo as hg; from hqrs_geo.engine.partitioned import ScaleOptions; "
            f"hg.tile({str(EXAMPLE_SCENE)!r}, {str(tmp_path / 't.gpkg')!r}, hg.TileConfig(tile_size=250)); "
            f"r = hg.tile({str(EXAMPLE_SCENE)!r}, {str(tmp_path / 'ds')!r} + '/', hg.TileConfig(tile_size=250)); "
            "assert r.tiles == 16, r; assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_ray_engine_needs_a_dataset_folder(tmp_path):
    result = run_cli("tile", EXAMPLE_SCENE, "-o", tmp_path / "t.gpkg", "--engine", "ray")
    assert result.returncode == 2 and "partitioned dataset" in result.stderr
    assert result.stderr.count("\n") == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = run_cli("tile", EXAMPLE_SCENE, "-o", f"{other}/")
    assert result.returncode == 2 and "not an hqrs_geo dataset" in result.stderr


def test_windows_read_where_the_model_runs_give_the_pixels_of_the_tiles(scenes, tmp_path):
    """The Ray engine's read task sends windows, not pixels; the model worker reads them (in
    threads): the same pixels as reading the unit in one process, and a scene gone between the
    two steps is one line naming it."""
    import shutil

    from hqrs_geo.engine.units import JobContext, Unit, plan_unit, read_pixels, read_unit
    from hqrs_geo.raster.catalog import resolve_catalog

    entry = resolve_catalog([scenes["sources"][0]], None).entries[0]
    ctx = JobContext(str(tmp_path), CONFIG.validated(), "EPSG:4326", "f", {}, [], 1024, 4)
    status, frame, windows = plan_unit(Unit(entry), ctx)
    assert status["kind"] == "ready" and len(windows.records) == status["tiles"] == len(frame) > 2
    assert windows.ids == list(frame["tile_id"])
    whole = read_unit(Unit(entry), ctx)[2][1]
    assert whole.dtype == np.uint8 and whole.shape == (len(frame), 3, 128, 128) and whole.any()
    np.testing.assert_array_equal(read_pixels(windows), whole)
    np.testing.assert_array_equal(read_pixels(windows, threads=3), whole)
    given = np.zeros_like(whole)
    assert read_pixels(windows, allocate=lambda shape: given) is given
    np.testing.assert_array_equal(given, whole)
    moved = tmp_path / "moved.tif"
    shutil.move(entry.path, moved)
    try:
        with pytest.raises(hg.InputError) as caught:
            read_pixels(windows)
    finally:
        shutil.move(moved, entry.path)
    assert "local.tif" in str(caught.value) and "\n" not in str(caught.value)
