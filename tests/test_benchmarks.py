"""Every benchmark runs at a tiny size, so a broken benchmark fails CI (the measured ratios at
these sizes mean nothing; ``make bench`` runs them at full size).

The benchmarks run in forks of one child process that has already imported torch, open_clip and
hqrs_geo (:data:`PRELOAD`), so each one starts in a fresh process of its own, as
``python benchmarks/NAME.py ARGS`` would, without paying those imports (seconds) again.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "data" / "ucm_val_samples" / "dataset.json"

SMOKE = {
    "tiling": (["--size", "512", "--repeat", "1"], "hqrs_geo / raw rasterio reads:"),
    "embed": (["--arch", "hqrs-mini-clip", "--size", "256", "--batch", "1"], "ratio end-to-end / bare:"),
    "caption": (["--arch", "hqrs-mini-coca", "--batch", "1", "--tokens", "2"], "speed-up"),
    "search": (["--n", "1000", "--dim", "32", "--clusters", "10", "--queries", "5", "--no-alternatives"],
               "targets:"),
    "search_archive": (["--archive", "4000", "--dim", "32", "--queries", "5", "--real-mix", "0",
                        "--param", "ivfpq.m=4", "--param", "ivfpq.train_size=2000", "--param", "ivfpq.opq=0"],
                       "targets at 4,000 x 32"),
    "demo_ap": ([], "mean AP"),
    "finetune": (["--steps", "1", "--warmup", "0", "--batch", "2", "--dataset", str(SAMPLES)], "ratio"),
    "mpgi": (["--tiles", "2", "--max-tokens", "8", "--batch", "2"], "pipeline/bare"),
    "scale": (["--scenes", "2", "--size", "256", "--batch", "1", "--memory-scenes", "1"], "ratio Ray / single-process"),
}

# Imported once in the parent of the benchmark processes: what the benchmarks import first. Nothing
# here starts a thread or a process (a fork only copies the calling thread).
PRELOAD = ("numpy", "rasterio", "torch", "torchvision", "open_clip", "hqrs_geo", "hqrs_geo.api",
           "hqrs_geo.engine.run", "hqrs_geo.models.loader", "hqrs_geo.models.decoding", "hqrs_geo.training",
           "hqrs_geo.search.index")

FORK_SERVER = r"""
import importlib, json, os, runpy, sys, traceback

for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the benchmark's own process: as `python SCRIPT ARGS` in CWD, output to files
        code = 1
        try:
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.chdir(job["cwd"])
            sys.argv = [job["script"], *job["args"]]
            sys.path[0] = os.path.dirname(job["script"])
            try:
                runpy.run_path(job["script"], run_name="__main__")
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class BenchmarkRunner:
    """Runs benchmark scripts, one at a time, each in a fork of a process with :data:`PRELOAD` imported."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.child = subprocess.Popen([sys.executable, "-c", FORK_SERVER, json.dumps(PRELOAD)], cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)
        assert json.loads(self._answer(300))["ready"]

    def _answer(self, timeout: float) -> str:
        ready, _, _ = select.select([self.child.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise AssertionError(f"no answer from the benchmark process within {timeout:.0f} s")
        line = self.child.stdout.readline()
        assert line, "the benchmark process ended"
        return line

    def run(self, script: Path, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
        """``python SCRIPT ARGS`` in the repository root: its exit status and output."""
        out, err = self.folder / f"{script.stem}.out", self.folder / f"{script.stem}.err"
        self.child.stdin.write(json.dumps({"script": str(script), "args": args, "cwd": str(ROOT),
                                           "stdout": str(out), "stderr": str(err)}) + "\n")
        self.child.stdin.flush()
        returncode = json.loads(self._answer(timeout))["returncode"]
        return subprocess.CompletedProcess([str(script), *args], returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        """End the process (and anything a benchmark left running in its session)."""
        if self.child.poll() is None:
            self.child.stdin.close()
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait()
        self.child.stdout.close()


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    runner = BenchmarkRunner(tmp_path_factory.mktemp("benchmarks"))
    yield runner
    runner.close()


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs(name, benchmarks):
    args, expected = SMOKE[name]
    script = name if (ROOT / "benchmarks" / f"{name}.py").exists() else name.split("_")[0]  # search_archive: search.py
    result = benchmarks.run(ROOT / "benchmarks" / f"{script}.py", args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout, result.stdout[-2000:]
    assert "unavailable: SyntaxError" not in result.stdout and "Traceback" not in result.stderr
