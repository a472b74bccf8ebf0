"""How captions are decoded (:class:`DecodingConfig`), without importing torch.

The settings live apart from the decoder (:mod:`hqrs_geo.models.decoding`, which imports torch)
so code that only reads or checks them (command-line parsing, a Ray driver that hands them to
its workers, QGIS) does not load torch (about 1 GB of memory) to do so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import OptionError

METHODS = ("greedy", "beam", "sample", "consensus")

#: Defaults of the consensus method (chosen on UCM-captions val CIDEr among two settings, see
#: docs/models.md): 8 samples per image at temperature 0.7.
CONSENSUS_SAMPLES = 8
CONSENSUS_TEMPERATURE = 0.7

#: Settings read only by the consensus method (left out of :meth:`DecodingConfig.as_dict` for the
#: others, so the records and resume fingerprints of runs with those methods do not change).
CONSENSUS_ONLY = ("samples",)


#: Most sampled candidates per image for the consensus method.
MAX_SAMPLES = 64


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


@dataclass(frozen=True)
class DecodingConfig:
    """How captions are decoded.

    ``method``: ``"greedy"`` (argmax), ``"beam"`` (beam search with ``num_beams`` beams, ranked
    by length-normalised log-probability), ``"sample"`` (``temperature``, then ``top_k``
    (0 = off), then nucleus ``top_p`` (1.0 = off), drawn from a ``torch.Generator`` seeded with
    ``seed``; ``seed=None`` uses torch's global RNG) or ``"consensus"``: several captions are
    decoded per image (the ``num_beams`` best finished hypotheses of a beam search, the greedy
    caption when ``num_beams > 1``, and ``samples`` captions sampled as ``"sample"`` does) and the
    one most similar to the others is kept (n-gram consensus, see
    :mod:`hqrs_geo.models.consensus`). ``repetition_penalty`` (1.0 = off) is
    CTRL-style: the logits of tokens already generated are divided by it when positive and
    multiplied by it when negative. ``min_length`` and ``max_length`` count generated caption
    tokens (neither the start token nor the end-of-text token): end-of-text is forbidden until
    ``min_length`` tokens exist, and a caption is cut at ``max_length`` tokens.
    ``temperature=None`` (the default) is the method's default: 1.0, or
    :data:`CONSENSUS_TEMPERATURE` (0.7) for the consensus method's samples.
    """

    method: str = "beam"
    num_beams: int = 3
    top_k: int = 0
    top_p: float = 1.0
    temperature: float | None = None
    repetition_penalty: float = 1.0
    min_length: int = 5
    max_length: int = 30
    seed: int | None = 0
    samples: int = CONSENSUS_SAMPLES

    def __post_init__(self) -> None:
        if self.temperature is None:  # the method's default
            default = CONSENSUS_TEMPERATURE if self.method == "consensus" else 1.0
            object.__setattr__(self, "temperature", default)

    def as_dict(self) -> dict:
        """The settings as a plain JSON-serialisable dict (for run records); the consensus-only
        settings (``samples``) only for the consensus method."""
        values = asdict(self)
        if self.method != "consensus":
            for name in CONSENSUS_ONLY:
                values.pop(name)
        return values

    def validated(self) -> DecodingConfig:
        """Return ``self`` if every value is usable, else raise a one-line :class:`OptionError`."""
        if self.method not in METHODS:
            raise OptionError(f"decoding method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise OptionError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise OptionError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise OptionError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.temperature is None or not _is_number(self.temperature) or self.temperature <= 0:
            raise OptionError(f"temperature must be a number > 0, got {self.temperature!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise OptionError(f"repetition_penalty must be a number > 0 (1.0 = off), got {self.repetition_penalty!r}")
        if not _is_int(self.min_length) or self.min_length < 0:
            raise OptionError(f"min_length must be an integer >= 0, got {self.min_length!r}")
        if not _is_int(self.max_length) or self.max_length < 1:
            raise OptionError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        if self.min_length > self.max_length:
            raise OptionError(f"{self.min_length} is more than the maximum length {self.max_length}; give a smaller "
                              "minimum or a larger «max_length»", option="min_length")
        if self.seed is not None and not _is_int(self.seed):
            raise OptionError(f"seed must be an integer or None, got {self.seed!r}")
        if not _is_int(self.samples) or not 0 <= self.samples <= MAX_SAMPLES:
            raise OptionError(f"samples must be an integer in [0, {MAX_SAMPLES}], got {self.samples!r}")
        if self.method == "consensus" and self.num_beams + self.samples < 2:
            raise OptionError("consensus decoding needs at least two candidates per image (1 beam, 0 samples); "
                              "give 1 or more samples, or 2 or more beams", option="samples")
        return self
