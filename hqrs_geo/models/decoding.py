"""Batched caption decoding for open_clip CoCa models, with a key/value cache.

open_clip's ``CoCa.generate`` needs ``transformers.BeamSearchScorer`` (gone in transformers 5)
and re-runs the whole model, image encoder included, for every generated token. This module
decodes over CoCa's towers directly:

* the image is encoded once (``model._encode_image``) and the cross-attention keys/values of
  every decoder layer are computed once per image from its ``image_embs``;
* each step runs only the newest token through the causal text tower and the multimodal
  decoder, attending to cached self-attention keys/values of the earlier positions;
* finished rows are dropped from the batch, so they stop costing (and contributing) anything.

Why the cache is exact (up to float rounding) for open_clip's towers:

* the text tower is causal, so a position never sees later ones; the CLS embedding that CoCa
  appends at the *end* of the sequence is therefore invisible to the caption positions, and
  its token outputs (``tokens = x[:, :-1]``, no ``ln_final`` when a CLS token is embedded) are
  those of a plain causal transformer;
* the text tower's additive pad/CLS mask only hides keys next to pad tokens. Decoding never
  emits the pad id (nor the start token): CoCa's caption loss ignores pad targets and never has
  the start token as a target, so a trained model gives them no meaningful probability, and
  open_clip itself treats an emitted pad as end-of-sequence. With no pad in the prefix the mask
  keeps every key, and only the causal mask remains, which the cache reproduces by construction;
* positions are absolute (``positional_embedding[t]`` for the token at position ``t``, the start
  token being position 0), and the decoder's self-attention is causal with cross-attention to
  ``image_embs`` only.

Scoring of beam search: hypotheses are ranked by **length-normalised log-probability**, the
sum of the log-probabilities of the generated tokens (the end-of-text token included when it is
emitted; with ``repetition_penalty`` the log-softmax of the penalised logits) divided by the
number of those tokens (a length penalty exponent of 1, like ``transformers``' default). Running
beams all have the same length, so they are expanded and pruned by their summed log-probability.
A search stops early only when no running beam can still beat the best finished hypothesis:
log-probabilities are <= 0, so a running beam with sum ``S`` can at best reach ``S / max_length``.

Consensus decoding (``method="consensus"``, :func:`caption_candidates`): each image gets a pool of
candidates, its ``num_beams`` best finished beam hypotheses (the search then runs until no live
beam can beat the ``num_beams``-th best, not only the best), the greedy caption and ``samples``
seeded samples, each kind decoded in one batch over all images from one pass of the image tower;
the caption with the highest mean n-gram similarity to the rest of the pool is kept
(:mod:`hqrs_geo.models.consensus`, a minimum-Bayes-risk choice). It costs about the sum of its
decodings (beam + greedy + ``samples`` sampled rows per image).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError
from .consensus import rank_candidates
from .decoding_options import METHODS, DecodingConfig  # noqa: F401  (re-exported: the settings live there)

#: An open_clip CoCa (its towers are reached by attribute, so it is typed loosely).
CoCaModel = Any


# A token picker: (processed logits [rows, vocab], float32; each row's original row index [rows];
# the step) -> chosen ids [rows].
Chooser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Logit processing (shared by the cached decoder and the naive reference)
# ----------------------------------------------------------------------------------------------


def _banned_ids(model: CoCaModel, sot_id: int, eos_id: int, pad_id: int | None) -> list[int]:
    """Token ids that are never generated: the start token and the pad id(s) (not end-of-text)."""
    banned = {int(sot_id)}
    if pad_id is not None:
        banned.add(int(pad_id))
    text_pad = getattr(getattr(model, "text", None), "pad_id", None)
    if text_pad is not None:  # the id the text tower's attention mask treats as padding
        banned.add(int(text_pad))
    banned.discard(int(eos_id))
    return sorted(banned)


def _forbid(scores: torch.Tensor, step: int, min_length: int, eos_id: int, banned: Sequence[int]) -> torch.Tensor:
    """In place: -inf for banned ids, and for end-of-text while fewer than ``min_length`` tokens exist."""
    if banned:
        scores[:, list(banned)] = -math.inf
    if step < min_length:
        scores[:, eos_id] = -math.inf
    return scores


def _repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty, in place, on the logits of the tokens in ``history`` [rows, t]."""
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter_(1, history, seen)


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (0 = all), then the smallest set of mass >= ``top_p``."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the most likely token always has mass_before == 0
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _temperature(config: DecodingConfig) -> float:
    """The sampling temperature (``DecodingConfig`` fills in the method's default for ``None``)."""
    return 1.0 if config.temperature is None else config.temperature


