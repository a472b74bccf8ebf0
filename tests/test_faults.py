"""Fuzz and fault tests (issue 12): hostile inputs and a failing machine, per failure class.

Every case is counted in :data:`REPORT` (printed at the end of the run by ``conftest.py``):
cases tried, clean one-line errors (exit 2), tracebacks or internal errors (target 0), data
lost (target 0) and faults recovered (a re-run after a kill, a full disk or a read-only file
system ends as an uninterrupted run does). Real parts throughout: GeoTIFFs written here, a
tmpfs that really fills up (or, where mounting is not allowed, a file-size limit in a child
process), real HTTP servers on 127.0.0.1, real signals to real child processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from conftest import EXAMPLE_SCENE, write_raster
from http_helpers import send_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import TINY_CLIP

REPORT = {"tried": 0, "clean": 0, "internal": 0, "data_lost": 0, "recovered": 0}
ONE_LINE = re.compile(r"^hqrs-geo: error: \S.*?: .+; .+")
PLAIN_LINE = re.compile(r"^hqrs-geo: error: .+")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# ----------------------------------------------------------------------------------- helpers

def cli(*argv, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run ``hqrs-geo ARGV`` in this process: (exit status, stdout, stderr)."""
    from hqrs_geo.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as exc:
                rc = int(exc.code or 0)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return rc, out.getvalue(), err.getvalue()


def child(*argv, cwd: Path | None = None, timeout: float = 300, preexec=None, **kw) -> subprocess.CompletedProcess:
    """``python -m hqrs_geo ARGV`` in a child process."""
    return subprocess.run([sys.executable, "-m", "hqrs_geo", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, preexec_fn=preexec, **kw)


def expect_clean(rc: int, err: str, *fragments: str, shape: bool = True) -> None:
    """Count one case and assert it ended in one clean line (exit 2) holding ``fragments``."""
    REPORT["tried"] += 1
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hqrs-geo: error: ")]
    if rc == 1 or "Traceback" in err or "internal error" in err:
        REPORT["internal"] += 1
        pytest.fail(f"internal error or traceback (exit {rc}): {err[-2000:]}")
    assert rc == 2, (rc, err[-2000:])
    assert len(errors) == 1 and errors[0] == lines[-1], err[-2000:]
    assert (ONE_LINE if shape else PLAIN_LINE).match(errors[0]), errors[0]
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]
    REPORT["clean"] += 1


def digest(path: Path) -> str | None:
    """sha256 of a file, or None when it does not exist."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def temporaries(folder: Path) -> list[Path]:
    """Temporary files (of :func:`hqrs_geo.atomic.atomic_path`) left anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def intact(before: str | None, path: Path) -> None:
    """Count data loss when ``path`` is no longer the file it was."""
    if digest(path) != before:
        REPORT["data_lost"] += 1
        pytest.fail(f"{path} changed after a failed run")


