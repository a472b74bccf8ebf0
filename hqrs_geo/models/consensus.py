"""Consensus among candidate captions of one image (minimum-Bayes-risk selection), without torch.

Decoding several captions of an image (beam search's finished hypotheses, greedy, seeded samples)
and keeping the one that agrees most with the others picks the caption the model is most sure of
*as a whole*, not only token by token: a sample that wandered off agrees with few others, while
wording that most decodings share is chosen. The agreement of two captions is an n-gram
similarity in the spirit of CIDEr-D, without its corpus statistics (one image's candidates are
no corpus, and a result must not depend on which other images share the batch):

* captions are lower-cased and split into words (runs of letters and digits; punctuation dropped);
* for each ``n`` in 1..``max_n`` (4), the cosine of the two captions' n-gram count vectors
  (0 when either caption has no n-gram of that order);
* the mean of those cosines, times a Gaussian length penalty ``exp(-(len a - len b)² / (2 σ²))``
  with ``σ = 6`` words, as CIDEr-D has.

A candidate's consensus score is its mean similarity to the *other* candidates of the pool
(duplicates are kept: a caption decoded several times is more likely, and each copy votes).
The pick is the candidate with the highest score; ties go to the earlier candidate.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

#: Longest n-gram compared.
MAX_N = 4
#: Standard deviation, in words, of the length penalty.
SIGMA = 6.0

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The words of a caption: lower-cased runs of letters and digits (punctuation dropped)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class _Profile:
    """One caption's n-gram counts (orders 1..max_n) with their Euclidean norms, and its length."""

    counts: tuple[Counter, ...]
    norms: tuple[float, ...]
    length: int


def _profile(tokens: Sequence[str], max_n: int) -> _Profile:
    counts = tuple(Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, max_n + 1))
    norms = tuple(math.sqrt(sum(c * c for c in count.values())) for count in counts)
    return _Profile(counts, norms, len(tokens))


def _similarity(a: _Profile, b: _Profile, sigma: float) -> float:
    total = 0.0
    for count_a, count_b, norm_a, norm_b in zip(a.counts, b.counts, a.norms, b.norms):
        if norm_a == 0.0 or norm_b == 0.0:
            continue
        small, large = (count_a, count_b) if len(count_a) <= len(count_b) else (count_b, count_a)
        dot = sum(c * large[gram] for gram, c in small.items() if gram in large)
        total += dot / (norm_a * norm_b)
    penalty = math.exp(-((a.length - b.length) ** 2) / (2.0 * sigma * sigma))
    return total / len(a.counts) * penalty


def _check(max_n: int, sigma: float) -> None:
    if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
        raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def similarity(a: str, b: str, max_n: int = MAX_N, sigma: float = SIGMA) -> float:
    """The n-gram similarity of two captions, in [0, 1] (1 for the same words, see the module docstring)."""
    _check(max_n, sigma)
    return _similarity(_profile(words(a), max_n), _profile(words(b), max_n), sigma)


def similarity_matrix(texts: Sequence[str], max_n: int = MAX_N, sigma: float = SIGMA) -> list[list[float]]:
    """Pairwise similarities of ``texts`` (symmetric; the diagonal is each text with itself)."""
    _check(max_n, sigma)
    profiles = [_profile(words(t), max_n) for t in texts]
    n = len(profiles)
    matrix = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            matrix[i][j] = matrix[j][i] = _similarity(profiles[i], profiles[j], sigma)
    return matrix


def consensus_scores(texts: Sequence[str], max_n: int = MAX_N, sigma: float = SIGMA) -> list[float]:
    """Each text's mean similarity to the other texts of the pool (0 for a pool of one)."""
    matrix = similarity_matrix(texts, max_n, sigma)
    n = len(texts)
    if n < 2:
        return [0.0] * n
    return [(sum(row) - row[i]) / (n - 1) for i, row in enumerate(matrix)]


def consensus_order(texts: Sequence[str], max_n: int = MAX_N, sigma: float = SIGMA) -> list[int]:
    """Indices of ``texts`` from the highest consensus score down (ties: the earlier text first)."""
    scores = consensus_scores(texts, max_n, sigma)
    return sorted(range(len(texts)), key=lambda i: (-scores[i], i))


def rank_candidates(texts: Sequence[str], max_n: int = MAX_N, sigma: float = SIGMA) -> list[str]:
    """The distinct texts of a candidate pool, the consensus pick first, then by falling score.

    Scores are computed over the whole pool, duplicates included (copies of one text have the same
    score, so a text's rank does not depend on which copy is kept)."""
    ranked: list[str] = []
    seen: set[str] = set()
    for i in consensus_order(texts, max_n, sigma):
        if texts[i] not in seen:
            seen.add(texts[i])
            ranked.append(texts[i])
    return ranked
