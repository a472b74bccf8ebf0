"""Fault and fuzz tests of partitioned datasets: a dataset is a transaction log, not a folder of hopes.

Each case is counted with :func:`archive_report.record` (printed at the end of the run): a clean
one-line error, an internal error (target 0), data lost or silently wrong (target 0), a fault
recovered (a re-run, a reprojection). Real parts throughout: GeoTIFF crops of the example scene,
datasets written by the engine with a tiny open_clip model, jobs run as real concurrent
processes, a tmpfs that really fills up (a file-size limit where mounting is not allowed).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from archive_report import record
from conftest import write_raster
from fork_runner import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window
from scale_helpers import EXAMPLE_SCENE, write_crop
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.engine.partitioned import ScaleOptions
from hqrs_geo.errors import HqrsError
from hqrs_geo.layer.dataset import Manifest, read_dataset_tiles, write_part
from hqrs_geo.search.partitioned import DatasetIndex, DatasetSession

CONFIG = hg.TileConfig(tile_size=64, crs="EPSG:3857")
WINDOWS = {"a": Window(0, 0, 256, 256), "b": Window(512, 0, 256, 256), "c": Window(0, 512, 256, 256)}
TILES = 48  # 16 per scene
ERROR = re.compile(r"^hqrs-geo: error: \S.*: .+; .+")


# ----------------------------------------------------------------------------------- helpers

def embed(sources, out: Path, ckpt: Path, verify: bool = False, crs: str | None = "EPSG:3857") -> object:
    """The dataset job of these tests (tiny CLIP embeddings), as the API runs it."""
    tiling = hg.TileConfig(tile_size=64, crs=crs) if crs else hg.TileConfig(tile_size=64)
    return hg.run([str(s) for s in sources], f"{out}/", tiling=tiling, embed_models=[TINY_CLIP],
                  embed_checkpoints=[str(ckpt)], device="cpu", options=RunOptions(batch_size=16),
                  scale=ScaleOptions(verify_parts=verify), command="embed")


def clean_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Count one case: it must end in exactly one clean error line (exit 2) holding ``fragments``."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "warning:" not in line]
    internal = result.returncode not in (0, 2) or "internal error" in result.stderr or "Traceback" in result.stderr
    if internal:
        record(internal=1)
        raise AssertionError(f"internal error: {result.stderr[-2000:]}")
    if result.returncode != 2 or len(lines) != 1 or not ERROR.match(lines[0]):
        record()
        raise AssertionError(f"not one clean error line (exit {result.returncode}): {result.stderr[-2000:]}")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    record(clean=1)
    return lines[0]


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def copy(dataset: Path, target: Path) -> Path:
    shutil.copytree(dataset, target)
    return target


def edit_manifest(folder: Path, change) -> None:
    path = folder / "_manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def tile_ids(path) -> list[str]:
    return sorted(hg.read_tiles(path).tile_id)


def vectors(frame) -> np.ndarray:
    return hg.read_embeddings(frame.sort_values("tile_id").reset_index(drop=True))[1]


def child(*argv, env: dict | None = None) -> subprocess.Popen:
    """``python -m hqrs_geo ARGV`` as a real child process (for jobs that run at the same time)."""
    return subprocess.Popen([sys.executable, "-m", "hqrs_geo", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_checkpoint):
    """Three 256 px crops, their dataset (EPSG:3857, one part per scene) and its merged GeoPackage."""
    folder = tmp_path_factory.mktemp("dataset_faults")
    scenes = {key: write_crop(EXAMPLE_SCENE, folder / f"{key}.tif", window, cog=False)
              for key, window in WINDOWS.items()}
    dataset = folder / "DS"
    report = embed(scenes.values(), dataset, tiny_clip_checkpoint)
    assert report.tiles == TILES and not report.failed
    merged = folder / "merged.gpkg"
    hg.merge_dataset(dataset, merged)
    return {"folder": folder, "scenes": scenes, "dataset": dataset, "merged": merged,
            "reference": hg.read_tiles(merged), "ckpt": tiny_clip_checkpoint,
            "key": DatasetSession.embedding_key(str(dataset))}


# ------------------------------------------------ 1: a manifest is validated before it is used

def _part(data, name="b.parquet"):
    return data["parts"][name]


def _rename(data, new):
    data["parts"][new] = data["parts"].pop("b.parquet")


MANIFESTS = {  # case -> (change to the manifest, what the one error line must say)
    "version text": (lambda d: d.update(version="x"), "key version"),
    "version 0": (lambda d: d.update(version=0), "key version"),
    "version true": (lambda d: d.update(version=True), "key version"),
    "version newer": (lambda d: d.update(version=99), "newer than this hqrs_geo"),
    "format": (lambda d: d.update(format="other"), "not an hqrs_geo dataset manifest"),
    "parts list": (lambda d: d.update(parts=list(d["parts"].values())), "key parts"),
    "parts null": (lambda d: d.update(parts=None), "key parts"),
    "part string": (lambda d: d["parts"].update({"b.parquet": "zz"}), 'parts["b.parquet"]'),
    "part number": (lambda d: d["parts"].update({"b.parquet": 7}), 'parts["b.parquet"]'),
    "name ../..": (lambda d: _rename(d, "../../X.parquet"), 'parts["../../X.parquet"]'),
    "name absolute": (lambda d: _rename(d, "/etc/passwd"), 'parts["/etc/passwd"]'),
    "name no suffix": (lambda d: _rename(d, "b"), 'parts["b"]'),
    "name hidden": (lambda d: _rename(d, ".b.parquet"), 'parts[".b.parquet"]'),
    "name reserved": (lambda d: _rename(d, "_search.parquet"), 'parts["_search.parquet"]'),
    "name mismatch": (lambda d: _part(d).update(name="c.parquet"), ".name"),
    "tiles text": (lambda d: _part(d).update(tiles="x"), ".tiles"),
    "tiles negative": (lambda d: _part(d).update(tiles=-1), ".tiles"),
    "tiles wrong": (lambda d: _part(d).update(tiles=3), ".tiles"),
    "tiles missing": (lambda d: _part(d).pop("tiles"), ".tiles"),
    "sha256 short": (lambda d: _part(d).update(sha256="abc"), ".sha256"),
    "sha256 null": (lambda d: _part(d).update(sha256=None), ".sha256"),
    "bytes text": (lambda d: _part(d).update(bytes="12"), ".bytes"),
    "rows": (lambda d: _part(d).update(rows=[3, 1]), ".rows"),
    "bounds inverted": (lambda d: _part(d).update(bounds=[1, 1, 0, 0]), ".bounds"),
    "bounds nan": (lambda d: _part(d).update(bounds=[0, 0, "nan", 1]), ".bounds"),
    "part crs": (lambda d: _part(d).update(crs="EPSG:999999"), ".crs"),
    "crs text": (lambda d: d.update(crs="not a crs"), "key crs"),
    "crs number": (lambda d: d.update(crs=5), "key crs"),
    "scenes list": (lambda d: d.update(scenes=[]), "key scenes"),
    "scene string": (lambda d: d["scenes"].update(b="x"), 'scenes["b"]'),
    "scene blocks": (lambda d: d["scenes"]["b"].update(blocks="x"), ".blocks"),
    "scene block rows": (lambda d: d["scenes"]["b"].update(block_rows=[[0]]), ".block_rows"),
    "scene reading": (lambda d: d["scenes"]["b"].update(reading={"source": 1}), ".reading"),
    "failed list": (lambda d: d.update(failed=[]), "key failed"),
    "runs object": (lambda d: d.update(runs={}), "key runs"),
    "runs numbers": (lambda d: d.update(runs=[1, 2]), "key runs"),
}
EVERY_COMMAND = ("version text", "parts list", "part string", "name ../..", "name absolute", "crs text",
                 "tiles text", "scene reading")  # the others: merge only (all commands load the manifest alike)
COMMANDS = {  # what reads a dataset: merge, search by example tiles, a job adding a scene
    "merge": lambda ds, w: ["merge", ds, "-o", ds.parent / f"{ds.name}.gpkg"],
    "similar": lambda ds, w: ["similar", ds, "--tile", "a_r0000_c0000", "-k", "5"],
    "tile": lambda ds, w: ["tile", w["scenes"]["a"], "-o", f"{ds}/", "--tile-size", "64"],
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_bad_manifests_are_one_line_errors_naming_the_key(world, tmp_path, case):
    change, fragment = MANIFESTS[case]
    outside = tmp_path / "X.parquet"  # what ../../X.parquet would reach from the copy
    shutil.copyfile(world["dataset"] / "b.parquet", outside)
    for command, argv in COMMANDS.items():
        if command != "merge" and case not in EVERY_COMMAND:
            continue
        dataset = copy(world["dataset"], tmp_path / "w" / command / "DS")
        edit_manifest(dataset, change)
        before = digest(dataset / "_manifest.json")
        line = clean_error(run_cli(*argv(dataset, world)), fragment)
        assert "_manifest.json" in line or "b.parquet" in line or "newer" in line, line
        assert digest(dataset / "_manifest.json") == before, "a refused manifest was rewritten"
        assert not (dataset.parent / f"{dataset.name}.gpkg").exists()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _paths(value, prefix=()):
    """Every path (keys / indexes) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_fuzzed_manifests_never_raise_internal_errors(world, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz") / "DS"
    copy(world["dataset"], folder)
    manifest = json.loads((folder / "_manifest.json").read_text())
    paths = [p for p in _paths(manifest) if p and p[0] not in ("updated",)]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON)
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (folder / "_manifest.json").write_text(json.dumps(manifest, allow_nan=True))
    try:
        frame = read_dataset_tiles(folder)
        DatasetIndex.open(folder, world["key"])
    except HqrsError as exc:
        assert "\n" not in str(exc)
        record(clean=1)
        return
    except Exception as exc:
        record(internal=1)
        raise AssertionError(f"{path} = {value!r}: {type(exc).__name__}: {exc}") from exc
    record()
    assert len(frame) in (0, 16, 32, TILES)  # what was read is whole parts


