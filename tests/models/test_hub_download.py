"""The registry's real Hugging Face hub download path, against a hub on 127.0.0.1 (``HF_ENDPOINT``).

A tiny CLIP checkpoint is served under a registry entry's real repository and file name
(``chendelong/RemoteCLIP``, ``RemoteCLIP-ViT-B-32.pt``); the entry's architecture is pointed at
the tiny config with ``--arch``, as a user does for a checkpoint of another architecture. The
CLI runs in child processes (huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when
imported) with their own ``HQRS_GEO_HOME`` and ``HF_HOME``: the download is cut off half-way and
resumed with a Range request, cached, checked against the entry's sha256, loaded and used to
embed; offline, the cache is used without one connection to the hub.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_raster
from http_helpers import LocalHub
from tiny_models import TINY_CLIP

from hqrs_geo import read_runs, read_tiles
from hqrs_geo.layer.columns import read_embeddings

REPO, FILE, MODEL = "chendelong/RemoteCLIP", "RemoteCLIP-ViT-B-32.pt", "remoteclip-vit-b-32"

# What a user does to pin an entry's weights: register it with the sha256 they expect, then run
# the command line (the body of ``python -m hqrs_geo``).
REGISTER_AND_RUN = (
    "import sys; from dataclasses import replace; "
    "from hqrs_geo.models.registry import REGISTRY, register; "
    f"register(replace(REGISTRY[{MODEL!r}], sha256=sys.argv[1])); "
    "from hqrs_geo.cli import main; raise SystemExit(main(sys.argv[2:]))"
)


def hub_env(hub: LocalHub, home: Path, offline: bool = False) -> dict[str, str]:
    """The environment of a child process using ``hub``, with its own caches and no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home / "hf_home"), HQRS_GEO_HOME=str(home / "hqrs"),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def child(args: list[str], env: dict[str, str], code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m hqrs_geo ARGS``, or ``python -c CODE ARGS``, in the repository root."""
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "hqrs_geo", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def embed_args(raster: Path, out: Path) -> list[str]:
    return ["embed", str(raster), "-o", str(out), "--tile-size", "64", "--model", MODEL, "--arch", TINY_CLIP,
            "--device", "cpu", "--workers", "1", "-q"]


def cached_file(home: Path, hub: LocalHub) -> Path:
    """Where huggingface_hub's cache layout puts the file (under ``$HQRS_GEO_HOME/hf``)."""
    folder = home / "hqrs" / "hf" / f"models--{REPO.replace('/', '--')}"
    return folder / "snapshots" / hub.commit / FILE


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    data = np.random.default_rng(7).integers(0, 255, size=(3, 128, 128), dtype=np.uint8)
    return write_raster(tmp_path_factory.mktemp("scene") / "scene.tif", data)


@pytest.fixture(scope="module")
def weights(tiny_clip_checkpoint) -> bytes:
    return Path(tiny_clip_checkpoint).read_bytes()


@pytest.fixture(scope="module")
def online(tmp_path_factory, raster, weights):
    """One online run: the hub drops the first download half-way; returns (hub, home, result, layer)."""
    home = tmp_path_factory.mktemp("hub_home")
    with LocalHub({(REPO, FILE): weights}) as hub:
        hub.drop_gets = 1
        digest = hashlib.sha256(weights).hexdigest()
        result = child([digest, *embed_args(raster, home / "online.gpkg")], hub_env(hub, home), REGISTER_AND_RUN)
        yield hub, home, result, home / "online.gpkg"


def test_a_download_cut_off_half_way_resumes_with_a_range_request(online, weights):
    hub, home, result, _ = online
    assert result.returncode == 0, result.stderr
    gets = [(path, headers.get("Range")) for method, path, headers in hub.requests if method == "GET"]
    assert len(gets) == 2 and gets[0][0] == gets[1][0] == f"/cdn/{hashlib.sha256(weights).hexdigest()}"
    assert gets[0][1] is None and gets[1][1] == f"bytes={len(weights) // 2}-"  # the half it had, not again
    heads = [path for method, path, _ in hub.requests if method == "HEAD"]
    assert heads and set(heads) == {f"/{REPO}/resolve/main/{FILE}"}
    path = cached_file(home, hub)
    assert path.read_bytes() == weights  # byte-identical after the resume
    assert not list(path.parents[2].rglob("*.incomplete"))
    assert not (home / "hf_home").exists() or not list((home / "hf_home").rglob("*.pt"))


def test_the_downloaded_checkpoint_is_verified_loaded_and_embeds(online, weights):
    hub, home, result, layer = online
    assert result.returncode == 0, result.stderr
    task = read_runs(layer)[-1]["params"]["tasks"][0]
    assert task["name"] == MODEL and task["arch"] == TINY_CLIP
    assert task["sha256"] == hashlib.sha256(weights).hexdigest()  # what was loaded is what was served
    assert Path(task["checkpoint"]) == cached_file(home, hub)
    present, matrix = read_embeddings(read_tiles(layer))
    assert present.all() and len(present) == 4 and matrix.shape == (4, 32) and np.isfinite(matrix).all()


def test_offline_uses_the_cache_without_a_connection(online, raster, tmp_path):
    hub, home, first, layer = online
    assert first.returncode == 0, first.stderr
    connections, requests = hub.connections, len(hub.requests)
    out = tmp_path / "offline.gpkg"
    result = child(embed_args(raster, out), hub_env(hub, home, offline=True))  # python -m hqrs_geo
    assert result.returncode == 0, result.stderr
    assert hub.connections == connections and len(hub.requests) == requests  # nothing reached the hub
    assert read_runs(out)[-1]["params"]["tasks"][0]["checkpoint"] == str(cached_file(home, hub))
    np.testing.assert_array_equal(read_embeddings(read_tiles(out))[1], read_embeddings(read_tiles(layer))[1])


def test_a_download_with_the_wrong_sha256_is_one_line_and_removed(tmp_path, raster, weights):
    args = [a for a in embed_args(raster, tmp_path / "bad.gpkg") if a not in ("--arch", TINY_CLIP)]
    with LocalHub({(REPO, FILE): weights}) as hub:  # checked before the architecture matters
        result = child(["0" * 64, *args], hub_env(hub, tmp_path), REGISTER_AND_RUN)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert f"{FILE} from hf-hub {REPO} has sha256 {hashlib.sha256(weights).hexdigest()[:16]}" in line
    assert f"expects {'0' * 16}" in line and "removed" in line
    folder = cached_file(tmp_path, hub).parents[2]
    assert not cached_file(tmp_path, hub).exists() and not list((folder / "blobs").iterdir())
    assert not (tmp_path / "bad.gpkg").exists()


RESOLVE = """import sys
from hqrs_geo.errors import InputError
from hqrs_geo.models.checkpoints import resolve_checkpoint
from hqrs_geo.models.registry import REGISTRY
try:
    print(resolve_checkpoint(REGISTRY[sys.argv[1]]))
except InputError as exc:
    sys.exit(f"error: {exc}")
"""


def test_a_download_that_keeps_failing_says_so_and_the_next_call_resumes(tmp_path, weights):
    from hqrs_geo.models.checkpoints import DOWNLOAD_TRIES

    with LocalHub({(REPO, FILE): weights}) as hub:
        hub.drop_gets = DOWNLOAD_TRIES  # every try of the first call is cut off half-way
        failed = child([MODEL], hub_env(hub, tmp_path), RESOLVE)
        assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].startswith(
            f"error: model {MODEL} needs {FILE} from hf-hub {REPO}, which could not be downloaded")
        left = sum(p.stat().st_size for p in tmp_path.rglob("*.incomplete"))
        assert len(weights) // 2 < left < len(weights)  # each try kept what it had
        done = child([MODEL], hub_env(hub, tmp_path), RESOLVE)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == weights
    ranges = [headers.get("Range") for method, _, headers in hub.requests if method == "GET"]
    assert len(ranges) == DOWNLOAD_TRIES + 1 and ranges[-1] == f"bytes={left}-"
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])


def test_offline_without_a_download_says_so_without_a_connection(tmp_path, weights):
    with LocalHub({(REPO, FILE): weights}) as hub:
        result = child([MODEL], hub_env(hub, tmp_path, offline=True), RESOLVE)
        assert hub.connections == 0
    line = result.stderr.strip()
    assert result.returncode == 1 and len(line.splitlines()) == 1 and line.startswith(
        f"error: model {MODEL} needs its checkpoint (hf-hub {REPO}, file {FILE}): put it at "
        f"{tmp_path / 'hqrs' / 'checkpoints' / FILE} ")
