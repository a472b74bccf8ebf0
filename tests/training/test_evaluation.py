"""Retrieval and zero-shot metrics against loops written out by hand, and the CLI on UCM."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import UCM_SAMPLES, run_cli
from tiny_models import TINY_CLIP

from hqrs_geo.evaluation import load_karpathy, retrieval_metrics, zeroshot_metrics
from hqrs_geo.models.encode import normalise

UCM = UCM_SAMPLES  # UCM val images with their UCM-captions, one per class (21), committed in tests/data


def reference_recall(sims, owners, k):
    i2t = np.mean([any(owners[t] == i for t in np.argsort(-sims[i], kind="stable")[:k]) for i in range(sims.shape[0])])
    t2i = np.mean([owners[t] in np.argsort(-sims[:, t], kind="stable")[:k] for t in range(sims.shape[1])])
    return 100 * i2t, 100 * t2i


def test_retrieval_metrics_match_reference():
    rng = np.random.default_rng(0)
    images = normalise(rng.normal(size=(30, 16)))
    owners = np.repeat(np.arange(30), 3)
    texts = normalise(images[owners] + rng.normal(scale=1.2, size=(90, 16)))
    got = retrieval_metrics(images, texts, owners)
    sims = images @ texts.T
    for k in (1, 5, 10):
        i2t, t2i = reference_recall(sims, owners, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t) and got[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["mR"] < 100
    perfect = retrieval_metrics(images, images[owners], owners)
    assert perfect["i2t_R@1"] == 100 and perfect["t2i_R@1"] == 100  # every caption finds its own image first


def test_zeroshot_metrics_match_reference():
    rng = np.random.default_rng(1)
    classes = normalise(rng.normal(size=(8, 12)))
    labels = rng.integers(0, 8, 50)
    images = normalise(classes[labels] + rng.normal(scale=0.8, size=(50, 12)))
    got = zeroshot_metrics(images, classes, labels)
    sims = images @ classes.T
    assert got["top1"] == pytest.approx(100 * np.mean(sims.argmax(1) == labels))
    assert got["top5"] == pytest.approx(100 * np.mean([labels[i] in np.argsort(-sims[i])[:5] for i in range(50)]))


def test_eval_cli_on_ucm(tmp_path, tiny_clip_checkpoint):
    records = load_karpathy(str(UCM), "val", limit=21)
    assert len(records) == 21 and all(len(r["captions"]) == 5 for r in records)
    out = tmp_path / "r.json"
    result = run_cli("eval", "retrieval", UCM, "--model", TINY_CLIP, "--checkpoint", tiny_clip_checkpoint,
                     "--device", "cpu", "--limit", "21", "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 21 and report["texts"] == 105 and 0 <= report["mR"] <= 100
    result = run_cli("eval", "zeroshot", UCM, "--model", TINY_CLIP, "--checkpoint", tiny_clip_checkpoint,
                     "--device", "cpu", "--limit", "40", "-q", "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["classes"] >= 2 and 0 <= report["top1"] <= report["top5"] <= 100 and "views" not in report
    result = run_cli("eval", "zeroshot", UCM, "--model", TINY_CLIP, "--checkpoint", tiny_clip_checkpoint,
                     "--device", "cpu", "--limit", "40", "-q", "--json", out, "--views", "16")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["views"] == 16
    bad = run_cli("eval", "retrieval", tmp_path / "none.json", "--model", TINY_CLIP,
                  "--checkpoint", tiny_clip_checkpoint)
    assert bad.returncode == 2 and "file not found" in bad.stderr


@pytest.fixture
def one_meteor(monkeypatch):
    """Every METEOR scorer caption_metrics makes in this test is one real METEOR process: each
    new one is a Java process that loads METEOR's paraphrase table (about 7 CPU seconds); the
    scorer keeps no state between the sets it scores."""
    from pycocoevalcap.meteor import meteor

    scorer = meteor.Meteor()
    monkeypatch.setattr(meteor, "Meteor", lambda: scorer)
    yield scorer
    scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()


def test_caption_metrics_behave(one_meteor):
    from hqrs_geo.evaluation import caption_metrics

    refs = {"1": ["There is a piece of farmland .", "It is a piece of cropland ."],
            "2": ["Many buildings are next to a road .", "Some houses along a street ."]}
    perfect = caption_metrics(refs, {"1": "There is a piece of farmland .", "2": "Many buildings are next to a road ."})
    poor = caption_metrics(refs, {"1": "a river with boats", "2": "an airplane on a runway"})
    assert perfect["BLEU-1"] == pytest.approx(100, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(100, abs=1e-6)
    for metric in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert perfect[metric] > poor[metric], metric


def test_eval_caption_cli(tmp_path, tiny_coca_checkpoint):
    from tiny_models import TINY_COCA

    out = tmp_path / "c.json"
    result = run_cli("eval", "caption", UCM, "--model", TINY_COCA, "--checkpoint", tiny_coca_checkpoint,
                     "--device", "cpu", "--limit", "6", "--decoding", "greedy", "--max-length", "8", "-q",
                     "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 6 and {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(report)
    assert all(isinstance(c, str) and c for c in report["examples"])
