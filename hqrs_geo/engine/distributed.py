"""The Ray executor of the partitioned engine (``engine="ray"``; needs the ``scale`` extra).

Per unit (:mod:`hqrs_geo.engine.units`) three Ray calls, chained by object references so
nothing large passes through the driver:

* a CPU **read task** (:func:`read_task`): scene preparation, valid fractions, the tile frame
  and the windows of the kept tiles (no pixels); scheduled (softly) on the node of the model
  worker that will compute the unit;
* a **model worker** actor (:class:`ModelWorker`; one per GPU, or per ``gpus_per_worker``
  GPUs, or one per node on CPU clusters) loads the job's models once, reads each unit's
  windows itself (decoded next to the model, into pinned memory on a GPU: no uint8 tile
  crosses the object store) and runs :func:`~hqrs_geo.engine.units.infer_unit` on them; it
  reads one unit while it computes another (on CPU with torch threads no more than its CPUs);
* a CPU **write task** (:func:`write_task`): results into the frame, the part written
  atomically to the dataset folder (which must be reachable from every node).

Memory is bounded whatever the archive size: at most ``in_flight`` units are between their
read and their write, and the driver holds only references and small status records.

Faults: a read or write task whose worker process or node dies is retried by Ray; a model
worker whose process dies is restarted on its node (its models loaded again) and its calls are
retried. Each model worker is pinned to a node, placed so that it fits there beside the other
workers and half a core for reading: when a node leaves the cluster its workers are retired, not
moved onto the survivors (where they would take the CPUs the reads need, and the job would wait
for good), and the job goes on with the workers left, saying so; when none is left, one is
started on a surviving node. A unit whose work is lost (an object lost with its node, a worker
that keeps dying) or that is under way longer than ``unit_timeout`` seconds is put back in the
queue (up to ``max_attempts``); an error of the scene itself (corrupt file, unreachable URL, NaN
embeddings) is returned as a failed unit. Parts are written atomically, so a unit computed twice
leaves one part.

The driver's own Ray instance (no cluster address) is shut down on every exit path; its
processes carry the driver's identity in their environment (:data:`OWNER_VARIABLE`), so the
processes left by a driver killed with SIGKILL are found and stopped by the next run, and no
other Ray instance is ever touched.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import HqrsError, InputError, OptionError, OutputError
from .options import RunOptions
from .units import (
    JobContext,
    Outcome,
    TaskSpec,
    Unit,
    UnitWindows,
    empty_part,
    infer_unit,
    plan_unit,
    read_pixels,
    write_unit,
)

try:  # the Ray engine is optional (the scale extra): without Ray, _ray() says how to install it
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:
    ray = None  # type: ignore[assignment]
try:  # parts of Ray outside its stable API: without them no start marks, no early token check, Ray's own logs
    import ray._private.worker as ray_worker
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.exceptions import AuthenticationError
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put
except ImportError:
    ray_worker = GcsClient = AuthenticationError = None  # type: ignore[assignment,misc]
    _internal_kv_del = _internal_kv_get = _internal_kv_put = None  # type: ignore[assignment]

log = logging.getLogger("hqrs_geo")

#: Environment variables forwarded to the workers (model search paths, the Hugging Face hub's
#: settings: endpoint, offline mode, cache, timeouts; GDAL settings).
FORWARDED_PREFIXES = ("HQRS_GEO_", "HF_", "GDAL_", "CPL_", "VSI_", "TORCH_HOME")
#: Variables never forwarded (credentials stay with each node's own configuration).
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "USERPWD", "HEADER", "CREDENTIAL", "AUTH")
QUEUED_PER_WORKER = 2
WORKER_RESTARTS = 3
#: Seconds a unit may be under way (read, computed, written) before it is put back in the queue.
UNIT_TIMEOUT = 1800.0
#: Seconds between checks of the cluster's nodes (and of the units' deadlines) while waiting.
POLL_SECONDS = 2.0
#: Seconds to wait for a cluster address to accept a connection.
CONNECT_SECONDS = 5.0
#: The key-value namespace of the read tasks' start marks.
MARK_NAMESPACE = "hqrs_geo"
#: The variable that marks the processes of a Ray instance this driver started ("PID:START").
OWNER_VARIABLE = "HQRS_RAY_OWNER"
#: What the last Ray job moved between its processes (read back by ``benchmarks/scale.py``):
#: ``units`` and ``tiles`` computed, ``bytes`` of every object a unit's calls returned (status,
#: frame, windows, results; sizes from ``ray.experimental.get_object_locations``), of which
#: ``store_bytes`` went through the shared-memory object store (the rest, small objects, is
#: passed inline through the driver).
TRAFFIC: dict[str, int] = {}


def _ray() -> Any:
    if ray is None:
        raise OptionError("the Ray engine needs Ray: pip install 'hqrs_geo[scale]' (or leave out «engine» for "
                          "the single-process engine)", option="engine")
    return ray


def worker_threads(cpus: float, passive_wait: bool = True) -> int:
    """Torch threads of a CPU model worker that holds ``cpus`` CPUs.

    With OpenMP's passive waiting (:func:`passive_openmp`: a thread that waits for a peer sleeps)
    the worker uses every core it shares: its CPUs rounded up (1.5 CPUs: 2 threads). With spinning
    threads (torch loaded before the policy could be set) only its whole CPUs, at least one: one
    spinning thread more than the cores left to it waits for a descheduled peer at every operation
    (on a loaded 2-core machine a 40-scene job took 130 s instead of 22 s)."""
    if passive_wait:
        return max(1, math.ceil(cpus - 1e-9))
    return max(1, math.floor(cpus + 1e-9))


def passive_openmp() -> bool:
    """Make OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) when torch is not
    loaded yet in this process; True when waiting is passive. An explicit setting is kept."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def worker_env() -> dict[str, str]:
    """The driver's variables the workers get (see :data:`FORWARDED_PREFIXES`)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(FORWARDED_PREFIXES) and not any(w in k.upper() for w in SECRET_WORDS)}


# -- what runs on the cluster ------------------------------------------------------------------------
def _started(mark: str | None) -> None:
    """Say that a task started, under the key ``mark`` of the cluster's key-value store: the
    driver's unit timeout counts from there (a unit queued behind others is not late)."""
    if mark:
        try:
            _internal_kv_put(mark, b"1", namespace=MARK_NAMESPACE)
        except Exception:  # no mark: the driver counts from the submission
            pass


