"""The Ray executor of the partitioned engine (``engine="ray"``; needs the ``scale`` extra).

Per unit (:mod:`hqrs_geo.engine.units`) three Ray calls, chained by object references so the
pixels never pass through the driver:

* a CPU **read task** (:func:`read_task`): scene preparation, valid fractions, pixels as one
  uint8 array in the object store; scheduled (softly) on the node of the model worker that
  will compute the unit, so pixels do not cross the network;
* a **model worker** actor (:class:`ModelWorker`; one per GPU, or per ``gpus_per_worker``
  GPUs, or one per node on CPU clusters) loads the job's models once and runs
  :func:`~hqrs_geo.engine.units.infer_unit` on each unit; a worker computes one unit while
  the read tasks of the next ones run on the CPUs (a GPU worker runs two units at once, so
  one's host-to-device copy and result conversion overlap the other's compute);
* a CPU **write task** (:func:`write_task`): results into the frame, the part written
  atomically to the dataset folder (which must be reachable from every node).

Memory is bounded whatever the archive size: at most ``in_flight`` units are between their
read and their write, and the driver holds only references and small status records.

Faults: a read or write task whose worker process or node dies is retried by Ray; a model
worker that dies is restarted (its models loaded again) and its calls are retried; a unit
whose work is lost anyway (an object lost with its node, a worker that keeps dying) is put
back in the queue (up to ``max_attempts``); an error of the scene itself (corrupt file,
unreachable URL, NaN embeddings) is returned as a failed unit. Parts are written atomically,
so a unit computed twice leaves one part.
"""
from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Any

from ..errors import HqrsError, InputError, OptionError, OutputError
from .options import RunOptions
from .units import JobContext, Outcome, TaskSpec, Unit, empty_part, infer_unit, read_unit, write_unit

#: Environment variables forwarded to the workers (model search paths, offline mode, GDAL settings).
FORWARDED_PREFIXES = ("HQRS_GEO_", "HF_HUB_OFFLINE", "HF_HOME", "GDAL_", "CPL_", "VSI_", "TORCH_HOME")
#: Variables never forwarded (credentials stay with each node's own configuration).
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "USERPWD", "HEADER", "CREDENTIAL", "AUTH")
QUEUED_PER_WORKER = 2
WORKER_RESTARTS = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptionError("the Ray engine needs Ray: pip install 'hqrs_geo[scale]' (or leave out «engine» for "
                          "the single-process engine)", option="engine") from None
    return ray