def huge_tiff(path: Path, width: int = 1_000_000, height: int = 1_000_000) -> Path:
    """A ~120-byte TIFF that declares ``width`` x ``height`` pixels (one strip, one data byte)."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, 1)]
    data_at = 8 + 2 + len(entries) * 12 + 4
    blob = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, value in entries:
        value = data_at if tag == 273 else value
        blob += (struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3
                 else struct.pack("<HHII", tag, kind, 1, value))
    path.write_bytes(bytes(blob + struct.pack("<I", 0) + b"\x00"))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def scene(work) -> Path:
    """A 400 x 400 RGB crop of the example scene (deflate, 128-px blocks)."""
    with rasterio.open(EXAMPLE_SCENE) as src:
        data = src.read(window=((0, 400), (0, 400)))
        transform = src.window_transform(((0, 400), (0, 400)))
        crs = src.crs.to_string()
    return write_raster(work / "scene.tif", data, transform=transform, crs=crs, compress="deflate",
                        blockxsize=128, blockysize=128)


@pytest.fixture(scope="module")
def layer(work, scene, tiny_clip_checkpoint) -> Path:
    """16 tiles of ``scene`` embedded with the tiny CLIP: the searchable layer of the suite."""
    out = work / "tiles.gpkg"
    rc, _, err = cli("tile", scene, "-o", out, "--tile-size", "100", "-q")
    assert rc == 0, err
    rc, _, err = cli("embed", out, "--model", TINY_CLIP, "--checkpoint", tiny_clip_checkpoint, "-q",
                     "--batch-size", "8")
    assert rc == 0, err
    return out


def fresh(layer: Path, folder: Path, name: str = "copy.gpkg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copyfile(layer, target)
    return target


# ------------------------------------------------------------------ 13: every command x bad input

NUMERIC = {  # command -> (arguments that reach the option check, numeric options)
    "tile": (["missing.tif", "-o", "o.gpkg"], ["--gsd", "--min-valid"]),
    "export-chips": (["missing.gpkg", "-o", "chips"], ["--quality", "--gsd", "--min-valid"]),
    "embed": (["missing.gpkg"], ["--batch-size", "--workers", "--gsd"]),
    "caption": (["missing.gpkg"], ["--beams", "--top-k", "--top-p", "--temperature", "--repetition-penalty",
                                   "--min-length", "--max-length", "--seed", "--batch-size"]),
    "search": (["missing.gpkg", "river"], ["-k", "--distance"]),
    "similar": (["missing.gpkg", "--tile", "x"], ["-k", "--negative-weight", "--distance"]),
    "classify": (["missing.gpkg", "--labels", "a,b"], ["--top-k", "--distance"]),
    "mpgi": (["missing.gpkg"], ["--limit"]),
    "export-dataset": (["missing.gpkg", "-o", "ds"], ["--val-fraction"]),
    "eval": (["retrieval", "missing.json", "--model", "hqrs-mini-clip"], ["--limit", "--beams", "--max-length"]),
    "finetune": (["missing.json", "-o", "run", "--arch", TINY_CLIP],
                 ["--epochs", "--max-steps", "--batch-size", "--accum-steps", "--lr", "--weight-decay",
                  "--warmup-steps", "--class-target", "--seed", "--save-every", "--keep-checkpoints",
                  "--class-prompts", "--min-scale"]),
}
BAD_NUMBERS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "", " ", "0x10", "1_0", "½", "1e", "--1",
                     "99999999999999999999999", "9" * 5000, "-0.0000001", "1,5", "true", "None"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.text(max_size=12),
)


@FAST
@given(command=st.sampled_from(sorted(NUMERIC)), data=st.data())
def test_every_numeric_option_refuses_bad_numbers_in_one_line(tmp_path_factory, command, data):
    folder = tmp_path_factory.mktemp("numbers")
    base, options = NUMERIC[command]
    option = data.draw(st.sampled_from(options))
    value = data.draw(BAD_NUMBERS).replace("\x00", "")
    rc, _, err = cli(command, *base, f"{option}={value}", cwd=folder)
    expect_clean(rc, err)  # a valid value reaches the missing input: still one clean line
    assert not any(folder.iterdir()), "a refused command wrote something"


TYPED = {  # command -> (arguments that reach the option check, options parsed into types or choices)
    "tile": (["missing.tif", "-o", "o.gpkg"], ["--tile-size", "--overlap", "--bands", "--stretch", "--crs",
                                               "--resampling", "--edge"]),
    "export-chips": (["missing.gpkg", "-o", "chips"], ["--format", "--tile-size", "--bands"]),
    "embed": (["missing.gpkg"], ["--precision", "--embedding-dtype", "--device"]),
    "caption": (["missing.gpkg"], ["--decoding"]),
    "search": (["missing.gpkg", "river"], ["--bbox", "--near", "--bbox-crs", "--near-crs"]),
    "export-dataset": (["missing.gpkg", "-o", "ds"], ["--captions", "--format"]),
    "index": (["missing.gpkg"], ["--kind"]),
    "finetune": (["missing.json", "-o", "run", "--arch", TINY_CLIP], ["--precision", "--save-dtype"]),
}
BAD_TEXT = st.one_of(st.sampled_from(["", "-", "--", "-5m", "-10%", "1e9", "0,0", "a,b,c", "nan,nan", "1,2,3,4,5",
                                      "EPSG:0", "p-1,200", "100%", "cuda:99", "../..", "\\x00"]),
                     st.text(max_size=16))


@FAST
@given(command=st.sampled_from(sorted(TYPED)), data=st.data())
def test_every_typed_option_refuses_bad_values_in_one_line(tmp_path_factory, command, data):
    folder = tmp_path_factory.mktemp("types")
    base, options = TYPED[command]
    option = data.draw(st.sampled_from(options))
    value = data.draw(BAD_TEXT).replace("\x00", "")
    rc, _, err = cli(command, *base, f"{option}={value}", cwd=folder)
    expect_clean(rc, err)
    assert not any(folder.iterdir()), "a refused command wrote something"


PATH_COMMANDS = {
    "info": lambda p, out: ["info", p],
    "tile": lambda p, out: ["tile", p, "-o", out / "o.gpkg"],
    "export-chips": lambda p, out: ["export-chips", p, "-o", out / "chips"],
    "embed": lambda p, out: ["embed", p],
    "search": lambda p, out: ["search", p, "river"],
    "classify-layer": lambda p, out: ["classify", p, "--labels", "a,b"],
    "index": lambda p, out: ["index", p],
    "mpgi": lambda p, out: ["mpgi", p],
    "export-dataset": lambda p, out: ["export-dataset", p, "-o", out / "ds"],
    "eval": lambda p, out: ["eval", "retrieval", p, "--model", "hqrs-mini-clip"],
    "finetune": lambda p, out: ["finetune", p, "-o", out / "run", "--arch", TINY_CLIP],
}


@pytest.fixture(scope="module")
def bad_paths(work) -> dict:
    folder = work / "bad_paths"
    folder.mkdir()
    (folder / "empty.gpkg").write_bytes(b"")
    (folder / "binary.gpkg").write_bytes(bytes(range(256)) * 8)
    (folder / "text.tif").write_text("not a raster\n")
    (folder / "folder.gpkg").mkdir()
    (folder / "five.json").write_text('{"images": 5}')
    (folder / "list.json").write_text("[1, 2, 3]")
    (folder / "deep.json").write_text("[" * 100000)
    (folder / "images.json").write_text('{"images": [{"filename": "../../etc/passwd", "split": "train", '
                                        '"sentences": [{"raw": "x"}]}]}')
    (folder / "bad.csv").write_bytes(b"filepath,caption\n\xff\xfe,\x00\n")
    (folder / "escape.csv").write_text("filepath,caption\n../../../etc/passwd,a caption\n")
    return {
        "missing": str(folder / "nope.gpkg"), "empty": str(folder / "empty.gpkg"),
        "binary": str(folder / "binary.gpkg"), "text": str(folder / "text.tif"),
        "folder": str(folder / "folder.gpkg"), "json5": str(folder / "five.json"),
        "jsonlist": str(folder / "list.json"), "deepjson": str(folder / "deep.json"),
        "escape_json": str(folder / "images.json"), "badcsv": str(folder / "bad.csv"),
        "escape_csv": str(folder / "escape.csv"), "long": str(folder / ("x" * 300 + ".gpkg")),
        "newline": str(folder / "a\nb.gpkg"), "devnull": "/dev/null", "root": "/",
        "vsi": "/vsicurl/http://127.0.0.1:9/x.tif",
    }


@settings(max_examples=45, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(command=st.sampled_from(sorted(PATH_COMMANDS)), which=st.sampled_from(
    ["missing", "empty", "binary", "text", "folder", "json5", "jsonlist", "deepjson", "escape_json", "badcsv",
     "escape_csv", "long", "newline", "devnull", "root", "vsi"]))
def test_every_command_refuses_bad_paths_in_one_line(tmp_path_factory, bad_paths, command, which):
    out = tmp_path_factory.mktemp("paths")
    rc, _, err = cli(*PATH_COMMANDS[command](bad_paths[which], out))
    expect_clean(rc, err, shape=False)
    assert not temporaries(out)


@pytest.mark.parametrize("argv, fragment", [
    (["tile", "SCENE", "-o", "OUT/x.gpkg", "--tile-size", "-5m"], "--tile-size"),
    (["tile", "SCENE", "-o", "OUT/x.gpkg", "--overlap", "-10%"], "--overlap"),
    (["tile", "SCENE", "-o", "OUT/x.gpkg", "--gsd", "nan"], "--gsd"),
    (["tile", "SCENE", "-o", "OUT/x.gpkg", "--gsd", "1e-9"], "--gsd"),
    (["tile", "SCENE", "-o", "OUT/x.gpkg", "--tile-size", "20000", "--edge", "pad"], "--tile-size"),
    (["tile", "SCENE", "-o", "OUT/x.gpkg", "--stretch", "0,inf"], "--stretch"),
    (["tile", "SCENE", "-o", "OUT/x.gpkg", "--crs", "EPSG:999999"], "--crs"),
    (["export-chips", "LAYER", "-o", "OUT/c", "--quality", "1000"], "--quality"),
    (["export-chips", "LAYER", "-o", "OUT/c", "--quality", "-5"], "--quality"),
    (["classify", "LAYER", "--labels", "a,b", "--top-k", "0"], "--top-k"),
    (["classify", "LAYER", "--labels", "a"], "--labels"),
    (["classify", "LAYER", "--labels-file", "/bin/sh"], "labels file"),
    (["search", "LAYER", "river", "--bbox-crs", "nope", "--bbox", "0,0,1,1"], "--bbox-crs"),
    (["search", "LAYER", "river", "--near", "1e30,1e30", "--distance", "5"], "--near"),
    (["search", "LAYER", "river", "-k", "1e400"], "-k"),
    (["similar", "LAYER", "--tile", "no_such_tile"], "--tile"),
    (["finetune", "x.json", "-o", "OUT/r", "--lr", "nan", "--arch", TINY_CLIP], "--lr"),
    (["mpgi", "LAYER", "--recipe", "OUT"], "is a folder"),
])
def test_reported_cases_are_clean_errors(layer, scene, tmp_path, argv, fragment):
    argv = [str(scene) if a == "SCENE" else str(layer) if a == "LAYER" else a.replace("OUT", str(tmp_path))
            for a in argv]
    before = digest(layer)
    rc, _, err = cli(*argv)
    expect_clean(rc, err, fragment)
    intact(before, layer)


@pytest.mark.parametrize("recipe, fragment", [
    ("perspectives = 5\n", "perspectives"),
    ("[llm]\ntype = 'openai'\nbase_url = 'http://127.0.0.1:9/v1'\nmodel = 'm'\ntimeout = 'soon'\n", "timeout"),
    ("[output]\nshort_captions = true\n", "short_captions"),
    ("[vlm]\ntype = 'telepathy'\n", "type"),
    ("[prompts]\nintegration = '{nope}'\n", "placeholder"),
    ("llmm = 1\n", "unknown section"),
    ("[facts]\nnir_band = 'four'\n", "nir_band"),
])
def test_bad_recipes_are_clean_errors(layer, tmp_path, recipe, fragment):
    path = tmp_path / "recipe.toml"
    path.write_text(recipe)
    rc, _, err = cli("mpgi", layer, "--recipe", path, "-o", tmp_path / "out.gpkg")
    expect_clean(rc, err, fragment)
    assert not (tmp_path / "out.gpkg").exists()


# -------------------------------------------------------------------- 11: back ends from recipes

class EchoLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible server: answers with the Authorization header it got (an echo of
    the API key, as careless servers do) inside an otherwise normal captioning answer."""

    def do_POST(self):  # noqa: N802 - http.server's hook
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        auth = self.headers.get("Authorization", "")
        if self.server.mode == "deny":  # type: ignore[attr-defined]
            send_body(self, 401, json.dumps({"error": {"message": f"bad key {auth}"}}).encode())
            return
        prompt = body["messages"][-1]["content"]
        words = " ".join(sorted(set(re.findall(r"[a-z]{4,}", prompt.lower())))[:6])
        text = f"A tile with {words}. Key was {auth}.\n- short one {words}.\n- {auth} again."
        send_body(self, 200, json.dumps({"choices": [{"message": {"content": text}}]}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoLLM)
    server.mode = "ok"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def minimal_recipe(folder: Path, port: int, **extra) -> Path:
    path = folder / "recipe.toml"
    lines = ["[vlm]", 'type = "none"', "[llm]", 'type = "openai"', f'base_url = "http://127.0.0.1:{port}/v1"',
             'model = "echo"', 'api_key_env = "HQRS_TEST_KEY"', "timeout = 5", "retries = 0",
             "[caption_model]", 'name = ""']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("stage, table", [
    ("vlm", {"type": "none"}),
    ("vlm", {"type": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "qwen"}),
    ("llm", {"type": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "qwen"}),
    ("llm", {"type": "transformers", "model": "smollm2"}),
    ("llm", {"type": "transformers", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"}),
    ("vlm", {"type": "transformers-vlm", "model": "HuggingFaceTB/SmolVLM-256M-Instruct"}),
])
def test_every_back_end_type_works_from_a_minimal_recipe(tmp_path, stage, table):
    from hqrs_geo.mpgi.backends import make_backend
    from hqrs_geo.mpgi.pipeline import resolve_backend_config
    from hqrs_geo.mpgi.recipe import load_recipe

    body = f"[{stage}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    (tmp_path / "r.toml").write_text(body)
    recipe = load_recipe(str(tmp_path / "r.toml"))
    REPORT["tried"] += 1
    chosen = recipe.vlm if stage == "vlm" else recipe.llm
    assert chosen["type"] == table["type"]
    if table["type"] != "none":
        backend = make_backend(resolve_backend_config(chosen))  # builds: no inherited key of another type
        assert backend.kind == table["type"]
        backend.close()
    REPORT["clean"] += 1


# ---------------------------------------------------------------------- 2 + 10: secrets, deadline

def test_an_echoed_api_key_is_never_stored_or_printed(layer, tmp_path, echo_server, monkeypatch):
    key = "sk-test-" + "7" * 24
    monkeypatch.setenv("HQRS_TEST_KEY", key)
    target = fresh(layer, tmp_path)
    recipe = minimal_recipe(tmp_path, echo_server.server_address[1])
    rc, out, err = cli("mpgi", target, "--recipe", recipe, "--limit", "3", "--progress", "json")
    REPORT["tried"] += 1
    assert rc == 0, err
    cache = Path(f"{target}.hqrs-mpgi.sqlite")
    with sqlite3.connect(cache) as db:
        stored = " ".join(str(v) for row in db.execute("SELECT * FROM calls") for v in row)
    assert "***" in stored  # the echo was there, masked
    for blob in (stored, target.read_bytes().decode("latin-1"), out, err):
        assert key not in blob
    echo_server.mode = "deny"  # an error message that quotes the key
    target2 = fresh(layer, tmp_path, "other.gpkg")
    rc, out, err = cli("mpgi", target2, "--recipe", recipe, "--limit", "1")
    expect_clean(rc, err, shape=False)
    assert key not in err and key not in out
    REPORT["clean"] += 0  # counted by expect_clean


def test_a_slow_drip_server_cannot_outlive_the_deadline():
    import socket

    from hqrs_geo.errors import InputError
    from hqrs_geo.mpgi.backends import ChatRequest, make_backend

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return

            def one(conn=conn):
                conn.recv(65536)
                body = b'{"choices": [{"message": {"content": "late"}}]}'
                reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                try:
                    for byte in reply:
                        conn.send(bytes([byte]))
                        time.sleep(0.25)
                except OSError:
                    pass
            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=drip, daemon=True).start()
    backend = make_backend({"type": "openai", "base_url": f"http://127.0.0.1:{listener.getsockname()[1]}/v1",
                            "model": "m", "timeout": 1, "retries": 1, "backoff": 0.1})
    start = time.monotonic()
    REPORT["tried"] += 1
    with pytest.raises(InputError, match="did not answer within 1s"):
        backend.complete([ChatRequest(messages=[{"role": "user", "content": "hi"}])])
    assert time.monotonic() - start < 5  # two attempts of at most 1 s each, plus back-off
    REPORT["clean"] += 1
    stop.set()
    listener.close()


# ------------------------------------------------------------------------------- 1: paths, CSVs

def craft_layer(layer: Path, folder: Path, ids: list[str], fmt: str = ".gpkg", captions=None) -> Path:
    from hqrs_geo.layer.io import open_layer, write_layer
    from hqrs_geo.layer.runs import new_run

    opened = open_layer(layer)
    frame = opened.frame.iloc[:len(ids)].copy()
    frame["tile_id"] = ids
    if captions is not None:
        frame["caption"] = captions
    target = folder / f"crafted{fmt}"
    write_layer(target, frame, new_run("tile", "tiles", {"scenes": [s.as_dict() for s in opened.scenes().values()]}))
    return target


@pytest.mark.parametrize("bad_id", ["../../escaped", "/tmp/hqrs_escaped", "a/../../b", "..", "c\\..\\d",
                                    "line\nbreak", "x" * 300])
@pytest.mark.parametrize("command", ["export-chips", "export-dataset"])
def test_tile_ids_never_become_paths_outside_the_output(layer, tmp_path, bad_id, command):
    crafted = craft_layer(layer, tmp_path, ["fine_r0000_c0000", bad_id], captions=["a river.", "a road."])
    out = tmp_path / "deep" / "out"
    argv = ["export-chips", crafted, "-o", out] if command == "export-chips" else \
        ["export-dataset", crafted, "-o", out, "--captions", "caption"]
    before = {p for p in Path("/tmp").glob("hqrs_escaped*")}
    rc, _, err = cli(*argv)
    expect_clean(rc, err, "cannot be used as a file name", shape=False)
    assert not out.exists() and not (tmp_path / "deep").exists()  # nothing written, no empty folder left
    assert {p for p in Path("/tmp").glob("hqrs_escaped*")} == before
    assert not list(tmp_path.rglob("escaped*"))


def test_csv_cells_never_act_as_formulas_and_round_trip_into_finetune(layer, tmp_path):
    from hqrs_geo.training.data import read_csv

    formulas = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "'=quoted"]
    ids = [f"{f[:1].strip() or 'w'}cell_r{i:04d}_c0000" for i, f in enumerate(formulas)]
    crafted = craft_layer(layer, tmp_path, ids, captions=formulas)
    rc, _, err = cli("export-dataset", crafted, "-o", tmp_path / "ds", "--captions", "caption", "--format", "png")
    REPORT["tried"] += 1
    assert rc == 0, err
    import csv

    for name in ("captions.csv", "images/index.csv"):
        for row in csv.reader(open(tmp_path / "ds" / name, newline="")):
            for cell in row:
                assert not cell or cell[0] not in "=+-@\t\r", (name, cell)
    back = {r.captions[0] for r in read_csv(str(tmp_path / "ds" / "captions.csv"))}
    assert back == {f.strip() for f in formulas}
    REPORT["clean"] += 1


def test_finetune_refuses_dataset_paths_outside_its_folder(tmp_path):
    (tmp_path / "d.csv").write_text("filepath,caption\n../outside.png,a caption\n")
    rc, _, err = cli("finetune", tmp_path / "d.csv", "-o", tmp_path / "run", "--arch", TINY_CLIP)
    expect_clean(rc, err, "points outside")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- 3: huge rasters

def limited(megabytes: int):
    """A ``preexec_fn`` capping the child's data segment (heap and anonymous mappings)."""
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_DATA, (megabytes << 20, megabytes << 20))
    return apply


