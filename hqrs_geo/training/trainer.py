"""``hqrs-geo finetune``: train or fine-tune an open_clip CLIP or CoCa on image-caption pairs.

The model code and the losses are open_clip's (``ClipLoss`` for CLIP, ``CoCaLoss`` =
contrastive + captioning for CoCa). This module adds what a long job on a workstation needs:

* device auto; AMP (bf16, or fp16 with a gradient scaler) on CUDA; on a CPU with bf16 units
  (AVX512-BF16, AMX) bf16 autocast by default, elsewhere fp32 (:func:`training_precision`);
* the cores the process may use that other work leaves free (``threads``, :func:`default_threads`);
* with class labels, optionally a class-aware contrastive target (``class_target``; see
  :mod:`hqrs_geo.training.losses`);
* gradient accumulation (``accum_steps`` micro-batches per optimiser step; the contrastive
  loss sees one micro-batch at a time);
* AdamW with open_clip's weight-decay exclusions, linear warm-up then cosine decay;
* a checkpoint every ``save_every`` steps and on Ctrl-C/SIGTERM (model, optimiser, schedule,
  step), written atomically; ``resume`` continues from the newest one on the same batches,
  because the image order and augmentations are functions of (seed, step). Ctrl-C/SIGTERM
  stop at the end of the current optimiser step (:class:`StopRequest`), so the checkpoint holds
  a consistent state and a resumed run ends bit-identical to an uninterrupted one; a second
  signal stops at once and keeps the last checkpoint;
* validation every epoch (retrieval mean recall, zero-shot top-1 when images have classes,
  and for a CoCa its captioning loss on the references), keeping the best weights (CLIP:
  mean of mR and zero-shot top-1; CoCa: lowest captioning loss);
* outputs the model engine loads by path: ``model.safetensors`` (last), ``best.safetensors``
  (best on validation) and ``train.json`` (config, data, metrics history).
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, CoCaLoss
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path, output_folder, sha256_file, write_json
from ..errors import Cancelled, InputError, OptionError
from ..evaluation import retrieval_metrics, zeroshot_metrics
from ..models.checkpoints import read_state_dict
from ..models.device import pick_device
from ..models.encode import ensemble_vectors, text_features
from ..models.loader import load_model, quiet_open_clip
from ..models.precision import autocast, autocast_dtype, check_precision, cpu_bf16_units, precision_name
from ..models.preprocess import BatchPreprocess, preprocess_config
from ..models.prompts import ZERO_SHOT_TEMPLATES
from ..models.registry import open_clip_arch
from ..models.tokenizers import build_tokenizer
from .augment import AugmentConfig, augment_batch, normalise
from .data import CaptionSampler, CaptionSet, describe_set, epoch_order, load_caption_set, read_records
from .losses import class_aware_clip_loss


@dataclass
class FinetuneConfig:
    """Everything that defines a training run (stored in every checkpoint and ``train.json``)."""

    dataset: str
    output: str
    arch: str | None = None  # open_clip architecture or config JSON to train from
    model: str | None = None  # registry model whose weights to start from
    checkpoint: str | None = None  # weights for ``model`` / ``arch``
    init_from: str | None = None  # warm start: copy tensors whose names and shapes match
    splits: Sequence[str] = ("train",)
    val_split: str | None = "val"
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None  # torch threads on CPU; None: $OMP_NUM_THREADS, else the usable cores not busy
    save_every: int = 500
    keep_checkpoints: int = 2
    class_prompt_prob: float = 0.0
    clip_loss_weight: float = 1.0
    caption_loss_weight: float = 2.0
    class_target: float = 0.0  # share of the contrastive target given to same-class pairs
    min_scale: float = 0.6
    dihedral: bool = True
    jitter: float = 0.15
    colour: float = 0.0
    coarsen: float = 1.0
    load_scale: float = 1.15  # images are decoded at load_scale x the model input size
    save_dtype: str = "fp32"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "caption"
    trust_checkpoint: bool = False

    def validated(self) -> FinetuneConfig:
        """Self, after checking the values; raises :class:`OptionError`."""
        if not (self.arch or self.model):
            raise OptionError("nothing to train; name an architecture or config .json («arch», from scratch) or a "
                              "registry model («model», to fine-tune)", option="arch")
        for name in ("epochs", "batch_size", "accum_steps", "save_every"):
            if getattr(self, name) < 1:
                raise OptionError(f"must be at least 1, not {getattr(self, name)!r}", option=name)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= 1024):
            raise OptionError(f"must be a whole number from 1 to 1024, not {self.threads!r}", option="threads")
        if self.max_steps is not None and self.max_steps < 1:
            raise OptionError("must be at least 1", option="max_steps")
        if self.lr <= 0:
            raise OptionError(f"must be a positive number, not {self.lr!r}", option="lr")
        check_precision(self.precision)
        if self.save_dtype not in ("fp32", "fp16"):
            raise OptionError("must be fp32 or fp16", option="save_dtype")
        if not 0.0 <= self.class_target < 1.0:
            raise OptionError("must lie in [0, 1)", option="class_target")
        if not 0.05 <= self.min_scale <= 1.0:
            raise OptionError("must lie in [0.05, 1]", option="min_scale")
        if not 0.0 <= self.colour < 1.0:
            raise OptionError(f"must lie in [0, 1), not {self.colour!r}", option="colour")
        if not 1.0 <= self.coarsen <= 16.0:
            raise OptionError(f"must lie in [1, 16], not {self.coarsen!r}", option="coarsen")
        return self


@dataclass
class TrainState:
    """Where the run is: optimiser steps done, best validation score, metric history."""

    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    history: list = field(default_factory=list)
    running_loss: float | None = None  # the smoothed training loss (kept so a resumed run logs the same)


class StopRequest:
    """Ctrl-C / SIGTERM during training: the first signal asks the loop to stop at the end of
    the current optimiser step (a consistent state to checkpoint); a second one stops at once
    (KeyboardInterrupt), keeping only the checkpoints already written. Signal handlers can only
    be set in the main thread: elsewhere the block changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------- compute


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; all cores where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch threads when ``threads`` is not given: ``$OMP_NUM_THREADS`` when it holds a positive
    whole number (an explicit choice, e.g. one thread for each of two runs side by side), else the
    usable cores (:func:`usable_cores`) that other work does not keep busy (minus the 1-minute load
    average, rounded; at least one): every core on an idle machine. Measured on a 2-core machine
    (``benchmarks/finetune.py``, docs/gpu.md): with free cores two threads trained the CLIP 1.35x
    and the CoCa 1.50x as fast as one (bf16); with another training run on the cores two threads
    were never faster, and the CLIP in bf16 made 10 steps/min against 38-55 with one thread (a
    thread more than the free cores waits for its descheduled peer at every operation)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        busy = 0.0
    return max(1, min(cores, cores - int(round(busy))))


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (and its inter-op threads, when this process has not started
    parallel work yet) to ``threads`` (None: :func:`default_threads`); returns the count in force."""
    count = default_threads() if threads is None else threads
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:  # only settable before the first parallel operation of the process
        pass
    return torch.get_num_threads()


def training_precision(device, precision: str = "auto"):
    """The autocast dtype a training run uses (None: fp32). As
    :func:`hqrs_geo.models.precision.autocast_dtype`, except that ``auto`` on a CPU with bf16 units
    (:func:`hqrs_geo.models.precision.cpu_bf16_units`: AVX512-BF16 or AMX) is bf16: there the
    shipped CLIP trains 1.4-2x as fast as in fp32 and the CoCa as fast (``benchmarks/finetune.py``),
    while CPUs that only emulate bf16 train about ten times slower in it and keep fp32."""
    if precision == "auto" and device.type == "cpu" and cpu_bf16_units():
        return torch.bfloat16
    return autocast_dtype(device, precision)


# ---------------------------------------------------------------- model set-up


def _resolve_arch(arch: str) -> str:
    path = Path(arch)
    if path.suffix == ".json":
        if not path.is_file():
            raise InputError(f"{arch}: model config not found")
        open_clip.add_model_config(path)
        return path.stem
    found = open_clip_arch(arch)
    if found is None:
        raise OptionError(f"unknown architecture {arch!r}: use an open_clip model name or a config .json")
    return found


def _init_untouched(model) -> None:
    """open_clip leaves CoCa's decoder output projection uninitialised (torch.empty)."""
    decoder = getattr(model, "text_decoder", None)
    proj = getattr(decoder, "text_projection", None)
    if proj is not None:
        with torch.no_grad():
            if isinstance(proj, torch.nn.Linear):
                torch.nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
                if proj.bias is not None:
                    proj.bias.zero_()
            else:
                torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)


