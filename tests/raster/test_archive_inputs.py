"""Fault suite of remote inputs: credentials, stalls, HTTP errors, catalogs that point where they
must not, and datasets that follow their STAC catalog.

Real parts throughout: COGs cut from the example scene, served over HTTP on 127.0.0.1 by a server
that checks passwords and tokens, answers chosen status codes, or accepts a connection and never
answers (a raw socket that never reads), or drips its answer a byte at a time; the CLI in a fork
of a preloaded process (:mod:`fork_runner`) or, for signals, in a real child process. Network
limits are small here (1 s without data, a 2 s deadline per read) so a stall costs seconds.

Each case is counted with :func:`archive_report.record`: a clean one-line error or stated
warning, an internal error (target 0), a credential found in any output file or line (target 0),
a wait past its deadline (target 0).
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from archive_report import record
from conftest import write_raster
from fork_runner import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from scale_helpers import EXAMPLE_SCENE, RangeHandler, stac_item, wgs84_bounds, write_crop

from hqrs_geo import InputError, OptionError
from hqrs_geo.raster.catalog import SourceEntry, SourceFilter, resolve_sources
from hqrs_geo.raster.network import NetworkLimits
from hqrs_geo.redact import public_url, redact, redact_all, reveal, url_secrets

PASSWORD = "pw-SECRET-4821"
TOKEN = "tok-SECRET-9731"
SIGNATURE = "sig-SECRET-5507"
SECRETS = (PASSWORD, TOKEN, SIGNATURE, "SECRET")
DEADLINE = 2.0
LIMITS = ("--http-deadline", str(DEADLINE), "--http-read-timeout", "1", "--http-connect-timeout", "1",
          "--http-retries", "1")
SLACK = 2.5  # seconds a run may take beyond one deadline (process start, writing, the poll step)


# -- servers ----------------------------------------------------------------------------------------
class ArchiveHandler(RangeHandler):
    """The range server of the scale tests, with routes in front of it:

    ``/auth/…`` needs HTTP Basic ``user:PASSWORD`` (else 401); ``/token/…`` needs ``?token=TOKEN``
    (else 403); ``/signed/…`` needs ``X-Amz-Signature=SIGNATURE`` (else 403); ``/code/NNN/…``
    answers status NNN; ``/drip/…`` announces a long body and sends a byte every 0.4 s;
    ``/after/N/…`` serves a file's first N GET requests, then never answers (pixels stall after
    the scene opened)."""

    def _route(self) -> bool:
        path, _, query = self.path.partition("?")
        head, _, rest = path.lstrip("/").partition("/")
        server = self.server
        if head == "auth":
            expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self.send_error(401)
                return False
        elif head in ("token", "signed"):
            if (f"token={TOKEN}" if head == "token" else f"X-Amz-Signature={SIGNATURE}") not in query:
                self.send_error(403)
                return False
        elif head == "code":
            code, _, rest = rest.partition("/")
            self.send_error(int(code))
            return False
        elif head == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not server.stopping.wait(0.4):  # type: ignore[attr-defined]
                try:
                    self.wfile.write(b"{")
                    self.wfile.flush()
                except OSError:
                    return False
            return False
        elif head == "after":
            count, _, rest = rest.partition("/")
            with server.lock:  # type: ignore[attr-defined]
                served = server.served.get(rest, 0)  # type: ignore[attr-defined]
                if self.command == "GET":
                    server.served[rest] = served + 1  # type: ignore[attr-defined]
            if self.command == "GET" and served >= int(count):
                server.stopping.wait(60)  # type: ignore[attr-defined]
                return False
        else:
            return self._serve(path)
        return self._serve("/" + rest.split("?")[0])

    def _serve(self, path: str) -> bool:
        self.path = path
        return True

    def do_GET(self):
        if self._route():
            super().do_GET()

    def do_HEAD(self):
        if self._route():
            super().do_HEAD()


class ArchiveServer:
    """:class:`ArchiveHandler` on 127.0.0.1 serving ``folder``."""

    def __init__(self, folder: Path):
        from http.server import ThreadingHTTPServer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
        self.httpd.folder = Path(folder).resolve()  # type: ignore[attr-defined]
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.httpd.stopping = threading.Event()  # type: ignore[attr-defined]
        self.httpd.lock = threading.Lock()  # type: ignore[attr-defined]
        self.httpd.served = {}  # type: ignore[attr-defined]
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, auth: str = "") -> str:
        return f"http://{auth}{self.host}/{path}"

    def close(self) -> None:
        self.httpd.stopping.set()  # type: ignore[attr-defined]
        self.httpd.shutdown()
        self.httpd.server_close()


class StallServer:
    """Accepts every connection and never reads or answers (the peer waits for ever).

    ``backlog_url(path)``: a port whose listen queue is full (never accepted), so a connection
    to it is never established (the connect timeout's case)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.connections: list[socket.socket] = []
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()
        self.full = socket.socket()
        self.full.bind(("127.0.0.1", 0))
        self.full.listen(0)
        self.fillers = []
        for _ in range(3):  # fill the queue: later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(self.full.getsockname())
            except BlockingIOError:
                pass
            self.fillers.append(filler)

    def backlog_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.full.getsockname()[1]}/{path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def url(self, path: str) -> str:
        return f"http://{self.host}/{path}"

    def close(self) -> None:
        self.sock.close()
        for conn in [*self.connections, *self.fillers, self.full]:
            conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    for name, window in (("a.tif", Window(0, 0, 256, 256)), ("b.tif", Window(300, 300, 256, 256)),
                         ("c.tif", Window(600, 100, 256, 256))):
        write_crop(EXAMPLE_SCENE, folder / name, window, cog=True)
    server, stall = ArchiveServer(folder), StallServer()
    yield server, stall, folder
    server.close()
    stall.close()


@pytest.fixture(autouse=True)
def network_settings():
    """The network limits and GDAL settings a case sets in this process are put back after it."""
    names = [n for n in os.environ if n.startswith(("HQRS_GEO_HTTP_", "GDAL_HTTP_"))]
    before = {n: os.environ[n] for n in names}
    yield
    for name in [n for n in os.environ if n.startswith(("HQRS_GEO_HTTP_", "GDAL_HTTP_"))]:
        if name not in before:
            del os.environ[name]
    os.environ.update(before)


# -- what a case did ---------------------------------------------------------------------------------
def _files_text(*paths: Path) -> bytes:
    data = b""
    for path in paths:
        if path.is_dir():
            data += b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())
        elif path.exists():
            data += path.read_bytes()
    return data