@pytest.mark.parametrize("argv, memory, fragment", [
    (["tile", "HUGE", "-o", "OUT/h.gpkg"], 1200, "tiles, more than"),
    (["export-chips", "HUGE", "-o", "OUT/chips"], 1200, "tiles, more than"),
    (["tile", "HUGE", "-o", "OUT/h.gpkg", "--tile-size", "1000000", "--edge", "pad"], 1200, "--tile-size"),
    (["info", "HUGE"], 1200, None),
    (["similar", "LAYER", "--image", "HUGE"], 3000, "too large"),
    (["tile", "SCENE", "-o", "OUT/g.gpkg", "--gsd", "1e-9"], 1200, "--gsd"),
])
def test_declared_huge_rasters_stay_within_a_memory_ceiling(work, layer, scene, tmp_path, argv, memory, fragment):
    huge = huge_tiff(tmp_path / "huge.tif")
    argv = [str(huge) if a == "HUGE" else str(layer) if a == "LAYER" else str(scene) if a == "SCENE"
            else a.replace("OUT", str(tmp_path)) for a in argv]
    result = child(*argv, preexec=limited(memory), timeout=120)
    if fragment is None:  # info describes it, then says its one byte of pixel data cannot be all (exit 2)
        REPORT["tried"] += 1
        assert result.returncode == 2 and "1000000 x 1000000" in result.stdout, result.stderr
        assert "beyond the end of the file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        REPORT["clean"] += 1
        return
    expect_clean(result.returncode, result.stderr, fragment, shape=False)
    assert not (tmp_path / "h.gpkg").exists() and not (tmp_path / "chips").exists()


