"""Real parts for the scale-out tests: an HTTP server with range requests on 127.0.0.1, COGs
cut from the example scene and the test scenes (tests/data, and the example scene warped to
EPSG:4326), STAC items pointing at them, a two-node Ray cluster on loopback addresses (each node
its own raylet), and snapshots of a dataset folder's parts; the Ray tests' shared fixtures
(:func:`served`, :func:`scenes`, :func:`env`: import them by name)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import DRONE_SCENE, EXAMPLE_SCENE, NAIP_SCENE, geographic_scene
from rasterio.windows import Window

from hqrs_geo.engine.distributed import stop_processes as kill_processes

ROOT = Path(__file__).resolve().parents[1]
RAY_SCENE_SIZE = (384, 256)  # the Ray tests' crops: 3 x 2 tiles of 128 px in the larger ones, 64 tiles in all


# -- HTTP with range requests -------------------------------------------------------------------
class RangeHandler(BaseHTTPRequestHandler):
    """Serves files of ``server.folder`` with single and multiple byte ranges (RFC 7233)."""

    def log_message(self, *args):  # quiet
        pass

    def _file(self):
        path = (self.server.folder / self.path.split("?", 1)[0].lstrip("/")).resolve()  # type: ignore[attr-defined]
        if not str(path).startswith(str(self.server.folder)) or not path.is_file():  # type: ignore[attr-defined]
            self.send_error(404)
            return None
        return path

    def do_HEAD(self):
        path = self._file()
        if path is None:
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        path = self._file()
        if path is None:
            return
        data = path.read_bytes()
        header = self.headers.get("Range")
        self.server.requests.append((self.path, header))  # type: ignore[attr-defined]
        if not header:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(data)
            return
        ranges = []
        for spec in header.replace("bytes=", "").split(","):
            start, _, end = spec.strip().partition("-")
            first = int(start) if start else max(0, len(data) - int(end))
            last = min(int(end), len(data) - 1) if end and start else len(data) - 1
            ranges.append((first, last))
        if any(first >= len(data) or first > last for first, last in ranges):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        if len(ranges) == 1:
            first, last = ranges[0]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            self.wfile.write(data[first:last + 1])
            return
        boundary = "hqrsboundary"
        body = b"".join(
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{len(data)}"
            f"\r\n\r\n".encode() + data[a:b + 1] + b"\r\n" for a, b in ranges) + f"--{boundary}--\r\n".encode()
        self.send_response(206)
        self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RangeServer:
    """A threaded HTTP server on 127.0.0.1 serving ``folder``; ``url(name)`` gives a file's URL."""

    def __init__(self, folder: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
        self.httpd.folder = Path(folder).resolve()  # type: ignore[attr-defined]
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list:
        return self.httpd.requests  # type: ignore[attr-defined]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- scenes -------------------------------------------------------------------------------------
def write_crop(source: Path, target: Path, window: Window, cog: bool) -> Path:
    """A crop of ``source`` as a GeoTIFF or a COG (rasterio's COG driver, with overviews)."""
    with rasterio.open(source) as src:
        data = src.read(window=window)
        profile = {"driver": "COG" if cog else "GTiff", "width": int(window.width), "height": int(window.height),
                   "count": src.count, "dtype": src.dtypes[0], "crs": src.crs,
                   "transform": src.window_transform(window), "nodata": src.nodata}
        if cog:
            profile.update(blocksize=128, compress="deflate", overview_resampling="average")
        else:
            profile.update(tiled=True, blockxsize=128, blockysize=128)
        colorinterp = src.colorinterp
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)
        if not cog:
            dst.colorinterp = colorinterp
    return target