# --------------------------------- 2: every part is checked; a damaged one is named and recomputed

def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garble(path: Path, keep_time: bool = False) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    with open(path, "r+b") as handle:  # in place: same size
        handle.write(bytes(data))
    if keep_time:  # what bit rot looks like: same size, same time
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


DAMAGE = {"truncated": _truncate, "emptied": _empty, "garbled": _garble,
          "garbled in place": lambda p: _garble(p, keep_time=True), "deleted": lambda p: p.unlink()}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_parts_are_named_and_recomputed_by_the_rerun(world, tmp_path, damage):
    dataset = copy(world["dataset"], tmp_path / "DS")
    DAMAGE[damage](dataset / "b.parquet")
    said = "is missing" if damage == "deleted" else "damaged or was changed"
    clean_error(run_cli("merge", dataset, "-o", tmp_path / "m.gpkg"), "b.parquet", said)
    assert not (tmp_path / "m.gpkg").exists()
    clean_error(run_cli("similar", dataset, "--tile", "a_r0000_c0000", "-k", str(TILES)), "b.parquet")
    clean_error(run_cli("embed", dataset, "--model", TINY_CLIP, "--checkpoint", world["ckpt"], "--overwrite"),
                "b.parquet")
    if damage == "garbled in place":  # size and time as written: only the SHA-256 tells, at resume too
        assert "--verify-parts" in run_cli("merge", dataset, "-o", tmp_path / "m.gpkg").stderr
    report = embed(world["scenes"].values(), dataset, world["ckpt"], verify=damage == "garbled in place")
    assert report.done == 1 and report.skipped == 2, (report.done, report.skipped)
    again = read_dataset_tiles(dataset)
    if list(again.tile_id) != list(world["reference"].tile_id) or not np.allclose(
            vectors(again), vectors(world["reference"]), atol=1e-3):
        record(data_lost=1)
        raise AssertionError("the re-run did not give the dataset back")
    record(recovered=1)