def _case(result, *outputs: Path, expect_error: bool, bound: float | None = None, elapsed: float = 0.0,
          secrets=SECRETS) -> dict:
    """Count one CLI case and return what was seen (asserted by the caller)."""
    text = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hqrs-geo: error:")]
    internal = "Traceback" in text or "internal error" in text or result.returncode == 1 or result.returncode < 0
    stored = [s for s in secrets if s in text or s.encode() in _files_text(*outputs)]
    late = bound is not None and elapsed > bound
    clean = not internal and (len(errors) == 1 or result.returncode == 3) if expect_error else False
    record(clean=int(clean), internal=int(internal), credentials_stored=int(bool(stored)), past_deadline=int(late))
    return {"clean": clean, "internal": internal, "stored": stored, "late": late, "errors": errors, "text": text}


def _timed(*args, **kwargs):
    """``run_cli(*args)`` and its seconds; the fork server is started first (not timed)."""
    run_cli("--version")
    started = time.monotonic()
    result = run_cli(*args, **kwargs)
    return result, time.monotonic() - started


def _columns(path: Path) -> dict[str, set]:
    """The distinct ``source``/``source_url`` values of a layer or dataset."""
    from hqrs_geo import read_tiles

    frame = read_tiles(path)
    return {c: set(frame[c].dropna()) for c in ("source", "source_url") if c in frame.columns}


# -- credentials -----------------------------------------------------------------------------------
URL_FORMS = {
    "password": lambda s: s.url("auth/a.tif", auth=f"user:{PASSWORD}@"),
    "token": lambda s: s.url(f"token/a.tif?x=1&token={TOKEN}"),
    "signed": lambda s: s.url(f"signed/a.tif?X-Amz-Credential=AKIA%2FSECRET&X-Amz-Signature={SIGNATURE}"),
    "user-token": lambda s: s.url("a.tif", auth=f"{TOKEN}@"),
}


@pytest.mark.parametrize("form", list(URL_FORMS))
def test_credentials_in_urls_are_used_and_never_stored(served, tmp_path, form):
    server, _, _ = served
    url = URL_FORMS[form](server)
    public = public_url(url)
    assert not any(s in public for s in SECRETS)
    for output in (tmp_path / "DS", tmp_path / "tiles.gpkg"):
        result = run_cli("tile", url, "-o", f"{output}/" if output.suffix == "" else output, "--tile-size", "128",
                         *LIMITS)
        seen = _case(result, output, expect_error=False)
        assert result.returncode == 0, result.stderr
        assert not seen["stored"] and not seen["internal"]
        columns = _columns(output)
        assert columns["source"] == {f"/vsicurl/{public}"} and columns["source_url"] == {public}
        from hqrs_geo import read_tiles

        assert len(read_tiles(output)) == 4  # the pixels were read with the credentials


def test_wrong_credentials_are_worded_and_not_stored(served, tmp_path):
    server, _, _ = served
    wrong = server.url("auth/b.tif", auth="user:wrong-SECRET-pw@")
    token = server.url("token/b.tif?token=bad-SECRET-tok")
    result = run_cli("tile", wrong, token, "-o", f"{tmp_path / 'DS'}/", "--tile-size", "128", "--progress", "json",
                     *LIMITS)
    seen = _case(result, tmp_path / "DS", expect_error=True)
    assert result.returncode == 3 and seen["clean"] and not seen["stored"]
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON on stdout
    assert len(lines[-1]["failed"]) == 2 and all("credentials" in f["error"] for f in lines[-1]["failed"])
    failed = json.loads((tmp_path / "DS" / "_manifest.json").read_text())["failed"]
    errors = sorted(v["error"] for v in failed.values())
    assert len(errors) == 2 and "asks for credentials (HTTP 401)" in errors[0]
    assert "access denied (HTTP 403)" in errors[1]
    assert all("complete" not in v["error"] for v in failed.values())
    for url in (wrong, token):
        result = run_cli("tile", url, "-o", tmp_path / "one.gpkg", *LIMITS)
        seen = _case(result, tmp_path / "one.gpkg", expect_error=True)
        assert result.returncode == 2 and seen["clean"] and not seen["stored"], seen
        assert "credentials" in seen["errors"][0] and public_url(url) in seen["errors"][0]