def worker_env() -> dict[str, str]:
    """The driver's variables the workers get (see :data:`FORWARDED_PREFIXES`)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(FORWARDED_PREFIXES) and not any(w in k.upper() for w in SECRET_WORDS)}


# -- what runs on the cluster ------------------------------------------------------------------------
def read_task(unit: Unit, ctx: JobContext) -> tuple[dict, Any, Any]:
    """Ray task: :func:`~hqrs_geo.engine.units.read_unit` (three returns)."""
    return read_unit(unit, ctx)


def write_task(unit: Unit, status: dict, frame: Any, stored: dict, ctx: JobContext) -> dict:
    """Ray task: :func:`~hqrs_geo.engine.units.write_unit`."""
    return write_unit(unit, status, frame, stored, ctx)


class ModelWorker:
    """Ray actor: the job's models, loaded once per worker process, computing units."""

    def __init__(self, plan: Any, options: RunOptions, device: str, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.error: HqrsError | None = None
        self.tasks: list = []
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
        import ray

        return ray.get_runtime_context().get_node_id()

    def infer(self, payload: tuple, batch_size: int) -> dict:
        """Every task on one unit's pixels."""
        ids, pixels = payload
        return infer_unit(self.tasks, ids, pixels, batch_size)


# -- the executor -------------------------------------------------------------------------------------
class RayExecutor:
    """Submits units to a Ray cluster and returns their outcomes (see the module docstring)."""

    name = "ray"

    def __init__(self, plan: Any, options: RunOptions, scale: Any, progress: Any = None) -> None:
        self.plan, self.options, self.scale, self.progress = plan, options, scale, progress
        self.ray = _ray()
        self.owns = False
        self.actors: list = []
        self.nodes: list[str | None] = []
        self.load: list[int] = []
        self.pending: dict = {}  # object ref -> (stage, unit, extra)
        self.ready: deque = deque()  # read units waiting for a free worker
        self.inflight = 0
        self.replacements = 0
        self.ctx_ref: Any = None
        self.specs: list[TaskSpec] = []

    # -- cluster and workers ------------------------------------------------------------------
    def _init(self) -> None:
        ray = self.ray
        if ray.is_initialized():  # a caller's own Ray session
            return
        address = self.scale.ray_address or os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"logging_level": logging.ERROR, "log_to_driver": False,
                        "runtime_env": {"env_vars": worker_env()}}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OptionError(f"cannot connect to the Ray cluster at {address or 'this machine'} ({reason}); start it "
                              "with 'ray start --head' or check «ray_address»", option="ray_address") from None
        self.owns = True

    def _plan_resources(self) -> dict:
        ray, scale, plan = self.ray, self.scale, self.plan
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes] or [1.0]
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
        cpw = float(scale.cpus_per_worker) if scale.cpus_per_worker else (1.0 if gpw else max(0.5, min(cpus) - io_cpus))
        workers = 0
        if models:
            workers = scale.workers or (max(1, int(gpus // gpw)) if gpw else len(nodes))
            if workers * cpw + io_cpus > sum(cpus) + 1e-9 or (gpw and workers * gpw > gpus + 1e-9):
                raise OptionError(
                    f"{workers} worker(s) of {cpw:g} CPU(s) and {gpw:g} GPU(s), plus {io_cpus:g} CPU for reading, "
                    f"do not fit the cluster ({sum(cpus):g} CPUs, {gpus:g} GPUs); use fewer «workers» or "
                    "«cpus_per_worker»",
                    option="workers")
        free = max(0.0, sum(cpus) - workers * cpw)
        in_flight = scale.in_flight or min(64, QUEUED_PER_WORKER * workers + max(1, int(free / io_cpus)))
        device_of_workers = "cuda" if gpw else "cpu"
        return {"workers": workers, "cpw": cpw, "gpw": gpw, "io_cpus": io_cpus, "in_flight": in_flight,
                "device": device_of_workers if device in ("auto", "cuda", "cpu") else device,
                "threads": max(1, math.ceil(cpw)) if not gpw else None}

    def _new_actor(self) -> Any:
        r = self.resources
        cls = self.ray.remote(ModelWorker).options(  # spread over the nodes: each node's reads feed its worker
            num_cpus=r["cpw"], num_gpus=r["gpw"], max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS,
            scheduling_strategy="SPREAD",
            max_concurrency=2 if r["gpw"] else 1,  # GPU: one unit's transfer overlaps the other's compute
        )
        return cls.remote(self.plan, self.options, r["device"], r["threads"])

    def start(self) -> list[TaskSpec]:
        """Connect (or start a local Ray instance), start the model workers; the tasks' specs."""
        ray = self.ray
        self._init()
        self.resources = self._plan_resources()
        r = self.resources
        self.read_fn, self.write_fn = ray.remote(read_task), ray.remote(write_task)
        self.io_options = {"num_cpus": r["io_cpus"], "max_retries": 3}
        self.actors = [self._new_actor() for _ in range(r["workers"])]
        self.load = [0] * len(self.actors)
        self.specs = []
        if self.actors:
            self.specs = self._get(self.actors[0].specs.remote())
            self.nodes = [self._node(a) for a in self.actors]
        if self.progress is not None and self.actors:
            self.progress.message(f"ray: {len(self.actors)} model worker(s) of {r['cpw']:g} CPU(s) and {r['gpw']:g} "
                                  f"GPU(s), {r['in_flight']} unit(s) in flight")
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

    def _node(self, actor: Any) -> str | None:
        try:
            return self.ray.get(actor.node.remote(), timeout=60)
        except Exception:  # a worker that cannot say where it is gets no locality
            return None

    def begin(self, ctx: JobContext) -> None:
        """Put the job's context in the object store (one copy for every task)."""
        self.ctx = ctx
        self.ctx_ref = self.ray.put(ctx)

    # -- the queue -----------------------------------------------------------------------------
    def room(self) -> bool:
        """True while fewer than ``in_flight`` units are under way."""
        return self.inflight < self.resources["in_flight"]

    def busy(self) -> bool:
        """True while some unit is under way."""
        return self.inflight > 0

    def submit(self, unit: Unit) -> None:
        """Start a unit's read task, on the node of the least loaded worker."""
        options: dict = {}
        worker = None
        if self.actors:
            worker = min(range(len(self.actors)), key=lambda i: self.load[i])
            self.load[worker] += 1  # counted from the read on, so reads spread over the workers
            node = self.nodes[worker] if worker < len(self.nodes) else None
            if node:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        status, frame, payload = self.read_fn.options(num_returns=3, **self.io_options, **options).remote(
            unit, self.ctx_ref)
        self.pending[status] = ("read", unit, (frame, payload, worker))
        self.inflight += 1

    def _release(self, worker: int | None) -> None:
        if worker is not None and worker < len(self.load):
            self.load[worker] = max(0, self.load[worker] - 1)

    def _dispatch(self) -> None:
        """Hand read units to their workers: infer, then the write that waits for it."""
        while self.ready:
            unit, status, status_ref, frame_ref, payload_ref, worker = self.ready.popleft()
            infer = self.actors[worker].infer.remote(payload_ref, self.ctx.batch_size)
            write = self.write_fn.options(**self.io_options).remote(unit, status_ref, frame_ref, infer, self.ctx_ref)
            self.pending[infer] = ("infer", unit, worker)
            self.pending[write] = ("write", unit, (status, worker))

    def wait(self) -> list[Outcome]:
        """Outcomes of the units that finished (blocks until at least one did)."""
        ray = self.ray
        self._dispatch()
        outcomes: list[Outcome] = []
        while not outcomes:
            refs = list(self.pending)
            done, _ = ray.wait(refs, num_returns=1, fetch_local=False)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False) if len(refs) > 1 \
                else (done, None)
            for ref in done:
                stage, unit, extra = self.pending.pop(ref)
                outcome = getattr(self, f"_after_{stage}")(ref, unit, extra)
                if outcome is not None:
                    self.inflight -= 1
                    outcomes.append(outcome)
            self._dispatch()
        return outcomes

    def _system_error(self, exc: BaseException) -> bool:
        errors = self.ray.exceptions
        lost = tuple(getattr(errors, name) for name in (
            "RayActorError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError", "NodeDiedError",
            "ObjectReconstructionFailedError", "ObjectFetchTimedOutError", "TaskCancelledError",
            "ActorUnavailableError", "RaySystemError", "ObjectStoreFullError", "OutOfMemoryError",
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
        if worker is None:  # tiling only: straight to the writer
            write = self.write_fn.options(**self.io_options).remote(unit, ref, frame_ref, {}, self.ctx_ref)
            self.pending[write] = ("write", unit, (status, None))
        else:
            self.ready.append((unit, status, ref, frame_ref, payload_ref, worker))
        return None

    def _after_infer(self, ref: Any, unit: Unit, worker: int) -> None:
        self._release(worker)  # its write task reports the outcome (and any error)

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
        """A unit whose work was lost with a process or node: replace a dead worker, retry the unit."""
        if worker is not None and isinstance(exc, self.ray.exceptions.RayActorError) \
                and not isinstance(exc, getattr(self.ray.exceptions, "ActorUnavailableError", ())):
            self._replace(worker)
        return Outcome(unit, "retry", error=_short(exc))

    def _replace(self, worker: int) -> None:
        if self.replacements >= max(3, 2 * len(self.actors)):
            raise InputError(f"model workers keep dying ({self.replacements} replaced); check the cluster's "
                             "memory and logs, then run the same command again to resume")
        try:
            self.ray.kill(self.actors[worker], no_restart=True)
        except Exception:  # already gone
            pass
        self.replacements += 1
        self.actors[worker] = self._new_actor()
        self.nodes[worker] = self._node(self.actors[worker])

    def close(self) -> None:
        """Stop the workers; leave the cluster (and shut down a Ray instance this executor started)."""
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors, self.pending = [], {}
        if self.owns and ray.is_initialized():
            ray.shutdown()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