# ---------------------------------------------- 3: jobs writing into one dataset or layer at once

def _add_parts(folder: str, worker: int, count: int) -> None:
    manifest = Manifest.load(folder)
    manifest.runs.append({"run_id": len(manifest.runs) + 1, "command": f"worker {worker}", "params": {}})
    for i in range(count):
        manifest.add_part({"name": f"w{worker}_{i}.parquet", "scene": f"w{worker}_{i}", "tiles": 0})
        manifest.save()


def test_concurrent_manifest_saves_never_drop_an_entry(tmp_path):
    folder = tmp_path / "DS"
    Manifest(folder, crs="EPSG:3857").save()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_parts, args=(str(folder), w, 25)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    manifest = Manifest.load(folder)
    lost = 100 - len(manifest.parts)
    record(data_lost=int(lost > 0), recovered=int(lost == 0))
    assert lost == 0, f"{lost} of 100 parts dropped"
    assert sorted(r["run_id"] for r in manifest.runs) == [1, 2, 3, 4]
    assert manifest.crs == "EPSG:3857"


def test_two_jobs_into_one_dataset_keep_every_part(world, tmp_path):
    scenes, out = world["scenes"], tmp_path / "D"
    jobs = [child("tile", scenes["a"], scenes["c"], "-o", f"{out}/", "--tile-size", "64", "--crs", "EPSG:3857"),
            child("tile", scenes["b"], "-o", f"{out}/", "--tile-size", "64", "--crs", "EPSG:3857")]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    manifest = Manifest.load(out)
    found = sorted(read_dataset_tiles(out).tile_id) if len(manifest.parts) == 3 else []
    if sorted(manifest.parts) != ["a.parquet", "b.parquet", "c.parquet"] or found != list(world["reference"].tile_id):
        record(data_lost=1)
        raise AssertionError(f"parts {sorted(manifest.parts)}")
    record(recovered=1)


