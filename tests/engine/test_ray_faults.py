"""Faults of the Ray engine, each on a real Ray instance started by the test: a node lost
mid-job on clusters of equal nodes (1+1 and 2+2 CPUs, the second node on 127.0.0.3 killed by
SIGKILL of its raylet or SIGTERM of all its processes) finishes with the values of the
single-process engine; a cluster address where nothing answers is a one-line error in seconds;
SIGTERM ends a run with exit 130 and only JSON on stdout; the processes of a local Ray instance
whose driver was killed with SIGKILL are stopped by the next run, and a run leaves none of its
own. Each case is counted with :func:`archive_report.record`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from archive_report import record
from scale_helpers import (  # noqa: F401  (fixtures)
    RayCluster,
    compare_layers,
    env,
    free_port,
    kill_processes,
    scenes,
    served,
    short_folder,
)
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo.engine.distributed import OWNER_VARIABLE, worker_env, worker_threads
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.layer.dataset import MANIFEST

pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(600)

TILING = ["--tile-size", "128", "--crs", "EPSG:4326"]
CONFIG = hg.TileConfig(tile_size=128, crs="EPSG:4326")


@pytest.fixture(scope="module")
def reference(scenes, tmp_path_factory, tiny_clip_checkpoint):
    """The single-process engine's tiles and embeddings of the 12 scenes."""
    out = tmp_path_factory.mktemp("ref") / "ref.gpkg"
    hg.run(scenes["sources"], out, embed_models=[TINY_CLIP], embed_checkpoints=[str(tiny_clip_checkpoint)],
           device="cpu", tiling=CONFIG, options=RunOptions(batch_size=4))
    return hg.read_tiles(out)


@pytest.fixture
def short_temp():
    temp = short_folder("rayf")
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def command(scenes, out, clip, *extra) -> list[str]:
    return [sys.executable, "-m", "hqrs_geo", "run", *scenes["sources"], "-o", f"{out}/", *TILING,
            "--embed-model", TINY_CLIP, "--embed-checkpoint", str(clip), "--batch-size", "4", "--device", "cpu",
            "--engine", "ray", "--block-tiles", "8", "--progress", "json", *extra]


def start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def until_scenes(proc: subprocess.Popen, done: int) -> list[str]:
    """Stdout lines up to the first progress object with ``done`` finished scenes."""
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the run ended early: {lines} {proc.stderr.read() if proc.stderr else ''}")
        lines.append(line)
        event = json.loads(line)
        if event["stage"] == "run" and event["done"] >= done:
            return lines


def only_json(lines: list[str]) -> list[dict]:
    """Every stdout line is a JSON object (the progress protocol); the objects."""
    events = []
    for line in lines:
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not JSON on stdout: {line!r}") from None
    return events