def _greedy_chooser() -> Chooser:
    """Pick the most likely token."""
    return lambda logits, *_: logits.argmax(dim=-1)


def _sampling_chooser(config: DecodingConfig, device: torch.device) -> Chooser:
    """Pick a token at random after temperature, top-k and top-p, from a seeded generator."""
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)

    def choose(logits: torch.Tensor, *_: Any) -> torch.Tensor:
        logits = _top_k_top_p(logits / _temperature(config), config.top_k, config.top_p)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return choose


def _slot_sampling_chooser(config: DecodingConfig, device: torch.device, slots: int) -> Chooser:
    """Sampling (temperature, top-k, top-p as :func:`_sampling_chooser`) whose draws do not depend
    on the other rows of the batch: the Gumbel-max trick, ``argmax(logits + G)``, with Gumbel noise
    ``G`` drawn per step from a generator seeded with ``(seed, step)`` for ``slots`` sample slots;
    a row takes the noise of its slot (its original row index modulo ``slots``). So the ``j``-th
    sample of an image is the same whichever images share its batch (``seed=None``: torch's RNG)."""
    def choose(logits: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        logits = _top_k_top_p(logits / _temperature(config), config.top_k, config.top_p)
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed((config.seed * 1_000_003 + step) % 2**63)
        uniform = torch.rand((slots, logits.shape[-1]), generator=generator, device=device)
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(uniform.dtype).tiny)))
        return (logits + gumbel[rows % slots]).argmax(dim=-1)

    return choose


# ----------------------------------------------------------------------------------------------
# The cached towers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: CoCaModel) -> Iterator[None]:
    """Run with ``model.eval()`` and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _unsupported(reason: str) -> OptionError:
    return OptionError(f"cached caption decoding needs an open_clip CoCa model: {reason}")


def _check_attention_block(block: Any, where: str) -> None:
    """The incremental attention reimplements open_clip's ``ResidualAttentionBlock`` exactly."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not hasattr(block, "ln_1") or not hasattr(block, "mlp"):
        raise _unsupported(f"{where} uses {type(block).__name__} blocks, not ResidualAttentionBlock")
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise _unsupported(f"{where} attention has separate/extra key-value projections")


def _check_supported(model: CoCaModel) -> None:
    """Raise a one-line OptionError unless ``model`` has the CoCa towers this decoder understands."""
    text, decoder = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if not hasattr(model, "_encode_image") or text is None or decoder is None:
        raise _unsupported(f"{type(model).__name__} has no _encode_image/text/text_decoder")
    if not hasattr(text, "token_embedding") or not hasattr(text, "transformer"):
        raise _unsupported("the text tower is not open_clip's TextTransformer (HF text towers are not supported)")
    if getattr(text, "attn_mask", None) is None:
        raise _unsupported("the text tower is not causal (no_causal_mask)")
    if not getattr(text, "output_tokens", False):
        raise _unsupported("the text tower does not output token embeddings")
    for block in text.transformer.resblocks:
        _check_attention_block(block, "the text tower")
    for block in decoder.resblocks:
        _check_attention_block(block, "the multimodal decoder")
    for block in decoder.cross_attn:
        _check_attention_block(block, "the multimodal decoder")
        if not hasattr(block, "ln_1_kv"):
            raise _unsupported("a cross-attention block has no ln_1_kv")