@pytest.mark.parametrize("trial", range(2))
def test_two_appends_to_one_geopackage_keep_both_scenes(world, tmp_path, trial):
    scenes, out = world["scenes"], tmp_path / "same.gpkg"
    jobs = [child("tile", scenes[key], "-o", out, "--tile-size", "64") for key in ("a", "b")]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    found = tile_ids(out)
    if len(found) != 32 or {t[0] for t in found} != {"a", "b"}:
        record(data_lost=1)
        raise AssertionError(f"{len(found)} tiles")
    record(recovered=1)


def test_columns_written_by_two_jobs_from_the_same_read_are_both_kept(world, tmp_path):
    dataset = copy(world["dataset"], tmp_path / "DS")
    first, second = hg.read_tiles(dataset), hg.read_tiles(dataset)  # two jobs read the dataset
    first["label_a"] = "water"
    second["label_b"] = "roof"
    hg.write_tiles(dataset, first)  # the first job writes its column back ...
    hg.write_tiles(dataset, second)  # ... then the second, from what it read before
    tiles = read_dataset_tiles(dataset)
    kept = {"label_a", "label_b"} <= set(tiles.columns) and (tiles.label_a == "water").all() and (
        tiles.label_b == "roof").all() and len(tiles) == TILES
    record(**({"recovered": 1} if kept else {"data_lost": 1}))
    assert kept, sorted(tiles.columns)


def test_an_output_another_job_holds_is_a_one_line_error(world, tmp_path):
    out = tmp_path / "held"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another job in the middle of writing a layer here
        result = run_cli("tile", world["scenes"]["a"], "-o", out / "t.gpkg", "--tile-size", "64",
                         env={**os.environ, "HQRS_GEO_LOCK_WAIT": "0.5"})
        clean_error(result, "another job is writing it")
        assert not (out / "t.gpkg").exists() and not list(out.iterdir())
    finally:
        os.close(fd)
    assert run_cli("tile", world["scenes"]["a"], "-o", out / "t.gpkg", "--tile-size", "64").returncode == 0


# ------------------------------------------------------------- 4: merge never loses what is there

def test_merge_refuses_outputs_that_would_lose_data(world, tmp_path):
    dataset = copy(world["dataset"], tmp_path / "DS")
    part = digest(dataset / "b.parquet")
    clean_error(run_cli("merge", dataset, "-o", dataset / "b.parquet"), "inside the dataset")
    clean_error(run_cli("merge", dataset, "-o", dataset / "sub.gpkg"), "inside the dataset")
    assert digest(dataset / "b.parquet") == part and not (dataset / "sub.gpkg").exists()
    hg.tile(world["scenes"]["a"], tmp_path / "s.gpkg", hg.TileConfig(tile_size=128))
    for name in ("s.gpkg",):
        before = digest(tmp_path / name)
        clean_error(run_cli("merge", dataset, "-o", tmp_path / name), "--overwrite")
        if digest(tmp_path / name) != before:
            record(data_lost=1)
    hg.merge_dataset(dataset, tmp_path / "m.parquet")
    before = digest(tmp_path / "m.parquet")
    clean_error(run_cli("merge", dataset, "-o", tmp_path / "m.parquet"), "--overwrite")
    assert digest(tmp_path / "m.parquet") == before
    assert run_cli("merge", dataset, "-o", tmp_path / "s.gpkg", "--overwrite").returncode == 0
    assert tile_ids(tmp_path / "s.gpkg") == list(world["reference"].tile_id)
    # a GeoPackage without a tile layer takes one; its other layers stay
    other = tmp_path / "other.gpkg"
    gpd.GeoDataFrame({"name": ["x"]}, geometry=gpd.points_from_xy([0], [0]), crs="EPSG:3857").to_file(
        other, layer="places")
    assert run_cli("merge", dataset, "-o", other).returncode == 0
    import pyogrio

    assert {"places", "tiles"} <= {name for name, _ in pyogrio.list_layers(other)}
    record(recovered=1)