def test_stac_asset_hrefs_with_credentials(served, tmp_path):
    server, _, folder = served
    features = [stac_item("item-a", URL_FORMS["password"](server), wgs84_bounds(folder / "a.tif"),
                          "2021-06-01T10:00:00Z"),
                stac_item("item-b", server.url(f"signed/b.tif?se=2030&X-Amz-Signature={SIGNATURE}"),
                          wgs84_bounds(folder / "b.tif"), "2021-06-02T10:00:00Z")]
    (folder / "creds.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    result = run_cli("tile", server.url(f"creds.json?token={TOKEN}"), "-o", f"{tmp_path / 'DS'}/",
                     "--tile-size", "128", *LIMITS)
    seen = _case(result, tmp_path / "DS", expect_error=False)
    assert result.returncode == 0 and not seen["stored"], seen
    columns = _columns(tmp_path / "DS")
    assert columns["source_url"] == {server.url("auth/a.tif"), server.url("signed/b.tif?se=2030")}


def test_run_records_lose_url_credentials(tmp_path):
    """The MpGI record keeps its recipe; a base_url with an API key is stored without it."""
    import pyogrio

    from hqrs_geo.layer.io import write_tiles
    from hqrs_geo.layer.runs import new_run

    layer = tmp_path / "t.gpkg"
    from hqrs_geo import tile_rasters

    tiles, _ = tile_rasters(str(EXAMPLE_SCENE), __import__("hqrs_geo").TileConfig(tile_size=512))
    recipe = {"llm": {"type": "openai", "base_url": f"https://llm.example/v1?api_key=sk-{TOKEN}",
                      "model": "m"}, "vlm": {"base_url": f"http://me:{PASSWORD}@127.0.0.1:9/v1"}}
    write_tiles(layer, tiles, new_run("mpgi", "tiles", {"recipe_content": recipe}))
    runs = pyogrio.read_dataframe(layer, layer="hqrs_runs")
    stored = [s for s in SECRETS if s.encode() in layer.read_bytes()]
    record(credentials_stored=int(bool(stored)))
    assert not stored
    params = json.loads(runs["params"].iloc[-1])
    assert params["recipe_content"]["llm"]["base_url"] == "https://llm.example/v1"
    assert params["recipe_content"]["vlm"]["base_url"] == "http://127.0.0.1:9/v1"


SECRET_NAMES = ["token", "TOKEN", "access_token", "api_key", "apikey", "key", "sig", "signature", "X-Amz-Signature",
                "x-amz-credential", "X-Amz-Security-Token", "X-Goog-Signature", "password", "client_secret",
                "my_token", "service_key"]


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(names=st.lists(st.sampled_from(SECRET_NAMES), min_size=0, max_size=3),
       plain=st.lists(st.sampled_from(["x", "format", "version", "se", "bands"]), max_size=2, unique=True),
       userinfo=st.sampled_from(["", "user:{s}@", "{s}@", "u%40x:{s}@"]),
       scheme=st.sampled_from(["http", "https"]), wrapped=st.booleans(),
       secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=6, max_size=24))
def test_fuzz_public_url_strips_every_credential(names, plain, userinfo, scheme, wrapped, secret):
    secret = "S3cr" + secret
    query = [(n, f"{secret}{i}") for i, n in enumerate(names)] + [(p, "v1") for p in plain]
    from urllib.parse import urlencode

    url = f"{scheme}://{userinfo.format(s=secret)}host.example:8443/x/scene.tif" + \
        (f"?{urlencode(query)}" if query else "")
    url = f"/vsicurl/{url}" if wrapped else url
    public = public_url(url)
    text = redact(f"GDAL: `{url}' not recognized; retry {url}.")
    leaked = secret in public or secret in text or (bool(names or "{s}" in userinfo) and not url_secrets(url))
    record(credentials_stored=int(leaked))
    assert not leaked, (url, public, text)
    assert all(f"{p}=v1" in public for p in plain) and public.startswith("/vsicurl/" if wrapped else scheme)