# ---------------------------------------------------------------- 8: truncated or corrupt GeoTIFFs

@pytest.mark.parametrize("damage", ["first1000", "half", "garbled-block", "zeroed-tail"])
def test_tile_detects_truncated_and_corrupt_geotiffs(scene, tmp_path, damage):
    data = bytearray(scene.read_bytes())
    with rasterio.open(scene) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_2_2", "TIFF", bidx=1))
    if damage == "first1000":
        data = data[:1000]
    elif damage == "half":
        data = data[: len(data) // 2]
    elif damage == "garbled-block":
        for i in range(offset + 8, offset + size - 8):
            data[i] = (data[i] * 7 + 13) % 256
    else:
        data[len(data) - 4096:] = bytes(4096)
    bad = tmp_path / f"{damage}.tif"
    bad.write_bytes(bytes(data))
    rc, _, err = cli("tile", bad, "-o", tmp_path / "t.gpkg", "--tile-size", "100")
    expect_clean(rc, err, shape=False)
    assert not (tmp_path / "t.gpkg").exists()


# ----------------------------------------------------------------------- 4: never lose a layer

def test_search_never_overwrites_the_searched_layer_or_foreign_layers(layer, tmp_path):
    import pyogrio

    target = fresh(layer, tmp_path)
    before = digest(target)
    for argv, fragment in [
        (["--result-layer", "tiles"], "--result-layer"), (["--result-layer", "TILES"], "--result-layer"),
        (["--result-layer", "hqrs_runs"], "--result-layer"),
        (["--score-column", "tile_id"], "--score-column"), (["--score-raster", str(target)], None),
    ]:
        rc, _, err = cli("search", target, "river", *argv)
        if fragment is None and rc == 0:
            REPORT["tried"] += 1
            REPORT["clean"] += 1
            continue
        expect_clean(rc, err, *( [fragment] if fragment else []), shape=False)
        intact(before, target)
    emb = next(c for c in pyogrio.read_info(target)["fields"] if c.startswith("emb_") and not c.endswith(("_model",
                                                                                                           "_dim")))
    rc, _, err = cli("search", target, "river", "--score-column", emb)
    expect_clean(rc, err, "--score-column")
    foreign = tmp_path / "foreign.gpkg"
    rc, _, err = cli("tile", EXAMPLE_SCENE, "-o", foreign, "--tile-size", "500", "-q")
    assert rc == 0
    kept = digest(foreign)
    rc, _, err = cli("search", target, "river", "--result-layer", "tiles", "--output", foreign)
    expect_clean(rc, err, "not written by an hqrs_geo search", shape=False)
    intact(kept, foreign)
    rc, _, err = cli("search", target, "river", "--result-layer", "mine")  # allowed, and again (its own)
    assert rc == 0 and cli("search", target, "river", "--result-layer", "mine")[0] == 0, err


# ------------------------------------------------------------------ 6: non-finite embeddings

def test_embed_refuses_nan_outputs_and_writes_nothing(layer, tmp_path):
    import torch
    from tiny_models import build_tiny

    model, _, _ = build_tiny(TINY_CLIP)
    state = model.state_dict()
    state["visual.ln_post.weight"] = torch.full_like(state["visual.ln_post.weight"], float("nan"))
    ckpt = tmp_path / "nan_clip.pt"
    torch.save(state, ckpt)
    target = fresh(layer, tmp_path)
    before = digest(target)
    rc, _, err = cli("embed", target, "--model", TINY_CLIP, "--checkpoint", ckpt, "--overwrite")
    expect_clean(rc, err, "NaN", shape=False)
    intact(before, target)
    assert not Path(f"{target}.hqrs-partial.sqlite").exists() and not temporaries(tmp_path)


# ----------------------------------------------- 12: trusted pickle checkpoints, absolute paths

def test_layers_embedded_with_a_trusted_pickle_checkpoint_can_be_searched_anywhere(scene, tmp_path):
    import argparse as ap

    import torch
    from tiny_models import build_tiny

    model, _, _ = build_tiny(TINY_CLIP)
    where = tmp_path / "a"
    where.mkdir()
    torch.save({"state_dict": model.state_dict(), "args": ap.Namespace(lr=1)}, where / "pickled.pt")
    rc, _, err = cli("tile", scene, "-o", where / "t.gpkg", "--tile-size", "200", "-q")
    assert rc == 0, err
    rc, _, err = cli("embed", "t.gpkg", "--model", TINY_CLIP, "--checkpoint", "pickled.pt", "-q", cwd=where)
    expect_clean(rc, err, "--trust-checkpoint")
    rc, _, err = cli("embed", "t.gpkg", "--model", TINY_CLIP, "--checkpoint", "pickled.pt", "-q",
                     "--trust-checkpoint", cwd=where)
    assert rc == 0, err
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    for command in (["search", where / "t.gpkg", "river"], ["classify", where / "t.gpkg", "--labels", "a,b"],
                    ["similar", where / "t.gpkg", "--image", EXAMPLE_SCENE]):
        rc, _, err = cli(*command, cwd=elsewhere)
        expect_clean(rc, err, "--trust-checkpoint")
        REPORT["tried"] += 1
        rc, out, err = cli(*command, "--trust-checkpoint", "-q", cwd=elsewhere)
        assert rc == 0, err
        REPORT["recovered"] += 1
    session = subprocess.run([sys.executable, "-m", "hqrs_geo", "serve-search", str(where / "t.gpkg"),
                              "--trust-checkpoint"], input='{"id": 1, "text": "river", "k": 2}\n', text=True,
                             capture_output=True, cwd=elsewhere, timeout=300)
    answers = [json.loads(line) for line in session.stdout.splitlines()]
    assert session.returncode == 0 and len(answers[1]["results"]) == 2, session.stderr


# --------------------------------------------------------------------- 9: serve-search garbage

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers(min_value=-10**40, max_value=10**40)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "op", "text", "k", "similar", "negative", "bbox", "near", "distance", "template",
                         "negative_weight", "bbox_crs", "within", "similar_images", "junk"]), children, max_size=5),
    max_leaves=12)