@pytest.mark.parametrize("argv, fragment", [
    (["--bbox", "10,10,0,0"], "--bbox"),
    (["--bbox", "0,0,0,1"], "--bbox"),
    (["--bbox-crs", "EPSG:4326"], "--bbox-crs"),
    (["--bbox", "0,0,1,1", "--bbox-crs", "EPSG:999999"], "--bbox-crs"),
    (["--bbox", "0,0,1,1", "--bbox-crs", "not a crs"], "--bbox-crs"),
])
def test_merge_refuses_bad_boxes_in_one_line(world, tmp_path, argv, fragment):
    result = run_cli("merge", world["dataset"], "-o", tmp_path / "m.gpkg", *argv)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    internal = result.returncode not in (0, 2) or "internal error" in result.stderr
    record(internal=int(internal), clean=int(not internal and result.returncode == 2 and len(lines) == 1))
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "m.gpkg").exists()


# --------------------------------------------- 5: parts in another CRS, parts of another dimension

@pytest.fixture(scope="module")
def native(world, tmp_path_factory):
    """Scene b alone in a dataset in its own CRS (EPSG:28992)."""
    out = tmp_path_factory.mktemp("native") / "DSN"
    embed([world["scenes"]["b"]], out, world["ckpt"], crs=None)
    assert Manifest.load(out).crs == "EPSG:28992"
    return out


def _bbox_hits(layer, bbox) -> list[str]:
    result = run_cli("similar", layer, "--tile", "a_r0000_c0000", "-k", str(TILES), "--bbox",
                     ",".join(map(repr, bbox)), "--bbox-crs", "EPSG:4326", "--json")
    assert result.returncode == 0, result.stderr
    return sorted(hit["tile_id"] for hit in json.loads(result.stdout))


def test_a_part_in_another_crs_is_reprojected(world, native, tmp_path):
    dataset = copy(world["dataset"], tmp_path / "DS")
    shutil.copyfile(native / "b.parquet", dataset / "b.parquet")  # as a job in another CRS wrote it
    entry = Manifest.load(native).parts["b.parquet"]
    edit_manifest(dataset, lambda d: d["parts"].update({"b.parquet": entry}))
    merged = tmp_path / "m.gpkg"
    assert run_cli("merge", dataset, "-o", merged).returncode == 0
    tiles = hg.read_tiles(merged)
    expected = gpd.read_parquet(native / "b.parquet").to_crs("EPSG:3857").sort_values("tile_id")
    ours = tiles[tiles.tile_id.str.startswith("b_")].sort_values("tile_id")
    assert len(tiles) == TILES and tiles.crs == "EPSG:3857"
    same = ours.geometry.reset_index(drop=True).geom_equals_exact(expected.geometry.reset_index(drop=True), 1e-6)
    box = [float(v) for v in expected.to_crs("EPSG:4326").total_bounds]
    hits, reference = _bbox_hits(dataset, box), _bbox_hits(merged, box)
    if not same.all() or not hits or hits != reference:
        record(data_lost=1)
        raise AssertionError(f"footprints {same.all()}, hits {hits} vs {reference}")
    record(recovered=1)


def test_a_hand_edited_manifest_crs_reprojects_instead_of_finding_nothing(world, tmp_path):
    dataset = copy(world["dataset"], tmp_path / "DS")
    edit_manifest(dataset, lambda d: d.update(crs="EPSG:4326"))
    merged = tmp_path / "m.gpkg"
    assert run_cli("merge", dataset, "-o", merged).returncode == 0
    tiles, reference = hg.read_tiles(merged), world["reference"].to_crs("EPSG:4326")
    box = [float(v) for v in reference[reference.tile_id.str.startswith("b_")].total_bounds]
    hits, expected = _bbox_hits(dataset, box), _bbox_hits(world["merged"], box)
    good = (tiles.crs == "EPSG:4326" and tiles.geometry.geom_equals_exact(reference.geometry, 1e-9).all()
            and hits and hits == expected)
    record(**({"recovered": 1} if good else {"data_lost": 1}))
    assert good, (hits, expected)


