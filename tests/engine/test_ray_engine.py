"""The Ray engine on a real two-node Ray cluster on this machine (``ray start --head`` on
127.0.0.2 and a second ``ray start --address`` node on 127.0.0.3, each with its own raylet):
12 scenes mixing local GeoTIFFs, COGs read over HTTP range requests and STAC items give the
tiles and values of the single-process engine, also after a worker process is killed, the
second node leaves, or the driver is killed and the command run again.

One cluster serves the module; a test that sends the second node away leaves it to be started
again by the next test that needs it, so the tests run in any order. At most 4 scenes are under way
at once (``--in-flight``): each concurrent read or write task is a Ray worker process with its own
interpreter and imports. The head node has 3 CPUs: when the second node leaves, both model workers
(1 CPU each) and the reads must fit on it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from scale_helpers import RayCluster, compare_layers, env, free_port, parts, scenes, served, short_folder  # noqa: F401  (fixtures)
from tiny_models import TINY_CLIP, TINY_COCA

import hqrs_geo as hg
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.layer.dataset import MANIFEST
from hqrs_geo.models.decoding import DecodingConfig

pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(900)

TILING = ["--tile-size", "128", "--crs", "EPSG:4326"]
CONFIG = hg.TileConfig(tile_size=128, crs="EPSG:4326")


@pytest.fixture(scope="module")
def two_nodes(env):
    temp = short_folder("ray")
    nodes = RayCluster(temp, env, head_cpus=3, worker_cpus=2)
    yield nodes
    nodes.stop()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def cluster(two_nodes):
    """The module's cluster with both nodes (the second started again if a test sent it away)."""
    if two_nodes.worker is None:
        two_nodes.start_worker()
    return two_nodes