@pytest.fixture(scope="module")
def session(layer):
    from hqrs_geo.search.session import SearchSession

    return SearchSession(str(layer))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(lines=st.lists(st.one_of(JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=40),
                                st.sampled_from(["", "   ", "[" * 5000, '{"k": 1e400, "text": "x"}',
                                                 '{"k": 2.5, "text": "x"}', '{"k": true, "text": "x"}',
                                                 '{"id": 7, "k": ' + "9" * 5000 + "}", "{" * 3000 + "}" * 3000])),
                      min_size=1, max_size=6))
def test_serve_search_answers_every_line_and_never_exits(session, lines):
    from hqrs_geo.search.serve import serve

    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    lines = [line for line in lines if '"op": "quit"' not in line and '"op":"quit"' not in line]
    stdin = io.StringIO("".join(line + "\n" for line in lines) + '{"id": "last", "op": "ping"}\n')
    stdout = io.StringIO()
    answered = serve(session, stdin, stdout)
    replies = [json.loads(r) for r in stdout.getvalue().splitlines()]
    REPORT["tried"] += len(lines)
    assert answered == len(lines) + 1 and len(replies) == len(lines) + 2
    assert replies[-1] == {"id": "last", "pong": True, "seconds": replies[-1]["seconds"]}
    for reply in replies[1:-1]:
        assert "error" in reply or "results" in reply or "pong" in reply
        assert "internal error" not in reply.get("error", ""), reply
    REPORT["clean"] += sum("error" in r for r in replies[1:-1])


