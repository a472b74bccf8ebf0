r"""Zero-shot prompt variants side by side, and the calibration of zero-shot probabilities.

    python benchmarks/prompts.py --set ucm=../shared/data/ucm/dataset_ucm.json:val \\
        --set eurosat=DATA/val_eurosat.json:val --heldout siri=DATA/holdout_siri.json:test \\
        [--model hqrs-mini-clip] [--checkpoint FILE --arch ARCH] [--calibrate] [--json out.json]

Every set is a Karpathy-style JSON with a ``class`` per image and a split. Images are embedded
once per set; then, for each prompt variant, the class vectors are built and scored:

* ``P0``: the five templates of the first release, class names as words, no synonyms;
* ``P1``: the model's own template + :data:`hqrs_geo.models.prompts.ZERO_SHOT_TEMPLATES`, no synonyms;
* ``P2``: P1 + :data:`hqrs_geo.models.prompts.CLASS_SYNONYMS` (the shipped wording);
* ``Q0`` / ``Q1``: text search by class name (each class name ranks the set's images; mean AP
  over the classes), with the model's template only (``Q0``) or as classes are worded (``Q1``).

Top-1 and top-5 zero-shot accuracy (percent) and the class-name AP are printed per set, with the
mean over the ``--set`` sets (the selection sets) and, apart, the ``--heldout`` sets (reported,
never used to choose). ``--calibrate`` fits one softmax scale for the P2 class probabilities by
negative log-likelihood on the selection sets (a 1-D search over log-scale) and prints the
expected calibration error (15 bins) of every set with the model's own logit scale and with the
fitted scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The ensemble of the first release (P0), kept here to reproduce its numbers.
FIRST_RELEASE_TEMPLATES = (
    "a satellite image of {}.",
    "an aerial photograph of {}.",
    "a remote sensing image of {}.",
    "an aerial view of {}.",
    "{} seen from above.",
)


def parse_set(text: str) -> tuple[str, str, str]:
    """``name=path:split`` -> ``(name, path, split)``."""
    name, _, rest = text.partition("=")
    path, _, split = rest.rpartition(":")
    if not name or not path or not split:
        raise SystemExit(f"--set/--heldout {text!r}: give name=path.json:split")
    return name, path, split


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Non-interpolated AP of a ranking by descending score."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    return float((np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)).mean())


def softmax(logits: np.ndarray, scale: float) -> np.ndarray:
    """Row softmax of ``logits * scale``."""
    z = (logits - logits.max(axis=1, keepdims=True)) * scale
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, scale: float) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.log(softmax(logits, scale)[np.arange(len(labels)), labels] + 1e-12).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error (percent) of the top-1 confidence, equal-width bins."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return 100.0 * total


def fit_scale(parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The softmax scale minimising the mean NLL over every (logits, labels) part (each part
    weighs the same), by golden-section search over log-scale in [1, 1000]."""
    def loss(log_scale: float) -> float:
        return float(np.mean([nll(logits, labels, float(np.exp(log_scale))) for logits, labels in parts]))

    low, high = 0.0, np.log(1000.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if loss(a) < loss(b):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="selection set: name=path.json:split")
    parser.add_argument("--heldout", action="append", default=[], help="held-out set (reported only)")
    parser.add_argument("--model", default="hqrs-mini-clip")
    parser.add_argument("--checkpoint")
    parser.add_argument("--arch")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()

    from hqrs_geo.evaluation import image_embeddings, load_karpathy, zeroshot_metrics
    from hqrs_geo.models.encode import class_vectors, ensemble_templates, query_vectors, text_vectors
    from hqrs_geo.models.loader import load_model
    from hqrs_geo.models.prompts import class_prompt_name
    from hqrs_geo.models.zeroshot import zero_shot_scale

    loaded = load_model(args.model, args.checkpoint, args.arch, device="cpu")
    own = ensemble_templates(loaded)
    variants = {
        "P0": lambda classes: text_vectors(loaded, [class_prompt_name(c) for c in classes],
                                           list(FIRST_RELEASE_TEMPLATES)),
        "P1": lambda classes: class_vectors(loaded, classes, own, synonyms=False),
        "P2": lambda classes: class_vectors(loaded, classes, own, synonyms=True),
    }
    queries = {
        "Q0": lambda classes: text_vectors(loaded, [class_prompt_name(c) for c in classes], [loaded.spec.template]),
        "Q1": lambda classes: query_vectors(loaded, [class_prompt_name(c) for c in classes]),
    }
    sets = [(*parse_set(s), "selection") for s in args.set] + [(*parse_set(s), "held out") for s in args.heldout]
    results: dict = {"model": args.model, "checkpoint": args.checkpoint, "templates": own, "sets": {}}
    cache: dict = {}
    for name, path, split, role in sets:
        records = load_karpathy(path, split)
        classes = sorted({r["class"] for r in records})
        labels = np.array([classes.index(r["class"]) for r in records])
        images = image_embeddings(loaded, [r["image"] for r in records])
        row: dict = {"role": role, "images": len(records), "classes": len(classes)}
        for key, build in variants.items():
            vectors = build(classes)
            row[key] = zeroshot_metrics(images, vectors, labels)
            if key == "P2":
                cache[name] = (images @ vectors.T, labels, role)
        for key, build in queries.items():
            scores = images @ build(classes).T
            row[key] = {"AP": float(np.mean([average_precision(scores[:, c], labels == c)
                                              for c in range(len(classes))]))}
        results["sets"][name] = row
        print(f"{name:10} ({role}, {len(records)} images, {len(classes)} classes): "
              + "  ".join(f"{k} top1 {row[k]['top1']:.2f} top5 {row[k]['top5']:.2f}" for k in variants)
              + "  " + "  ".join(f"{k} AP {row[k]['AP']:.4f}" for k in queries), flush=True)
    selection = [n for n, row in results["sets"].items() if row["role"] == "selection"]
    if selection:
        results["selection_mean"] = {k: float(np.mean([results["sets"][n][k]["top1"] for n in selection]))
                                     for k in variants}
        results["selection_mean"].update({k: float(np.mean([results["sets"][n][k]["AP"] for n in selection]))
                                          for k in queries})
        print("selection mean: " + "  ".join(f"{k} {v:.4f}" for k, v in results["selection_mean"].items()))
    if args.calibrate and selection:
        own_scale = zero_shot_scale(loaded)
        fitted = fit_scale([(cache[n][0], cache[n][1]) for n in selection])
        results["calibration"] = {"model_scale": own_scale, "fitted_scale": fitted, "ece": {}}
        for name, (logits, labels, role) in cache.items():
            before, after = ece(softmax(logits, own_scale), labels), ece(softmax(logits, fitted), labels)
            results["calibration"]["ece"][name] = {"role": role, "model_scale": before, "fitted_scale": after,
                                                   "nll_model": nll(logits, labels, own_scale),
                                                   "nll_fitted": nll(logits, labels, fitted)}
            print(f"calibration {name:10} ({role}): ECE {before:.2f} % at scale {own_scale:.1f} -> "
                  f"{after:.2f} % at {fitted:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