def warm_start(model, path: str, trust: bool = False) -> tuple[int, int]:
    """Copy the tensors of a checkpoint whose names and shapes match ``model``'s; returns
    (copied, total in model)."""
    state = read_state_dict(Path(path), trust=trust)
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise InputError(f"{path}: no tensor of this checkpoint fits the model; check the file", option="init_from")
    model.load_state_dict(fits, strict=False)
    return len(fits), len(own)


def build_model(config: FinetuneConfig, device):
    """(model, tokenizer, arch, kind, provenance) for a run."""
    if config.model:
        loaded = load_model(config.model, config.checkpoint, config.arch, device=str(device),
                            trust_checkpoint=config.trust_checkpoint)
        model, arch, kind = loaded.model, loaded.spec.arch, loaded.kind
        source: dict[str, Any] = {"model": loaded.spec.name, "checkpoint": loaded.checkpoint,
                                  "sha256": loaded.sha256}
    else:
        arch = _resolve_arch(str(config.arch))
        with quiet_open_clip():  # "no pretrained weights loaded" is the point of training from scratch
            model = open_clip.create_model(arch, pretrained=None)
        kind = "coca" if hasattr(model, "text_decoder") else "clip"
        source = {"arch": arch}
        if config.checkpoint:
            model.load_state_dict(read_state_dict(Path(config.checkpoint), trust=config.trust_checkpoint))
            source["checkpoint"] = config.checkpoint
        else:
            _init_untouched(model)
    if config.init_from:
        copied, total = warm_start(model, config.init_from, config.trust_checkpoint)
        source["init_from"] = {"path": config.init_from, "tensors": f"{copied}/{total}"}
    if hasattr(model, "output_dict"):
        model.output_dict = True
    model = model.to(device)
    return model, build_tokenizer(arch), arch, kind, source


