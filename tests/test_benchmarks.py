"""Every benchmark runs at a tiny size, so a broken benchmark fails CI (the measured ratios at
these sizes mean nothing; ``make bench`` runs them at full size).

Each benchmark runs as ``python benchmarks/NAME.py ARGS`` in a fresh process of its own, forked
from a process that has already imported torch, open_clip and hqrs_geo (:mod:`fork_runner`), so
it does not pay those imports (seconds) again.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from fork_runner import run_script

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
    "fewshot": (["--draws", "1", "--shots", "1,3", "--timing", "2000", "--repeat", "1", "--heldout", "none",
                 "--calibrate", "no"], "few-shot vs text AP"),
    "finetune": (["--steps", "1", "--warmup", "0", "--batch", "2", "--dataset", str(SAMPLES)], "ratio"),
    "mpgi": (["--tiles", "2", "--max-tokens", "8", "--batch", "2", "--threads", "1"], "pipeline/bare"),
    "scale": (["--scenes", "2", "--size", "256", "--batch", "1", "--memory-scenes", "1"], "ratio Ray / single-process"),
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs(name):
    args, expected = SMOKE[name]
    script = name if (ROOT / "benchmarks" / f"{name}.py").exists() else name.split("_")[0]  # search_archive: search.py
    result = run_script(ROOT / "benchmarks" / f"{script}.py", *args, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout, result.stdout[-2000:]
    assert "unavailable: SyntaxError" not in result.stdout and "Traceback" not in result.stderr