def test_serve_search_reads_one_similar_id_and_refuses_odd_k(session, layer):
    from hqrs_geo.search.serve import serve

    first = session.index.ids[0]
    requests = [{"id": 1, "similar": first, "k": 3}, {"id": 2, "text": "x", "k": 2.5},
                {"id": 3, "text": "x", "k": True}, {"id": 4, "text": "x", "k": 0}]
    stdout = io.StringIO()
    serve(session, io.StringIO("".join(json.dumps(r) + "\n" for r in requests) + "\n"), stdout)
    replies = [json.loads(r) for r in stdout.getvalue().splitlines()][1:]
    assert len(replies[0]["results"]) == 3 and first not in [r["tile_id"] for r in replies[0]["results"]]
    assert all("'k'" in r["error"] and r["id"] == n for n, r in zip((2, 3, 4), replies[1:4]))
    assert "empty request" in replies[4]["error"]
    REPORT["tried"] += 5
    REPORT["clean"] += 4


# --------------------------------------------------------- 5: full disk and read-only outputs

def _mount(folder: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "hqrs-test", str(folder)], capture_output=True)
    return done.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (None where this machine does not allow mounting)."""
    folder = tmp_path / "disk"
    if not _mount(folder, "size=4m,mode=0777"):
        yield None
        return
    yield folder
    _umount(folder)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` so that about ``leave`` bytes stay free."""
    filler = disk / "filler.bin"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "ab") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


WRITERS = {  # name -> argv writing into OUT (the folder on the small disk)
    "tile-gpkg": ["tile", "SCENE", "-o", "OUT/t.gpkg", "--tile-size", "50"],
    "tile-parquet": ["tile", "SCENE", "-o", "OUT/t.parquet", "--tile-size", "50"],
    "tile-fgb": ["tile", "SCENE", "-o", "OUT/t.fgb", "--tile-size", "50"],
    "export-chips": ["export-chips", "LAYER", "-o", "OUT/chips", "--format", "png"],
    "score-raster": ["search", "LAYER", "river", "--score-raster", "OUT/score.tif"],
    "result-layer": ["search", "LAYER", "river", "--result-layer", "hits", "--output", "OUT/hits.gpkg"],
    "embed": ["embed", "OUT/copy.gpkg", "--model", TINY_CLIP, "--checkpoint", "CKPT", "--overwrite"],
    "classify": ["classify", "OUT/copy.gpkg", "--labels", "water,land"],
    "eval-json": ["eval", "retrieval", "DATASET", "--model", TINY_CLIP, "--checkpoint", "CKPT", "--json",
                  "OUT/m.json"],
}


def writer_argv(name: str, out: Path, scene: Path, layer: Path, ckpt: Path, dataset: Path) -> list[str]:
    return [str(scene) if a == "SCENE" else str(layer) if a == "LAYER" else str(ckpt) if a == "CKPT"
            else str(dataset) if a == "DATASET" else a.replace("OUT", str(out)) for a in WRITERS[name]]


@pytest.fixture(scope="module")
def eval_dataset(work) -> Path:
    try:
        from test_training import _write_dataset
    except ModuleNotFoundError:  # tests/training not collected in this session
        from training.test_training import _write_dataset

    folder = work / "captions"
    folder.mkdir()
    return _write_dataset(folder, per_class=4)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_full_disk_gives_one_line_and_keeps_what_was_there(small_disk, scene, layer, tiny_clip_checkpoint,
                                                           eval_dataset, tmp_path, name):
    if small_disk is None:
        return _full_disk_by_file_size_limit(scene, layer, tiny_clip_checkpoint, eval_dataset, tmp_path, name)
    out = small_disk / "out"
    out.mkdir()
    if name in ("embed", "classify"):
        shutil.copyfile(layer, out / "copy.gpkg")
    argv = writer_argv(name, out, scene, layer, tiny_clip_checkpoint, eval_dataset)
    previous = {p: digest(p) for p in out.rglob("*") if p.is_file()}
    rng = random.Random(name)
    for leave in (0, rng.randrange(2_000, 40_000)):
        filler = fill(small_disk, leave)
        rc, _, err = cli(*argv)
        if rc == 0:  # it fitted: nothing to check for this amount of free space
            filler.unlink()
            previous = {p: digest(p) for p in out.rglob("*") if p.is_file()}
            continue
        expect_clean(rc, err, "no space left", shape=False)
        for path, before in previous.items():
            intact(before, path)
        assert not temporaries(out), temporaries(out)
        assert not (out / "chips").exists() or any((out / "chips").iterdir())
        filler.unlink()
    rc, _, err = cli(*argv)  # with space again, the same command succeeds
    assert rc == 0, err
    REPORT["recovered"] += 1


