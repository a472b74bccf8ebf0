"""Consensus decoding: the torch-free n-gram scorer (hqrs_geo.models.consensus) against a brute-force
reference, and the consensus method of the cached decoder on tiny random-weight CoCa models."""
from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_decoding import CAPTION_COCA, EOS, PAD, SOT, _build, registered  # noqa: F401  (fixture)

from hqrs_geo.errors import OptionError
from hqrs_geo.models.consensus import (
    MAX_N,
    SIGMA,
    consensus_order,
    consensus_scores,
    rank_candidates,
    similarity,
    similarity_matrix,
    words,
)
from hqrs_geo.models.decoding import (
    DecodingConfig,
    _decode_beams,
    _IncrementalCoCa,
    _Tokens,
    candidate_pools,
    caption_candidates,
    generate_captions,
    generate_tokens,
)

ROOT = Path(__file__).resolve().parents[2]


# -- the scorer against a brute-force reference ----------------------------------------------------


def _brute_similarity(a: str, b: str, max_n: int = MAX_N, sigma: float = SIGMA) -> float:
    """Dense n-gram count vectors over every n-gram of both captions, cosine per order, written out."""
    ta, tb = a.lower(), b.lower()
    for mark in ".,;:!?'\"-()":
        ta, tb = ta.replace(mark, " "), tb.replace(mark, " ")
    wa, wb = ta.split(), tb.split()
    total = 0.0
    for n in range(1, max_n + 1):
        grams_a = [tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)]
        grams_b = [tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)]
        vocabulary = sorted(set(grams_a) | set(grams_b))
        va = np.array([grams_a.count(g) for g in vocabulary], dtype=float)
        vb = np.array([grams_b.count(g) for g in vocabulary], dtype=float)
        if va.any() and vb.any():
            total += float(va @ vb) / (np.linalg.norm(va) * np.linalg.norm(vb))
    return total / max_n * math.exp(-((len(wa) - len(wb)) ** 2) / (2 * sigma ** 2))


def _random_captions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = ["a", "the", "river", "green", "trees", "many", "houses", "are", "near", "road", "of", "and"]
    texts = []
    for _ in range(count):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 14)))
        texts.append(rng.choice([text, text.capitalize() + " .", text.replace(" ", " , ", 1)]))
    return texts


@pytest.mark.parametrize("seed", range(4))
def test_scorer_matches_brute_force(seed):
    texts = _random_captions(12, seed) + ["", "River , river  RIVER.", "many green trees near the river and houses",
                                          "Many green trees near a river and many houses ."]
    matrix = similarity_matrix(texts)
    brute = [[_brute_similarity(a, b) for b in texts] for a in texts]
    np.testing.assert_allclose(matrix, brute, rtol=0, atol=1e-12)
    assert max(v for i, row in enumerate(brute) for j, v in enumerate(row) if i != j) > 0.4  # not all ~0
    n = len(texts)
    mean_others = [(sum(row) - row[i]) / (n - 1) for i, row in enumerate(brute)]
    np.testing.assert_allclose(consensus_scores(texts), mean_others, rtol=0, atol=1e-12)
    for max_n, sigma in ((1, 6.0), (2, 1.5), (6, 100.0)):
        assert similarity(texts[0], texts[1], max_n, sigma) == pytest.approx(
            _brute_similarity(texts[0], texts[1], max_n, sigma), abs=1e-12)


def test_scorer_properties():
    assert words("Many GREEN trees, near a river.") == ["many", "green", "trees", "near", "a", "river"]
    assert similarity("many green trees here .", "Many green trees here") == pytest.approx(1.0)
    assert similarity("many green trees", "many green trees") == pytest.approx(0.75)  # no 4-gram, as in CIDEr
    assert similarity("", "") == 0.0 and similarity("a river", "") == 0.0
    assert similarity("a river near houses", "houses near a river") < similarity("a river near houses",
                                                                                   "a river near the houses")
    short, long_ = "a river", "a river " + "with many green trees on both banks " * 2
    assert similarity(short, long_) < similarity(short, long_, sigma=1000.0)  # the length penalty
    assert consensus_scores(["only one"]) == [0.0] and consensus_order([]) == []
    with pytest.raises(ValueError, match="max_n"):
        similarity("a", "b", max_n=0)
    with pytest.raises(ValueError, match="sigma"):
        similarity("a", "b", sigma=math.nan)