def _param_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    def exclude(name, param):
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- validation


def validate(model, tokenizer, data: CaptionSet, preprocess_cfg: dict, device, batch: int = 128) -> dict:
    """Retrieval R@K/mR on the set's captions, and zero-shot top-1/top-5 when it has classes
    (the prompt ensemble of :data:`hqrs_geo.models.prompts.ZERO_SHOT_TEMPLATES` with class synonyms)."""
    was_training = model.training
    model.eval()
    prep = BatchPreprocess(preprocess_cfg, device)
    with torch.inference_mode():
        images = np.concatenate([
            model.encode_image(prep(torch.stack(data.pixels[i:i + batch]).to(device)), normalize=True)
            .float().cpu().numpy()
            for i in range(0, len(data), batch)])
        metrics: dict = {}
        texts = [c for r in data.records for c in r.captions]
        if texts:
            owners = [i for i, r in enumerate(data.records) for _ in r.captions]
            metrics.update(retrieval_metrics(images, text_features(model, tokenizer, texts, device), owners))
            if hasattr(model, "text_decoder"):
                metrics["caption_loss"] = caption_loss(model, tokenizer, data, owners, texts, prep, device, batch)
        classes = data.classes
        labelled = [i for i, r in enumerate(data.records) if r.label]
        if len(classes) >= 2 and labelled:
            emb = ensemble_vectors(model, tokenizer, classes, ZERO_SHOT_TEMPLATES, device)
            labels = [classes.index(str(data.records[i].label)) for i in labelled]
            metrics.update({f"zs_{k}": v for k, v in zeroshot_metrics(images[labelled], emb, labels).items()})
    model.train(was_training)
    return metrics


def caption_loss(model, tokenizer, data: CaptionSet, owners: Sequence[int], texts: Sequence[str], prep, device,
                 batch: int = 128) -> float:
    """A CoCa's teacher-forced captioning loss on reference captions (cross-entropy per
    token, padding excluded; ``texts[j]`` describes image ``owners[j]``)."""
    total, tokens_seen = 0.0, 0
    for start in range(0, len(texts), batch):
        chosen = owners[start:start + batch]
        images = prep(torch.stack([data.pixels[i] for i in chosen]).to(device))
        out = model(images, tokenizer(list(texts[start:start + batch])).to(device))
        labels = out["labels"]
        total += float(F.cross_entropy(out["logits"].float().permute(0, 2, 1), labels, ignore_index=0, reduction="sum"))
        tokens_seen += int((labels != 0).sum())
    return total / max(1, tokens_seen)


