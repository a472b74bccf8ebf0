"""The one way the plugin runs other processes, and the one reader of their errors.

Everything the engine does runs out of process (``<interpreter> -m hqrs_geo …``), so torch/CUDA
failures or clashing numpy/GDAL builds can never take QGIS down. :class:`ChildProcess` starts a
child, queues its stdout lines from a reader thread, keeps its stderr, stops it (SIGTERM, then
kill) and always closes its pipes; :meth:`ChildProcess.follow` is the one loop that reads a child
to its end while polling for cancel and, with a :class:`StallWatch`, for a child that makes no
progress. On top of it: :func:`run_cli` (a CLI command with ``--progress json``), the search
sessions of :mod:`.sessions` (``serve-search``, JSON lines) and the installer's steps
(:mod:`.installer`). :func:`parse_error` turns what a failed child left on
stderr into one :class:`EngineError` with the action that fixes it.
"""
from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Callable

ERROR_PREFIX = "hqrs-geo: error: "
KILL_GRACE_S = 15.0  # after SIGTERM, a child still running this long is killed
EXIT_USER, EXIT_CANCELLED = 2, 130

# what each engine command is called in QGIS (Processing ▸ HQRS ▸ …), for messages
ALGORITHM_NAMES = {
    "tile": "Tiles ▸ Tile raster", "embed": "Models ▸ Embed tiles", "caption": "Models ▸ Caption tiles",
    "run": "Models ▸ Tile, embed and caption", "search": "Search ▸ Text search", "similar": "Search ▸ Similar tiles",
    "classify": "Search ▸ Zero-shot classify", "export-chips": "Tiles ▸ Export chips", "mpgi": "Models ▸ MpGI captions",
    "export-dataset": "Models ▸ Export image-text dataset", "detect": "Search ▸ Detect from examples",
    "change": "Search ▸ Compare two dates",
}
# CLI flags as the fields of the Processing dialogs and of the HQRS settings name them
FIELD_NAMES = {
    "--tile-size": "Tile size", "--overlap": "Overlap", "--gsd": "Resample to ground resolution",
    "--edge": "Partial tiles at the edge", "--min-valid": "Minimum valid fraction", "--bands": "Bands",
    "--crs": "CRS of the tile footprints", "--model": "Model", "--embed-model": "Embedding model",
    "--caption-model": "Caption model", "--arch": "open_clip architecture", "--embed-arch": "open_clip architecture",
    "--caption-arch": "open_clip architecture", "--checkpoint": "Checkpoint", "--embed-checkpoint": "Checkpoint",
    "--caption-checkpoint": "Checkpoint", "--device": "Device", "--batch-size": "Batch size",
    "--trust-checkpoint": "Trust the checkpoint", "--overwrite": "Recompute results", "--labels": "Labels",
    "--bbox": "Extent", "--tile": "Example tile ids", "--pos": "Positive example tile ids",
    "--neg": "Negative example tile ids", "--labels-from": "Use the labels saved with the layer",
    "--negative": "Negative example tile ids",
    "--recipe": "Recipe", "--vectors": "Vector layers", "--limit": "Only the first N tiles",
    "--max-length": "Maximum caption length", "--decoding": "Caption decoding", "-k": "Number of results",
    "--output": "output", "-o": "output",
    "--became": "Tiles that became…", "--stopped": "Tiles that stopped being…", "--threshold": "Threshold",
    "--min-overlap": "Least valid overlap", "--no-captions": "Caption both dates",
}


class EngineError(Exception):
    """A child process failed; ``str()`` is one line. ``kind``: ``engine`` (the interpreter cannot
    run the engine: set it up), ``user`` (an input to fix), ``cancelled``, ``network`` (a package
    index could not be reached) or ``internal``; ``fix`` says what to do (or '')."""

    def __init__(self, message: str, kind: str = "internal", fix: str = ""):
        super().__init__(message)
        self.kind, self.fix = kind, fix

    @property
    def text(self) -> str:
        """The message with its fix."""
        return f"{self}; {self.fix}" if self.fix else str(self)