def read_task(unit: Unit, ctx: JobContext, mark: str | None = None) -> tuple[dict, Any, Any]:
    """Ray task: :func:`~hqrs_geo.engine.units.plan_unit` (three returns: status, frame and the
    windows the model worker reads; no pixels)."""
    _started(mark)
    return plan_unit(unit, ctx)


def warm_task() -> bool:
    """Ray task: nothing but loading this module in a worker process, with what the read and
    write tasks use (:mod:`.units` imports scene preparation, GDAL, GeoPandas and Parquet at its
    top); run while the model workers load their models, so the first unit does not wait for a
    worker process's imports."""
    return True


def write_task(unit: Unit, status: dict, frame: Any, stored: dict, ctx: JobContext, mark: str | None = None) -> dict:
    """Ray task: :func:`~hqrs_geo.engine.units.write_unit`."""
    _started(mark)
    return write_unit(unit, status, frame, stored, ctx)


class ModelWorker:
    """Ray actor: the job's models, loaded once per worker process, reading and computing units.

    Each call reads its unit's windows itself (:func:`~hqrs_geo.engine.units.read_pixels`,
    ``read_threads`` threads; into pinned memory on a GPU), so no pixel array passes through
    the object store. Two calls run at once: one unit is read while the other is computed; on
    CPU the computing is one at a time, with :func:`worker_threads` torch threads that sleep
    while they wait (:func:`passive_openmp`; spinning OpenMP threads that wait for a descheduled
    peer made a loaded machine 10 to 20 times slower).
    """

    def __init__(self, plan: Any, options: RunOptions, device: str, cpus: float | None,
                 read_threads: int = 1) -> None:
        passive = passive_openmp()  # before torch is imported
        import torch

        if cpus:
            torch.set_num_threads(worker_threads(cpus, passive))
        self.error: HqrsError | None = None
        self.tasks: list = []
        self.read_threads = max(1, int(read_threads))
        self.compute = threading.Lock() if device == "cpu" else None
        self.pinned = device.startswith("cuda")
        try:
            self.tasks = plan.tasks(options, device=device)
        except HqrsError as exc:  # reported by specs(), so the driver shows one line
            self.error = exc

    def specs(self) -> list[TaskSpec]:
        """The tasks' specs (raises the model-loading error, if any)."""
        if self.error is not None:
            raise self.error
        return [TaskSpec.of(t) for t in self.tasks]

    def node(self) -> str:
        """The id of the node this worker runs on."""
        return ray.get_runtime_context().get_node_id()

    def _allocate(self, shape: tuple) -> Any:
        import torch

        return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()

    def infer(self, windows: UnitWindows, batch_size: int) -> dict:
        """Every task on one unit: its windows read here, then computed."""
        pixels = read_pixels(windows, self.read_threads, self._allocate if self.pinned else None)
        if self.compute is None:
            return infer_unit(self.tasks, windows.ids, pixels, batch_size)
        with self.compute:
            return infer_unit(self.tasks, windows.ids, pixels, batch_size)


