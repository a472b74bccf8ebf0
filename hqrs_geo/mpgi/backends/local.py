"""Local transformers back ends: a causal LLM (folders, hub ids, GGUF files) and a VLM.

This module imports torch and transformers: :func:`hqrs_geo.mpgi.backends.make_backend`
imports it only when a local back end is built, after checking both are installed."""
from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.utils import cached_file, is_accelerate_available

from ...errors import InputError, OptionError
from ...models.checkpoints import cache_dir, checkpoint_sha256
from ...models.device import pick_device
from ...models.precision import autocast_dtype
from .base import (
    ChatBackend,
    ChatRequest,
    _count,
    _error_text,
    _image_to_pil,
    _last_user_index,
    _text,
)

log = logging.getLogger(__name__)



def _weights_dtype(device, precision: str):
    """Torch dtype of the model weights, by the one precision rule (:mod:`hqrs_geo.models.precision`):
    ``auto`` is bf16 (fp16 without bf16) on CUDA, fp32 on CPU."""
    return autocast_dtype(device, precision) or torch.float32


def _dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` keyword for the dtype (``dtype`` since transformers 4.56, ``torch_dtype`` before)."""
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _model_source(model: str) -> str:
    """A local folder (absolute) or a hub id; a missing local path raises :class:`InputError`."""
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return os.path.abspath(path)
    looks_local = os.path.isabs(path) or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local:
        raise InputError(f"model {model}: no such folder; give a local model folder or a hub id (org/name)")
    return model


@contextmanager
def _loading(model: str, what: str) -> Iterator[None]:
    """Turn transformers' loading errors into a one-line :class:`InputError`."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load {what} {model!r} ({_error_text(err)}); give a local model folder, "
                         "or a hub id while online (HF_HUB_OFFLINE unset)") from None
    except ImportError as err:
        raise OptionError(f"cannot load {what} {model!r}: {_error_text(err)}; "
                          "install the MpGI extras: pip install 'hqrs_geo[mpgi]'") from None


def _batches(requests: Sequence[ChatRequest], key: Callable[[ChatRequest], Hashable],
             size: int) -> list[list[int]]:
    """Indices of requests grouped by ``key`` (first-seen order), in chunks of at most ``size``."""
    groups: dict[Hashable, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(key(request), []).append(index)
    return [indices[start:start + size] for indices in groups.values() for start in range(0, len(indices), size)]


def _ensure_pad_token(tokenizer) -> None:
    """Left padding, with a pad token (EOS, else UNK) when the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


class _TransformersBackend(ChatBackend):
    """Shared parts of the local back ends: device, dtype, batching and generation."""

    def __init__(self, model: str, device: str, batch_size: int, precision: str, seed: int) -> None:
        self.model = _text("model", model)
        self.batch_size = _count("batch_size", batch_size, 1)
        self.seed = _count("seed", seed, 0)
        self.device = pick_device(device)
        self.dtype = _weights_dtype(self.device, precision)
        self._source = _model_source(self.model)
        self._net: Any = None
        self._tokenizer: Any = None
        self._closed = False

    def _ensure_loaded(self) -> None:
        """Load the model on first use (a re-run answered from the cache never loads it)."""

    @property
    def tokenizer(self):
        """The tokenizer the back end decodes with."""
        self._ensure_loaded()
        return self._tokenizer

    def _batch_key(self, request: ChatRequest) -> Hashable:
        return (request.max_tokens, float(request.temperature))

    def _complete(self, requests: list[ChatRequest]) -> list[str]:
        if self._closed:
            raise OptionError(f"{self.identity()} was closed; make a new back end")
        self._ensure_loaded()
        answers = [""] * len(requests)
        for batch in _batches(requests, self._batch_key, self.batch_size):
            texts = self._answer_batch([requests[index] for index in batch])
            for index, text in zip(batch, texts):
                answers[index] = text
        return answers

    @abstractmethod
    def _answer_batch(self, batch: list[ChatRequest]) -> list[str]:
        """Answers for requests sharing max_tokens, temperature (and image count)."""

    def _generate(self, inputs, request: ChatRequest) -> list[str]:
        """Generate for a padded batch; only the new text, special tokens removed."""
        options: dict[str, Any] = {"max_new_tokens": request.max_tokens, "pad_token_id": self._tokenizer.pad_token_id}
        sampling = request.temperature > 0
        if sampling:
            options.update(do_sample=True, temperature=float(request.temperature))
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if "token_type_ids" in inputs and "token_type_ids" not in inspect.signature(self._net.forward).parameters:
            del inputs["token_type_ids"]  # some tokenizers make them; generate() refuses unused inputs
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=cuda, enabled=sampling):
            if sampling:
                torch.manual_seed(self.seed)
            output = self._net.generate(**inputs, **options)
        if not getattr(self._net.config, "is_encoder_decoder", False):
            output = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self._tokenizer.batch_decode(output, skip_special_tokens=True)]

    def close(self) -> None:
        """Drop the model (and free CUDA memory)."""
        self._closed = True
        self._net = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _load_gguf_causal_lm(source: str, gguf_file: str):
    """A causal LM from a GGUF file, dequantised by transformers.

    transformers' ``from_pretrained(gguf_file=...)`` refuses to run without ``accelerate``, which
    it only needs for bookkeeping; without it, the same steps are done here: read the config,
    dequantise the tensors with transformers' GGUF reader, build the model from them.
    """
    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise OptionError(f"{gguf_file}: a {type(config).__name__} is not a causal LM transformers can run; "
                          "use a GGUF of a chat LLM")
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    path = cached_file(source, gguf_file)
    extra = {}
    if "model_to_load" in inspect.signature(load_gguf_checkpoint).parameters:
        with torch.device("meta"):
            extra["model_to_load"] = model_class(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, **extra)["tensors"]
    return model_class.from_pretrained(None, config=config, state_dict=tensors)


def gguf_cache_dir() -> Path:
    """Folder of GGUF models converted to transformers' own format (``$HQRS_GEO_HOME/gguf``,
    default ``~/.cache/hqrs_geo/gguf``)."""
    return cache_dir().parent / "gguf"


def converted_gguf_folder(path: str) -> Path:
    """Where the conversion of the GGUF file ``path`` is kept: one folder per file content
    (sha256) and transformers version, so a changed file or a new transformers converts again."""
    digest = checkpoint_sha256(path)[:16]
    return gguf_cache_dir() / f"{Path(path).stem}.{digest}.transformers-{transformers.__version__}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _save_converted(folder: Path, tokenizer, net) -> None:
    """Save a converted GGUF model to ``folder`` (written beside it, then renamed: a folder that
    exists is complete). Best effort: a failure (full disk, read-only cache) is logged, not raised;
    leftovers of conversions killed half-way are removed."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
            pid = stale.name[len(folder.name) + 2:-len(".tmp")].split(".")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
        try:
            net.save_pretrained(work, safe_serialization=True)
            tokenizer.save_pretrained(work)
            os.rename(work, folder)
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            if not folder.is_dir():  # not another process converting at the same time
                raise
    except OSError as err:
        log.warning("could not keep the converted GGUF model in %s (%s); the next run converts it again",
                    folder, _error_text(err))


def _load_gguf_cached(source: str, gguf_file: str):
    """(tokenizer, model) of a GGUF causal LM. A local file is converted once (transformers parses
    and dequantises a GGUF in pure Python: a minute for SmolLM2-135M on a busy CPU) and kept in
    :func:`gguf_cache_dir` in transformers' format (float32 safetensors: the same weights, loaded
    in about a second); a hub GGUF is converted each time."""
    path = os.path.join(source, gguf_file)
    folder = converted_gguf_folder(path) if os.path.isfile(path) else None
    if folder is not None and folder.is_dir():
        try:
            return (AutoTokenizer.from_pretrained(folder),
                    AutoModelForCausalLM.from_pretrained(folder, **_dtype_kwargs(torch.float32)))
        except Exception as err:  # damaged (cut short, edited): convert again
            log.warning("the converted GGUF model in %s is unreadable (%s); converting again", folder,
                        _error_text(err))
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    net = _load_gguf_causal_lm(source, gguf_file)
    if folder is not None:
        _save_converted(folder, tokenizer, net)
    return tokenizer, net


class TransformersLLMBackend(_TransformersBackend):
    """A causal LM through transformers: a folder, a hub id, or a GGUF file (``gguf_file``).

    Prompts use the tokenizer's chat template; requests are generated in left-padded batches
    of ``batch_size``: greedy at temperature 0, else sampled with ``seed``. Text only.
    """

    kind = "transformers"

    def __init__(self, model: str, *, gguf_file: str | None = None, device: str = "auto", batch_size: int = 4,
                 precision: str = "auto", seed: int = 0) -> None:
        model = _text("model", model)
        if gguf_file is None and model.lower().endswith(".gguf") and os.path.isfile(os.path.expanduser(model)):
            model, gguf_file = os.path.split(os.path.abspath(os.path.expanduser(model)))
        super().__init__(model, device, batch_size, precision, seed)
        self.gguf_file = None if gguf_file is None else _text("gguf_file", gguf_file)
        if self.gguf_file and os.path.isdir(self._source) \
                and not os.path.isfile(os.path.join(self._source, self.gguf_file)):
            raise InputError(f"{os.path.join(self._source, self.gguf_file)}: GGUF file not found; check gguf_file")

    def _ensure_loaded(self) -> None:
        if self._net is None:
            self._tokenizer, self._net = self._load()

    def _load(self):
        with _loading(self.model, "causal LM"):
            if self.gguf_file:
                tokenizer, net = _load_gguf_cached(self._source, self.gguf_file)
            else:
                tokenizer = AutoTokenizer.from_pretrained(self._source)
                net = AutoModelForCausalLM.from_pretrained(self._source, **_dtype_kwargs(self.dtype))
        if not tokenizer.chat_template:
            raise OptionError(f"model {self.model} has no chat template (a base model?); use an instruct/chat model")
        _ensure_pad_token(tokenizer)
        return tokenizer, net.to(device=self.device, dtype=self.dtype).eval()

    def identity(self) -> str:
        """``transformers:MODEL`` or ``transformers:MODEL:GGUF_FILE``."""
        base = f"{self.kind}:{self._source}"
        return f"{base}:{self.gguf_file}" if self.gguf_file else base

    def _answer_batch(self, batch: list[ChatRequest]) -> list[str]:
        prompts = [self._tokenizer.apply_chat_template(_plain_messages(request.messages), tokenize=False,
                                                       add_generation_prompt=True) for request in batch]
        inputs = self._tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return self._generate(inputs.to(self.device), batch[0])


def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages reduced to role and content."""
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _vlm_conversation(request: ChatRequest) -> list[dict]:
    """Messages as processor chat-template parts; the images lead the last user message."""
    target = _last_user_index(request.messages) if request.images else -1
    conversation = []
    for index, message in enumerate(request.messages):
        parts: list[dict] = [{"type": "text", "text": message["content"]}]
        if index == target:
            parts = [{"type": "image"} for _ in request.images] + parts
        conversation.append({"role": message["role"], "content": parts})
    return conversation


def _load_vlm(source: str, dtype):
    """An image-text-to-text model: ``AutoModelForImageTextToText``, else ``AutoModelForVision2Seq``."""
    failure: Exception | None = None
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(source, **_dtype_kwargs(dtype))
        except ValueError as err:  # "Unrecognized configuration class": try the older auto class
            failure = err
    raise failure or ValueError("this transformers has no image-text-to-text auto class")


class TransformersVLMBackend(_TransformersBackend):
    """An image-text-to-text model through transformers (``AutoProcessor`` and its chat template).

    Requests are batched (left padding) among those with the same number of images; images
    become PIL images for the processor; answers are the new text only.
    """

    kind = "transformers-vlm"
    supports_images = True

    def __init__(self, model: str, *, device: str = "auto", batch_size: int = 4, precision: str = "auto",
                 seed: int = 0) -> None:
        super().__init__(model, device, batch_size, precision, seed)
        self._processor: Any = None

    def _ensure_loaded(self) -> None:
        if self._net is None:
            self._processor, self._net = self._load()
            self._tokenizer = self._processor.tokenizer

    def _load(self):
        with _loading(self.model, "vision-language model"):
            processor = AutoProcessor.from_pretrained(self._source)
            net = _load_vlm(self._source, self.dtype)
        if not getattr(processor, "chat_template", None):
            raise OptionError(f"model {self.model} has no processor chat template; use an instruct/chat VLM")
        if getattr(processor, "tokenizer", None) is None:
            raise OptionError(f"model {self.model}: its processor has no tokenizer; is it a vision-language model?")
        _ensure_pad_token(processor.tokenizer)
        return processor, net.to(self.device).eval()

    def identity(self) -> str:
        """``transformers-vlm:MODEL``."""
        return f"{self.kind}:{self._source}"

    def _batch_key(self, request: ChatRequest) -> Hashable:
        return (len(request.images), request.max_tokens, float(request.temperature))

    def _answer_batch(self, batch: list[ChatRequest]) -> list[str]:
        prompts = [self._processor.apply_chat_template(_vlm_conversation(request), tokenize=False,
                                                       add_generation_prompt=True) for request in batch]
        options: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if batch[0].images:
            options["images"] = [[_image_to_pil(image) for image in request.images] for request in batch]
        inputs = self._processor(**options).to(self.device, dtype=self.dtype)
        return self._generate(inputs, batch[0])

    def close(self) -> None:
        """Drop the model and processor."""
        self._processor = None
        super().close()