def test_rank_candidates_picks_the_most_agreed_caption_and_dedupes():
    pool = ["a river with trees", "a stadium", "a river with green trees", "a river with trees", "a road"]
    assert rank_candidates(pool)[0] == "a river with trees"  # shares most with the others, and twice decoded
    assert sorted(rank_candidates(pool)) == sorted(set(pool))
    assert rank_candidates(["x y", "a b", "c d"]) == ["x y", "a b", "c d"]  # all tied at 0: pool order
    assert consensus_order(["a b", "a b"]) == [0, 1]


# -- the consensus method of the decoder -----------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread (see test_decoding.one_thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def coca(registered):  # noqa: F811
    return _build(CAPTION_COCA, eos_bias=22.0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _config(**kwargs) -> DecodingConfig:
    values = {"method": "consensus", "num_beams": 3, "samples": 4, "temperature": 1.5, "min_length": 1,
              "max_length": 10, "seed": 11}
    return DecodingConfig(**{**values, **kwargs})


def _plain_pick(pool: list[str]) -> str:
    """The candidate with the highest mean brute-force similarity to the others (first on ties)."""
    scores = [sum(_brute_similarity(c, o) for j, o in enumerate(pool) if j != i) / (len(pool) - 1)
              for i, c in enumerate(pool)]
    return pool[max(range(len(pool)), key=lambda i: (scores[i], -i))]


def test_consensus_pick_equals_the_plain_pairwise_pick(coca, images):
    model, tokenizer = coca
    config = _config()
    pools = candidate_pools(model, tokenizer, images, config)
    ranked = caption_candidates(model, tokenizer, images, config)
    assert all(len(pool) == 3 + 1 + 4 for pool in pools)
    assert sum(len(set(pool)) for pool in pools) >= 2 * len(pools)  # the pools disagree: a real choice
    assert [r[0] for r in ranked] == [_plain_pick(pool) for pool in pools]
    assert [sorted(r) for r in ranked] == [sorted(set(pool)) for pool in pools]
    assert generate_captions(model, tokenizer, images, config) == [r[0] for r in ranked]
    assert any(r[0] != pool[0] for r, pool in zip(ranked, pools))  # not always the best beam


def test_pool_holds_the_beams_greedy_and_samples(coca, images):
    """The pool is the beam caption and the next-best beam hypotheses, the greedy caption, and
    samples; samples of one token (top_k 1) are greedy."""
    model, tokenizer = coca
    config = _config()
    pools = candidate_pools(model, tokenizer, images, config)
    same = {k: v for k, v in config.as_dict().items() if k not in ("method", "samples")}
    for method, index in (("beam", 0), ("greedy", 3)):
        expected = generate_captions(model, tokenizer, images, DecodingConfig(**{**same, "method": method}))
        assert [pool[index] for pool in pools] == expected
    greedy = [pool[3] for pool in pools]
    assert [pool[4:] for pool in candidate_pools(model, tokenizer, images, _config(top_k=1))] == \
        [[g] * 4 for g in greedy]
    assert any(len(set(pool[4:])) > 1 for pool in pools)
    assert all(len(set(pool[:3])) == 3 for pool in pools)  # distinct beam hypotheses
    with torch.inference_mode():
        tokens = model._encode_image(images)[1]
        assert candidate_pools(model, tokenizer, images, config, image_embs=tokens) == pools


def test_collected_finals_keep_the_best_hypothesis(coca, images):
    """Collecting the finished hypotheses changes neither the returned best hypothesis (token ids)
    nor anything of a beam search without them; the finals are ranked by their scores."""
    model, _ = coca
    for num_beams in (1, 3):
        config = DecodingConfig(num_beams=num_beams, min_length=0, max_length=12)
        ids = _Tokens(SOT, EOS, (SOT, PAD))
        finals: list = [[] for _ in range(len(images))]
        with torch.no_grad():
            plain = _decode_beams(_IncrementalCoCa(model), images, config, ids)
            collected = _decode_beams(_IncrementalCoCa(model), images, config, ids, finals=finals)
        assert collected == plain == generate_tokens(model, images, config, SOT, EOS, PAD)
        for best, image_finals in zip(plain, finals):
            assert len(image_finals) >= num_beams
            top = max(image_finals, key=lambda f: f[0])
            assert top[1] == best


def test_consensus_is_seeded_and_independent_of_the_batch(coca, images):
    """The same seed gives the same pools; an image's candidates do not depend on the other images
    of its batch (the engine splits batches by memory and resumes runs)."""
    model, tokenizer = coca
    first = candidate_pools(model, tokenizer, images, _config(seed=3))
    assert candidate_pools(model, tokenizer, images[1:3], _config(seed=3)) == first[1:3]
    assert candidate_pools(model, tokenizer, images[4:], _config(seed=3)) == first[4:]
    assert candidate_pools(model, tokenizer, images, _config(seed=3)) == first
    other = candidate_pools(model, tokenizer, images, _config(seed=4))
    assert [p[:4] for p in other] == [p[:4] for p in first]  # beams and greedy do not depend on the seed
    assert [p[4:] for p in other] != [p[4:] for p in first]
    only_beams = candidate_pools(model, tokenizer, images, _config(samples=0))
    assert [p[:4] for p in only_beams] == [p[:4] for p in first] and all(len(p) == 4 for p in only_beams)


def test_consensus_settings():
    assert "samples" not in DecodingConfig().as_dict()  # records of the other methods are unchanged
    defaults = DecodingConfig(method="consensus").validated().as_dict()
    assert (defaults["samples"], defaults["temperature"]) == (8, 0.7)  # the consensus method's own defaults
    assert DecodingConfig().temperature == DecodingConfig(method="sample").temperature == 1.0
    assert DecodingConfig(method="consensus", temperature=1.2).temperature == 1.2
    for kwargs, match in (({"samples": -1}, "samples must"), ({"samples": 2.0}, "samples must"),
                          ({"samples": 65}, "samples must"),
                          ({"method": "consensus", "num_beams": 1, "samples": 0}, "at least two candidates")):
        with pytest.raises(OptionError, match=match) as err:
            DecodingConfig(**kwargs).validated()
        assert "\n" not in str(err.value)
    DecodingConfig(method="consensus", num_beams=1, samples=1).validated()
    DecodingConfig(method="beam", num_beams=1, samples=0).validated()  # samples only matter to consensus


def test_consensus_needs_the_text(coca, images):
    model, _ = coca
    with pytest.raises(OptionError, match="generate_captions or caption_candidates"):
        generate_tokens(model, images, _config(), SOT, EOS, PAD)
    assert caption_candidates(model, coca[1], images[:0], _config()) == []


def test_caption_task_candidates(tiny_coca_checkpoint):
    """The engine's caption task: candidates of the task's settings, the consensus pick first and
    equal to the consensus caption of the task; the same in decoder batches."""
    from tiny_models import TINY_COCA

    from hqrs_geo.engine.options import RunOptions
    from hqrs_geo.engine.tasks import CaptionTask
    from hqrs_geo.models.loader import load_model

    loaded = load_model(TINY_COCA, checkpoint=str(tiny_coca_checkpoint), device="cpu")
    images = torch.randint(0, 256, (5, 3, 80, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    config = DecodingConfig(method="consensus", num_beams=2, samples=3, max_length=8)
    task = CaptionTask(loaded, RunOptions(), config)
    captions = task(images)
    candidates = task.candidates(images)
    assert [c[0] for c in candidates] == captions
    assert all(len(c) == len(set(c)) >= 1 for c in candidates) and max(len(c) for c in candidates) >= 2
    task.candidate_limit = 2  # decoder batches of 2, 2 and 1
    assert task.candidates(images) == candidates
    beam_task = CaptionTask(loaded, RunOptions(), DecodingConfig(num_beams=2, samples=3, max_length=8))
    assert beam_task.candidates(images) == candidates  # the consensus pool of the settings, whatever the method
    assert task.describe()["decoding"]["method"] == "consensus"


def test_cli_decoding_options_accept_consensus():
    from hqrs_geo.cli import build_parser
    from hqrs_geo.cli.options import decoding_config

    parser = build_parser()
    for command in (["caption", "layer.gpkg"], ["eval", "caption", "data.json", "--model", "m"]):
        args = parser.parse_args([*command, "--decoding", "consensus", "--samples", "6", "--temperature", "0.5"])
        config = decoding_config(args)
        assert (config.method, config.samples, config.temperature) == ("consensus", 6, 0.5)
        defaults = decoding_config(parser.parse_args([*command, "--decoding", "consensus"]))
        assert (defaults.samples, defaults.temperature) == (8, 0.7)
        assert decoding_config(parser.parse_args(command)).temperature == 1.0
    result = subprocess.run([sys.executable, "-m", "hqrs_geo", "eval", "caption", "data.json", "--model", "m",
                             "--decoding", "consensus", "--beams", "1", "--samples", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "--samples" in result.stderr and "at least two candidates" in result.stderr