def _full_disk_by_file_size_limit(scene, layer, ckpt, dataset, tmp_path, name):
    """Where mounting is not allowed: the child's file-size limit makes its writes fail (EFBIG)."""
    import resource

    out = tmp_path / "out"
    out.mkdir()
    if name in ("embed", "classify"):
        shutil.copyfile(layer, out / "copy.gpkg")
    previous = {p: digest(p) for p in out.rglob("*") if p.is_file()}

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = child(*writer_argv(name, out, scene, layer, ckpt, dataset), preexec=cap)
    if result.returncode != 0:
        expect_clean(result.returncode, result.stderr, shape=False)
        for path, before in previous.items():
            intact(before, path)
        assert not temporaries(out)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_read_only_outputs_give_one_line(tmp_path, scene, layer, tiny_clip_checkpoint, eval_dataset, name):
    out = tmp_path / "ro"
    if not _mount(out, "size=8m,mode=0777"):
        if os.geteuid() == 0:
            pytest.skip("read-only file systems need mount (root ignores permissions)")
        out.mkdir(exist_ok=True)
    if name in ("embed", "classify"):
        shutil.copyfile(layer, out / "copy.gpkg")
    before = {p: digest(p) for p in out.rglob("*") if p.is_file()}
    try:
        if os.geteuid() == 0:
            subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True, capture_output=True)
        else:
            out.chmod(0o555)
        rc, _, err = cli(*writer_argv(name, out, scene, layer, tiny_clip_checkpoint, eval_dataset))
        expect_clean(rc, err, shape=False)
        assert re.search(r"read-only|not writable|permission denied", err), err
        for path, digest_before in before.items():
            intact(digest_before, path)
    finally:
        if os.geteuid() == 0:
            _umount(out)
        else:
            out.chmod(0o755)


# ------------------------------------------------------------ 7 + kills: random SIGKILL/SIGTERM

