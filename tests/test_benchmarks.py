"""Every benchmark runs at a tiny size, so a broken benchmark fails CI (the measured ratios at
these sizes mean nothing; ``make bench`` runs them at full size)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "data" / "ucm_val_samples" / "dataset.json"

SMOKE = {
    "tiling": (["--size", "512", "--repeat", "1"], "hqrs_geo / raw rasterio reads:"),
    "embed": (["--arch", "hqrs-mini-clip", "--size", "512", "--batch", "4"], "ratio end-to-end / bare:"),
    "caption": (["--arch", "hqrs-mini-coca", "--batch", "2", "--tokens", "4"], "speed-up"),
    "search": (["--n", "3000", "--dim", "32", "--clusters", "10", "--queries", "5", "--no-alternatives"],
               "targets:"),
    "search_archive": (["--archive", "20000", "--dim", "64", "--queries", "10", "--real-mix", "0",
                        "--param", "ivfpq.m=8", "--param", "ivfpq.train_size=10000", "--param", "ivfpq.opq=0"],
                       "targets at 20,000 x 64"),
    "demo_ap": ([], "mean AP"),
    "finetune": (["--steps", "1", "--batch", "8", "--dataset", str(SAMPLES)], "ratio"),
    "mpgi": (["--tiles", "2", "--max-tokens", "8", "--batch", "2"], "pipeline/bare"),
    "scale": (["--scenes", "2", "--size", "256", "--batch", "4", "--memory-scenes", "20"], "ratio Ray / single-process"),
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs(name):
    args, expected = SMOKE[name]
    script = name if (ROOT / "benchmarks" / f"{name}.py").exists() else name.split("_")[0]  # search_archive: search.py
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout, result.stdout[-2000:]
    assert "unavailable: SyntaxError" not in result.stdout and "Traceback" not in result.stderr