def test_a_part_with_another_embedding_size_is_refused_by_name(world, tmp_path):
    dataset = copy(world["dataset"], tmp_path / "DS")
    frame = gpd.read_parquet(dataset / "c.parquet")
    column = next(c for c in frame.columns if c.startswith("emb_") and f"{c}_dim" in frame.columns)
    frame[column] = [np.asarray(v[:-1]) for v in frame[column]]
    frame[f"{column}_dim"] = frame[f"{column}_dim"] - 1
    manifest = Manifest.load(dataset)
    manifest.parts["c.parquet"].update(write_part(dataset / "c.parquet", frame, []))  # as another model wrote it
    manifest.save()
    clean_error(run_cli("merge", dataset, "-o", tmp_path / "m.gpkg"), "c.parquet", "values")
    shutil.rmtree(dataset / "_search", ignore_errors=True)  # the vectors are read from the parts
    clean_error(run_cli("similar", dataset, "--tile", "a_r0000_c0000", "-k", "5"), "c.parquet", "values")


def test_an_empty_scene_into_a_layer_in_another_crs(world, tmp_path):
    layer = tmp_path / "l.gpkg"
    hg.tile(world["scenes"]["a"], layer, hg.TileConfig(tile_size=64))
    empty = write_raster(tmp_path / "nodata.tif", np.zeros((3, 128, 128), np.uint8), nodata=0, crs="EPSG:32633")
    result = run_cli("tile", empty, "-o", layer, "--tile-size", "64")
    if result.returncode != 0:
        clean_error(result)
    else:
        record(recovered=1)
    assert len(hg.read_tiles(layer)) == 16


# --------------------------------------------------------- 6: a new output on a full disk

def _mount(folder: Path, megabytes: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0777", "hqrs-test", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def _fill(disk: Path, leave: int) -> None:
    stat = os.statvfs(disk)
    with open(disk / "filler.bin", "wb") as handle:
        handle.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


WRITERS = {  # a new output of each kind, and free bytes that leave it short in the middle of writing
    "gpkg": (lambda w, out: ["tile", EXAMPLE_SCENE, "-o", out / "t.gpkg", "--tile-size", "16"],
             (0, 60_000, 300_000, 900_000)),
    "dataset": (lambda w, out: ["tile", w["scenes"]["a"], w["scenes"]["b"], "-o", f"{out}/d/", "--tile-size", "16",
                                "--block-tiles", "300"], (0, 20_000, 60_000)),
    "merge": (lambda w, out: ["merge", w["dataset"], "-o", out / "m.gpkg"], (0, 60_000)),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_new_output_on_a_full_disk_is_one_line_and_leaves_nothing_half_written(world, tmp_path, writer):
    disk = tmp_path / "disk"
    if not _mount(disk, 8):
        return _full_disk_by_file_size_limit(world, tmp_path, writer)
    try:
        out = disk / "out"
        make, leaves = WRITERS[writer]
        argv = make(world, out)
        failed = 0
        for leave in leaves:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            _fill(disk, leave)
            result = run_cli(*argv)
            (disk / "filler.bin").unlink()
            if result.returncode == 0:
                continue
            failed += 1
            clean_error(result, "no space left")
            left = [p for p in out.rglob("*") if ".tmp" in p.name or p.suffix in (".gpkg", ".fgb")]
            assert not left, left
            for manifest in out.rglob("_manifest.json"):  # what a dataset kept is whole and listed
                kept = Manifest.load(manifest.parent)
                assert kept.parts and all(
                    digest(manifest.parent / n) == p["sha256"] for n, p in kept.parts.items() if p["tiles"])
        assert failed >= 2, "the disk never filled up"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        assert run_cli(*argv).returncode == 0  # with space again, the same command succeeds
        record(recovered=1)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _full_disk_by_file_size_limit(world, tmp_path, writer):
    """Where mounting is not allowed: the child's file-size limit makes its writes fail (EFBIG)."""
    import resource

    out = tmp_path / "out"
    out.mkdir()

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    result = subprocess.run([sys.executable, "-m", "hqrs_geo", *map(str, WRITERS[writer][0](world, out))],
                            capture_output=True, text=True, preexec_fn=cap, timeout=300)
    if result.returncode != 0:
        clean_error(result)
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]