def test_source_entries_keep_credentials_in_memory_only():
    entry = resolve_sources([f"http://user:{PASSWORD}@127.0.0.1:9/z/q.tif?token={TOKEN}&b=1"])[0]
    assert entry.path == "/vsicurl/http://127.0.0.1:9/z/q.tif?b=1" and entry.url == "http://127.0.0.1:9/z/q.tif?b=1"
    assert PASSWORD not in repr(entry) and PASSWORD not in json.dumps(entry.as_dict())
    assert PASSWORD in reveal(entry.path)
    clone = pickle.loads(pickle.dumps(entry))  # a Ray task or a worker process: the read still works
    assert clone == entry and clone.real == entry.real
    assert redact(f"failed: {entry.real}") == f"failed: {entry.path}"
    assert redact_all({"u": [entry.real], entry.real: 1}) == {"u": [entry.path], entry.path: 1}
    record(credentials_stored=0)


# -- catalogs that point where they must not -----------------------------------------------------------
def test_remote_catalog_may_not_point_at_local_files(served, tmp_path):
    server, _, folder = served
    secret = tmp_path / "secret"
    secret.mkdir()
    write_crop(EXAMPLE_SCENE, secret / "scene.tif", Window(0, 0, 256, 256), cog=False)
    bounds = wgs84_bounds(secret / "scene.tif")
    # an absolute path in a catalog read over HTTP is a path on that server (URL rules), never a local file
    for name, href, words in (("file-url.json", f"file://{secret / 'scene.tif'}", "local file"),
                              ("vsi.json", f"/vsizip/{secret / 'x.zip'}/scene.tif", "local file"),
                              ("abs-path.json", str(secret / "scene.tif"), "does not exist on the server")):
        (folder / name).write_text(json.dumps(stac_item("local", href, bounds, "2021-06-01T10:00:00Z")))
        output = tmp_path / f"{name}.gpkg"
        result = run_cli("tile", server.url(name), "-o", output, *LIMITS)
        seen = _case(result, expect_error=True)
        assert result.returncode == 2 and seen["clean"] and not output.exists(), seen
        assert words in seen["errors"][0], seen["errors"]
        assert words != "local file" or "--allow-local-assets" in seen["errors"][0]
    result = run_cli("tile", server.url("file-url.json"), "-o", tmp_path / "allowed.gpkg", "--allow-local-assets",
                     "--tile-size", "128")
    _case(result, expect_error=False)
    assert result.returncode == 0 and _columns(tmp_path / "allowed.gpkg")["source"] == {str(secret / "scene.tif")}
    # a local catalog may point at local files as before
    (tmp_path / "local.json").write_text((folder / "file-url.json").read_text())
    assert resolve_sources([str(tmp_path / "local.json")])[0].path == str(secret / "scene.tif")


def test_remote_catalog_links_to_local_files_and_item_links_to_catalogs(served, tmp_path):
    server, _, folder = served
    item = stac_item("item-a", server.url("a.tif"), wgs84_bounds(folder / "a.tif"), "2021-06-01T10:00:00Z")
    local_item = tmp_path / "item.json"
    local_item.write_text(json.dumps(item))
    (folder / "item-a.json").write_text(json.dumps(item))

    def catalog(name: str, links: list[dict]) -> str:
        (folder / name).write_text(json.dumps({"type": "Catalog", "stac_version": "1.0.0", "id": name,
                                               "description": "d", "links": links}))
        return server.url(name)

    to_local = catalog("to-local.json", [{"rel": "item", "href": f"file://{local_item}"}])
    inner = catalog("inner.json", [{"rel": "item", "href": "./item-a.json"}])
    to_catalog = catalog("to-catalog.json", [{"rel": "item", "href": "./inner.json"}])
    cases = ((to_local, "links to the local file"), (to_catalog, "not an Item"))
    for url, words in cases:
        with pytest.raises(InputError, match=words) as caught:
            resolve_sources([url])
        record(clean=int("\n" not in str(caught.value)))
    result = run_cli("tile", to_catalog, "-o", tmp_path / "x.gpkg", *LIMITS)
    seen = _case(result, expect_error=True)
    assert result.returncode == 2 and seen["clean"] and "'item' link points at a Catalog" in seen["errors"][0]
    assert [e.item for e in resolve_sources([inner])] == ["item-a"]
    assert [e.item for e in resolve_sources([to_local], SourceFilter(allow_local_assets=True))] == ["item-a"]


# -- stalls -------------------------------------------------------------------------------------------
STALLS = {  # what stalls: (inputs, output, exit status, words of the error)
    "tif, layer": (lambda sv, st: [st.url("one/a.tif")], "a.gpkg", 2, "no answer|did not answer"),
    "tif, dataset": (lambda sv, st: [st.url("two/a.tif")], "DS", 3, "no answer|did not answer"),
    "STAC URL": (lambda sv, st: [st.url("cat.json")], "b.gpkg", 2, "no answer|did not answer"),
    "STAC asset": (lambda sv, st: [sv.url("stall-item.json")], "DS2", 3, "no answer|did not answer"),
    "dripping tif": (lambda sv, st: [sv.url("drip/a.tif")], "c.gpkg", 2, "no answer|did not answer|not a raster"),
    "dripping STAC": (lambda sv, st: [sv.url("drip/d.json")], "d.gpkg", 2, "no answer|did not answer"),
    "pixels stall": (lambda sv, st: [sv.url("after/2/c.tif")], "e.gpkg", 2, "no answer|did not answer"),
    "no connection, tif": (lambda sv, st: [st.backlog_url("a.tif")], "f.gpkg", 2, "no connection|no answer"),
    "no connection, STAC": (lambda sv, st: [st.backlog_url("c.json")], "g.gpkg", 2, "no connection|no answer"),
}


