"""Caption decoding (hqrs_geo.models.decoding) on tiny random-weight CoCa models, on CPU.

Random CoCa weights give flat next-token distributions and a decoder ``text_projection`` that
open_clip leaves uninitialised, so the fixtures give the projection a large scale (sharp,
image-dependent logits) and turn channel 0 of the decoder's final LayerNorm into a constant 1:
row 0 of the projection is then an exact per-token logit bias, used to make end-of-text likely
(captions of varied lengths) or to make greedy decoding repeat a token.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import CONFIGS, TINY_COCA, build_tiny, register_tiny_configs

from hqrs_geo.errors import OptionError
from hqrs_geo.models.decoding import (
    DecodingConfig,
    _IncrementalCoCa,
    clean_caption,
    generate_captions,
    generate_tokens,
    naive_greedy_tokens,
)

SOT, EOS, PAD = 49406, 49407, 0
# tiny_models' CoCa has embed_dim 32 but a 64-wide decoder, so its image tokens (embed_dim wide)
# cannot feed the decoder; these captioning variants fix embed_dim to the decoder width.
CAPTION_COCA = "hqrs-test-tiny-coca-caption"
VARIANT_COCA = "hqrs-test-tiny-coca-variant"  # LayerScale, QuickGELU, 4 heads
EOS_BIAS = 24.0  # mix of captions ending early and captions cut at max_length


def _caption_configs() -> dict:
    base = copy.deepcopy(CONFIGS[TINY_COCA])
    base["embed_dim"] = 64
    variant = copy.deepcopy(base)
    variant["quick_gelu"] = True
    variant["text_cfg"].update(heads=4, ls_init_value=0.5)
    variant["multimodal_cfg"].update(heads=4, ls_init_value=0.5)
    return {CAPTION_COCA: base, VARIANT_COCA: variant}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode with one torch thread: these tensors are tiny, and two OpenMP threads on a busy
    machine (another pytest-xdist worker, child processes) wait for each other at every op:
    with torch's default of one thread per core this module took 122 CPU seconds instead of 9."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def registered(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("model_configs")
    register_tiny_configs(folder)
    extra = tmp_path_factory.mktemp("caption_configs")
    for name, cfg in _caption_configs().items():
        (extra / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(extra)
    return folder


def _sharpen(model, scale: float = 1.0, seed: int = 0):
    """Initialise the decoder projection with std ``scale`` and make channel 0 a logit bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proj = model.text_decoder.text_projection
        proj.copy_(torch.randn(proj.shape, generator=g) * scale)
        ln = model.text_decoder.ln_final
        ln.weight[0], ln.bias[0] = 0.0, 1.0
        proj[0] = 0.0
    return model


def _set_logit_bias(model, token: int, value: float):
    with torch.no_grad():
        model.text_decoder.text_projection[0, token] = value
    return model


def _build(name: str, eos_bias: float = EOS_BIAS):
    model, _, tokenizer = build_tiny(name)
    _set_logit_bias(_sharpen(model), EOS, eos_bias)
    return model, tokenizer


@pytest.fixture(scope="session")
def coca(registered):
    return _build(CAPTION_COCA)


@pytest.fixture(scope="session")
def images():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _decode(model, images, **kwargs):
    return generate_tokens(model, images, DecodingConfig(**kwargs), SOT, EOS, PAD)


def _normalised_logprob(model, image, ids, max_length: int) -> float:
    """Length-normalised log-probability of a caption, from one full forward pass."""
    ended = len(ids) < max_length
    text = torch.tensor([[SOT, *ids] + ([EOS] if ended else [])])
    with torch.no_grad():
        out = model(image[None], text)  # teacher forcing: logits[:, i] predicts labels[:, i]
    logp = out["logits"].float().log_softmax(-1).gather(-1, out["labels"][..., None])
    return logp.sum().item() / out["labels"].shape[1]


# -- the key/value cache -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CAPTION_COCA, VARIANT_COCA])
def test_cached_steps_match_full_forward_logits(registered, images, name):
    model, _ = _build(name)
    text = torch.randint(1, 49000, (images.shape[0], 12), generator=torch.Generator().manual_seed(2))
    text[:, 0] = SOT
    stepper = _IncrementalCoCa(model)
    with torch.no_grad():
        full = model(images, text, output_labels=False)["logits"]
        state = stepper.start(images, capacity=12)
        steps = torch.stack([stepper.step(state, text[:, i]) for i in range(12)], dim=1)
    assert full.abs().max() > 10  # sharp logits, so the comparison means something
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [CAPTION_COCA, VARIANT_COCA])
def test_cached_greedy_equals_naive_greedy(registered, images, name):
    model, _ = _build(name)
    cached = _decode(model, images, method="greedy", min_length=0, max_length=20)
    naive = naive_greedy_tokens(model, images, 20, SOT, EOS)
    assert cached == naive
    assert len({tuple(ids) for ids in cached}) >= 4  # image-dependent captions
    assert max(len(ids) for ids in cached) == 20 and sum(len(ids) for ids in cached) > 30


