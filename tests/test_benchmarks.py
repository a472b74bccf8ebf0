"""Every benchmark runs at a tiny size, so a broken benchmark fails CI (the measured ratios at
these sizes mean nothing; ``make bench`` runs them at full size).

Each benchmark runs as ``python benchmarks/NAME.py ARGS`` in a fresh process of its own, forked
from a process that has already imported torch, open_clip and hqrs_geo (:mod:`fork_runner`), so
it does not pay those imports (seconds) again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fork_runner import run_script

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "data" / "ucm_val_samples" / "dataset.json"

SMOKE = {
    "tiling": (["--size", "512", "--repeat", "1"], "hqrs_geo / raw rasterio reads:"),
    "embed": (["--arch", "hqrs-mini-clip", "--size", "256", "--batch", "1"], "ratio end-to-end / bare:"),
    "caption": (["--arch", "hqrs-mini-coca", "--batch", "1", "--tokens", "2", "--engine-tiles", "2", "--repeats", "1"],
                "ratio engine / bare decoder"),
    "search": (["--n", "1000", "--dim", "32", "--clusters", "10", "--queries", "5", "--no-alternatives"],
               "targets:"),
    "search_archive": (["--archive", "4000", "--dim", "32", "--queries", "5", "--real-mix", "0",
                        "--param", "ivfpq.m=4", "--param", "ivfpq.train_size=2000", "--param", "ivfpq.opq=0"],
                       "targets at 4,000 x 32"),
    "demo_ap": ([], "mean AP"),
    "class_agreement": (["--dataset", str(SAMPLES)], "the caption names another class"),
    "fewshot": (["--draws", "1", "--shots", "1,3", "--timing", "2000", "--repeat", "1", "--heldout", "none",
                 "--calibrate", "no"], "few-shot vs text AP"),
    "finetune": (["--steps", "1", "--warmup", "0", "--batch", "2", "--dataset", str(SAMPLES),
                  "--arch", "hqrs-mini-clip", "--threads", "1"], "ratio"),
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


def _change_pairs(folder: Path, pairs: int = 2, size: int = 128) -> int:
    """Real PNG pairs for benchmarks/change.py: a smooth random texture as BEFORE, the same with
    a bright square in one 64 px tile as AFTER, the square as the change mask; returns the
    number of changed 64 px tiles."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("A", "B", "label"):
        (folder / sub).mkdir(parents=True)
    for i in range(pairs):
        coarse = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        before = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
        after, mask = before.copy(), np.zeros((size, size), np.uint8)
        y, x = 64 * (i % 2) + 8, 8
        after[y:y + 40, x:x + 40] = (250, 250, 240)
        mask[y:y + 40, x:x + 40] = 255
        Image.fromarray(before).save(folder / "A" / f"p{i}.png")
        Image.fromarray(after).save(folder / "B" / f"p{i}.png")
        Image.fromarray(mask).save(folder / "label" / f"p{i}.png")
    return pairs


def test_change_benchmark_runs(tmp_path):
    """The change benchmark on two tiny synthetic pairs: tiles, labels and scores line up (the
    only changed tile of each pair is ranked first by the pixel and the embedding scores)."""
    import json

    changed = _change_pairs(tmp_path / "set")
    out = tmp_path / "result.json"
    result = run_script(ROOT / "benchmarks" / "change.py", "--data", str(tmp_path), "--tile", "64",
                        "--json", str(out), cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "embedding z vs pixel |A-B|" in result.stdout, result.stdout[-2000:]
    assert "Traceback" not in result.stderr
    summary = json.loads(out.read_text())["sets"]["set"]
    assert (summary["pairs"], summary["tiles"]) == (2, 8)
    at5 = summary["metrics"]["5%"]
    assert at5["positives"] == changed
    for name in ("pixel |A-B|", "CVA", "embedding 1-cos [hqrs-mini-clip]", "embedding z [hqrs-mini-clip]"):
        assert at5["methods"][name]["AUC"] == 1.0, (name, at5["methods"][name])
        assert at5["methods"][name]["AP"] == 1.0, (name, at5["methods"][name])
        assert summary["intervals"][name]["AUC"] == [1.0, 1.0]  # pairs resampled: still perfect


def test_change_benchmark_metrics_match_sklearn():
    """The benchmark's AP and ROC AUC (ties included) agree with scikit-learn's."""
    import importlib.util

    from sklearn.metrics import average_precision_score, roc_auc_score

    spec = importlib.util.spec_from_file_location("change_bench", ROOT / "benchmarks" / "change.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.integers(0, 6, 50).astype(float)  # many ties
        positive = rng.random(50) < 0.3
        assert module.roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
        distinct = rng.random(50)  # sklearn's AP groups ties; compare without them
        assert module.average_precision(distinct, positive) == pytest.approx(
            average_precision_score(positive, distinct))
    z = module.robust_z(np.array([1.0, 2.0, 3.0, 10.0, 5.0, 5.0, 7.0]), np.array([0, 0, 0, 0, 1, 1, 1]))
    assert z[:4] == pytest.approx([(d - 2.5) / (1.4826 * 1.0) for d in (1, 2, 3, 10)])
    assert z[4:] == pytest.approx([0.0, 0.0, 2.0 / (1.2533 * 2 / 3)])  # MAD 0: the mean deviation