def _kill_at(argv: list, delay: float, sig: int, cwd: Path | None = None, after: str | None = None,
             done: int = 0) -> tuple[int, bool]:
    """Start ``hqrs-geo ARGV --progress json`` and send ``sig`` ``delay`` seconds after the
    stage ``after`` started and reported ``done`` steps (or after the start); returns the exit
    status and whether the signal was sent while the process still ran."""
    proc = subprocess.Popen([sys.executable, "-m", "hqrs_geo", *map(str, argv), "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    if after is not None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if f'"stage": "{after}"' in line and json.loads(line).get("done", 0) >= done:
                break
    time.sleep(delay)
    sent = proc.poll() is None
    if sent:
        proc.send_signal(sig)
    proc.communicate(timeout=300)
    return proc.returncode, sent


KILL_TRIES = 5


def _kill_landed(argv: list, delay: float, sig: int, prepare: Callable[[], Any] = lambda: None,
                 **where: Any) -> tuple[int, Any]:
    """:func:`_kill_at` until the signal lands: a run that finished before it (exit status 0, or
    the signal sent too late) is tried again with half the delay (0 on the last of
    :data:`KILL_TRIES` tries), each try after ``prepare()`` (which sets up the state before the
    run); the test fails when no try is killed. Returns the killed run's exit status (never 0)
    and what ``prepare`` returned for it."""
    for attempt in range(KILL_TRIES):
        prepared = prepare()
        rc, sent = _kill_at(argv, delay if attempt < KILL_TRIES - 1 else 0.0, sig, **where)
        if sent and rc != 0:
            if sig == signal.SIGKILL:
                assert rc == -signal.SIGKILL, rc
            return rc, prepared
        delay /= 2
    pytest.fail(f"{signal.Signals(sig).name} never landed: hqrs-geo {argv[0]} finished before it {KILL_TRIES} times")


@pytest.mark.parametrize("fmt", [".gpkg", ".parquet", ".fgb"])
def test_killed_tiling_keeps_the_previous_layer_and_a_rerun_matches(scene, tmp_path, fmt):
    from hqrs_geo.layer.io import read_tiles

    reference = tmp_path / f"reference{fmt}"
    assert cli("tile", scene, "-o", reference, "--tile-size", "20", "-q")[0] == 0
    target = tmp_path / f"t{fmt}"

    def previous() -> str | None:
        """The previous layer (tiles of 200 px) in place; its digest."""
        assert cli("tile", scene, "-o", target, "--tile-size", "200", "-q")[0] == 0
        return digest(target)

    rng = random.Random(fmt)
    for sig in (signal.SIGKILL, signal.SIGTERM):
        REPORT["tried"] += 1
        _, before = _kill_landed(["tile", scene, "-o", target, "--tile-size", "20"], rng.uniform(0.0, 1.5), sig,
                                 prepare=previous, after="tile")
        if digest(target) != before:  # killed after the layer was replaced: then it is the complete new one
            same = read_tiles(target).drop(columns="geometry").equals(read_tiles(reference).drop(columns="geometry"))
            if not same:
                REPORT["data_lost"] += 1
            assert same, "a killed run left a layer that is neither the previous one nor the new one"
    rc, _, err = cli("tile", scene, "-o", target, "--tile-size", "20", "-q")
    assert rc == 0 and not temporaries(tmp_path), (err, temporaries(tmp_path))
    a, b = read_tiles(reference), read_tiles(target)
    assert a.drop(columns="geometry").equals(b.drop(columns="geometry"))
    REPORT["recovered"] += 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_embedding_resumes_to_the_uninterrupted_result(layer, tmp_path, tiny_clip_checkpoint, sig):
    from hqrs_geo.layer.columns import read_embeddings
    from hqrs_geo.layer.io import read_tiles

    plain = fresh(layer, tmp_path / "plain")
    cut = tmp_path / "cut" / "copy.gpkg"
    args = ["--model", TINY_CLIP, "--checkpoint", tiny_clip_checkpoint, "--overwrite", "--batch-size", "2"]
    assert cli("embed", plain, *args, "-q")[0] == 0
    REPORT["tried"] += 1
    _, before = _kill_landed(["embed", cut, *args], random.Random(int(sig)).uniform(0.1, 1.0), sig,
                             prepare=lambda: digest(fresh(layer, cut.parent)), after="embed")
    if digest(cut) == before:  # (a kill after the layer was written leaves the complete result)
        assert cli("embed", cut, *args[:-3], "--batch-size", "2", "-q")[0] == 0  # resume (no --overwrite)
    key = next(c[4:] for c in read_tiles(plain).columns if c.startswith("emb_") and c.endswith("_dim"))[:-4]
    pa, ma = read_embeddings(read_tiles(plain), key)
    pb, mb = read_embeddings(read_tiles(cut), key)
    assert (pa == pb).all() and np.allclose(ma, mb, atol=2e-3)
    assert not Path(f"{cut}.hqrs-partial.sqlite").exists()
    REPORT["recovered"] += 1


TINY_RN = "hqrs-test-tiny-rn"


@pytest.fixture(scope="module")
def tiny_resnet(model_environment) -> str:
    """A tiny ResNet CLIP (batch norm: its counters must survive a SIGTERM + resume exactly)."""
    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (model_environment / f"{TINY_RN}.json").write_text(json.dumps(config))
    open_clip.add_model_config(model_environment)
    return TINY_RN


@pytest.fixture(scope="module")
def train_dataset(work) -> Path:
    try:
        from test_training import _write_dataset
    except ModuleNotFoundError:  # tests/training not collected in this session
        from training.test_training import _write_dataset

    folder = work / "train_captions"
    folder.mkdir()
    return _write_dataset(folder, per_class=6)  # 12 train images: 3 steps per epoch at batch 4


# 12 training images at batch 4: 3 steps an epoch; 2 epochs (a new epoch's order, validation and
# model selection at steps 3 and 6) and a checkpoint every 2 steps
FINETUNE = {"batch_size": 4, "epochs": 2, "max_steps": 6, "save_every": 2, "lr": 1e-3, "warmup_steps": 2, "seed": 1,
            "device": "cpu", "precision": "fp32"}


@pytest.fixture(scope="module")
def straight_finetune(train_dataset, tiny_resnet, work) -> Path:
    """The uninterrupted run the stopped-and-resumed ones must equal bit for bit (made once, only read)."""
    from hqrs_geo.training import FinetuneConfig, finetune

    straight = work / "straight_finetune"
    finetune(FinetuneConfig(output=str(straight), dataset=str(train_dataset), arch=tiny_resnet, **FINETUNE))
    return straight


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_finetune_resumes_bit_identical(train_dataset, tiny_resnet, straight_finetune, tmp_path, sig):
    from safetensors.torch import load_file

    from hqrs_geo.training import FinetuneConfig, finetune
    from hqrs_geo.training.trainer import latest_checkpoint

    cut = tmp_path / "cut"
    argv = ["finetune", train_dataset, "-o", cut, "--arch", tiny_resnet]
    for key, value in FINETUNE.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    REPORT["tried"] += 1
    rng = random.Random(int(sig))
    # stopped after step 3 to 5 (of 6): a checkpoint exists (step 2 or 4, or the step a SIGTERM stopped
    # at), so the resumed run continues from a saved state rather than training again from the start
    rc, _ = _kill_landed(argv, rng.uniform(0.0, 0.2), sig, prepare=lambda: shutil.rmtree(cut, ignore_errors=True),
                         after="train", done=rng.randint(3, 5))
    if sig == signal.SIGTERM:
        assert rc == 130
    assert latest_checkpoint(cut) is not None
    resumed = finetune(FinetuneConfig(output=str(cut), dataset=str(train_dataset), arch=tiny_resnet, **FINETUNE),
                       resume=True)
    assert resumed["steps"] == FINETUNE["max_steps"]
    for name in ("model.safetensors", "best.safetensors"):
        a, b = load_file(str(straight_finetune / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        different = [k for k in a if not np.array_equal(a[k].numpy(), b[k].numpy())]
        if different:
            REPORT["data_lost"] += 1
        assert not different, different[:5]
    assert not temporaries(cut)
    REPORT["recovered"] += 1


def test_killed_mpgi_resumes_from_its_call_cache(layer, tmp_path, echo_server, monkeypatch):
    monkeypatch.setenv("HQRS_TEST_KEY", "sk-" + "5" * 20)
    recipe = minimal_recipe(tmp_path, echo_server.server_address[1], )
    plain = fresh(layer, tmp_path / "plain")
    assert cli("mpgi", plain, "--recipe", recipe, "-q") == (0, "", "")  # -q: nothing at all on the terminal
    cut = tmp_path / "cut" / "copy.gpkg"
    REPORT["tried"] += 1
    _, before = _kill_landed(["mpgi", cut, "--recipe", recipe], 0.3, signal.SIGKILL,
                             prepare=lambda: digest(fresh(layer, cut.parent)), after="integrate")
    from hqrs_geo.layer.io import read_tiles

    if digest(cut) != before:  # killed after the layer was replaced: then it is the complete new one
        complete = read_tiles(cut)["mpgi_caption"].tolist() == read_tiles(plain)["mpgi_caption"].tolist()
        assert complete, "a killed run left a layer that is neither the previous one nor the new one"
    assert cli("mpgi", cut, "--recipe", recipe, "-q")[0] == 0
    a, b = read_tiles(plain), read_tiles(cut)
    assert a["mpgi_caption"].tolist() == b["mpgi_caption"].tolist()
    assert a["mpgi_short"].tolist() == b["mpgi_short"].tolist()
    REPORT["recovered"] += 1


def test_killed_export_chips_leaves_no_temporary_and_resumes(layer, tmp_path):
    out = tmp_path / "chips"
    REPORT["tried"] += 1
    _kill_landed(["export-chips", layer, "-o", out], 0.2, signal.SIGKILL,
                 prepare=lambda: shutil.rmtree(out, ignore_errors=True), after="export-chips")
    assert cli("export-chips", layer, "-o", out, "-q")[0] == 0
    assert not temporaries(out) and len(list(out.glob("*.png"))) == 16
    reference = tmp_path / "reference"
    assert cli("export-chips", layer, "-o", reference, "-q")[0] == 0
    for chip in reference.glob("*.png"):
        assert digest(chip) == digest(out / chip.name)
    REPORT["recovered"] += 1


# ------------------------------------------------------------------------------- 14: noise

def test_quiet_means_quiet_for_errors_of_a_missing_hub_model(layer, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline, at once
    monkeypatch.setenv("HQRS_GEO_HOME", str(tmp_path))
    tiles = tmp_path / "tiles.gpkg"  # a real layer: its input is checked before any model is fetched
    shutil.copyfile(layer, tiles)
    start = time.monotonic()
    result = child("embed", tiles, "--model", "remoteclip-rn50", "-q", cwd=tmp_path,
                   env={**os.environ})
    expect_clean(result.returncode, result.stderr, "hub cannot be reached", shape=False)
    assert len(result.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 20