def owned_by(pid: int) -> list[int]:
    """Live processes carrying the mark of a Ray instance started by driver ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and f"{OWNER_VARIABLE}={pid}:".encode() in [e[:len(OWNER_VARIABLE) + len(str(pid)) + 2]
                                                                    for e in environ]:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("cpus,how", [(1, "raylet SIGKILL"), (2, "SIGTERM of the node's processes")])
def test_a_node_lost_mid_job_changes_nothing(cpus, how, scenes, reference, tmp_path, env, short_temp,
                                             tiny_clip_checkpoint):
    """Equal nodes: a model worker per node, sized from the smallest; the lost node's worker is
    retired (it would not fit beside the survivor's worker and the reads), the job finishes on
    the surviving node with the single-process engine's values, and says what happened."""
    cluster = RayCluster(short_temp, env, head_cpus=cpus, worker_cpus=cpus)
    proc = None
    try:
        out = tmp_path / "ds"
        proc = start(command(scenes, out, tiny_clip_checkpoint, "--ray-address", cluster.address), env)
        lines = until_scenes(proc, 0)  # both workers loaded, the first units submitted: the job has work left
        if how == "raylet SIGKILL":
            os.kill(cluster.worker_raylet(), signal.SIGKILL)
        else:
            kill_processes(cluster.worker_processes(), grace=10.0)
        lost = time.monotonic()
        stdout, stderr = proc.communicate(timeout=300)
        seconds = time.monotonic() - lost
        assert proc.returncode == 0, stderr[-3000:]
        events = only_json(lines + stdout.splitlines())
        assert events[-1]["stage"] == "done" and events[-1]["failed"] == [] and events[-1]["scenes"] == 12
        assert any("1 node(s) left the cluster" in e["message"] for e in events), events
        assert "node(s) left the cluster" in stderr
        compare_layers(hg.read_tiles(out), reference)
        record(node_losses_survived=1)
        print(f"{cpus}+{cpus} CPUs, {how}: finished {seconds:.1f} s after the loss")
        if cpus == 1:  # on the surviving node: a unit stuck on a server that never answers is re-planned
            with socket.socket() as stall:  # connections are accepted by the kernel, never answered
                stall.bind(("127.0.0.1", 0))
                stall.listen(16)
                url = f"http://127.0.0.1:{stall.getsockname()[1]}/stalled.tif"
                started = time.monotonic()
                done = subprocess.run(
                    command({"sources": [url, scenes["sources"][0]]}, tmp_path / "late", tiny_clip_checkpoint,
                            "--ray-address", cluster.address, "--unit-timeout", "5"),
                    env=env, capture_output=True, text=True, timeout=300)
                seconds = time.monotonic() - started
            assert done.returncode == 3, done.stderr[-3000:]
            failed = json.loads((tmp_path / "late" / MANIFEST).read_text())["failed"]
            assert only_json(done.stdout.splitlines())[-1]["finished"] == 1, failed
            assert list(failed) == ["stalled"], failed
            assert "lost 3 times (under way more than the unit timeout, 5 s)" in failed["stalled"]["error"], failed
            assert seconds < 150
            record(clean=1)
            print(f"unit timeout 5 s: the stalled scene failed after 3 tries, the other finished, in {seconds:.1f} s")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.stop()


def test_an_address_where_nothing_answers_is_one_line(tmp_path, env, scenes, tiny_clip_checkpoint):
    address = f"127.0.0.2:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(command(scenes, tmp_path / "ds", tiny_clip_checkpoint, "--ray-address", address),
                          env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no Ray cluster answers at {address} (connection refused)" in lines[0], lines
    assert seconds < 60
    record(clean=1)


def test_a_cluster_that_requires_a_token_is_one_line(tmp_path, env, scenes, short_temp, tiny_clip_checkpoint):
    token = "hqrs-test-token-0123456789abcdef0123456789"
    cluster = RayCluster(short_temp, {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, head_cpus=1,
                         worker_cpus=0)
    try:
        started = time.monotonic()
        done = subprocess.run(command(scenes, tmp_path / "ds", tiny_clip_checkpoint, "--ray-address",
                                      cluster.address), env=env, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    finally:
        cluster.stop()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "requires an authentication token: set RAY_AUTH_TOKEN" in lines[0], lines
    assert token not in done.stderr + done.stdout
    assert seconds < 60
    record(clean=1)
    print(f"token refused: one line in {seconds:.1f} s")


def test_hub_settings_reach_the_workers_and_secrets_do_not(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/mirror")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HQRS_GEO_API_KEY", "sk-secret")
    monkeypatch.setenv(OWNER_VARIABLE, "1:2")
    env = worker_env()
    assert env["HF_ENDPOINT"] == "http://127.0.0.1:9/mirror" and env["HF_HUB_ETAG_TIMEOUT"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert not {"HF_TOKEN", "HQRS_GEO_API_KEY", OWNER_VARIABLE} & set(env)


def test_sigterm_and_a_killed_drivers_leftovers(scenes, tmp_path, env, tiny_clip_checkpoint):
    """A local Ray instance (no address): ``kill -9`` of its driver may leave its processes running;
    the next run stops them (and only them) before it starts its own; SIGTERM of that run ends it
    with exit 130, one line on stderr, only JSON on stdout, and none of its processes left."""
    killed = start(command(scenes, tmp_path / "a", tiny_clip_checkpoint), env)
    until_scenes(killed, 1)
    mark = f"{killed.pid}:{Path(f'/proc/{killed.pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    killed.kill()
    killed.wait(timeout=60)
    # Ray's agents outlive a killed driver for as long as they take to notice (seconds, or less
    # on an idle machine): a stand-in process with the killed driver's mark makes the case certain
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                env={**env, OWNER_VARIABLE: mark})
    time.sleep(1)
    left = owned_by(killed.pid)
    assert stand_in.pid in left

    run = start(command(scenes, tmp_path / "b", tiny_clip_checkpoint), env)
    lines = until_scenes(run, 1)
    assert not owned_by(killed.pid), "the next run did not stop the killed driver's Ray processes"
    assert stand_in.wait(timeout=10) is not None
    assert owned_by(run.pid)
    started = time.monotonic()
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    seconds = time.monotonic() - started
    assert run.returncode == 130, stderr[-3000:]
    events = only_json(lines + stdout.splitlines())
    assert events[-1]["stage"] == "error" and "cancelled" in events[-1]["message"]
    assert "SIGTERM" not in stderr and "PC:" not in stderr
    assert [line for line in stderr.splitlines() if "error" in line] == [f"hqrs-geo: error: {events[-1]['message']}"]
    deadline = time.monotonic() + 15
    while owned_by(run.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not owned_by(run.pid), "the cancelled run left processes of its Ray instance"
    record(clean=1)      # SIGTERM: exit 130, one line
    record(recovered=1)  # a killed driver's processes stopped by the next run
    print(f"SIGTERM to exit: {seconds:.1f} s; {len(left)} process(es) of the killed driver stopped")


def test_cpu_model_workers_run_spinning_threads_only_on_their_whole_cpus():
    """The 2-core case: a worker of 1.5 CPUs (half a core left for the read and write tasks) ran
    2 spinning torch threads, and OpenMP's threads waited for each other at every operation
    whenever a read, a write or another process took a core (a 40-scene job: 130 s instead of
    22 s). Spinning: whole CPUs only; sleeping (passive) waits: the CPUs rounded up."""
    assert worker_threads(1.5, passive_wait=False) == 1
    assert worker_threads(0.5, False) == 1 and worker_threads(1, False) == 1 and worker_threads(2, False) == 2
    assert worker_threads(15.5, False) == 15 and worker_threads(2.9999999999, False) == 3
    assert worker_threads(1.5) == 2 and worker_threads(0.5) == 1 and worker_threads(2.0) == 2
    for cpus in (0.5, 1.0, 1.5, 2.0, 3.5, 7.0, 15.5):
        assert 1 <= worker_threads(cpus, False) <= max(1.0, cpus)
        assert cpus <= worker_threads(cpus) < cpus + 1


@pytest.mark.parametrize(("before", "given", "passive"), [
    ("", None, True),                 # a fresh worker process: waiting made passive before torch loads
    ("import torch", None, False),    # torch already loaded: too late, its threads spin
    ("", "ACTIVE", False),            # an explicit setting is kept
])
def test_passive_openmp_is_set_only_before_torch_loads(before: str, given: str | None, passive: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = (f"{before}\nimport os\nfrom hqrs_geo.engine.distributed import passive_openmp\n"
            "print(passive_openmp(), os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == str(passive)
    assert out.split()[1] == (given or ("PASSIVE" if passive else "None"))