def scene_crops(folder: Path, size=(512, 384)) -> list[tuple[Path, Window]]:
    """Windows of the test scenes, 12 in all: the example scene's four corners (``size``), the
    drone and NAIP crops' top-left and bottom-right (3/4 of their size), and the four corners of
    the example scene warped to EPSG:4326 (``size``)."""
    w, h = size
    plan = [(EXAMPLE_SCENE, Window(0, 0, w, h)), (EXAMPLE_SCENE, Window(488, 0, w, h)),
            (EXAMPLE_SCENE, Window(0, 616, w, h)), (EXAMPLE_SCENE, Window(488, 616, w, h))]
    for path in (DRONE_SCENE, NAIP_SCENE):
        with rasterio.open(path) as src:
            cw, ch = min(w, src.width * 3 // 4), min(h, src.height * 3 // 4)
            plan += [(path, Window(0, 0, cw, ch)), (path, Window(src.width - cw, src.height - ch, cw, ch))]
    path = geographic_scene()
    with rasterio.open(path) as src:
        plan += [(path, Window(x, y, w, h)) for x in (0, src.width - w) for y in (0, src.height - h)]
    return plan


def stac_item(item_id: str, href: str, bbox, when: str, extra_assets: dict | None = None) -> dict:
    """A STAC 1.0 Item with a ``visual`` asset (and ``extra_assets``)."""
    import pystac
    import shapely

    item = pystac.Item(id=item_id, geometry=shapely.geometry.mapping(shapely.box(*bbox)), bbox=list(bbox),
                       datetime=pystac.utils.str_to_datetime(when), properties={})
    item.add_asset("visual", pystac.Asset(href=href, media_type=pystac.MediaType.COG, roles=["visual"]))
    for key, value in (extra_assets or {}).items():
        item.add_asset(key, pystac.Asset(href=value, media_type=pystac.MediaType.COG, roles=["data"]))
    return item.to_dict(include_self_link=False)


def wgs84_bounds(path: Path) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        return tuple(transform_bounds(src.crs, "EPSG:4326", *src.bounds))


def archive(folder: Path, server: RangeServer, size=(512, 384)) -> dict:
    """12 scenes: 4 local GeoTIFFs, 4 COGs by URL, 4 COGs through a STAC ItemCollection (crops of
    ``size`` pixels, see :func:`scene_crops`)."""
    local_dir, served = folder / "local", server.httpd.folder  # type: ignore[attr-defined]
    local_dir.mkdir(parents=True, exist_ok=True)
    sources, features = [], []
    for i, (source, window) in enumerate(scene_crops(folder, size)):
        name = f"s{i:02d}_{source.stem.split('_')[0]}.tif"
        if i % 3 == 0:
            sources.append(str(write_crop(source, local_dir / name, window, cog=False)))
        elif i % 3 == 1:
            write_crop(source, served / name, window, cog=True)
            sources.append(server.url(name))
        else:
            write_crop(source, served / name, window, cog=True)
            features.append(stac_item(f"item-{i:02d}", server.url(name), wgs84_bounds(served / name),
                                      f"2021-0{1 + i % 9}-15T10:00:00Z"))
    collection = folder / "items.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return {"sources": [*sources, str(collection)], "stac": collection, "n": 12}


# -- a two-node Ray cluster on loopback addresses ---------------------------------------------------
def _tree(marker: str) -> list[int]:
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(pid)] = (ppid, cmd)
    found = {p for p, (_, cmd) in procs.items() if marker in cmd and p != os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def processes_named(name: str) -> list[int]:
    """PIDs whose command line starts with ``name`` (e.g. ``ray::ModelWorker``)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(name) and _alive(int(pid)):
                out.append(int(pid))
    return out


class RayCluster:
    """``ray start --head`` on 127.0.0.2 plus ``ray start --address … --block`` on 127.0.0.3: two
    nodes, each with its own raylet and object store, all on loopback addresses. Neither node runs
    a log monitor (the engine does not forward worker logs to the driver). Every process a method
    finds or kills is one of this cluster's (under its temporary folder): other clusters on the
    same addresses (another test session, another pytest-xdist worker) are never touched."""

    HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
    STARTED = "Ray runtime started."  # printed by ``ray start`` once the node is registered with the GCS

    def __init__(self, temp: Path, env: dict, head_cpus: int = 3, worker_cpus: int = 2):
        """Start the head (``env``'s ``RAY_AUTH_MODE``, else ``disabled``) and, unless
        ``worker_cpus`` is 0, the second node."""
        self.temp = Path(temp)
        self.port = free_port()
        self.env = {"RAY_AUTH_MODE": "disabled", **env, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_initial_delay_ms": "1000"}
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.worker = None
        head = subprocess.run(
            [self.ray, "start", "--head", f"--node-ip-address={self.HEAD_IP}", f"--port={self.port}",
             f"--num-cpus={head_cpus}", "--object-store-memory=150000000", "--include-dashboard=false",
             "--include-log-monitor=false", f"--temp-dir={self.temp}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=180)
        if head.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed: {head.stderr[-2000:]}")
        self.worker_cpus = worker_cpus
        if worker_cpus:  # 0: the head node alone
            self.start_worker()

    @property
    def address(self) -> str:
        return f"{self.HEAD_IP}:{self.port}"

    def start_worker(self) -> None:
        """The second node joins; returns once ``ray start`` says it is registered (no polling
        driver: each would cost a Python process and a Ray connection)."""
        path = self.temp / "worker-node.log"
        with open(path, "w") as log:
            self.worker = subprocess.Popen(
                [self.ray, "start", f"--address={self.address}", f"--node-ip-address={self.WORKER_IP}",
                 f"--num-cpus={self.worker_cpus}", "--object-store-memory=100000000", "--include-log-monitor=false",
                 f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", "--block"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.STARTED in path.read_text(errors="replace"):
                return
            if self.worker.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the second Ray node did not join: {path.read_text()[-2000:]}")

    def alive_nodes(self) -> int:
        out = subprocess.run([sys.executable, "-c", (
            f"import ray, logging; ray.init(address={self.address!r}, logging_level=logging.ERROR); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")],
            env=self.env, capture_output=True, text=True, timeout=60)
        match = re.search(r"^(\d+)\s*$", out.stdout, re.M)
        return int(match.group(1)) if match else 0

    def processes_named(self, name: str) -> list[int]:
        """This cluster's live processes whose command line starts with ``name`` (e.g. ``ray::ModelWorker``)."""
        ours = set(_tree(str(self.temp)))
        return [pid for pid in processes_named(name) if pid in ours]

    def worker_processes(self) -> list[int]:
        """The second node's processes: its ``ray start`` and everything it started."""
        node = set(_tree(f"--node-ip-address={self.WORKER_IP}")) & set(_tree(str(self.temp)))
        pids = node | ({self.worker.pid} if self.worker is not None else set())
        return sorted(pids | {p for root in pids for p in _descendants(root)})

    def worker_raylet(self) -> int:
        """The pid of the second node's raylet."""
        for pid in self.worker_processes():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"/raylet") and any(self.WORKER_IP.encode() in a for a in cmd):
                return pid
        raise AssertionError("the second node has no raylet")

    def stop_worker(self) -> None:
        """The second node leaves: its ``ray start`` and every process it started are killed."""
        if self.worker is not None:
            node = set(_tree(f"--node-ip-address={self.WORKER_IP}")) & set(_tree(str(self.temp)))
            pids = {self.worker.pid, *node}
            kids = {p for root in pids for p in _descendants(root)}
            kill_processes(sorted(pids | kids), grace=0.5)
            self.worker.wait(timeout=30)
            self.worker = None

    def stop(self) -> None:
        """Stop both nodes: every process started for this cluster (found by its temp folder)."""
        self.stop_worker()
        kill_processes(_tree(str(self.temp)))


def _descendants(root: int) -> list[int]:
    out, frontier = [], [root]
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(pid))
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            out.append(child)
            frontier.append(child)
    return out