def model_args(clip, coca) -> list[str]:
    return ["--embed-model", TINY_CLIP, "--embed-checkpoint", str(clip), "--caption-model", TINY_COCA,
            "--caption-checkpoint", str(coca), "--decoding", "greedy", "--max-length", "8", "--batch-size", "4",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(scenes, tmp_path_factory, tiny_clip_checkpoint, tiny_coca_checkpoint):
    """The single-process engine's GeoPackage of the 12 scenes."""
    out = tmp_path_factory.mktemp("ref") / "ref.gpkg"
    hg.run(scenes["sources"], out, embed_models=[TINY_CLIP], embed_checkpoints=[str(tiny_clip_checkpoint)],
           caption_model=TINY_COCA, caption_checkpoint=str(tiny_coca_checkpoint),
           decoding=DecodingConfig(method="greedy", max_length=8), device="cpu", tiling=CONFIG,
           options=RunOptions(batch_size=4))
    return hg.read_tiles(out)


def ray_command(scenes, out, cluster, clip, coca, *extra, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "hqrs_geo", "run", *scenes["sources"], "-o", f"{out}/", *TILING,
            *model_args(clip, coca), "--engine", "ray", "--ray-address", cluster.address, "--workers", str(workers),
            "--cpus-per-worker", "1", "--block-tiles", "8", "--in-flight", "4", "--progress", "json", *extra]


def start(command, env) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_scenes(proc: subprocess.Popen, done: int, timeout: float = 300) -> list[dict]:
    """Read the JSON progress until ``done`` scenes are finished; the events read."""
    events, deadline = [], time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        event = json.loads(line)
        events.append(event)
        if event["stage"] == "run" and event["done"] >= done:
            return events
    raise AssertionError(f"the run did not reach {done} scenes: {events} {proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_part_snapshots_ignore_a_writers_temporaries(tmp_path):
    """The snapshots the resume tests compare hold parts only: the temporary file a writer (or a
    killed run) has beside them is not one (it once failed the killed-driver test with
    ``KeyError: '.s06_naip.b0001.parquet.27604.yli9_ljh.tmp.parquet'``)."""
    from hqrs_geo.atomic import atomic_path

    (tmp_path / "s00_urban.b0000.parquet").write_bytes(b"part")
    with atomic_path(tmp_path / "s06_naip.b0001.parquet") as tmp:
        tmp.write_bytes(b"being written")
        assert tmp.name.startswith(".s06_naip.b0001.parquet.") and tmp.name.endswith(".tmp.parquet")
        assert list(parts(tmp_path)) == ["s00_urban.b0000.parquet"]
    assert sorted(parts(tmp_path)) == ["s00_urban.b0000.parquet", "s06_naip.b0001.parquet"]


def test_ray_engine_equals_the_single_process_engine(cluster, scenes, reference, tmp_path, env,
                                                     tiny_clip_checkpoint, tiny_coca_checkpoint):
    out = tmp_path / "ds"
    command = ray_command(scenes, out, cluster, tiny_clip_checkpoint, tiny_coca_checkpoint)
    code, stdout, stderr = finish(start([command[0], "-X", "importtime", *command[1:]], env))
    assert code == 0, stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert "ray" in imported and "torch" not in imported, "the driver of a caption job imported torch"
    final = json.loads(stdout.strip().splitlines()[-1])
    assert final["stage"] == "done" and final["scenes"] == 12 and final["failed"] == []
    assert final["tiles"] == len(reference)
    tiles = hg.read_tiles(out)
    compare_layers(tiles, reference)
    from_stac = tiles.tile_id.str.startswith("item-")  # every third scene came through the STAC collection
    assert (tiles.stac_item.notna() == from_stac).all() and tiles.stac_item[from_stac].nunique() == 4
    assert tiles.source_url.str.startswith("http").any()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["failed"] == {} and len(manifest["scenes"]) == 12
    assert sum(p["tiles"] for p in manifest["parts"].values()) == len(reference)
    runs = hg.read_runs(out)
    assert runs[-1]["params"]["engine"] == "ray"


def test_a_killed_worker_process_changes_nothing(cluster, scenes, reference, tmp_path, env,
                                                  tiny_clip_checkpoint, tiny_coca_checkpoint):
    out = tmp_path / "ds"
    # one model worker: no other worker can take its units over, its restart must
    proc = start(ray_command(scenes, out, cluster, tiny_clip_checkpoint, tiny_coca_checkpoint, workers=1), env)
    wait_for_scenes(proc, 2)
    workers = cluster.processes_named("ray::ModelWorker")
    assert workers, "no model worker process found"
    os.kill(workers[0], signal.SIGKILL)
    code, _, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    compare_layers(hg.read_tiles(out), reference)
    assert json.loads((out / MANIFEST).read_text())["failed"] == {}


def test_a_killed_driver_resumes_without_recomputing(cluster, scenes, reference, tmp_path, env,
                                                     tiny_clip_checkpoint, tiny_coca_checkpoint):
    out = tmp_path / "ds"
    # one model worker: resuming is the driver's business (its manifest and parts), not the workers'
    command = ray_command(scenes, out, cluster, tiny_clip_checkpoint, tiny_coca_checkpoint, workers=1)
    proc = start(command, env)
    wait_for_scenes(proc, 3)
    proc.kill()
    proc.wait(timeout=60)
    first = parts(out)
    assert first
    code, stdout, stderr = finish(start(command, env))
    assert code == 0, stderr[-3000:]
    final = json.loads(stdout.strip().splitlines()[-1])
    assert final["skipped"] >= 3 and final["skipped"] + final["finished"] == 12
    after = parts(out)
    assert {n: after[n] for n in first} == first  # finished parts were not computed again
    compare_layers(hg.read_tiles(out), reference)


def test_failed_scenes_are_recorded_and_only_they_are_retried(cluster, scenes, served, tmp_path, env,
                                                              tiny_clip_checkpoint, tiny_coca_checkpoint):
    folder = served.httpd.folder
    good = next(s for s in scenes["sources"] if s.startswith("http"))
    (folder / "corrupt.tif").write_bytes((folder / good.rsplit("/", 1)[1]).read_bytes()[:5000])
    dead = f"http://127.0.0.1:{free_port()}/unreachable.tif"
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "hqrs_geo", "run", good, served.url("corrupt.tif"), dead, "-o", f"{out}/",
               *TILING, *model_args(tiny_clip_checkpoint, tiny_coca_checkpoint), "--engine", "ray",
               "--ray-address", cluster.address, "--workers", "1", "--cpus-per-worker", "1", "--progress", "json"]
    code, stdout, stderr = finish(start(command, env))
    assert code == 3, stderr[-3000:]
    assert "corrupt" in stderr and "unreachable" in stderr
    failed = json.loads((out / MANIFEST).read_text())["failed"]
    assert set(failed) == {"corrupt", "unreachable"} and all("\n" not in f["error"] for f in failed.values())
    kept = parts(out)
    (folder / "corrupt.tif").write_bytes((folder / good.rsplit("/", 1)[1]).read_bytes())  # repaired
    code, stdout, stderr = finish(start(command, env))
    final = json.loads(stdout.strip().splitlines()[-1])
    assert code == 3 and final["finished"] == 1 and final["skipped"] == 1, stderr[-3000:]
    assert {n: i for n, i in parts(out).items() if n in kept} == kept
    assert set(json.loads((out / MANIFEST).read_text())["failed"]) == {"unreachable"}


def test_a_node_that_leaves_changes_nothing(cluster, scenes, reference, tmp_path, env,
                                            tiny_clip_checkpoint, tiny_coca_checkpoint):
    """The cluster keeps one node afterwards (the ``cluster`` fixture starts the second again)."""
    out = tmp_path / "ds"
    proc = start(ray_command(scenes, out, cluster, tiny_clip_checkpoint, tiny_coca_checkpoint), env)
    wait_for_scenes(proc, 2)
    cluster.stop_worker()
    code, _, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    compare_layers(hg.read_tiles(out), reference)
    assert json.loads((out / MANIFEST).read_text())["failed"] == {}