def test_cached_greedy_equals_naive_with_min_length(coca, images):
    model, _ = coca
    cached = _decode(model, images, method="greedy", min_length=6, max_length=12)
    assert cached == naive_greedy_tokens(model, images, 12, SOT, EOS, min_length=6)


# -- beam search ---------------------------------------------------------------------------------


def test_one_beam_is_greedy(coca, images):
    model, _ = coca
    for min_length in (0, 4):
        greedy = _decode(model, images, method="greedy", min_length=min_length, max_length=20)
        beam = _decode(model, images, method="beam", num_beams=1, min_length=min_length, max_length=20)
        assert beam == greedy


@pytest.mark.parametrize("eos_bias", [20.0, 26.0])
def test_beam_search_scores_at_least_greedy(registered, images, eos_bias):
    """Beam captions beat greedy ones, including greedy ones forced longer (other hypotheses
    the search could have kept), under length-normalised log-probability."""
    model, _ = _build(CAPTION_COCA, eos_bias=eos_bias)
    beam = _decode(model, images, method="beam", num_beams=3, min_length=0, max_length=16)
    assert _decode(model, images, method="beam", num_beams=3, min_length=0, max_length=16) == beam
    rivals = [_decode(model, images, method="greedy", min_length=m, max_length=16) for m in (0, 4, 8, 12)]
    better = 0
    for i, (image, ids) in enumerate(zip(images, beam)):
        score = _normalised_logprob(model, image, ids, 16)
        rival_scores = [_normalised_logprob(model, image, rival[i], 16) for rival in rivals]
        assert score >= max(rival_scores) - 1e-5
        better += score > rival_scores[0] + 1e-4
    assert better >= 1  # beam search found something greedy did not


def test_beam_search_respects_lengths(registered, images):
    model, _ = _build(CAPTION_COCA, eos_bias=28.0)
    free = _decode(model, images, method="beam", num_beams=3, min_length=0, max_length=15)
    assert min(len(ids) for ids in free) < 6  # so the min_length check below can fail
    bounded = _decode(model, images, method="beam", num_beams=3, min_length=6, max_length=15)
    assert all(6 <= len(ids) <= 15 for ids in bounded)


# -- lengths -------------------------------------------------------------------------------------


def test_min_and_max_length(coca, images):
    model, _ = coca
    free = _decode(model, images, method="greedy", min_length=0, max_length=20)
    assert min(len(ids) for ids in free) < 5 and max(len(ids) for ids in free) == 20
    bounded = _decode(model, images, method="greedy", min_length=5, max_length=20)
    assert all(len(ids) >= 5 for ids in bounded)
    short = _decode(model, images, method="greedy", min_length=0, max_length=3)
    assert all(len(ids) <= 3 for ids in short) and max(len(ids) for ids in short) == 3
    fixed = _decode(model, images, method="sample", min_length=7, max_length=7)
    assert all(len(ids) == 7 for ids in fixed)


def test_special_tokens_never_generated(coca, images):
    model, _ = coca
    for method in ("greedy", "beam", "sample"):
        for ids in _decode(model, images, method=method, min_length=0, max_length=20):
            assert not {SOT, EOS, PAD} & set(ids)


# -- sampling ------------------------------------------------------------------------------------


def test_sampling_is_seeded(coca, images):
    model, _ = coca
    first = _decode(model, images, method="sample", seed=3, temperature=2.0)
    assert _decode(model, images, method="sample", seed=3, temperature=2.0) == first
    assert _decode(model, images, method="sample", seed=4, temperature=2.0) != first
    assert first != _decode(model, images, method="greedy")


def test_top_k_one_and_tiny_top_p_are_greedy(coca, images):
    model, _ = coca
    greedy = _decode(model, images, method="greedy", min_length=2)
    assert _decode(model, images, method="sample", top_k=1, temperature=5.0, min_length=2) == greedy
    assert _decode(model, images, method="sample", top_p=1e-6, temperature=5.0, min_length=2) == greedy


# -- repetition penalty --------------------------------------------------------------------------