@pytest.mark.parametrize("what", list(STALLS))
def test_stalled_reads_end_within_the_deadline(served, tmp_path, what):
    import re

    server, stall, folder = served
    (folder / "stall-item.json").write_text(json.dumps(stac_item(
        "stalled", stall.url("s/a.tif"), wgs84_bounds(folder / "a.tif"), "2021-06-01T10:00:00Z")))
    inputs, name, status, words = STALLS[what]
    output = tmp_path / name
    target = f"{output}/" if output.suffix == "" else str(output)
    result, elapsed = _timed("tile", *inputs(server, stall), "-o", target, "--tile-size", "128", *LIMITS, timeout=60)
    seen = _case(result, output, expect_error=True, bound=DEADLINE + SLACK, elapsed=elapsed)
    assert result.returncode == status and seen["clean"] and not seen["late"], (elapsed, seen)
    assert re.search(words, result.stderr), result.stderr
    assert status == 3 or not output.exists()


def test_sigterm_ends_a_stalled_read_at_once(served, tmp_path):
    """With the default limits (a 120 s deadline) a stalled read ends on SIGTERM within seconds."""
    _, stall, _ = served
    before = len(stall.connections)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HQRS_GEO_HTTP_", "GDAL_HTTP_"))}
    child = subprocess.Popen([sys.executable, "-m", "hqrs_geo", "tile", stall.url("term/a.tif"), "-o",
                              str(tmp_path / "t.gpkg")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    try:
        limit = time.monotonic() + 30
        while len(stall.connections) == before and time.monotonic() < limit:
            time.sleep(0.05)
        time.sleep(0.3)  # the request is on its way: the child waits for the answer
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
    result = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    seen = _case(result, tmp_path / "t.gpkg", expect_error=True, bound=3.0, elapsed=elapsed)
    assert child.returncode == 130 and "cancelled" in err and seen["clean"] and not seen["late"], (elapsed, seen)
    assert not (tmp_path / "t.gpkg").exists()


# -- HTTP errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "words"), [(404, "does not exist on the server (HTTP 404); check the URL"),
                                             (410, "does not exist"), (401, "asks for credentials (HTTP 401)"),
                                             (403, "access denied (HTTP 403)"), (500, "server error (HTTP 500)"),
                                             (429, "too many requests")])
def test_http_errors_get_advice_that_fits(served, tmp_path, code, words):
    server, _, _ = served
    for name in ("a.tif", "cat.json"):
        url = server.url(f"code/{code}/{name}?token={TOKEN}")
        result = run_cli("tile", url, "-o", tmp_path / f"{name}.gpkg", *LIMITS[:-1], "0")
        seen = _case(result, tmp_path / f"{name}.gpkg", expect_error=True)
        assert result.returncode == 2 and seen["clean"] and not seen["stored"], seen
        error = seen["errors"][0]
        assert words in error and public_url(url) in error and "complete" not in error, error


# -- option and environment ranges ------------------------------------------------------------------
@pytest.mark.parametrize(("flag", "value"), [("--http-deadline", "0"), ("--http-deadline", "-1"),
                                             ("--http-deadline", "inf"), ("--http-deadline", "nan"),
                                             ("--http-read-timeout", "1e9"), ("--http-connect-timeout", "x"),
                                             ("--http-retries", "21"), ("--http-retries", "1.5")])
def test_network_options_are_range_checked(tmp_path, flag, value):
    result = run_cli("tile", str(EXAMPLE_SCENE), "-o", tmp_path / "x.gpkg", flag, value)
    seen = _case(result, expect_error=True)
    assert result.returncode == 2 and seen["clean"] and flag in seen["errors"][0], seen


def test_network_environment_is_range_checked():
    assert NetworkLimits.from_env({}) == NetworkLimits(10.0, 30.0, 120.0, 3)
    assert NetworkLimits.from_env({"HQRS_GEO_HTTP_DEADLINE": "7.5", "HQRS_GEO_HTTP_RETRIES": "0"}) == \
        NetworkLimits(deadline=7.5, retries=0)
    for variable, text in (("HQRS_GEO_HTTP_DEADLINE", "abc"), ("HQRS_GEO_HTTP_DEADLINE", "0"),
                           ("HQRS_GEO_HTTP_READ_TIMEOUT", "inf"), ("HQRS_GEO_HTTP_RETRIES", "-1"),
                           ("HQRS_GEO_HTTP_CONNECT_TIMEOUT", "1e400")):
        with pytest.raises(OptionError, match=variable) as caught:
            NetworkLimits.from_env({variable: text})
        record(clean=int("\n" not in str(caught.value)))
    limits = NetworkLimits(connect_timeout=1.5, read_timeout=2.2, deadline=9, retries=2).gdal_options()
    assert limits == {"GDAL_HTTP_CONNECTTIMEOUT": "1.5", "GDAL_HTTP_LOW_SPEED_TIME": "3",
                      "GDAL_HTTP_LOW_SPEED_LIMIT": "1", "GDAL_HTTP_TIMEOUT": "9", "GDAL_HTTP_MAX_RETRY": "2",
                      "GDAL_HTTP_RETRY_DELAY": "1"}


