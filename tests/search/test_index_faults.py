"""Damaged compressed (IVF-PQ) indexes: files cut short, emptied, garbled or hand-edited must
never crash a search (a SIGBUS from the memory-mapped lists), never give silently different
results, never end in an internal error. A damaged index is not used: one warning naming the
``hqrs-geo index`` command that rebuilds it, and the search is exact (the same hits as without
``--ann``). Each case is counted in the archive fault suite (``tests/archive_report.py``).

One small dataset (two 512 px crops of the example scene, 32 px tiles, the tiny CLIP model)
and its index are built once for the module; each case damages a copy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from archive_report import record
from conftest import ROOT
from fork_runner import run_cli
from rasterio.windows import Window
from scale_helpers import EXAMPLE_SCENE, write_crop
from tiny_models import TINY_CLIP

import hqrs_geo as hg
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.engine.partitioned import ScaleOptions

PARAMS = ["--kind", "ivfpq", "--param", "nlist=8", "--param", "m=8", "--param", "train_size=512",
          "--param", "rerank=64", "--param", "nprobe=8", "--param", "opq=0"]
QUERY = ["a river", "-k", "10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_checkpoint):
    """The dataset, its index, a merged layer with its own index, and the exact answers."""
    folder = tmp_path_factory.mktemp("index_faults")
    crops = [write_crop(EXAMPLE_SCENE, folder / f"q{i}.tif", w, cog=False)
             for i, w in enumerate([Window(0, 0, 512, 512), Window(488, 488, 512, 512)])]
    dataset = folder / "ds"
    hg.run([str(c) for c in crops], f"{dataset}/", tiling=hg.TileConfig(tile_size=32), embed_models=[TINY_CLIP],
           embed_checkpoints=[str(tiny_clip_checkpoint)], device="cpu", options=RunOptions(batch_size=64),
           scale=ScaleOptions(block_tiles=200), command="embed")
    built = run_cli("index", dataset, *PARAMS)
    assert built.returncode == 0, built.stderr
    layer = folder / "merged.gpkg"
    assert run_cli("merge", dataset, "-o", layer).returncode == 0
    built = run_cli("index", layer, *PARAMS)
    assert built.returncode == 0, built.stderr
    exact = {name: run_cli("search", path, *QUERY) for name, path in (("ds", dataset), ("layer", layer))}
    for done in exact.values():
        assert done.returncode == 0, done.stderr
    return {"folder": folder, "dataset": dataset, "layer": layer, "exact": {k: v.stdout for k, v in exact.items()}}


def index_folder(target: Path) -> Path:
    found = list((target / "_search").glob("emb_*.ivfpq")) if target.is_dir() else \
        list(target.parent.glob(f"{target.name}.emb_*.ivfpq"))
    assert len(found) == 1, found
    return found[0]


def copy_of(world, tmp_path: Path, kind: str) -> Path:
    source = world["dataset"] if kind == "ds" else world["layer"]
    if kind == "ds":
        return Path(shutil.copytree(source, tmp_path / "ds"))
    target = tmp_path / source.name  # a layer's index matches the layer's file (inode, time): built again
    shutil.copy(source, target)
    built = run_cli("index", target, *PARAMS)
    assert built.returncode == 0, built.stderr
    return target


def ranked_ids(table: str) -> list[str]:
    """Tile ids of a printed result table (rank, score, tile id per line)."""
    return [line.split()[-1] for line in table.splitlines() if line.split() and line.split()[0].isdigit()]


def merged_file(folder: Path, suffix: str) -> Path:
    generation = json.loads((folder / "index.json").read_text())["generation"]
    return folder / f"merged-{generation}{suffix}"


def truncate(fraction: float, suffix: str = ".ivfdata"):
    def damage(folder: Path) -> None:
        path = merged_file(folder, suffix)
        os.truncate(path, int(path.stat().st_size * fraction))
    return damage


def garble(suffix: str = ".ivfdata", where: float = 0.5, length: int = 64):
    def damage(folder: Path) -> None:
        path = merged_file(folder, suffix) if suffix.startswith(".") else folder / suffix
        data = bytearray(path.read_bytes())
        start = int(len(data) * where)
        data[start:start + length] = bytes((b ^ 0x5A) for b in data[start:start + length])
        path.write_bytes(bytes(data))
    return damage


def edit_json(change):
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "index.json").read_text())
        (folder / "index.json").write_text(json.dumps(change(meta)))
    return damage


def set_param(name: str, value):
    return edit_json(lambda meta: {**meta, "params": {**meta["params"], name: value}})


def swap_numbers(meta: dict) -> dict:
    first, second = meta["parts"][0], meta["parts"][1]
    first["number"], second["number"] = second["number"], first["number"]
    return meta


def judge(done: subprocess.CompletedProcess, expected: str, took: float, limit: float = 60) -> dict:
    """The archive counts of one search run that should warn and answer exactly."""
    err = done.stderr
    crashed = done.returncode < 0 or done.returncode > 128
    internal = "Traceback" in err or "internal error" in err
    warned = "hqrs-geo index" in err and "warning" in err
    same = done.returncode == 0 and done.stdout == expected
    return {"crashes": int(crashed), "internal": int(internal and not crashed),
            "data_lost": int(done.returncode == 0 and not same),
            "clean": int(same and warned), "recovered": int(same and warned),
            "past_deadline": int(took > limit)}


DAMAGE = {
    "ivfdata cut to 50%": truncate(0.5),
    "ivfdata emptied": truncate(0.0),
    "ivfdata garbled mid-file": garble(),
    "ivfdata missing": lambda folder: merged_file(folder, ".ivfdata").unlink(),
    "merged index cut short": truncate(0.5, ".index"),
    "trained index garbled": garble("trained.index"),
    "list checksums missing": lambda folder: merged_file(folder, ".crc32").unlink(),
    "index.json an array": lambda folder: (folder / "index.json").write_text("[1, 2]"),
    "index.json not JSON": lambda folder: (folder / "index.json").write_text('{"version": 1, '),
    "nprobe 0": set_param("nprobe", 0),
    "nprobe -1": set_param("nprobe", -1),
    "nprobe 'x'": set_param("nprobe", "x"),
    "rerank 0": set_param("rerank", 0),
    "rerank 1e9": set_param("rerank", 1_000_000_000),
    "parts' numbers swapped": edit_json(swap_numbers),
    "version 'x'": edit_json(lambda meta: {**meta, "version": "x"}),
    "parts null": edit_json(lambda meta: {**meta, "parts": None}),
    # an index written before sizes and checksums were recorded: the lists' extents still guard the map
    "older index, ivfdata cut to 50%": lambda folder: (
        edit_json(lambda meta: {k: v for k, v in meta.items() if k != "files"})(folder), truncate(0.5)(folder)),
    "older index, ivfdata emptied": lambda folder: (
        edit_json(lambda meta: {k: v for k, v in meta.items() if k != "files"})(folder), truncate(0.0)(folder)),
}


LAYER_CASES = ("ivfdata cut to 50%", "ivfdata emptied", "ivfdata garbled mid-file", "index.json an array",
               "nprobe 'x'", "rerank 0")  # a layer's index is the same code: a sample of the cases


@pytest.mark.parametrize("case, kind", [(c, "ds") for c in DAMAGE] + [(c, "layer") for c in LAYER_CASES])
def test_a_damaged_index_warns_and_searches_exactly(world, tmp_path, case, kind):
    target = copy_of(world, tmp_path, kind)
    DAMAGE[case](index_folder(target))
    started = time.monotonic()
    done = run_cli("search", target, *QUERY, "--ann", timeout=120)
    counts = judge(done, world["exact"][kind], time.monotonic() - started)
    record(**counts)
    assert counts["clean"] == 1, (done.returncode, done.stderr[-600:])
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and f"hqrs-geo index {target} --kind ivfpq" in warning[0], done.stderr


def test_an_intact_index_is_used_without_warnings(world, tmp_path):
    target = copy_of(world, tmp_path, "ds")
    done = run_cli("search", target, *QUERY, "--ann")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    exact_ids, ann_ids = ranked_ids(world["exact"]["ds"]), ranked_ids(done.stdout)
    # nprobe = nlist: only the PQ ranking before the exact re-ranking can lose one
    assert len(exact_ids) == len(ann_ids) == 10 and len(set(exact_ids) & set(ann_ids)) >= 9


def test_serve_search_on_a_cut_short_index_keeps_answering(world, tmp_path):
    """serve-search --ann on an index whose lists were cut to half: it used to die of SIGBUS
    after its ready line; now it warns and answers exactly."""
    target = copy_of(world, tmp_path, "ds")
    truncate(0.5)(index_folder(target))
    child = subprocess.Popen([sys.executable, "-m", "hqrs_geo", "serve-search", str(target), "--ann"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        out, err = child.communicate(json.dumps({"id": 1, "text": "a river", "k": 10}) + "\n", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    answer = next((a for a in answers if a.get("id") == 1), {})
    exact_ids = ranked_ids(world["exact"]["ds"])
    assert len(exact_ids) == 10
    got = [hit.get("tile_id") for hit in answer.get("results", answer.get("hits", []))]
    ok = child.returncode == 0 and got == exact_ids and "hqrs-geo index" in err
    record(crashes=int(child.returncode < 0), internal=int("Traceback" in err), clean=int(ok), recovered=int(ok),
           data_lost=int(bool(got) and got != exact_ids))
    assert ok, (child.returncode, answers[-1:] if answers else None, err[-600:])


def test_a_cut_short_shard_is_encoded_again_by_index(world, tmp_path):
    """``hqrs-geo index`` over an index whose shard was cut short: the part is encoded again
    (with a warning), the update ends cleanly and the index is used again."""
    target = copy_of(world, tmp_path, "ds")
    folder = index_folder(target)
    shard = sorted((folder / "shards").glob("*.index"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    done = run_cli("index", target, "--kind", "ivfpq")
    ok = done.returncode == 0 and "encoding part" in done.stderr and "Traceback" not in done.stderr
    searched = run_cli("search", target, *QUERY, "--ann")
    ok = ok and searched.returncode == 0 and "warning" not in searched.stderr
    record(clean=int(ok), recovered=int(ok), internal=int("internal error" in done.stderr))
    assert ok, (done.returncode, done.stderr[-600:], searched.stderr[-300:])


@pytest.mark.parametrize("value", ["0", "-1", "x", "1000000000"])
def test_index_params_out_of_range_are_one_line_errors(world, tmp_path, value):
    target = copy_of(world, tmp_path, "ds")
    for name in ("rerank", "nprobe"):
        done = run_cli("index", target, *PARAMS, "--param", f"{name}={value}")
        if name == "nprobe" and value == "1000000000":  # more lists than there are: all of them are probed
            ok = done.returncode == 0
        else:
            ok = done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and name in done.stderr
        record(clean=int(ok), internal=int("Traceback" in done.stderr or "internal error" in done.stderr))
        assert ok, (name, value, done.returncode, done.stderr)


def test_similar_with_negatives_that_cancel_the_positives_says_so(world):
    """``similar --tile X --negative X --negative-weight 1``: the query is a zero vector (every
    score 0): a one-line error naming --negative-weight, not a table of zeros."""
    tile = ranked_ids(world["exact"]["ds"])[0]
    done = run_cli("similar", world["dataset"], "--tile", tile, "--negative", tile, "--negative-weight", "1")
    ok = done.returncode == 2 and "--negative-weight" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    record(clean=int(ok), data_lost=int(done.returncode == 0), internal=int("Traceback" in done.stderr))
    assert ok, (done.returncode, done.stdout[-300:], done.stderr)
    half = run_cli("similar", world["dataset"], "--tile", tile, "--negative", tile, "--negative-weight", "0.5")
    assert half.returncode == 0 and len(ranked_ids(half.stdout)) > 0, half.stderr


@pytest.mark.parametrize("kind, damage", [("hnsw", "cut"), ("ivf", "cut"), ("ivf", "nprobe x"), ("hnsw", "json")])
def test_a_damaged_faiss_index_of_a_layer_warns_and_searches_exactly(world, tmp_path, kind, damage):
    """The in-memory FAISS indexes (HNSW, IVF-Flat) of a layer: a file cut short or a .json
    edited by hand is not used; one warning names the command that rebuilds it."""
    target = tmp_path / world["layer"].name
    shutil.copy(world["layer"], target)
    built = run_cli("index", target, "--kind", kind)
    assert built.returncode == 0, built.stderr
    (path,) = tmp_path.glob(f"{target.name}.emb_*.{kind}.faiss")
    meta = Path(f"{path}.json")
    if damage == "cut":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "nprobe x":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "params": {"nlist": 8, "nprobe": "x"}}))
    else:
        meta.write_text("[]")
    started = time.monotonic()
    done = run_cli("search", target, *QUERY, "--ann")
    counts = judge(done, world["exact"]["layer"], time.monotonic() - started)
    record(**counts)
    assert counts["clean"] == 1, (done.returncode, done.stderr[-600:])
    assert f"hqrs-geo index {target} --kind {kind}" in done.stderr