def test_repetition_penalty_reduces_repeats(registered, images):
    model, _ = _build(CAPTION_COCA, eos_bias=-100.0)
    token = 320  # "a"
    _set_logit_bias(model, token, 45.0)  # above every other logit, but not above them once halved
    plain = _decode(model, images, method="greedy", max_length=20)
    penalised = _decode(model, images, method="greedy", max_length=20, repetition_penalty=2.0)
    assert all(ids.count(token) == 20 for ids in plain)
    assert all(ids.count(token) <= 2 for ids in penalised)
    repeats = lambda seqs: sum(len(ids) - len(set(ids)) for ids in seqs)  # noqa: E731
    assert repeats(penalised) < repeats(plain)
    beam = _decode(model, images, method="beam", max_length=20, repetition_penalty=2.0)
    assert repeats(beam) < repeats(plain)


# -- text ----------------------------------------------------------------------------------------


def test_clean_caption_strips_special_tokens(coca):
    _, tokenizer = coca
    ids = tokenizer(["a river  next to a road"])[0].tolist()
    assert ids[0] == SOT and EOS in ids and ids[-1] == PAD
    assert clean_caption(tokenizer, ids) == "a river next to a road"
    assert clean_caption(tokenizer, torch.tensor(ids[1:6])) == "a river next to a"
    assert clean_caption(tokenizer, [SOT, EOS, PAD]) == ""


def test_generate_captions(coca, images):
    model, tokenizer = coca
    captions = generate_captions(model, tokenizer, images, DecodingConfig(min_length=3, max_length=8))
    assert len(captions) == len(images) and all(isinstance(c, str) and c == c.strip() for c in captions)
    assert all("<" not in c and "  " not in c for c in captions)
    assert any(captions)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_given_image_tokens_give_the_same_captions(coca, images, method):
    """Tokens of the image tower computed elsewhere (an embedding pass of the same model) decode
    to the captions the decoder gets by encoding the images itself; tokens of other images are refused."""
    model, tokenizer = coca
    config = DecodingConfig(method=method, num_beams=2, min_length=2, max_length=8)
    with torch.inference_mode():
        tokens = model._encode_image(images)[1]
        assert generate_captions(model, tokenizer, images, config, image_embs=tokens) == \
            generate_captions(model, tokenizer, images, config)
        with pytest.raises(OptionError, match="do not belong"):
            generate_captions(model, tokenizer, images, config, image_embs=tokens[:1])


# -- execution contexts --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_inference_mode(coca, images, method):
    model, _ = coca
    expected = _decode(model, images, method=method, max_length=10)
    with torch.inference_mode():
        got = _decode(model, images.clone(), method=method, max_length=10)
    assert got == expected


def test_cpu_autocast_bf16(coca, images):
    model, _ = coca
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = _decode(model, images, method="beam", min_length=2, max_length=8)
    assert len(out) == len(images) and all(2 <= len(ids) <= 8 for ids in out)


def test_empty_batch_and_training_flag(coca):
    model, _ = coca
    model.train()
    try:
        assert _decode(model, torch.zeros(0, 3, 64, 64), method="greedy") == []
        _decode(model, torch.zeros(1, 3, 64, 64), method="greedy", min_length=0, max_length=3)
        assert model.training  # restored
    finally:
        model.eval()


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"method": "nucleus"}, {"num_beams": 0}, {"num_beams": 2.5}, {"top_k": -1}, {"top_p": 0.0},
    {"top_p": 1.5}, {"temperature": 0.0}, {"temperature": math.inf}, {"repetition_penalty": 0.0},
    {"min_length": -1}, {"max_length": 0}, {"min_length": 10, "max_length": 5}, {"seed": "x"},
    {"max_length": True},
])
def test_invalid_config_raises(kwargs):
    with pytest.raises(OptionError) as err:
        DecodingConfig(**kwargs).validated()
    assert "\n" not in str(err.value)


def test_config_defaults_and_dict():
    config = DecodingConfig().validated()
    assert config.as_dict() == {
        "method": "beam", "num_beams": 3, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
        "repetition_penalty": 1.0, "min_length": 5, "max_length": 30, "seed": 0,
    }


def test_bad_inputs_raise(coca, images):
    model, _ = coca
    with pytest.raises(OptionError):
        _decode(model, images, max_length=500)
    with pytest.raises(OptionError):
        generate_tokens(model, images[0], DecodingConfig(), SOT, EOS)
    with pytest.raises(OptionError):
        generate_tokens(torch.nn.Linear(2, 2), images, DecodingConfig(), SOT, EOS)