# -- datasets follow their catalog ---------------------------------------------------------------------
def _collection(folder: Path, server: ArchiveServer, name: str, items: dict[str, str]) -> str:
    features = [stac_item(item_id, server.url(href), wgs84_bounds(folder / href), "2021-06-01T10:00:00Z")
                for item_id, href in items.items()]
    (folder / name).write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return server.url(name)


def test_dataset_follows_its_catalog(served, tmp_path):
    server, _, folder = served
    dataset = tmp_path / "DS"
    three = {"item-a": "a.tif", "item-b": "b.tif", "item-c": "c.tif"}
    url = _collection(folder, server, "follow.json", three)
    result = run_cli("tile", url, "-o", f"{dataset}/", "--tile-size", "128", *LIMITS)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((dataset / "_manifest.json").read_text())
    assert set(manifest["scenes"]) == set(three) and len(manifest["parts"]) == 3
    part_b = next(n for n, p in manifest["parts"].items() if p["scene"] == "item-b")
    # item-b leaves the catalog: reported, its part dropped
    _collection(folder, server, "follow.json", {"item-a": "a.tif", "item-c": "c.tif"})
    result = run_cli("tile", url, "-o", f"{dataset}/", "--tile-size", "128", *LIMITS)
    seen = _case(result, dataset, expect_error=False)
    manifest = json.loads((dataset / "_manifest.json").read_text())
    warned = "no longer in their STAC catalog" in result.stderr and "item-b" in result.stderr
    record(clean=int(warned), data_lost=int(set(manifest["scenes"]) != {"item-a", "item-c"}))
    assert result.returncode == 0 and warned and not seen["internal"], result.stderr
    assert set(manifest["scenes"]) == {"item-a", "item-c"} and not (dataset / part_b).exists()
    from hqrs_geo import read_tiles

    assert set(read_tiles(dataset)["stac_item"]) == {"item-a", "item-c"}
    # --keep-removed keeps what is there; a filter (bbox) is not a removal
    _collection(folder, server, "follow.json", three)
    assert run_cli("tile", url, "-o", f"{dataset}/", "--tile-size", "128", *LIMITS).returncode == 0
    _collection(folder, server, "follow.json", {"item-a": "a.tif"})
    result = run_cli("tile", url, "-o", f"{dataset}/", "--tile-size", "128", "--keep-removed", *LIMITS)
    seen = _case(result, dataset, expect_error=False)
    manifest = json.loads((dataset / "_manifest.json").read_text())
    assert result.returncode == 0 and "kept" in result.stderr and set(manifest["scenes"]) == set(three), result.stderr
    _collection(folder, server, "follow.json", three)
    left, bottom, right, top = wgs84_bounds(folder / "a.tif")
    only_a = f"{(left + right) / 2},{(bottom + top) / 2},{(left + right) / 2 + 1e-7},{(bottom + top) / 2 + 1e-7}"
    result = run_cli("tile", url, "-o", f"{dataset}/", "--tile-size", "128", f"--bbox={only_a}", *LIMITS)
    assert result.returncode == 0 and "no longer" not in result.stderr, result.stderr
    assert set(json.loads((dataset / "_manifest.json").read_text())["scenes"]) == set(three)


def test_items_sharing_an_asset_are_one_scene(served, tmp_path):
    server, _, folder = served
    url = _collection(folder, server, "shared.json", {"item-x": "a.tif", "item-y": "a.tif", "item-z": "b.tif"})
    result = run_cli("tile", url, "-o", f"{tmp_path / 'DS'}/", "--tile-size", "128", *LIMITS)
    seen = _case(result, tmp_path / "DS", expect_error=False)
    warned = "item-x, item-y share one asset" in result.stderr
    record(clean=int(warned))
    assert result.returncode == 0 and warned and not seen["internal"], result.stderr
    manifest = json.loads((tmp_path / "DS" / "_manifest.json").read_text())
    assert set(manifest["scenes"]) == {"item-x", "item-z"}


#: Scenes in three UTM zones: Amsterdam (31N), Washington (18N), Cape Town (34S).
ZONES = {"amsterdam": ("EPSG:32631", 628000, 5805000), "washington": ("EPSG:32618", 323000, 4308000),
         "capetown": ("EPSG:32734", 261000, 6244000)}