def selection_score(metrics: dict) -> float:
    """The number model selection maximises: for a CoCa, minus its validation captioning loss
    (captions are what it is for); otherwise the mean of retrieval mR and zero-shot top-1
    (either alone when only one is available)."""
    if "caption_loss" in metrics:
        return -metrics["caption_loss"]
    parts = [metrics[k] for k in ("mR", "zs_top1") if k in metrics]
    return float(np.mean(parts)) if parts else -math.inf


# ---------------------------------------------------------------- checkpoints


def checkpoint_dir(output: Path) -> Path:
    """Folder of the periodic training checkpoints."""
    return output / "checkpoints"


def latest_checkpoint(output: Path) -> Path | None:
    """The newest ``step-*.pt`` of a run folder, if any."""
    found = sorted(checkpoint_dir(output).glob("step-*.pt"))
    return found[-1] if found else None


def _check_zip(tmp: Path) -> None:
    """A written ``torch.save`` file is a complete zip archive (its central directory is last)."""
    if not tmp.is_file() or tmp.stat().st_size == 0 or not zipfile.is_zipfile(tmp):
        raise OSError(errno.EIO, "the written checkpoint is incomplete")


def _check_safetensors(expected: int):
    """A check of a written safetensors file: its header opens and lists ``expected`` tensors."""
    def verify(tmp: Path) -> None:
        try:
            with safe_open(str(tmp), framework="pt") as handle:
                found = len(list(handle.keys()))
        except Exception as exc:  # safetensors raises its own types for damaged files
            raise OSError(errno.EIO, f"the written weights cannot be read back ({exc})") from None
        if found != expected:
            raise OSError(errno.EIO, f"the written weights hold {found} tensors instead of {expected}")
    return verify


def _atomic_torch_save(payload, path: Path) -> None:
    with atomic_path(path, verify=_check_zip) as tmp:
        torch.save(payload, tmp)