SET_UP_ENGINE = "set it up with Raster ▸ HQRS ▸ Set up engine… (or choose its Python in HQRS settings)"
_MISSING = re.compile(r"No module named '?([A-Za-z0-9_]+)")
_COMMAND = re.compile(r"'hqrs-geo ([a-z-]+)(?: [^']*)?'")
_NETWORK = ("Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable",
            "No matching distribution found", "Could not find a version that satisfies", "ConnectTimeout",
            "Max retries exceeded", "ProxyError", "SSLError")


def humanize(message: str) -> str:
    """Engine advice in the words of QGIS: ``run 'hqrs-geo embed X --model NAME' first`` becomes
    ``run Processing ▸ HQRS ▸ Models ▸ Embed tiles first``; CLI flags become field names."""
    def command(match: re.Match) -> str:
        name = ALGORITHM_NAMES.get(match.group(1))
        return f"Processing ▸ HQRS ▸ {name}" if name else match.group(0)

    message = _COMMAND.sub(command, message)
    for flag in sorted(FIELD_NAMES, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", f"'{FIELD_NAMES[flag]}'", message)
    return message


def parse_error(stderr: Sequence[str], returncode: int | None, python: str = "") -> EngineError:
    """One :class:`EngineError` from a failed child's stderr lines and exit status."""
    lines = [line.rstrip("\n") for line in stderr]
    reported = [line[len(ERROR_PREFIX):].strip() for line in lines if line.startswith(ERROR_PREFIX)]
    if returncode == EXIT_CANCELLED or (reported and reported[-1].startswith("cancelled")):
        return EngineError(reported[-1] if reported else "cancelled", "cancelled")
    if reported:
        message = humanize(reported[-1])
        return EngineError(message, "user" if returncode == EXIT_USER else "internal")
    text = "\n".join(lines)
    missing = _MISSING.search(text)
    if missing:
        where = f" in {python}" if python else ""
        return EngineError(f"the engine's Python lacks the module {missing.group(1)}{where}", "engine", SET_UP_ENGINE)
    if any(marker in text for marker in _NETWORK):
        return EngineError("the package index could not be reached", "network")
    tail = [line.strip() for line in lines if line.strip()]
    return EngineError(tail[-1] if tail else f"the process ended with status {returncode}", "internal")


def child_env(program: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: QGIS's, but a Python other than QGIS's own does not get QGIS's
    PYTHONPATH/PYTHONHOME (they point at QGIS's libraries, e.g. on OSGeo4W); PYTHONSAFEPATH keeps
    ``python -m hqrs_geo`` from picking up a folder of that name in QGIS's working directory."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", PYTHONSAFEPATH="1")
    try:
        own = os.path.abspath(program) == os.path.abspath(sys.executable)  # a venv links to the same binary
    except (OSError, ValueError):
        own = False
    if not own:
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
    return env


class ChildProcess:
    """One child process: stdout lines through a queue, stderr kept, pipes always closed.

    ``merge_stderr`` sends stderr into the stdout lines (installer logs); ``stdin`` opens a pipe
    for :meth:`send`.
    """

    def __init__(self, argv: Sequence[str], stdin: bool = False, merge_stderr: bool = False,
                 env: dict[str, str] | None = None, cwd: str | None = None):
        self.argv = [str(a) for a in argv]
        self.stdin, self.merge_stderr = stdin, merge_stderr
        self.env = child_env(self.argv[0], env)
        self.cwd = cwd
        self.stderr: list[str] = []
        self.returncode: int | None = None
        self._child: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._write_lock = threading.Lock()

    # -- life -------------------------------------------------------------------------------
    def start(self) -> ChildProcess:
        """Start the child; raises EngineError (kind ``engine``) when it cannot be started."""
        try:
            child = self._child = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if self.merge_stderr else subprocess.PIPE, text=True, encoding="utf-8",
                errors="replace", bufsize=1, env=self.env, cwd=self.cwd, start_new_session=True)
        except OSError as exc:
            raise EngineError(f"cannot start {self.argv[0]}: {exc.strerror or exc}", "engine", SET_UP_ENGINE) from None
        assert child.stdout is not None  # a pipe (stderr too, unless merged into it)
        self._spawn(child.stdout, self._lines.put, end=lambda: self._lines.put(None))
        if child.stderr is not None:
            self._spawn(child.stderr, self.stderr.append)
        return self

    def _spawn(self, stream: IO[str], keep: Callable[[str], None], end: Callable[[], None] = lambda: None) -> None:
        """A reader thread: every line of ``stream`` to ``keep``, then ``end()``."""
        def pump() -> None:
            try:
                for line in stream:
                    keep(line)
            except (OSError, ValueError):
                pass
            end()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        """True while the child runs."""
        return self._child is not None and self._child.poll() is None

    # -- talking --------------------------------------------------------------------------
    def read_line(self, timeout: float | None = None) -> str | None:
        """The next stdout line; None at the end of output; TimeoutError after ``timeout`` s."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def send(self, obj: dict) -> None:
        """Write one JSON line to the child's stdin."""
        stdin = self._child.stdin if self._child is not None else None
        with self._write_lock:
            try:
                if stdin is None:
                    raise ValueError("it has no input pipe")
                stdin.write(json.dumps(obj) + "\n")
                stdin.flush()
            except (OSError, ValueError) as exc:
                raise EngineError(f"the process stopped listening ({exc})", "internal") from None

    # -- ending ---------------------------------------------------------------------------
    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM: the CLI cancels cleanly)."""
        if self._child is not None and self.running:
            try:
                self._child.terminate()
            except OSError:
                pass

    def kill(self) -> None:
        """Stop the child at once."""
        if self._child is not None and self.running:
            try:
                self._child.kill()
            except OSError:
                pass

    def finish(self, timeout: float = 10.0) -> int:
        """Wait for the end (killing it after ``timeout`` s), join the readers, close every pipe."""
        if self._child is None:
            return self.returncode if self.returncode is not None else -1
        try:
            self._child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        for pipe in (self._child.stdin, self._child.stdout, self._child.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self.returncode = self._child.returncode
        self._child = None
        return self.returncode

    def error(self, python: str = "") -> EngineError:
        """What went wrong, from stderr (or the merged output) and the exit status."""
        return parse_error(self.stderr, self.returncode, python)

    def follow(self, on_line: Callable[[str], None], is_cancelled: Callable[[], bool] | None = None,
               watch: StallWatch | None = None, poll: float = 0.1, kill_grace: float = KILL_GRACE_S) -> Followed:
        """Give every stdout line of the started child to ``on_line`` until its output ends.

        ``is_cancelled`` is asked every ``poll`` s; once it says yes the child is asked to stop
        (SIGTERM: the CLI cancels cleanly) and killed ``kill_grace`` s later if it still runs (a long
        C call; outputs stay safe, every write is atomic). A ``watch`` that finds the child making no
        progress stops it the same way. Call :meth:`finish` afterwards."""
        followed = Followed()
        kill_at: float | None = None
        while True:
            if not followed.cancelled and is_cancelled is not None and is_cancelled():
                followed.cancelled = True
                kill_at = self._stop(kill_at, kill_grace)
            if kill_at is not None and time.monotonic() > kill_at:
                self.kill()
                kill_at = None
            try:
                line = self.read_line(timeout=poll)
            except TimeoutError:
                if watch is not None and not followed.stalled:
                    followed.stalled = watch.stalled()
                    if followed.stalled:
                        kill_at = self._stop(kill_at, kill_grace)
                continue
            if line is None:
                return followed
            if watch is not None:
                watch.moved()
            on_line(line)

    def _stop(self, kill_at: float | None, grace: float) -> float:
        """SIGTERM once; when to kill (an earlier stop keeps its time)."""
        if kill_at is None:
            self.terminate()
            return time.monotonic() + grace
        return kill_at


@dataclass
class Followed:
    """How :meth:`ChildProcess.follow` ended: ``cancelled`` when asked to stop; ``stalled`` says why
    the watch stopped the child ('' when it did not)."""

    cancelled: bool = False
    stalled: str = ""


class StallWatch:
    """Whether a child still makes progress: a line of output, or ``min_bytes`` more read by the
    process (``rchar`` of ``/proc/PID/io``: network and files; elsewhere only lines count), within
    ``stall_seconds``; and whether it is still within ``limit_seconds`` of its start."""

    def __init__(self, pid: int | None, stall_seconds: float, limit_seconds: float, min_bytes: int):
        self.pid, self.stall_seconds, self.min_bytes = pid, stall_seconds, min_bytes
        self.started = self.last = time.monotonic()
        self.deadline = self.started + limit_seconds
        self.read = self._rchar()

    def _rchar(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/io") as handle:
                for line in handle:
                    if line.startswith("rchar:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def moved(self) -> None:
        """A line came."""
        self.last = time.monotonic()

    def stalled(self) -> str:
        """Why the child counts as stalled ('' while it makes progress)."""
        now = time.monotonic()
        read = self._rchar()
        if read is not None and self.read is not None and read - self.read >= self.min_bytes:
            self.read, self.last = read, now
        elif read is not None and self.read is None:
            self.read = read
        if now - self.last > self.stall_seconds:
            return (f"made no progress for {self.stall_seconds:g} s (no output, under {self.min_bytes // 1024} KiB "
                    "read)")
        if now > self.deadline:
            return f"ran past its {(self.deadline - self.started) / 60:g}-minute limit"
        return ""


@dataclass
class CliResult:
    """How a CLI run ended: ``final`` is its last ``done`` event; ``error`` an EngineError."""

    returncode: int
    error: EngineError | None = None
    final: dict = field(default_factory=dict)
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        """True when the command succeeded."""
        return self.returncode == 0


@dataclass
class Progress:
    """One ``--progress json`` event in words: ``tiling: 40 / 120 tiles``."""

    stage: str
    done: int
    total: int | None
    message: str

    STAGES = {"tile": "tiling", "run": "embedding and captioning", "embed": "embedding", "caption": "captioning",
              "chips": "writing chips", "export-chips": "writing chips", "mpgi": "MpGI captions", "load": "loading",
              "align": "aligning the later date", "change": "embedding and captioning the dates",
              "compare": "comparing the dates", "write": "writing the change layer"}

    @property
    def percent(self) -> float:
        """0..100 within the stage."""
        return 100.0 * self.done / self.total if self.total else 0.0

    @property
    def text(self) -> str:
        """``tiling: 40 / 120 tiles`` (or the stage's message)."""
        name = self.STAGES.get(self.stage, self.stage.replace("_", " "))
        count = f"{self.done} / {self.total} tiles" if self.total else ""
        return ": ".join(part for part in (name, count, self.message) if part)


def run_cli(args: Sequence[str], python: str, on_progress: Callable[[Progress], None] | None = None,
            is_cancelled: Callable[[], bool] | None = None, env: dict[str, str] | None = None) -> CliResult:
    """Run ``hqrs-geo ARGS --progress json`` to its end, reporting progress and polling for cancel."""
    child = ChildProcess([python, "-m", "hqrs_geo", *map(str, args), "--progress", "json"], env=env)
    try:
        child.start()
    except EngineError as exc:
        return CliResult(returncode=127, error=exc)
    final: dict = {}

    def take(line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(event, dict) or "stage" not in event:  # e.g. a JSON list printed by --json
            return
        if event["stage"] in ("done", "error"):
            final.clear()
            final.update(event)
        elif on_progress is not None:
            on_progress(Progress(str(event.get("stage", "")), int(event.get("done") or 0), event.get("total"),
                                 str(event.get("message") or "")))

    cancelled = child.follow(take, is_cancelled).cancelled
    returncode = child.finish()
    error = None if returncode == 0 else child.error(python)
    return CliResult(returncode=returncode, error=error, final=final,
                     cancelled=cancelled or returncode == EXIT_CANCELLED)