def compare_layers(got, expected, atol: float = 2e-3) -> None:
    """Tile for tile: same ids, windows, valid fractions, footprints; embeddings within ``atol``;
    captions identical."""
    from hqrs_geo.layer.columns import embedding_keys, read_embeddings

    assert list(got["tile_id"]) == list(expected["tile_id"])
    for column in ("source", "row", "col", "x_off", "y_off", "width", "height", "out_width", "out_height"):
        assert list(got[column]) == list(expected[column]), column
    assert np.allclose(got["valid_fraction"].to_numpy(float), expected["valid_fraction"].to_numpy(float))
    assert got.geometry.geom_equals_exact(expected.geometry.to_crs(got.crs), 1e-9).all()
    assert embedding_keys(got) == embedding_keys(expected) and embedding_keys(got)
    for key in embedding_keys(expected):
        present_a, a = read_embeddings(got, key)
        present_b, b = read_embeddings(expected, key)
        assert present_a.all() and present_b.all()
        assert np.abs(a - b).max() <= atol, (key, np.abs(a - b).max())
    if "caption" in expected.columns:
        assert list(got["caption"]) == list(expected["caption"])


# -- a dataset folder's parts --------------------------------------------------------------------
def parts(folder: Path) -> dict[str, int]:
    """The finished part files of a dataset folder (name -> inode, which changes when a part is
    written again). A writer's temporary files (``.NAME.PID.RANDOM.tmp.parquet``: hidden, and
    removed by the next run when their writer was killed) are not parts."""
    return {path.name: path.stat().st_ino for path in folder.glob("*.parquet")
            if not path.name.startswith(".") and ".tmp" not in path.name}


# -- the Ray tests' shared fixtures ---------------------------------------------------------------
def short_folder(prefix: str) -> Path:
    """A new folder with a short path: Ray's sockets live under a cluster's folder and AF_UNIX paths
    stop at 107 bytes, which pytest's own temporary folders pass under pytest-xdist
    (/tmp/pytest-of-USER/pytest-NNN/popen-gwN/...)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An HTTP server with range requests on 127.0.0.1 for the module."""
    server = RangeServer(tmp_path_factory.mktemp("http"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def scenes(served, tmp_path_factory):
    """The 12 scenes of :func:`archive` (crops of :data:`RAY_SCENE_SIZE`), 8 of them served."""
    return archive(tmp_path_factory.mktemp("archive"), served, size=RAY_SCENE_SIZE)


@pytest.fixture(scope="module")
def env(model_environment):
    """The environment of Ray processes: the repository importable, no Ray token, no usage stats."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
