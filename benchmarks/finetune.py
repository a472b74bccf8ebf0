"""Training throughput of ``hqrs-geo finetune`` on this machine: threads x precision x model, in one run.

    python benchmarks/finetune.py [--arch hqrs-mini-clip --arch hqrs-mini-coca] [--threads 1 --threads 2]
                                  [--precision fp32 --precision bf16] [--steps 25] [--warmup 4] [--batch 64]
                                  [--repeats 1] [--dataset ../shared/data/ucm/dataset_ucm.json] [--split val]
                                  [--device cpu] [--bare]

For every combination it runs :func:`hqrs_geo.training.finetune` (``threads`` and ``precision``
as the ``--threads`` / ``--precision`` options set them) for ``warmup + steps`` optimiser steps on
real images (decoded once beforehand; per step: caption sampling, tokenisation, batch
augmentation, normalisation, forward/backward/AdamW step, logit-scale clamp) and times the last
``steps`` of them from the trainer's own progress calls (the warm-up steps, image decoding and
the final checkpoint are not timed). It prints steps/min and images/s per combination, the ratio
to the first combination of the same model (1 thread fp32 by default), and the speed-up of the
last thread count over the first and of bf16 over fp32.

``--bare`` adds ``model(images, texts)`` + loss + backward + AdamW on one ready batch of random
tensors (the model's own cost), to show the share of time the loop adds.

The header says whether the CPU has bf16 units (AVX512-BF16, AMX), what ``--precision auto``
picks for training here, and the load on the machine before and after (other processes share
the cores: compare numbers of one run only).
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hqrs_geo.models.precision import autocast, autocast_dtype, cpu_bf16_units, precision_name  # noqa: E402
from hqrs_geo.progress import Progress  # noqa: E402
from hqrs_geo.training import FinetuneConfig, finetune  # noqa: E402
from hqrs_geo.training.trainer import _loss_fn, apply_threads, build_model, training_precision  # noqa: E402

SHARED_UCM = ROOT.parent / "shared" / "data" / "ucm" / "dataset_ucm.json"
SAMPLES = ROOT / "tests" / "data" / "ucm_val_samples" / "dataset.json"


class StepClock(Progress):
    """A silent progress sink that notes the time of every training step."""

    def __init__(self) -> None:
        super().__init__("none")
        self.times: list[float] = []

    def start(self, stage: str, total: int | None, message: str = "", unit: str = "tile", initial: int = 0) -> None:
        """Begin a stage; the training stage's start is the first time noted."""
        super().start(stage, total, message, unit, initial)
        if stage == "train":
            self.times.append(time.perf_counter())

    def advance(self, n: int = 1) -> None:
        """Count the steps and note when they ended."""
        super().advance(n)
        if self.stage == "train":
            self.times.append(time.perf_counter())


def loop_rate(config: FinetuneConfig, steps: int, warmup: int) -> float:
    """Optimiser steps per second of the real training loop over its last ``steps`` steps."""
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        run = FinetuneConfig(**{**config.__dict__, "output": tmp, "max_steps": warmup + steps, "val_split": None,
                                "save_every": 10 ** 9})
        finetune(run, progress=clock)
    times = clock.times[warmup:]  # from the end of the last warm-up step (or the start)
    return (len(times) - 1) / (times[-1] - times[0])


