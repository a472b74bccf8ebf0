"""hqrs-geo finetune uses the machine: torch threads, bf16 on CPUs with bf16 units, the GPU script."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fork_runner import run_cli
from test_training import _write_dataset
from tiny_models import TINY_CLIP, TINY_COCA

from hqrs_geo.errors import Cancelled, OptionError
from hqrs_geo.models.precision import cpu_bf16_units
from hqrs_geo.training import FinetuneConfig, finetune
from hqrs_geo.training.trainer import default_threads, latest_checkpoint, training_precision, usable_cores

ROOT = Path(__file__).resolve().parents[2]
CPU_SCRIPT = ROOT / "examples" / "train_hqrs_mini.sh"
GPU_SCRIPT = ROOT / "examples" / "train_hqrs_mini_gpu.sh"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("captions"))


def _config(dataset: Path, output: Path, **kw) -> FinetuneConfig:
    values = dict(dataset=str(dataset), output=str(output), arch=TINY_CLIP, batch_size=8, lr=2e-3, warmup_steps=2,
                  max_steps=4, save_every=100, seed=3, device="cpu", precision="fp32", val_split=None)
    values.update(kw)
    return FinetuneConfig(**values)


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_bf16_units_match_the_kernel_cpu_flags_and_decide_auto():
    import torch

    flags = _cpuinfo_flags()
    expected = {unit for unit in ("avx512_bf16", "amx_bf16") if unit in flags}
    assert cpu_bf16_units() == expected
    cpu = torch.device("cpu")
    assert training_precision(cpu, "auto") == (torch.bfloat16 if expected else None)
    assert training_precision(cpu, "fp32") is None and training_precision(cpu, "bf16") == torch.bfloat16
    with pytest.raises(OptionError, match="fp16 needs a CUDA"):
        training_precision(cpu, "fp16")


def test_default_threads_are_the_cores_left_free_unless_omp_says_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.5, 0.5))  # an idle machine: every core
    assert default_threads() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.7, 1.0, 1.0))  # all but about one busy
    assert default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * cores, 1.0, 1.0))  # overloaded: still one
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: ignored
    assert default_threads() == cores


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, 5000])
def test_bad_thread_counts_are_refused(dataset, tmp_path, bad):
    with pytest.raises(OptionError, match="whole number from 1 to 1024") as error:
        finetune(_config(dataset, tmp_path / "run", threads=bad))
    assert error.value.option == "threads" and not (tmp_path / "run").exists()


def test_threads_are_applied_recorded_and_given_back(dataset, tmp_path, model_environment, monkeypatch):
    import torch

    from hqrs_geo.progress import Progress

    seen = []

    class Spy(Progress):
        def advance(self, n: int = 1) -> None:
            if self.stage == "train":
                seen.append(torch.get_num_threads())
            super().advance(n)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # as on an idle machine
    before = torch.get_num_threads()
    record = finetune(_config(dataset, tmp_path / "one", threads=1), progress=Spy("none"))
    assert record["threads"] == 1 and seen == [1] * 4 and record["config"]["threads"] == 1
    assert torch.get_num_threads() == before  # the caller's setting again
    seen.clear()
    record = finetune(_config(dataset, tmp_path / "all"), progress=Spy("none"))
    assert record["threads"] == usable_cores() and set(seen) == {usable_cores()}
    assert record["config"]["threads"] is None
    assert record["cpu_bf16_units"] == sorted(cpu_bf16_units())


def test_auto_precision_trains_finite_and_resumes_to_the_same_weights(dataset, tmp_path, model_environment):
    """``auto`` (bf16 where the CPU has bf16 units): finite losses, and a cancelled then resumed
    run ends on the weights of an uninterrupted one, as in fp32."""
    from safetensors.torch import load_file

    expected = "bf16" if cpu_bf16_units() else "fp32"
    coca = finetune(_config(dataset, tmp_path / "coca", arch=TINY_COCA, precision="auto", max_steps=2))
    assert coca["precision"] == expected and np.isfinite(coca["history"][-1]["train_loss"])

    config = dict(precision="auto", max_steps=6)
    straight = finetune(_config(dataset, tmp_path / "straight", **config))
    assert straight["precision"] == expected
    losses = [h["train_loss"] for h in straight["history"] if "train_loss" in h]
    assert losses and all(np.isfinite(losses))

    calls = {"n": 0}

    def cancel_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled, match="step 3"):
        finetune(_config(dataset, tmp_path / "cut", **config), cancel=cancel_after_three)
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000003.pt"
    resumed = finetune(_config(dataset, tmp_path / "cut", **config), resume=True)
    assert resumed["steps"] == 6 and resumed["precision"] == expected
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst


def test_cli_threads_option_is_recorded_and_checked(dataset, tmp_path, model_environment):
    out = tmp_path / "cli"
    done = run_cli("finetune", str(dataset), "-o", str(out), "--arch", TINY_CLIP, "--max-steps", "1",
                   "--batch-size", "8", "--device", "cpu", "--threads", "1", "--val-split", "")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "train.json").read_text())
    assert record["threads"] == 1 and record["precision"] == ("bf16" if cpu_bf16_units() else "fp32")
    for bad in ("0", "two"):
        refused = run_cli("finetune", str(dataset), "-o", str(tmp_path / "bad"), "--arch", TINY_CLIP,
                          "--threads", bad)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and "--threads" in refused.stderr and len(lines) == 1, refused.stderr
        assert not (tmp_path / "bad").exists()


def _script(script: Path, *args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env}
    if path is not None:
        environ["PATH"] = path
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=60)


def test_training_scripts_parse():
    for script in (CPU_SCRIPT, GPU_SCRIPT):
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        assert os.stat(script).st_mode & stat.S_IXUSR


def _finetune_commands(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines() if " finetune " in line]


def _value(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


def test_gpu_dry_run_is_the_cpu_recipe_with_larger_batches_on_cuda():
    cpu = _script(CPU_SCRIPT, "D", "DEU", "DEU6", "R", DRY_RUN="1")
    gpu = _script(GPU_SCRIPT, "--dry-run", "D", "DEU", "DEU6", "R")
    assert cpu.returncode == 0 and gpu.returncode == 0, cpu.stderr + gpu.stderr
    cpu_runs, gpu_runs = _finetune_commands(cpu.stdout), _finetune_commands(gpu.stdout)
    assert len(cpu_runs) == len(gpu_runs) == 7  # five CLIP stages and two CoCa stages
    for slow, fast in zip(cpu_runs, gpu_runs):
        assert _value(slow, "--device") == "auto" and _value(fast, "--device") == "cuda"
        assert _value(slow, "--precision") == _value(fast, "--precision") == "auto"
        assert int(_value(fast, "--batch-size")) == 4 * int(_value(slow, "--batch-size")) == 256
        assert float(_value(fast, "--lr")) == pytest.approx(2 * float(_value(slow, "--lr")))
        assert int(_value(fast, "--warmup-steps")) == -(-int(_value(slow, "--warmup-steps")) // 4)
        for option in ("-o", "--epochs", "--seed", "--arch", "--save-dtype"):
            assert _value(fast, option) == _value(slow, option)
    # the same records and copies into the package, in the same order
    rest = [line for line in cpu.stdout.splitlines() if " finetune " not in line]
    assert rest == [line for line in gpu.stdout.splitlines() if " finetune " not in line]
    assert any("hqrs-mini-coca.train.json" in line for line in rest)
    scaled = _script(GPU_SCRIPT, "--dry-run", "D", "DEU", "DEU6", BATCH_SCALE="2")
    assert "--batch-size 128 " in scaled.stdout


def test_gpu_script_refuses_a_machine_without_a_usable_gpu(tmp_path):
    # no nvidia-smi on the PATH (this machine, or one without an NVIDIA driver)
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("bash", "dirname"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (bare / tool).symlink_to(found)
    refused = _script(GPU_SCRIPT, "D", "DEU", "DEU6", path=str(bare))
    assert refused.returncode == 1 and "no nvidia-smi" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not refused.stdout
    # a driver that lists a GPU, but a torch that cannot use it (here: no CUDA at all)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Test GPU (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    refused = _script(GPU_SCRIPT, "D", "DEU", "DEU6", path=f"{tmp_path}:{os.environ['PATH']}",
                      PY=sys.executable)
    assert refused.returncode == 1 and "cannot use the GPU" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "finetune" not in refused.stdout


def test_batch_scale_must_be_a_whole_number():
    refused = _script(CPU_SCRIPT, "D", "DEU", "DEU6", DRY_RUN="1", BATCH_SCALE="0.5")
    assert refused.returncode == 2 and "BATCH_SCALE" in refused.stderr and not refused.stdout