def test_scenes_in_several_utm_zones_get_a_crs_that_suits_all(tmp_path, rng):
    paths = []
    for name, (crs, x, y) in ZONES.items():
        data = rng.integers(0, 255, size=(3, 64, 64), dtype=np.uint8)
        paths.append(write_raster(tmp_path / f"{name}.tif", data, transform=Affine(2, 0, x, 0, -2, y), crs=crs))
    result = run_cli("tile", *paths, "-o", f"{tmp_path / 'DS'}/", "--tile-size", "32")
    manifest = json.loads((tmp_path / "DS" / "_manifest.json").read_text())
    warned = "3 CRSs" in result.stderr and "EPSG:4326" in result.stderr
    record(clean=int(warned), data_lost=int(manifest["crs"] != "EPSG:4326"))
    assert result.returncode == 0 and warned and manifest["crs"] == "EPSG:4326", result.stderr
    for path in paths:  # each scene's footprints where the scene is (an independent reprojection)
        with rasterio.open(path) as src:
            expected = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        part = next(p for p in manifest["parts"].values() if p["scene"] == path.stem)
        assert np.allclose(part["bounds"], expected, atol=1e-5), (path.stem, part["bounds"], expected)
    layer = run_cli("tile", *paths, "-o", tmp_path / "zones.gpkg", "--tile-size", "32")  # a layer: the same rule
    from hqrs_geo import read_tiles

    assert layer.returncode == 0 and "3 CRSs" in layer.stderr and read_tiles(tmp_path / "zones.gpkg").crs == "EPSG:4326"
    # scenes of one zone keep it
    one = run_cli("tile", paths[0], "-o", f"{tmp_path / 'ONE'}/", "--tile-size", "32")
    assert one.returncode == 0 and json.loads((tmp_path / "ONE" / "_manifest.json").read_text())["crs"] == "EPSG:32631"
    assert SourceEntry("p", "p", crs="EPSG:32631").crs == "EPSG:32631"


def test_info_reads_urls_without_showing_credentials(served):
    server, _, _ = served
    for url, status in ((URL_FORMS["password"](server), 0), (server.url(f"code/404/a.tif?token={TOKEN}"), 2),
                        (server.url("auth/a.tif", auth="user:bad-SECRET@"), 2)):
        result = run_cli("info", url, "--json") if status == 0 else run_cli("info", url)
        seen = _case(result, expect_error=status != 0)
        assert result.returncode == status and not seen["stored"] and not seen["internal"], seen
        if status == 0:
            assert json.loads(result.stdout)["path"] == f"/vsicurl/{public_url(url)}"
        else:
            assert seen["clean"] and ("HTTP 404" in seen["errors"][0] or "HTTP 401" in seen["errors"][0])


def test_new_credentials_are_tried_again_in_the_same_process(served):
    """A failed opening is remembered per URL *with* its credentials: a corrected password is
    tried at once (a long-lived process such as the QGIS plugin's), the same wrong one is not."""
    from hqrs_geo.raster.scene import open_raster

    server, _, _ = served
    wrong = resolve_sources([server.url("auth/c.tif", auth="user:wrong-SECRET-2@")])[0]
    for _ in range(2):  # the second answer comes from memory, in the same words
        with pytest.raises(InputError, match="asks for credentials .HTTP 401.") as caught:
            with open_raster(wrong.path):
                pass
        assert "SECRET" not in str(caught.value)
        record(clean=1)
    right = resolve_sources([server.url("auth/c.tif", auth=f"user:{PASSWORD}@")])[0]
    assert right.path == wrong.path  # one public path: the credentials given last are used
    with open_raster(right.path) as src:
        assert src.count == 3
    record()


@pytest.mark.parametrize("spec", ["0.0001m", "0.01ft", "1e3", "nan", "inf", "-1", "0", "99999999999m", "5%", "12 px px",
                                  "0x10", "２５６"])
def test_hostile_tile_sizes_are_one_line_errors(served, spec):
    from hqrs_geo import TileConfig, tile_rasters
    from hqrs_geo.errors import HqrsError

    _, _, folder = served
    with pytest.raises(HqrsError) as caught:
        tile_rasters(str(folder / "a.tif"), TileConfig(tile_size=spec))
    named = caught.value.option == "tile_size" or "tile size" in str(caught.value)
    record(clean=int("\n" not in str(caught.value) and named))
    assert "\n" not in str(caught.value) and named, str(caught.value)