def save_weights(model, path: Path, dtype: str = "fp32") -> None:
    """Model weights as safetensors (floating tensors in ``dtype``), written atomically."""
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype == "fp16" and value.is_floating_point():
            value = value.to(torch.float16)
        state[key] = value.contiguous().clone()
    with atomic_path(path, verify=_check_safetensors(len(state))) as tmp:
        save_file(state, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors (and mkstemp) create 0600 files


def save_checkpoint(output: Path, model, optimizer, scaler, state: TrainState, config: FinetuneConfig,
                    keep: int) -> Path:
    """Write ``checkpoints/step-NNNNNNN.pt`` (and prune old ones, keeping ``keep``)."""
    folder = checkpoint_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{state.step:07d}.pt"
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scaler": scaler.state_dict() if scaler is not None else None,
               "state": asdict(state), "config": json.dumps(asdict(config))}
    _atomic_torch_save(payload, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def _restore(path: Path, model, optimizer, scaler, config: FinetuneConfig) -> TrainState:
    def foreign(reason: str) -> InputError:
        return InputError(f"{path}: not a checkpoint this trainer wrote ({' '.join(reason.split())[:120]}); it was "
                          f"not loaded (nothing in it ran): move it out of {path.parent}, or train into a new «output»")

    try:  # weights_only: a pickle that would run code is refused by torch before anything runs
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, a cut-short zip (RuntimeError), EOFError, ...
        raise foreign(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "state", "config"} <= set(payload):
        raise foreign("it lacks the model, optimizer, state and config this trainer saves")
    try:
        saved = json.loads(payload["config"])
        if not isinstance(saved, dict) or not isinstance(payload["state"], dict):
            raise ValueError("config or state is not a table")
    except (TypeError, ValueError) as exc:
        raise foreign(str(exc)) from None
    for key in ("arch", "model", "batch_size", "accum_steps", "seed", "dataset"):
        if saved.get(key) != (list(v) if isinstance(v := getattr(config, key), tuple) else v):
            raise OptionError(f"{path}: checkpoint was trained with {key}={saved.get(key)!r}, not "
                              f"{getattr(config, key)!r}; use the same options to resume, or a new «output»")
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        return TrainState(**payload["state"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise foreign(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


# ---------------------------------------------------------------- the loop


def _loss_fn(kind: str, config: FinetuneConfig):
    """``loss(model_output, labels) -> (total, parts)``: open_clip's ``ClipLoss`` / ``CoCaLoss``;
    with ``config.class_target > 0`` the contrastive part is
    :func:`hqrs_geo.training.losses.class_aware_clip_loss` (``labels``: class index per row)."""
    clip_loss = ClipLoss()

    def contrastive(out, labels):
        if config.class_target > 0:
            return class_aware_clip_loss(out["image_features"], out["text_features"], out["logit_scale"], labels,
                                         config.class_target)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    if kind == "coca":
        caption_loss = CoCaLoss(caption_loss_weight=config.caption_loss_weight, clip_loss_weight=0)

        def coca(out, labels):
            clip_l = config.clip_loss_weight * contrastive(out, labels)
            _, cap_l = caption_loss(out["image_features"], out["text_features"], out["logits"], out["labels"],
                                    out["logit_scale"])
            return clip_l + cap_l, {"clip": float(clip_l.detach()), "caption": float(cap_l.detach())}
        return coca

    def clip(out, labels):
        value = contrastive(out, labels)
        return value, {"clip": float(value.detach())}
    return clip


def finetune(config: FinetuneConfig, resume: bool = False, progress=None,
             cancel: Callable[[], bool] | None = None) -> dict:
    """Run (or resume) a training job; returns the ``train.json`` record.

    ``cancel`` is polled between steps; when it returns True (or on KeyboardInterrupt) a
    checkpoint is written and :class:`Cancelled` is raised, so ``resume=True`` loses nothing.
    """
    config.validated()
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise OptionError(f"{output}: is not a folder; give a folder for the run", option="output")
    if not resume and latest_checkpoint(output) is not None:
        raise OptionError(f"{output}: holds checkpoints of an earlier run; «resume» it or choose another output folder",
                          option="output")
    before = torch.get_num_threads()
    try:
        with output_folder(output):  # a folder this run made is removed again if it fails before writing into it
            return _finetune(config, output, resume, progress, cancel)
    finally:
        torch.set_num_threads(before)  # the caller's setting again (the trainer may run in a longer process)


def _finetune(config: FinetuneConfig, output: Path, resume: bool, progress,
              cancel: Callable[[], bool] | None) -> dict:
    read_records(config.dataset, list(config.splits), config.csv_img_key, config.csv_caption_key)  # fail early
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    threads = apply_threads(config.threads)
    model, tokenizer, arch, kind, source = build_model(config, device)
    preprocess_cfg = preprocess_config(model)
    size = preprocess_cfg["size"][0]
    load_size = int(round(size * config.load_scale))

    train = load_caption_set(config.dataset, list(config.splits), load_size, progress,
                             config.csv_img_key, config.csv_caption_key)
    val = None
    if config.val_split and Path(config.dataset).suffix.lower() == ".json":
        val = load_caption_set(config.dataset, [config.val_split], load_size, progress)
    if len(train) < config.batch_size:
        raise OptionError(f"{config.dataset}: {len(train)} training images, fewer than the batch size "
                          f"{config.batch_size}; lower it", option="batch_size")
    sampler = CaptionSampler(train, config.class_prompt_prob)
    class_ids = {name: k for k, name in enumerate(train.classes)}
    micro_per_epoch = len(train) // config.batch_size
    steps_per_epoch = max(1, micro_per_epoch // config.accum_steps)
    total_steps = config.max_steps or steps_per_epoch * config.epochs

    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    amp_dtype = training_precision(device, config.precision)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    state = TrainState()
    found = latest_checkpoint(output) if resume else None
    if found is not None:
        state = _restore(found, model, optimizer, scaler, config)
        if progress is not None:
            progress.message(f"resuming {output} from step {state.step}")
    loss_fn = _loss_fn(kind, config)
    augment = AugmentConfig(config.min_scale, config.dihedral, config.jitter, config.colour, config.coarsen)
    mean, std = preprocess_cfg["mean"], preprocess_cfg["std"]
    channels_last = kind == "clip"  # convolutional towers gain from it
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    started = time.monotonic()
    if progress is not None:
        progress.start("train", total_steps, f"training {arch} ({kind}) on {len(train)} images", unit="step",
                       initial=state.step)
    def evaluate_and_select() -> None:
        if val is None:
            return
        metrics = validate(model, tokenizer, val, preprocess_cfg, device)
        score = selection_score(metrics)
        record = {"step": state.step, "epoch": state.step / steps_per_epoch, "val": metrics, "score": score}
        state.history.append(record)
        if score > state.best_score:
            state.best_score, state.best_step = score, state.step
            save_weights(model, output / "best.safetensors", config.save_dtype)
        if progress is not None:
            shown = ", ".join(f"{k} {metrics[k]:.{3 if k == 'caption_loss' else 1}f}"
                              for k in ("mR", "zs_top1", "caption_loss") if k in metrics)
            progress.message(f"step {state.step}: val {shown} (best step {state.best_step})")

    def one_step() -> None:
        """One optimiser step (all its micro-batches), then validation and checkpoints when due."""
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(state.step, config.warmup_steps, total_steps)
        parts: dict = {}
        for micro in range(config.accum_steps):
            index = state.step * config.accum_steps + micro  # global micro-batch number
            epoch, within = divmod(index, micro_per_epoch)
            order = epoch_order(len(train), config.seed, epoch)
            chosen = order[within * config.batch_size:(within + 1) * config.batch_size]
            rng = random.Random(config.seed * 7919 + index)
            texts = tokenizer([sampler.caption(i, rng) for i in chosen]).to(device)
            labels = torch.tensor([class_ids.get(str(train.records[i].label), -1) for i in chosen], device=device)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
            images = augment_batch([train.pixels[i] for i in chosen], size, generator, augment, device)
            images = normalise(images, mean, std)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                loss, parts = loss_fn(model(images, texts), labels)
                loss = loss / config.accum_steps
            if not torch.isfinite(loss):
                raise OptionError(f"loss became {float(loss)} at step {state.step}; lower «lr» or use "
                                  "«precision» fp32", option="lr")
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        state.step += 1
        value = sum(parts.values())
        running = value if state.running_loss is None else 0.98 * state.running_loss + 0.02 * value
        state.running_loss = running
        if progress is not None:
            progress.advance()
            progress.postfix(loss=f"{running:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        if state.step % steps_per_epoch == 0 or state.step == total_steps:
            state.history.append({"step": state.step, "train_loss": running})
            evaluate_and_select()
        if state.step % config.save_every == 0 and state.step < total_steps:
            save_checkpoint(output, model, optimizer, scaler, state, config, config.keep_checkpoints)

    stop = StopRequest()
    try:
        with stop:
            while state.step < total_steps:
                if stop.requested or (cancel is not None and cancel()):  # between steps: a consistent state
                    if state.step > 0:
                        save_checkpoint(output, model, optimizer, scaler, state, config, config.keep_checkpoints)
                    raise Cancelled(f"training cancelled at step {state.step}; " + (
                        "checkpoint written, re-run with «resume» to continue" if state.step else
                        "no step was done, so nothing was kept; run it again"))
                one_step()
    except KeyboardInterrupt:  # a second signal: stopped mid-step, that state is not written
        kept = latest_checkpoint(output)
        raise Cancelled(f"training stopped at once during step {state.step + 1}; "
                        + (f"the last checkpoint ({kept.name}) is kept, re-run with «resume» to continue from it"
                           if kept else "no checkpoint was written yet")) from None
    save_checkpoint(output, model, optimizer, scaler, state, config, config.keep_checkpoints)
    save_weights(model, output / "model.safetensors", config.save_dtype)
    if progress is not None:
        progress.close_bar()

    record = {
        "arch": arch, "kind": kind, "source": source, "config": asdict(config), "device": str(device),
        "precision": precision_name(amp_dtype), "threads": threads,
        "cpu_bf16_units": sorted(cpu_bf16_units()) if device.type == "cpu" else None,
        "steps": state.step, "steps_per_epoch": steps_per_epoch,
        "train": describe_set(train), "val": describe_set(val) if val is not None else None,
        "final": state.history[-1]["val"] if val is not None and state.history and "val" in state.history[-1] else None,
        "best": {"step": state.best_step, "score": state.best_score} if val is not None else None,
        "history": state.history, "seconds_this_session": round(time.monotonic() - started, 1),
        "weights": {"model": "model.safetensors", "sha256": sha256_file(output / "model.safetensors")},
    }
    if val is not None and (output / "best.safetensors").is_file():
        record["weights"]["best"] = "best.safetensors"
        record["weights"]["best_sha256"] = sha256_file(output / "best.safetensors")
    write_json(output / "train.json", record)
    return record