def max_caption_length(model: CoCaModel) -> int:
    """The most tokens one caption can have with ``model`` (its text context length)."""
    text_positions = model.text.positional_embedding.shape[0] - (1 if model.text.cls_emb is not None else 0)
    return int(min(text_positions, model.text_decoder.context_length))


@dataclass
class _State:
    """Per-batch decoding state.

    ``cross``: [decoder layers, 2 (k/v), images, heads, image tokens, head dim], computed once.
    ``text_kv`` / ``dec_kv``: [layers, 2, rows, heads, capacity, head dim] self-attention caches
    (allocated at the first step, in the dtype the projections produce, e.g. bf16 under
    autocast). Rows are grouped by image: row ``r`` belongs to image ``r // (rows / images)``.
    """

    cross: torch.Tensor
    capacity: int
    text_kv: torch.Tensor | None = None
    dec_kv: torch.Tensor | None = None
    length: int = 0


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows, width] -> [rows, heads, head dim]."""
    return x.view(x.shape[0], heads, x.shape[1] // heads)


class _IncrementalCoCa:
    """One-token-at-a-time forward of a CoCa's text tower and multimodal decoder."""

    def __init__(self, model: CoCaModel):
        _check_supported(model)
        self.model = model
        self.text = model.text
        self.decoder = model.text_decoder
        self.text_blocks = list(self.text.transformer.resblocks)
        self.self_blocks = list(self.decoder.resblocks)
        self.cross_blocks = list(self.decoder.cross_attn)
        # With an appended CLS token the text tower returns its transformer outputs without
        # ln_final (that norm only applies to the pooled CLS output); otherwise ln_final(x).
        self.text_final = None if self.text.cls_emb is not None else self.text.ln_final
        self.max_length = max_caption_length(model)
        self.image_embs: torch.Tensor | None = None  # the images' tower tokens, when computed elsewhere

    # -- setup ---------------------------------------------------------------------------------

    def start(self, images: torch.Tensor, capacity: int) -> _State:
        """Encode ``images`` once (unless :attr:`image_embs` already holds their image tower
        tokens) and precompute every decoder layer's cross-attention k/v."""
        image_embs = self.image_embs
        if image_embs is None:
            visual_dtype = next(self.model.visual.parameters()).dtype
            if images.is_floating_point() and images.dtype != visual_dtype:
                images = images.to(visual_dtype)
            _, image_embs = self.model._encode_image(images)
        layers = [self._cross_kv(block, image_embs) for block in self.cross_blocks]
        return _State(cross=torch.stack(layers), capacity=capacity)

    @staticmethod
    def _cross_kv(block: Any, image_embs: torch.Tensor) -> torch.Tensor:
        """[2, images, heads, image tokens, head dim] keys/values of ``ln_1_kv(image_embs)``."""
        attn: nn.MultiheadAttention = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        bias = attn.in_proj_bias[width:] if attn.in_proj_bias is not None else None
        kv = F.linear(block.ln_1_kv(image_embs), attn.in_proj_weight[width:], bias)
        n_images, n_tokens = image_embs.shape[:2]
        kv = kv.view(n_images, n_tokens, 2, heads, width // heads)
        return kv.permute(2, 0, 3, 1, 4).contiguous()

    # -- one step ------------------------------------------------------------------------------

    def step(self, state: _State, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [rows] at the next position and return the logits [rows, vocab]."""
        pos = state.length
        if pos >= state.capacity:
            raise RuntimeError("decoding state is full")
        cast = self.text.transformer.get_cast_dtype()
        x = self.text.token_embedding(tokens).to(cast) + self.text.positional_embedding[pos].to(cast)
        for layer, block in enumerate(self.text_blocks):
            q, k, v = self._qkv(block, x)
            if state.text_kv is None:
                state.text_kv = self._new_cache(len(self.text_blocks), k, state.capacity)
            x = self._self_attention(block, x, state.text_kv[layer], pos, q, k, v)
        if self.text_final is not None:
            x = self.text_final(x)
        for layer, (block, cross) in enumerate(zip(self.self_blocks, self.cross_blocks)):
            q, k, v = self._qkv(block, x)
            if state.dec_kv is None:
                state.dec_kv = self._new_cache(len(self.self_blocks), k, state.capacity)
            x = self._self_attention(block, x, state.dec_kv[layer], pos, q, k, v)
            x = self._cross_attention(cross, x, state.cross[layer])
        state.length = pos + 1
        out = self.decoder.ln_final(x)
        if self.decoder.text_projection is not None:
            out = out @ self.decoder.text_projection
        return out

    @staticmethod
    def _new_cache(layers: int, k: torch.Tensor, capacity: int) -> torch.Tensor:
        """A [layers, 2, rows, heads, capacity, head dim] cache in the dtype ``k`` was computed in."""
        rows, heads, head_dim = k.shape
        return torch.zeros((layers, 2, rows, heads, capacity, head_dim), dtype=k.dtype, device=k.device)

    @staticmethod
    def _qkv(block: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value [rows, heads, head dim] of ``ln_1(x)`` for a self-attention block."""
        attn: nn.MultiheadAttention = block.attn
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (_split_heads(part, attn.num_heads) for part in qkv.chunk(3, dim=-1))
        return q, k, v

    @staticmethod
    def _self_attention(block: Any, x: torch.Tensor, kv: torch.Tensor, pos: int,
                        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Finish a causal self-attention block for the newest position, caching its k/v."""
        attn: nn.MultiheadAttention = block.attn
        kv[0, :, :, pos] = k
        kv[1, :, :, pos] = v
        # Only positions <= pos are in the cache, which is exactly the causal mask.
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2).to(kv.dtype), kv[0, :, :, : pos + 1], kv[1, :, :, : pos + 1])
        out = attn.out_proj(out.reshape(x.shape[0], attn.embed_dim))
        x = x + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    @staticmethod
    def _cross_attention(block: Any, x: torch.Tensor, cross_kv: torch.Tensor) -> torch.Tensor:
        """Cross-attention block: the rows of each image (its beams) query that image's k/v."""
        attn: nn.MultiheadAttention = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        bias = attn.in_proj_bias[:width] if attn.in_proj_bias is not None else None
        q = F.linear(block.ln_1(x), attn.in_proj_weight[:width], bias)
        n_images, rows = cross_kv.shape[1], x.shape[0]
        # [rows, width] -> [images, heads, rows per image, head dim]: beams of an image become
        # extra queries against the same keys, so image k/v are never copied per beam.
        q = q.view(n_images, rows // n_images, heads, width // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.to(cross_kv.dtype), cross_kv[0], cross_kv[1])
        out = attn.out_proj(out.transpose(1, 2).reshape(rows, width))
        x = x + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    # -- batch bookkeeping ---------------------------------------------------------------------

    @staticmethod
    def select(state: _State, rows: torch.Tensor, images: torch.Tensor | None = None) -> None:
        """Keep/reorder cache rows (``rows``: source row per new row) and, optionally, images."""
        if images is not None:
            state.cross = state.cross.index_select(2, images)
        n = state.length
        for name in ("text_kv", "dec_kv"):
            cache = getattr(state, name)
            if cache is None:
                continue
            if rows.numel() == cache.shape[2]:  # same batch, reordered beams: copy the filled part
                filled = cache.narrow(4, 0, n)
                filled.copy_(filled.index_select(2, rows))
            else:  # fewer rows: a compacted cache
                setattr(state, name, cache.index_select(2, rows))


# ----------------------------------------------------------------------------------------------
# Decoding loops
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tokens:
    """Special ids for one decoding run."""

    sot: int
    eos: int
    banned: tuple[int, ...]


def _decode_rows(stepper: _IncrementalCoCa, images: torch.Tensor, config: DecodingConfig,
                 ids: _Tokens, choose: Chooser) -> list[list[int]]:
    """Greedy or sampled decoding, one row per image; finished rows leave the batch."""
    n, device, max_length = images.shape[0], images.device, config.max_length
    state = stepper.start(images, capacity=max_length)
    alive = torch.arange(n, device=device)  # original index of each row still decoding
    history = torch.empty((n, max_length), dtype=torch.long, device=device)
    tokens = torch.full((n,), ids.sot, dtype=torch.long, device=device)
    results: list[list[int]] = [[] for _ in range(n)]
    for t in range(max_length):
        logits = stepper.step(state, tokens).float()
        _repetition_penalty(logits, history[:, :t], config.repetition_penalty)
        _forbid(logits, t, config.min_length, ids.eos, ids.banned)
        tokens = choose(logits, alive, t)
        history[:, t] = tokens
        ended = tokens == ids.eos
        if t + 1 == max_length:
            ended = torch.ones_like(ended)
        if not bool(ended.any()):
            continue
        for row in ended.nonzero().flatten().tolist():
            length = t if int(tokens[row]) == ids.eos else t + 1
            results[int(alive[row])] = history[row, :length].tolist()
        keep = (~ended).nonzero().flatten()
        if keep.numel() == 0:
            break
        alive, history, tokens = alive[keep], history[keep], tokens[keep]
        stepper.select(state, keep, images=keep)
    return results


def _decode_beams(stepper: _IncrementalCoCa, images: torch.Tensor, config: DecodingConfig,
                  ids: _Tokens, finals: list[list[tuple[float, list[int]]]] | None = None) -> list[list[int]]:
    """Beam search over images x beams; returns each image's best length-normalised hypothesis.

    Every step, the ``num_beams`` best (beam, token) continuations of an image (by summed
    log-probability) are kept. A continuation that is end-of-text becomes a finished
    hypothesis and its slot stays empty for that step (it is refilled from the live beams at the
    next step); at ``max_length`` the live beams are finished as they are. With one beam this is
    exactly greedy decoding. An image leaves the batch once it has no live beam or no live beam
    can beat its best finished hypothesis (see the module docstring).

    ``finals`` (one list per image): every finished hypothesis is appended to its image's list as
    ``(length-normalised log-probability, ids)``, and an image stays in the search until no live
    beam can beat its ``num_beams``-th best finished hypothesis (so up to ``num_beams`` of them
    are complete); the best hypothesis returned is the same as without ``finals``.
    """
    n, device, max_length, beams = images.shape[0], images.device, config.max_length, config.num_beams
    state = stepper.start(images, capacity=max_length)
    alive = torch.arange(n, device=device)
    history = torch.empty((n * beams, max_length), dtype=torch.long, device=device)
    tokens = torch.full((n * beams,), ids.sot, dtype=torch.long, device=device)
    scores = torch.full((n, beams), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    best = torch.full((n,), -math.inf, device=device)
    kth = torch.full((n,), -math.inf, device=device)  # with finals: each image's num_beams-th best score
    results: list[list[int]] = [[] for _ in range(n)]
    for t in range(max_length):
        logits = stepper.step(state, tokens).float()
        _repetition_penalty(logits, history[:, :t], config.repetition_penalty)
        logp = _forbid(F.log_softmax(logits, dim=-1), t, config.min_length, ids.eos, ids.banned)
        m, vocab = scores.shape[0], logp.shape[-1]
        top, flat = (scores.view(-1, 1) + logp).view(m, beams * vocab).topk(beams, dim=1)
        source = flat // vocab + torch.arange(m, device=device).unsqueeze(1) * beams  # [m, beams] rows
        token = flat % vocab
        finite = torch.isfinite(top)
        last = t + 1 == max_length
        is_eos = finite & (token == ids.eos)
        # Finished now: eos continuations (t tokens + eos) or, at the last step, every
        # continuation (t + 1 tokens); both have t + 1 scored tokens.
        finishing = (finite if last else is_eos)
        finished_scores = torch.where(finishing, top / (t + 1), torch.full_like(top, -math.inf))
        cand, pick = finished_scores.max(dim=1)
        improved = cand > best[alive]
        if bool(improved.any()):
            for i in improved.nonzero().flatten().tolist():
                j, row = int(pick[i]), int(source[i, pick[i]])
                tok = int(token[i, j])
                results[int(alive[i])] = history[row, :t].tolist() + ([] if tok == ids.eos else [tok])
            best[alive[improved]] = cand[improved]
        if finals is not None:
            _collect_finals(finals, kth, finished_scores, source, token, history, alive, t, ids.eos, beams)
        scores = torch.where(is_eos | ~finite, torch.full_like(top, -math.inf), top)
        rows = source.flatten()
        history = history.index_select(0, rows)
        history[:, t] = token.flatten()
        tokens = token.flatten()
        if beams > 1:
            stepper.select(state, rows)
        if last:
            break
        bound = scores.max(dim=1).values / max_length  # best score any live beam could still reach
        done = (best if finals is None else kth)[alive] >= bound  # also true with no live beam (-inf >= -inf)
        if not bool(done.any()):
            continue
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            break
        keep_rows = (keep.unsqueeze(1) * beams + torch.arange(beams, device=device)).flatten()
        alive, scores = alive[keep], scores[keep]
        history, tokens = history[keep_rows], tokens[keep_rows]
        stepper.select(state, keep_rows, images=keep)
    return results


def _collect_finals(finals: list[list[tuple[float, list[int]]]], kth: torch.Tensor, finished_scores: torch.Tensor,
                    source: torch.Tensor, token: torch.Tensor, history: torch.Tensor, alive: torch.Tensor,
                    t: int, eos: int, beams: int) -> None:
    """Append this step's finished hypotheses to their images' ``finals`` and update ``kth``."""
    finished = torch.isfinite(finished_scores).nonzero().tolist()
    for i, j in finished:
        row, tok, image = int(source[i, j]), int(token[i, j]), int(alive[i])
        ids = history[row, :t].tolist() + ([] if tok == eos else [tok])
        finals[image].append((float(finished_scores[i, j]), ids))
    for image in {int(alive[i]) for i, _ in finished}:
        if len(finals[image]) >= beams:
            kth[image] = sorted((score for score, _ in finals[image]), reverse=True)[beams - 1]


def _best_finals(finals: list[tuple[float, list[int]]], count: int) -> list[list[int]]:
    """The ``count`` best hypotheses of one image, best first (ties: the one finished first)."""
    order = sorted(range(len(finals)), key=lambda k: (-finals[k][0], k))
    return [finals[k][1] for k in order[:count]]


def _decode_pool(stepper: _IncrementalCoCa, images: torch.Tensor, config: DecodingConfig,
                 ids: _Tokens) -> list[list[list[int]]]:
    """The consensus candidates of each image: its ``num_beams`` best beam hypotheses, the greedy
    caption when ``num_beams > 1``, then ``samples`` seeded samples (drawn so that they do not
    depend on the other images of the batch, see :func:`_slot_sampling_chooser`). The image tower
    runs once; each decoding is one batch over all images (the samples: ``samples`` rows per image)."""
    n = images.shape[0]
    if stepper.image_embs is None:
        visual_dtype = next(stepper.model.visual.parameters()).dtype
        pixels = images.to(visual_dtype) if images.dtype != visual_dtype else images
        stepper.image_embs = stepper.model._encode_image(pixels)[1]
    embs = stepper.image_embs
    finals: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    best = _decode_beams(stepper, images, config, ids, finals=finals)
    pools = [_best_finals(f, config.num_beams) or [b] for f, b in zip(finals, best)]
    if config.num_beams > 1:
        for pool, caption in zip(pools, _decode_rows(stepper, images, config, ids, _greedy_chooser())):
            pool.append(caption)
    if config.samples:
        rows = n * config.samples  # image-major: the samples of image i are rows i*samples ...
        stepper.image_embs = embs.repeat_interleave(config.samples, dim=0)
        # _decode_rows reads only the row count and device of its images once image_embs is set
        sampled = _decode_rows(stepper, images[:1].expand(rows, *images.shape[1:]), config, ids,
                               _slot_sampling_chooser(config, images.device, config.samples))
        stepper.image_embs = embs
        for i, pool in enumerate(pools):
            pool.extend(sampled[i * config.samples:(i + 1) * config.samples])
    return pools


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise OptionError(f"images must be a float tensor of shape (batch, channels, height, width), got {shape}")


def _prepare(model: CoCaModel, images: torch.Tensor, config: DecodingConfig, sot_id: int, eos_id: int,
             pad_id: int | None, image_embs: torch.Tensor | None) -> tuple[_IncrementalCoCa, _Tokens]:
    """Check the inputs against the model and the settings; the stepper and the special ids."""
    _check_images(images)
    stepper = _IncrementalCoCa(model)
    if image_embs is not None:
        if image_embs.dim() != 3 or image_embs.shape[0] != images.shape[0]:
            raise OptionError(f"image_embs of shape {tuple(image_embs.shape)} do not belong to {images.shape[0]} "
                              "images; give model._encode_image(images)[1]")
        stepper.image_embs = image_embs
    if config.max_length > stepper.max_length:
        raise OptionError(f"{config.max_length} exceeds the model's text context ({stepper.max_length}); give a "
                          "smaller maximum length", option="max_length")
    return stepper, _Tokens(int(sot_id), int(eos_id), tuple(_banned_ids(model, sot_id, eos_id, pad_id)))


def generate_tokens(
    model: CoCaModel,
    images: torch.Tensor,
    config: DecodingConfig | None,
    sot_id: int,
    eos_id: int,
    pad_id: int | None = 0,
    image_embs: torch.Tensor | None = None,
) -> list[list[int]]:
    """Caption token ids for a batch of preprocessed images, decoded with a key/value cache.

    ``images`` are already preprocessed and on the model's device (any float dtype; the call may
    be wrapped in ``torch.autocast`` and/or ``torch.inference_mode``). ``config`` defaults to
    ``DecodingConfig()``. Returns one list per image, without the start and end-of-text tokens;
    the start token and ``pad_id`` are never generated. Greedy and beam search are deterministic;
    sampling is reproducible for a given ``config.seed``. ``image_embs``: the images' token
    embeddings from ``model._encode_image(images)[1]`` when already computed (e.g. by the same
    model's embedding pass), so the image tower does not run again.
    """
    config = (config or DecodingConfig()).validated()
    if config.method == "consensus":
        raise OptionError("consensus decoding chooses among caption texts; call generate_captions or "
                          "caption_candidates (they have the tokenizer), or choose another method", option="method")
    stepper, ids = _prepare(model, images, config, sot_id, eos_id, pad_id, image_embs)
    if images.shape[0] == 0:
        return []
    with _eval_mode(model), torch.no_grad():
        if config.method == "beam":
            return _decode_beams(stepper, images, config, ids)
        if config.method == "sample":
            return _decode_rows(stepper, images, config, ids, _sampling_chooser(config, images.device))
        return _decode_rows(stepper, images, config, ids, _greedy_chooser())


def naive_greedy_tokens(
    model: CoCaModel,
    images: torch.Tensor,
    max_length: int,
    sot_id: int,
    eos_id: int,
    min_length: int = 0,
    pad_id: int | None = 0,
) -> list[list[int]]:
    """Reference greedy decoding without any cache: a full ``model(images, prefix)`` per token.

    Every step re-encodes the images and runs the text tower and the decoder over the whole
    prefix, then takes the argmax of the last position (with the same token rules as
    :func:`generate_tokens`: no start/pad token, no end-of-text before ``min_length``).
    Slow on purpose: it is the ground truth for tests and the baseline of the benchmark.
    """
    DecodingConfig(method="greedy", min_length=min_length, max_length=max_length).validated()
    _check_images(images)
    if max_length > max_caption_length(model):
        raise OptionError(f"{max_length} exceeds the model's text context ({max_caption_length(model)}); give a "
                          "smaller maximum length", option="max_length")
    banned = _banned_ids(model, sot_id, eos_id, pad_id)
    n = images.shape[0]
    results: list[list[int]] = [[] for _ in range(n)]
    alive = list(range(n))
    prefix = torch.full((n, 1), sot_id, dtype=torch.long, device=images.device)
    with _eval_mode(model), torch.no_grad():
        for t in range(max_length):
            if not alive:
                break
            logits = model(images, prefix, output_labels=False)["logits"][:, -1].float()
            tokens = _forbid(logits, t, min_length, eos_id, banned).argmax(dim=-1)
            prefix = torch.cat([prefix, tokens.unsqueeze(1)], dim=1)
            keep = []
            for row, token in enumerate(tokens.tolist()):
                if token == eos_id or t + 1 == max_length:
                    results[alive[row]] = prefix[row, 1:-1 if token == eos_id else None].tolist()
                else:
                    keep.append(row)
            alive = [alive[row] for row in keep]
            index = torch.tensor(keep, dtype=torch.long, device=images.device)
            images, prefix = images.index_select(0, index), prefix.index_select(0, index)
    return results


_SPECIAL_TEXT = ("<start_of_text>", "<end_of_text>")


def clean_caption(tokenizer, ids: Sequence[int], pad_id: int = 0) -> str:
    """Decode caption ids to text: stop at end-of-text, drop start/pad ids, tidy whitespace."""
    ids = [int(i) for i in ids]
    eos = getattr(tokenizer, "eot_token_id", None)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    skip = {pad_id, getattr(tokenizer, "sot_token_id", None)}
    text = tokenizer.decode([i for i in ids if i not in skip])
    for special in _SPECIAL_TEXT:
        text = text.replace(special, " ")
    return " ".join(text.split())


def candidate_pools(model: CoCaModel, tokenizer, images: torch.Tensor, config: DecodingConfig | None = None,
                    image_embs: torch.Tensor | None = None) -> list[list[str]]:
    """Every consensus candidate of each image as clean text, in decoding order, duplicates kept:
    the ``num_beams`` best beam hypotheses (best first), the greedy caption when ``num_beams > 1``,
    then ``config.samples`` seeded samples. The settings' method is not read: this is the pool the
    consensus method decodes (``image_embs``: see :func:`generate_tokens`)."""
    config = (config or DecodingConfig(method="consensus")).validated()
    pad_id = getattr(model, "pad_id", 0)
    sot_id, eos_id = tokenizer.sot_token_id, tokenizer.eot_token_id
    stepper, ids = _prepare(model, images, config, sot_id, eos_id, pad_id, image_embs)
    if images.shape[0] == 0:
        return []
    with _eval_mode(model), torch.no_grad():
        pools = _decode_pool(stepper, images, config, ids)
    return [[clean_caption(tokenizer, caption, pad_id=pad_id) for caption in pool] for pool in pools]


def caption_candidates(model: CoCaModel, tokenizer, images: torch.Tensor, config: DecodingConfig | None = None,
                       image_embs: torch.Tensor | None = None) -> list[list[str]]:
    """The distinct candidate captions of each image, the consensus pick first, then by falling
    consensus score (see :func:`candidate_pools` and :func:`hqrs_geo.models.consensus.rank_candidates`).

    The pick is what ``generate_captions`` returns with ``method="consensus"``; the other methods'
    settings give the same pool (their ``method`` is not read). Reproducible for a given ``seed``."""
    return [rank_candidates(pool) for pool in candidate_pools(model, tokenizer, images, config, image_embs)]


def generate_captions(model: CoCaModel, tokenizer, images: torch.Tensor,
                      config: DecodingConfig | None = None, image_embs: torch.Tensor | None = None) -> list[str]:
    """Captions (clean text) for a batch of preprocessed images; ids come from the tokenizer
    (``image_embs``: see :func:`generate_tokens`). With ``method="consensus"``, the first of
    :func:`caption_candidates`."""
    if config is not None and config.method == "consensus":
        return [ranked[0] for ranked in caption_candidates(model, tokenizer, images, config, image_embs)]
    pad_id = getattr(model, "pad_id", 0)
    token_ids = generate_tokens(model, images, config, tokenizer.sot_token_id, tokenizer.eot_token_id, pad_id,
                                image_embs=image_embs)
    return [clean_caption(tokenizer, ids, pad_id=pad_id) for ids in token_ids]