def _hostile_stac() -> dict[str, str | bytes]:
    good = {"type": "Feature", "stac_version": "1.0.0", "id": "x", "geometry": None, "bbox": [0, 0, 1, 1],
            "properties": {"datetime": "2021-01-01T00:00:00Z"}, "links": [],
            "assets": {"visual": {"href": "http://127.0.0.1:9/a.tif", "type": "image/tiff"}}}

    def catalog(links):
        return json.dumps({"type": "Catalog", "stac_version": "1.0.0", "id": "c", "description": "d", "links": links})

    return {
        "array": "[1,2]", "string": '"x"', "null": "null", "empty": "", "garbage": "{{{", "bad-utf8": b"\xff\xfe{}",
        "deep": "[" * 100000 + "]" * 100000, "deep-object": '{"type":"Feature","a":' + "[" * 50000 + "]" * 50000 + "}",
        "no-type": json.dumps({"id": "x"}),
        "features-null": json.dumps({"type": "FeatureCollection", "features": None}),
        "features-text": json.dumps({"type": "FeatureCollection", "features": "abc"}),
        "feature-number": json.dumps({"type": "FeatureCollection", "features": [1]}),
        "no-assets": json.dumps({**good, "assets": {}}), "assets-list": json.dumps({**good, "assets": []}),
        "href-null": json.dumps({**good, "assets": {"visual": {"href": None}}}),
        "href-number": json.dumps({**good, "assets": {"visual": {"href": 5}}}),
        "bbox-short": json.dumps({**good, "bbox": [0, 1]}), "bbox-text": json.dumps({**good, "bbox": "abc"}),
        "bbox-nan": json.dumps({**good, "bbox": [0, 0, float("nan"), 1]}),
        "no-id": json.dumps({k: v for k, v in good.items() if k != "id"}), "id-number": json.dumps({**good, "id": 5}),
        "id-path": json.dumps({**good, "id": "../../etc/passwd"}),
        "properties-null": json.dumps({**good, "properties": None}),
        "datetime-word": json.dumps({**good, "properties": {"datetime": "yesterday"}}),
        "links-text": json.dumps({**good, "links": "x"}),
        "proj-text": json.dumps({**good, "properties": {"datetime": "2021-01-01T00:00:00Z", "proj:epsg": "abc"}}),
        "child-cycle": catalog([{"rel": "child", "href": "./child-cycle.json"}]),
        "links-null": catalog(None), "child-missing": catalog([{"rel": "child", "href": "./nope.json"}]),
        "item-link-without-href": catalog([{"rel": "item"}]),
    }


def test_hostile_stac_documents_are_one_line_errors(served, tmp_path):
    """Broken STAC documents, local and over HTTP, with every filter: a scene list or a one-line
    error, never an internal error."""
    from hqrs_geo.errors import HqrsError

    server, _, folder = served
    filters = (SourceFilter(), SourceFilter(datetime="2021-01-01"), SourceFilter(bbox=(0, 0, 1, 1)),
               SourceFilter(asset="visual"))
    for name, text in _hostile_stac().items():
        for where in (tmp_path, folder):
            path = where / f"{name}.json"
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            source = str(path) if where == tmp_path else server.url(path.name)
            outcome = {"clean": 0, "internal": 0}
            for flt in filters:
                try:
                    entries = resolve_sources([source], flt)
                    assert all(isinstance(e.key, str) and "/" not in e.key for e in entries)
                except HqrsError as exc:
                    outcome["clean"] = int("\n" not in str(exc))
                    assert "\n" not in str(exc), str(exc)
                except Exception as exc:  # an internal error: counted, then failed
                    outcome["internal"] = 1
                    record(**outcome)
                    raise AssertionError(f"{name} ({source}): {type(exc).__name__}: {exc}") from exc
            record(**outcome)


def test_hostile_source_lists(tmp_path):
    from hqrs_geo.errors import HqrsError

    (tmp_path / "self.txt").write_text("self.txt\n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\xff\n")
    (tmp_path / "long.txt").write_text("a" * 1_000_000 + "\n")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    for name, words in (("self", "nest too deep"), ("binary", "cannot read the list"), ("long", "file not found"),
                        ("empty", "empty")):
        with pytest.raises(HqrsError, match=words) as caught:
            resolve_sources([str(tmp_path / f"{name}.txt")])
        one_line = "\n" not in str(caught.value) and len(str(caught.value)) < 600
        record(clean=int(one_line))
        assert one_line, str(caught.value)[:300]
    (tmp_path / "creds.txt").write_text(f"http://u:{PASSWORD}@127.0.0.1:9/a.tif?token={TOKEN}\n")
    entry = resolve_sources([str(tmp_path / "creds.txt")])[0]
    record(credentials_stored=int(any(s in entry.path + entry.url for s in SECRETS)))
    assert (entry.path, entry.url) == ("/vsicurl/http://127.0.0.1:9/a.tif", "http://127.0.0.1:9/a.tif")


def test_reads_within_limits_reuse_their_connections(served):
    """Reads run in one helper thread per calling thread, so GDAL keeps its connection from read to
    read (a thread per read opened a connection, and a TLS handshake, per tile)."""
    from http.server import ThreadingHTTPServer

    from hqrs_geo import TileConfig, tile_rasters

    _, _, folder = served

    class KeepAlive(ArchiveHandler):
        protocol_version = "HTTP/1.1"

    class Counting(ThreadingHTTPServer):
        daemon_threads = True
        connections = 0

        def verify_request(self, request, client_address) -> bool:  # noqa: ANN001 (socketserver's API)
            Counting.connections += 1
            return True

    httpd = Counting(("127.0.0.1", 0), KeepAlive)
    httpd.folder, httpd.requests = Path(folder).resolve(), []  # type: ignore[attr-defined]
    httpd.stopping, httpd.lock, httpd.served = threading.Event(), threading.Lock(), {}  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        tiles, _ = tile_rasters(f"http://127.0.0.1:{httpd.server_address[1]}/b.tif", TileConfig(tile_size=32))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(tiles) == 64 and len(httpd.requests) >= 2  # type: ignore[attr-defined]
    assert Counting.connections <= 2, (Counting.connections, len(httpd.requests))  # type: ignore[attr-defined]
