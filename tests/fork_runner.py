"""Run ``python -m hqrs_geo ARGS`` (or ``python SCRIPT ARGS``) without paying torch's import each time.

A long-lived child process (one per test process) imports torch, open_clip and hqrs_geo once;
every run is a fork of it that then does what the interpreter does for ``python -m hqrs_geo``:
``sys.argv``, the working folder and the environment of the caller, stdin from /dev/null, stdout
and stderr captured, the command's own ``SystemExit`` status, an uncaught exception's traceback
and status 1, and at the end the interpreter's exit as the caller sees it (threads joined,
atexit handlers run, output flushed). So each run is still a fresh process of its own; it starts
in milliseconds instead of seconds.

:func:`run_cli` has the signature and result of ``conftest.run_cli`` (a ``CompletedProcess``,
``TimeoutExpired`` after ``timeout`` seconds). Runs that pass other ``subprocess.run`` arguments
(``input``, ``env``, ...) take a real child process, as do runs whose environment differs from the
one the server started with (it is restarted when the environment changed).
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# What the engine's commands import first. Nothing here starts a thread or a process at import
# (a fork copies only the calling thread).
PRELOAD = ("numpy", "pandas", "geopandas", "pyogrio", "rasterio", "torch", "torchvision", "open_clip",
           "hqrs_geo", "hqrs_geo.cli", "hqrs_geo.api", "hqrs_geo.engine.run", "hqrs_geo.models.loader",
           "hqrs_geo.models.decoding", "hqrs_geo.search.session", "hqrs_geo.search.index", "hqrs_geo.training")

SERVER = r"""
import gc, importlib, json, os, sys

def serve():
    for name in json.loads(sys.argv[1]):
        importlib.import_module(name)
    gc.freeze()  # a run's garbage collections leave the server's objects (and their memory pages) alone
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return job
        print(json.dumps({"pid": pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime}),
              flush=True)


def run(job):  # in the forked process: the command, as the interpreter runs it; its exit status
    import runpy
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = open(0, closefd=False)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    try:
        if job["script"] is None:
            sys.argv = ["-m", *job["args"]]
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [job["script"], *job["args"]]
            sys.path[0] = os.path.dirname(job["script"])
            runpy.run_path(job["script"], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


code = run(serve())  # only a forked run gets past serve()
# the interpreter's exit as it matters to the caller (threads joined, atexit handlers, output
# flushed), without freeing every object of torch one by one (seconds in a forked copy)
import atexit, threading  # noqa: E401
threading._shutdown()
atexit._run_exitfuncs()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except Exception:
        pass
os._exit(code)
"""


class ForkServer:
    """One child process with :data:`PRELOAD` imported; :meth:`run` forks it for each command."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD, startup_timeout: float = 600):
        self.folder = Path(tempfile.mkdtemp(prefix="hqrs-fork-"))
        self.env = _environment()
        self.lock = threading.Lock()
        self.count = 0
        self.log = open(self.folder / "server.log", "w")
        self.buffer = b""
        self.child = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(preload)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self.log, bufsize=0, start_new_session=True)
        assert self.child.stdin is not None and self.child.stdout is not None
        self.requests, self.answers = self.child.stdin, self.child.stdout
        if not self._answer(startup_timeout).get("ready"):
            raise RuntimeError(f"the fork server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def _answer(self, timeout: float | None) -> dict:
        """The server's next line (read from the pipe as it comes: nothing waits in a buffer)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.answers], [], [], left)
            if not ready:
                raise subprocess.TimeoutExpired(self.child.args, timeout or 0)
            chunk = os.read(self.answers.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the fork server ended: {(self.folder / 'server.log').read_text()[-2000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, args: list[str], module: str | None = "hqrs_geo", script: str | None = None,
            cwd: str | os.PathLike | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
        """``python -m MODULE ARGS`` (or ``python SCRIPT ARGS``) in a fork; its status and output."""
        args = [str(a) for a in args]
        with self.lock:
            self.count += 1
            out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
            job = {"module": module if script is None else None, "script": script, "args": args,
                   "cwd": str(cwd or os.getcwd()), "env": dict(os.environ), "stdout": str(out), "stderr": str(err)}
            self.requests.write(json.dumps(job).encode() + b"\n")
            pid = self._answer(60)["pid"]
            try:
                answer = self._answer(timeout)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._answer(60)
                raise subprocess.TimeoutExpired(args, timeout or 0, out.read_text(), err.read_text()) from None
            result = subprocess.CompletedProcess([sys.executable, *(["-m", module] if script is None else [script]),
                                                  *args], answer["returncode"], out.read_text(), err.read_text())
            global cpu_seconds
            cpu_seconds += answer["cpu"]
            out.unlink()
            err.unlink()
            return result

    def close(self) -> None:
        """End the server (and whatever a run left in its session)."""
        try:
            self.requests.close()  # the server ends at the end of its input
        except OSError:
            pass
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()
        self.answers.close()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_server: ForkServer | None = None
_server_lock = threading.Lock()
cpu_seconds = 0.0  # CPU time of the forked runs (and their children) in this process so far
IGNORED = ("PYTEST_CURRENT_TEST",)  # set per test by pytest; read by no import


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if k not in IGNORED}


def server() -> ForkServer:
    """This process's fork server, started on first use (again when the environment changed since)."""
    global _server
    with _server_lock:
        if _server is not None and (_server.env != _environment() or _server.child.poll() is not None):
            _server.close()
            _server = None
        if _server is None:
            _server = ForkServer()
        return _server


@atexit.register
def _close() -> None:
    if _server is not None:
        _server.close()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m hqrs_geo ARGS`` in a fresh (forked) process and capture its output."""
    if kwargs:  # input=, env=, ...: a real child process
        return subprocess.run([sys.executable, "-m", "hqrs_geo", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, timeout=timeout, **kwargs)
    return server().run(list(args), cwd=cwd, timeout=timeout)


def run_script(script: str | os.PathLike, *args: str, cwd: Path | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python SCRIPT ARGS`` in a fresh (forked) process and capture its output."""
    return server().run(list(args), script=str(script), cwd=cwd, timeout=timeout)