# -- this driver's own Ray processes ------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (ended, waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def owner_mark() -> str:
    """The identity of this process, ``PID:START`` (a later process with the same pid differs)."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _owner_alive(mark: str) -> bool:
    pid, _, start = mark.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == start


def leftover_processes() -> list[int]:
    """Processes of this user left by a Ray instance whose driver is gone: they carry
    :data:`OWNER_VARIABLE` and the process it names is no longer running (Linux; elsewhere none)."""
    found = []
    needle = f"{OWNER_VARIABLE}=".encode()
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            if uid is not None and os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        for entry in environ.split(b"\0"):
            if entry.startswith(needle):
                if not _owner_alive(entry[len(needle):].decode(errors="replace")):
                    found.append(pid)
                break
    return found


def stop_processes(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds for those still running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def clean_leftovers() -> int:
    """Stop what an earlier driver killed with SIGKILL left of its own Ray instance; how many."""
    pids = leftover_processes()
    if pids:
        stop_processes(pids)
        log.warning(f"stopped {len(pids)} process(es) left by an earlier Ray run that was killed")
    return len(pids)


# -- connecting ----------------------------------------------------------------------------------------
def check_address(address: str) -> None:
    """A one-line error unless something accepts connections at ``HOST:PORT`` within
    :data:`CONNECT_SECONDS` (``auto``, and addresses without a port, are left to Ray)."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            return
    except TimeoutError:
        reason = f"no answer in {CONNECT_SECONDS:g} s"
    except OSError as exc:
        reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    raise OptionError(f"no Ray cluster answers at {address} ({reason}); check «ray_address», or start one there "
                      "with 'ray start --head'", option="ray_address")


AUTH_WORDS = ("InvalidAuthToken", "UNAUTHENTICATED", "Unauthenticated", "AuthenticationError",
              "authentication token", "auth token")


def _auth_error(address: str) -> OptionError:
    return OptionError(f"the Ray cluster at {address} requires an authentication token: set RAY_AUTH_TOKEN (or "
                       "RAY_AUTH_TOKEN_PATH) to the cluster's token ('ray get-auth-token' on its head node)",
                       option="ray_address")


def _check_authentication(address: str) -> None:
    """A one-line error when the cluster at ``address`` refuses this client's token (one GCS
    request, under a second, instead of ``ray.init``'s 20 retries a second apart)."""
    if GcsClient is None:
        return
    try:
        GcsClient(address=address, cluster_id=None)
    except AuthenticationError:
        raise _auth_error(address) from None
    except Exception:  # anything else is ray.init's to report
        return


class _CapturedStderr:
    """Redirects file descriptor 2 to a temporary file (Ray's C++ core writes there directly)."""

    def __enter__(self) -> _CapturedStderr:
        self.file = tempfile.TemporaryFile()
        try:
            self.saved: int | None = os.dup(2)
            os.dup2(self.file.fileno(), 2)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)

    def text(self) -> str:
        self.file.seek(0)
        return self.file.read().decode(errors="replace")