def bare_rate(config: FinetuneConfig, steps: int, warmup: int) -> float:
    """Steps per second of forward + loss + backward + step on one fixed random batch."""
    device = torch.device(config.device)
    apply_threads(config.threads)
    model, tokenizer, arch, kind, _ = build_model(config, device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    if kind == "clip":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    texts = tokenizer(["a river runs through a dense residential area with many trees"] * config.batch_size).to(device)
    labels = (torch.arange(config.batch_size) % 21).to(device)  # 21 classes, as UCM
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = autocast_dtype(device, config.precision)
    loss_fn = _loss_fn(kind, config)
    model.train()
    start = time.perf_counter()
    for i in range(steps + warmup):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device, amp):
            loss, _ = loss_fn(model(images, texts), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def machine_line(device: str) -> str:
    """CPU model, bf16 units, what ``--precision auto`` picks, and the load average."""
    units = cpu_bf16_units()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    auto = precision_name(training_precision(torch.device(device), "auto"))
    return (f"cpu {name}; {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} "
            f"cores usable; AVX512-BF16 {'yes' if 'avx512_bf16' in units else 'no'}, "
            f"AMX {'yes' if 'amx_bf16' in units else 'no'}; torch {torch.__version__} "
            f"(kernels {torch.backends.cpu.get_cpu_capability()}); training --precision auto on {device}: {auto}; "
            f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"ONEDNN_MAX_CPU_ISA {os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")


def load_line() -> str:
    """The 1-minute load average and the other training processes running now."""
    others = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) not in (os.getpid(), os.getppid()):  # not this run (or its timeout)
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "hqrs_geo finetune" in cmd or "hqrs-geo finetune" in cmd or "benchmarks/finetune.py" in cmd:
                others.append(proc.name)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load {load:.2f}, other training processes: {', '.join(others) or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", default=None,
                        help="model to train (repeatable; default hqrs-mini-clip and hqrs-mini-coca)")
    parser.add_argument("--threads", type=int, action="append", default=None,
                        help="torch threads (repeatable; default 1 and every usable core)")
    parser.add_argument("--precision", action="append", default=None, choices=("fp32", "bf16", "fp16"),
                        help="repeatable; default fp32 and bf16")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per combination")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--class-target", type=float, default=0.5, help="as the shipped hqrs-mini-clip recipe")
    parser.add_argument("--dataset", default=str(SHARED_UCM if SHARED_UCM.is_file() else SAMPLES))
    parser.add_argument("--split", default="val",
                        help="split to train on (default val: UCM's 210 val images decode fast; the step cost is "
                             "the same on any split)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all combinations, interleaved (on a shared machine the load drifts); "
                             "the table shows each combination's median")
    parser.add_argument("--bare", action="store_true", help="also time the bare model step on a random batch")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1, --warmup at least 0")
    split = args.split if Path(args.dataset) == SHARED_UCM else "val"
    batch = args.batch if Path(args.dataset) == SHARED_UCM else min(args.batch, 16)
    archs = args.arch or ["hqrs-mini-clip", "hqrs-mini-coca"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or sorted({1, cores})
    precisions = args.precision or ["fp32", "bf16"]
    combos = list(itertools.product(archs, threads, precisions))
    print(machine_line(args.device))
    print(f"batch {batch}, {args.warmup} warm-up + {args.steps} timed steps each, {args.repeats} round(s), "
          f"class target {args.class_target} (CLIP), data {args.dataset} ({split})")
    print(f"before: {load_line()}")
    rates: dict = {combo: [] for combo in combos}
    bares: dict = {combo: [] for combo in combos}
    for round_ in range(args.repeats):
        for arch, n, precision in combos:
            config = FinetuneConfig(dataset=args.dataset, output="", arch=arch, splits=(split,), batch_size=batch,
                                    device=args.device, precision=precision, seed=0, threads=n,
                                    class_target=args.class_target if "clip" in arch else 0.0)
            rates[arch, n, precision].append(loop_rate(config, args.steps, args.warmup))
            if args.bare:
                bares[arch, n, precision].append(bare_rate(config, args.steps, args.warmup))
            print(f"  round {round_ + 1}: {arch} {n} thread(s) {precision}: "
                  f"{rates[arch, n, precision][-1] * 60:.1f} steps/min ({load_line()})", flush=True)
    print(f"after: {load_line()}")
    rate = {combo: statistics.median(values) for combo, values in rates.items()}
    header = f"{'model':<16}{'threads':>8}{'precision':>10}{'steps/min':>11}{'img/s':>9}{'ratio':>7}"
    print(header + (f"{'spread':>9}" if args.repeats > 1 else "") + ("  bare img/s  loop/bare" if args.bare else ""))
    for arch, n, precision in combos:
        value = rate[arch, n, precision]
        line = (f"{arch:<16}{n:>8}{precision:>10}{value * 60:>11.1f}{value * batch:>9.1f}"
                f"{value / rate[arch, threads[0], precisions[0]]:>7.2f}")
        if args.repeats > 1:
            spread = rates[arch, n, precision]
            line += f"{(max(spread) - min(spread)) / value:>8.0%} "
        if args.bare:
            bare = statistics.median(bares[arch, n, precision])
            line += f"{bare * batch:>12.1f}{value / bare:>11.2f}"
        print(line)
    for arch in archs:
        parts = []
        if len(threads) > 1:
            many, one = threads[-1], threads[0]
            parts += [f"{many} vs {one} threads ({p}) x{rate[arch, many, p] / rate[arch, one, p]:.2f}"
                      for p in precisions]
        if "fp32" in precisions and "bf16" in precisions:
            parts += [f"bf16 vs fp32 ({n} thr) x{rate[arch, n, 'bf16'] / rate[arch, n, 'fp32']:.2f}" for n in threads]
        if parts:
            print(f"{arch}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