# -- the executor -------------------------------------------------------------------------------------
class RayExecutor:
    """Submits units to a Ray cluster and returns their outcomes (see the module docstring)."""

    name = "ray"

    def __init__(self, plan: Any, options: RunOptions, scale: Any, progress: Any = None) -> None:
        self.plan, self.options, self.scale, self.progress = plan, options, scale, progress
        self.ray = _ray()
        self.owns = False
        self.actors: list = []  # None: a worker retired with its node
        self.nodes: list[str] = []
        self.load: list[int] = []
        self.pending: dict = {}  # object ref -> (stage, unit, extra)
        self.since: dict[int, float] = {}  # id(unit) -> when it was submitted
        self.marks: dict[int, str] = {}  # id(unit) -> the key its read task sets when it starts
        self.began: dict[int, float] = {}  # id(unit) -> when the driver saw its read start
        self.progress_at = time.monotonic()  # the last time a unit started or finished
        self.serial = 0
        self.job = ""
        self.ready: deque = deque()  # read units waiting for a free worker
        self.inflight = 0
        self.replacements = 0
        self.ctx_ref: Any = None
        self.specs: list[TaskSpec] = []
        self.alive: dict[str, dict] = {}
        self.gone: set[str] = set()  # nodes a pinned worker could not be scheduled on (gone before the GCS says so)
        self.resources: dict[str, Any] = {}
        self.checked = 0.0
        self.timeout = float(getattr(scale, "unit_timeout", None) or UNIT_TIMEOUT)
        self.warm: list = []

    # -- cluster and workers ------------------------------------------------------------------
    def _init(self) -> None:
        ray = self.ray
        if ray.is_initialized():  # a caller's own Ray session
            return
        clean_leftovers()
        address = self.scale.ray_address or os.environ.get("RAY_ADDRESS")
        if address and address not in ("auto", "local"):
            check_address(address)
        kwargs: dict = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address and address != "local":  # a Ray instance started here inherits this environment; a
            kwargs["runtime_env"] = {"env_vars": worker_env()}  # runtime_env costs a worker start per task
        main = threading.current_thread() is threading.main_thread()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        started = not address or address == "local"
        if started:
            os.environ[OWNER_VARIABLE] = owner_mark()  # inherited by every process of the new instance
        captured = _CapturedStderr()
        try:
            with captured:
                if address and address not in ("auto", "local") and "://" not in address:
                    _check_authentication(address)
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError, ray.exceptions.RayError) as exc:
            text = str(exc).strip()
            if address and any(w in text or w in captured.text() for w in AUTH_WORDS):
                raise _auth_error(address) from None
            reason = text.splitlines()[0] if text else type(exc).__name__
            raise OptionError(f"cannot connect to the Ray cluster at {address or 'this machine'} ({reason[:300]}); "
                              "start it with 'ray start --head' or check «ray_address»", option="ray_address") from None
        finally:
            os.environ.pop(OWNER_VARIABLE, None)
            for sig, handler in handlers.items():  # Ray's own handlers end the process with exit 15 and a dump
                if handler is not None:
                    signal.signal(sig, handler)
        self.owns = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug(captured.text())
        else:
            if ray_worker is not None:  # Ray prints cluster events (a node that died...) to stdout: the job
                ray_worker._worker_logs_enabled = False  # says what matters itself

    def _alive_nodes(self) -> dict[str, dict]:
        """Alive nodes (less those Ray already refused to schedule on): id -> total resources."""
        return {n["NodeID"]: dict(n.get("Resources", {})) for n in self.ray.nodes()
                if n.get("Alive") and n["NodeID"] not in self.gone}

    def _plan_resources(self) -> dict:
        ray, scale, plan = self.ray, self.scale, self.plan
        self.alive = self._alive_nodes()
        cpus = [float(r.get("CPU", 0)) for r in self.alive.values()] or [1.0]
        gpus = float(ray.cluster_resources().get("GPU", 0))
        models = plan is not None and not plan.empty
        device = plan.device if models else "cpu"
        if device == "cuda" and gpus == 0:
            raise OptionError("the Ray cluster has no GPU; use «device» auto or cpu", option="device")
        if device in ("cpu", "mps"):
            gpw = 0.0
        else:
            gpw = float(scale.gpus_per_worker) if scale.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        if gpw > gpus:
            raise OptionError(f"{gpw:g} GPU(s) per worker, but the cluster has {gpus:g}", option="gpus_per_worker")
        io_cpus = 1.0 if gpw else 0.5
        # sized from the smallest node: a worker (and a read) fits on any node, so one can always
        # be started again on whatever node survives
        cpw = float(scale.cpus_per_worker) if scale.cpus_per_worker else (1.0 if gpw else max(0.5, min(cpus) - io_cpus))
        workers = 0
        self.resources = {"cpw": cpw, "gpw": gpw, "io_cpus": io_cpus}
        placed: list[str] = []
        if models:
            workers = scale.workers or (max(1, int(gpus // gpw)) if gpw else len(self.alive))
            placed = self._place(workers, [])
            if len(placed) < workers:
                raise OptionError(
                    f"{workers} worker(s) of {cpw:g} CPU(s) and {gpw:g} GPU(s), plus {io_cpus:g} CPU for reading, "
                    f"do not fit the cluster's nodes ({', '.join(f'{c:g}' for c in cpus)} CPUs, {gpus:g} GPUs); use "
                    "fewer «workers» or «cpus_per_worker»",
                    option="workers")
        free = max(0.0, sum(cpus) - workers * cpw)
        in_flight = scale.in_flight or min(64, QUEUED_PER_WORKER * workers + max(1, int(free / io_cpus)))
        device_of_workers = "cuda" if gpw else "cpu"
        # a CPU worker reads one unit in one thread while it computes the other; a GPU worker reads
        # with the CPUs of its share of the node
        per_node = max(1, math.ceil(workers / max(1, len(self.alive))))
        read_threads = 1 if not gpw else max(2, int(min(cpus) // per_node) - 1)
        return {"workers": workers, "cpw": cpw, "gpw": gpw, "io_cpus": io_cpus, "in_flight": in_flight,
                "device": device_of_workers if device in ("auto", "cuda", "cpu") else device,
                "cpus": cpw if not gpw else None, "read_threads": read_threads,
                "placed": placed}

    def _place(self, count: int, taken: list[str | None]) -> list[str]:
        """Nodes for ``count`` more workers beside those on ``taken``: each on the node with the
        most CPUs left, where it fits, keeping ``io_cpus`` free somewhere for the reads."""
        r = self.resources
        free = {node: [float(res.get("CPU", 0)), float(res.get("GPU", 0))] for node, res in self.alive.items()}
        for node in taken:
            if node in free:
                free[node][0] -= r["cpw"]
                free[node][1] -= r["gpw"]
        placed: list[str] = []
        eps = 1e-9
        for _ in range(count):
            fits = [n for n, (c, g) in free.items() if c + eps >= r["cpw"] and g + eps >= r["gpw"]]
            fits.sort(key=lambda n: (-free[n][0], n))
            chosen = None
            for node in fits:
                left = sum(c for c in (v[0] for v in free.values())) - r["cpw"]
                if left + eps >= r["io_cpus"]:
                    chosen = node
                    break
            if chosen is None:
                break
            free[chosen][0] -= r["cpw"]
            free[chosen][1] -= r["gpw"]
            placed.append(chosen)
        return placed

    def _new_actor(self, node: str) -> Any:
        r = self.resources
        cls = self.ray.remote(ModelWorker).options(  # pinned: restarted on its node, never moved onto another
            num_cpus=r["cpw"], num_gpus=r["gpw"], max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            max_concurrency=2,  # one unit read (and on a GPU copied) while the other is computed
        )
        return cls.remote(self.plan, self.options, r["device"], r["cpus"], r.get("read_threads", 1))

    def start(self) -> list[TaskSpec]:
        """Connect (or start a local Ray instance), start the model workers; the tasks' specs."""
        ray = self.ray
        self._init()
        TRAFFIC.clear()
        TRAFFIC.update(units=0, tiles=0, bytes=0, store_bytes=0)
        self.resources = self._plan_resources()
        r = self.resources
        self.read_fn, self.write_fn = ray.remote(read_task), ray.remote(write_task)
        self.io_options = {"num_cpus": r["io_cpus"], "max_retries": 3}
        self.nodes = list(r["placed"])
        self.actors = [self._new_actor(node) for node in self.nodes]
        # the CPU task workers import their modules while the models load (not waited for)
        slots = max(1, int(min(4, r["in_flight"])))
        self.warm = [ray.remote(warm_task).options(**self.io_options).remote() for _ in range(slots)]
        self.load = [0] * len(self.actors)
        self.specs = []
        self.checked = time.monotonic()
        if self.actors:
            self.specs = self._get(self.actors[0].specs.remote())
        if self.progress is not None and self.actors:
            self.progress.message(f"ray: {len(self.actors)} model worker(s) of {r['cpw']:g} CPU(s) and {r['gpw']:g} "
                                  f"GPU(s) on {len(set(self.nodes))} node(s), {r['in_flight']} unit(s) in flight")
        return self.specs

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, HqrsError):
                raise cause from None
            raise
        except self.ray.exceptions.RayActorError as exc:
            raise InputError(f"the model worker could not start ({str(exc).splitlines()[0]}); check the model "
                             "and the cluster's memory") from None

    def begin(self, ctx: JobContext) -> None:
        """Put the job's context in the object store (one copy for every task)."""
        self.ctx = ctx
        self.ctx_ref = self.ray.put(ctx)
        self.job = self.ray.get_runtime_context().get_job_id()

    def _say(self, text: str) -> None:
        log.warning(text)
        if self.progress is not None and getattr(self.progress, "mode", None) == "json":
            self.progress.message(text)

    # -- the queue -----------------------------------------------------------------------------
    def room(self) -> bool:
        """True while fewer than ``in_flight`` units are under way."""
        return self.inflight < self.resources["in_flight"]

    def busy(self) -> bool:
        """True while some unit is under way."""
        return self.inflight > 0

    def _live(self) -> list[int]:
        return [i for i, a in enumerate(self.actors) if a is not None]

    def _least_loaded(self) -> int | None:
        live = self._live()
        return min(live, key=lambda i: self.load[i]) if live else None

    def submit(self, unit: Unit) -> None:
        """Start a unit's read task, on the node of the least loaded worker."""
        options: dict = {}
        worker = self._least_loaded() if self.actors else None
        if worker is not None:
            self.load[worker] += 1  # counted from the read on, so reads spread over the workers
            node = self.nodes[worker]
            if node:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        status, frame, payload = self.read_fn.options(num_returns=3, **self.io_options, **options).remote(
            unit, self.ctx_ref, self._waiting(unit))
        self.pending[status] = ("read", unit, (frame, payload, worker))
        self.inflight += 1

    def _waiting(self, unit: Unit) -> str:
        """The unit waits for its next task to start (read or write); the mark that task sets."""
        key = id(unit)
        self._forget_mark(key)
        self.serial += 1
        self.marks[key] = f"started:{self.job}:{self.serial}"
        self.since[key] = time.monotonic()
        self.began.pop(key, None)
        return self.marks[key]

    def _forget_mark(self, key: int) -> None:
        mark = self.marks.pop(key, None)
        if mark:
            try:
                _internal_kv_del(mark, namespace=MARK_NAMESPACE)
            except Exception:  # a mark left behind is a few bytes
                pass

    def _release(self, worker: int | None) -> None:
        if worker is not None and worker < len(self.load):
            self.load[worker] = max(0, self.load[worker] - 1)

    def _dispatch(self) -> None:
        """Hand read units to their workers: infer, then the write that waits for it."""
        while self.ready:
            unit, status, status_ref, frame_ref, payload_ref, worker = self.ready.popleft()
            if self.actors[worker] is None:  # its worker left with its node: another one takes the unit
                self._release(worker)
                self._ensure_worker()  # (a one-line error when no node can hold one)
                worker = self._least_loaded()
                assert worker is not None
                self.load[worker] += 1
            infer = self.actors[worker].infer.remote(payload_ref, self.ctx.batch_size)
            write = self.write_fn.options(**self.io_options).remote(unit, status_ref, frame_ref, infer, self.ctx_ref,
                                                                     self._waiting(unit))
            self.pending[infer] = ("infer", unit, worker)
            self.pending[write] = ("write", unit, (status, worker))

    def wait(self) -> list[Outcome]:
        """Outcomes of the units that finished (blocks until at least one did)."""
        ray = self.ray
        self._dispatch()
        outcomes: list[Outcome] = []
        while not outcomes:
            refs = list(self.pending)
            done: list = []
            if refs:
                done, _ = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS, fetch_local=False)
                if done and len(refs) > 1:
                    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in done:
                if ref not in self.pending:  # dropped with its unit meanwhile
                    continue
                stage, unit, extra = self.pending.pop(ref)
                outcome = getattr(self, f"_after_{stage}")(ref, unit, extra)
                if outcome is not None:
                    outcomes.append(self._finished(outcome))
            if not refs:  # (only units waiting for a worker: no busy loop)
                time.sleep(0.1)
            if not refs or time.monotonic() - self.checked >= POLL_SECONDS:
                outcomes += self._check()
            self._dispatch()
        return outcomes

    def _finished(self, outcome: Outcome) -> Outcome:
        self.inflight -= 1
        self.progress_at = time.monotonic()
        key = id(outcome.unit)
        self.since.pop(key, None)
        self.began.pop(key, None)
        self._forget_mark(key)
        return outcome

    # -- nodes that leave, units that wait too long ----------------------------------------------
    def _check(self) -> list[Outcome]:
        """Retire the workers of nodes that left; put units past their deadline back in the queue."""
        self.checked = time.monotonic()
        self._check_nodes_now()
        outcomes: list[Outcome] = []
        under_way = {id(u): u for _, u, _ in self.pending.values()}
        under_way.update({id(e[0]): e[0] for e in self.ready})
        self._see_starts(under_way)
        # first the units whose task runs past the timeout; a re-plan gives those waiting behind
        # them (for the same CPUs) a fresh timeout
        now = time.monotonic()
        reason = f"under way more than the unit timeout, {self.timeout:g} s"
        for key, unit in under_way.items():
            began = self.began.get(key)
            if began is not None and now - began > self.timeout:
                outcomes.append(self._finished(self._drop(unit, reason)))
        if not outcomes:  # then those waiting to start while nothing started, finished or was re-planned
            for key, unit in under_way.items():
                if key not in self.began and now - max(self.since.get(key, now), self.progress_at) > self.timeout:
                    outcomes.append(self._finished(self._drop(unit, reason)))
        return outcomes

    def _see_starts(self, units: dict[int, Unit]) -> None:
        """Note the units whose read task said it started (see :func:`read_task`)."""
        waiting = [key for key in units if key not in self.began and key in self.marks]
        if not waiting:
            return
        if _internal_kv_get is None:
            return
        now = time.monotonic()
        for key in waiting:
            try:
                started = _internal_kv_get(self.marks[key], namespace=MARK_NAMESPACE)
            except Exception:  # the cluster did not answer: counted from the submission
                started = b"1"
            if started:
                self.began[key] = now
                self.progress_at = now

    def _nodes_left(self, gone: set[str]) -> None:
        """Retire the workers of nodes that left, say so, and keep at least one worker."""
        for i in self._live():
            if self.nodes[i] in gone:
                self._retire(i)
        left = len(self._live())
        self._say(f"ray: {len(gone)} node(s) left the cluster; going on with {len(self.alive)} node(s) and "
                  f"{left} model worker(s)" + (" (starting one on a surviving node)" if self.actors and not left
                                               else ""))
        self._ensure_worker()

    def _drop(self, unit: Unit, reason: str) -> Outcome:
        """Forget every call of ``unit`` (cancelled where Ray can) and put it back in the queue."""
        for ref in [r for r, (_, u, _) in self.pending.items() if u is unit]:
            stage, _, extra = self.pending.pop(ref)
            if stage == "read":
                self._release(extra[2])
            elif stage == "infer":
                self._release(extra)
            try:  # a stuck read or write (a stalled network read) is ended with its worker process
                self.ray.cancel(ref, force=stage != "infer")
            except Exception:  # finished or already gone; a model worker's call cannot be forced
                pass
        kept: deque = deque()
        for entry in self.ready:
            if entry[0] is unit:
                self._release(entry[5])
            else:
                kept.append(entry)
        self.ready = kept
        return Outcome(unit, "retry", error=reason)

    def _retire(self, worker: int) -> None:
        """A worker whose node left: killed (Ray must not move it onto a survivor), its slot emptied."""
        actor = self.actors[worker]
        self.actors[worker] = None
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def _ensure_worker(self) -> None:
        """At least one model worker: started on a surviving node where it fits, else a one-line error."""
        if self._live() or not self.actors:
            return
        placed = self._place(1, [])
        if not placed:
            r = self.resources
            raise InputError(f"no node left in the Ray cluster can hold a model worker of {r['cpw']:g} CPU(s) and "
                             f"{r['gpw']:g} GPU(s); run the same command again to resume when the cluster has one")
        self.actors.append(self._new_actor(placed[0]))
        self.nodes.append(placed[0])
        self.load.append(0)

    def _system_error(self, exc: BaseException) -> bool:
        errors = self.ray.exceptions
        lost = tuple(getattr(errors, name) for name in (
            "RayActorError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError", "NodeDiedError",
            "ObjectReconstructionFailedError", "ObjectFetchTimedOutError", "TaskCancelledError",
            "ActorUnavailableError", "RaySystemError", "ObjectStoreFullError", "OutOfMemoryError",
            "TaskUnschedulableError", "ActorUnschedulableError",
        ) if hasattr(errors, name))
        return isinstance(exc, lost)

    def _after_read(self, ref: Any, unit: Unit, extra: tuple) -> Outcome | None:
        frame_ref, payload_ref, worker = extra
        try:
            status = self.ray.get(ref)
        except Exception as exc:
            self._release(worker)
            if self._system_error(exc):
                return Outcome(unit, "retry", error=_short(exc))
            raise
        kind = status["kind"]
        if kind in ("split", "failed"):
            self._release(worker)
            return Outcome(unit, kind, scene=status.get("scene"), blocks=status.get("blocks"),
                           error=status.get("error"))
        if kind == "empty":
            self._release(worker)
            return Outcome(unit, "part", part=empty_part(unit, status, self.ctx), scene=status["scene"],
                           blocks=status["blocks"])
        self._count([ref, frame_ref, payload_ref], tiles=int(status.get("tiles") or 0))
        if worker is None:  # tiling only: straight to the writer
            write = self.write_fn.options(**self.io_options).remote(unit, ref, frame_ref, {}, self.ctx_ref,
                                                                     self._waiting(unit))
            self.pending[write] = ("write", unit, (status, None))
        else:
            self._waiting(unit)  # for a model worker, then for its write
            self.ready.append((unit, status, ref, frame_ref, payload_ref, worker))
        return None

    def _after_infer(self, ref: Any, unit: Unit, worker: int) -> None:
        self._release(worker)  # its write task reports the outcome (and any error)
        self._count([ref])

    def _count(self, refs: list, tiles: int = 0) -> None:
        """Add the sizes of finished objects to :data:`TRAFFIC` (never fails the job)."""
        TRAFFIC["tiles"] = TRAFFIC.get("tiles", 0) + tiles
        TRAFFIC["units"] = TRAFFIC.get("units", 0) + (1 if tiles else 0)
        try:
            found = self.ray.experimental.get_object_locations(refs, timeout_ms=1000)
        except Exception:  # sizes unknown this time
            return
        for info in found.values():
            size = int(info.get("object_size") or 0)
            TRAFFIC["bytes"] = TRAFFIC.get("bytes", 0) + size
            if info.get("node_ids"):
                TRAFFIC["store_bytes"] = TRAFFIC.get("store_bytes", 0) + size

    def _after_write(self, ref: Any, unit: Unit, extra: tuple) -> Outcome | None:
        status, worker = extra
        try:
            part = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, OutputError):
                raise cause from None
            if isinstance(cause, HqrsError):
                return Outcome(unit, "failed", error=str(cause).splitlines()[0])
            if cause is not None and self._system_error(cause):
                return self._lost(unit, worker, cause)
            text = str(cause if cause is not None else exc).strip().splitlines()
            return Outcome(unit, "failed", error=f"{unit.entry.path}: internal error: "
                                                 f"{type(cause).__name__}: {text[0] if text else ''}")
        except Exception as exc:
            if self._system_error(exc):
                return self._lost(unit, worker, exc)
            raise
        return Outcome(unit, "part", part=part, scene=status["scene"], blocks=status["blocks"])

    def _lost(self, unit: Unit, worker: int | None, exc: BaseException) -> Outcome:
        """A unit whose work was lost with a process or node: replace a dead worker (retire one
        whose node is gone), retry the unit."""
        errors = self.ray.exceptions
        unschedulable = isinstance(exc, getattr(errors, "ActorUnschedulableError", ()))
        if worker is not None and (unschedulable or (isinstance(exc, errors.RayActorError)
                                                     and NODE_DIED.search(str(exc)))):
            node = self.nodes[worker]
            if node not in self.gone:  # its node is gone (pinned workers are never moved)
                self.gone.add(node)
                self.alive.pop(node, None)
                self._nodes_left({node})
        elif worker is not None and isinstance(exc, errors.RayActorError) \
                and not isinstance(exc, getattr(errors, "ActorUnavailableError", ())):
            self._replace(worker)
        return Outcome(unit, "retry", error=_short(exc))

    def _replace(self, worker: int) -> None:
        """A worker that died: started again on its node while the node is alive, else retired."""
        if self.actors[worker] is None:  # retired already (its node left)
            return
        self._check_nodes_now()
        if self.actors[worker] is None:
            return
        if self.replacements >= max(3, 2 * len(self.actors)):
            raise InputError(f"model workers keep dying ({self.replacements} replaced); check the cluster's "
                             "memory and logs, then run the same command again to resume")
        try:
            self.ray.kill(self.actors[worker], no_restart=True)
        except Exception:  # already gone
            pass
        self.replacements += 1
        node = self.nodes[worker]
        self.actors[worker] = self._new_actor(node) if node in self.alive else None
        if self.actors[worker] is None:
            self._ensure_worker()

    def _check_nodes_now(self) -> None:
        """Retire the workers of nodes that left (and say so)."""
        try:
            alive = self._alive_nodes()
        except Exception:  # the cluster did not answer this time: check again later
            return
        gone = set(self.alive) - set(alive)
        self.alive = alive
        if gone:
            self._nodes_left(gone)

    def close(self) -> None:
        """Stop the workers; leave the cluster (and shut down a Ray instance this executor started)."""
        ray = self.ray
        for actor in self.actors:
            if actor is None:
                continue
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors, self.pending, self.warm = [], {}, []
        if self.owns and ray.is_initialized():
            ray.shutdown()


#: How Ray says that an actor died with its node (before the GCS lists the node as dead).
NODE_DIED = re.compile(r"\bnode\b[^\n]*\b(?:died|dead)\b", re.IGNORECASE)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
