"""``hqrs-geo finetune`` (train or fine-tune CLIP/CoCa) and ``hqrs-geo eval`` (metrics)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..evaluation import evaluate_captions, evaluate_retrieval, evaluate_zeroshot
from ..models.loader import load_model
from ..models.precision import PRECISIONS
from ..models.views import VIEW_COUNTS
from .options import add_decoding_options, add_progress_options, decoding_config, finish, number


def register(sub: Any) -> None:
    """Add the ``eval`` and ``finetune`` commands."""
    evaluate = sub.add_parser("eval", help="evaluate a model: retrieval R@K, zero-shot accuracy, caption metrics")
    evaluate.add_argument("task", choices=("retrieval", "zeroshot", "caption"))
    evaluate.add_argument("dataset", help="Karpathy-style JSON (images[].filename, class, split, sentences[].raw)")
    evaluate.add_argument("--split", default="val", help="split to evaluate (default val)")
    evaluate.add_argument("--model", required=True, help="registry name or open_clip architecture")
    evaluate.add_argument("--checkpoint", default=None)
    evaluate.add_argument("--arch", default=None)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--limit", type=number(int, 1, 10**9), default=None, help="evaluate only the first N images")
    evaluate.add_argument("--json", dest="json_out", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument("--views", type=int, default=1, choices=VIEW_COUNTS,
                          help="retrieval, zeroshot: test-time views per image, as embed --views (default 1)")
    evaluate.add_argument("--trust-checkpoint", action="store_true")
    add_decoding_options(evaluate)  # the caption task's decoding
    add_progress_options(evaluate)
    evaluate.set_defaults(func=run_eval)

    tune = sub.add_parser("finetune", help="train or fine-tune an open_clip CLIP/CoCa on image-caption pairs")
    tune.add_argument("dataset", help="open_clip CSV/TSV (filepath, caption) or Karpathy-style JSON")
    tune.add_argument("-o", "--output", required=True, help="run folder (checkpoints, model.safetensors, train.json)")
    what = tune.add_argument_group("model")
    what.add_argument("--arch", default=None, help="open_clip architecture or config .json to train from scratch")
    what.add_argument("--model", default=None, help="registry model to fine-tune from its weights")
    what.add_argument("--checkpoint", default=None, help="weights to start from")
    what.add_argument("--init-from", default=None, help="warm start: copy the tensors of this checkpoint that fit")
    what.add_argument("--trust-checkpoint", action="store_true")
    data = tune.add_argument_group("data")
    data.add_argument("--split", dest="splits", action="append", default=None,
                      help="training split of a JSON dataset (default train); repeatable")
    data.add_argument("--val-split", default="val", help="validation split for model selection ('' for none)")
    data.add_argument("--class-prompts", dest="class_prompt_prob", type=number(float, 0, 1), default=0.0,
                      help="probability of a class prompt instead of a sentence, for images with a class")
    data.add_argument("--csv-img-key", default="filepath")
    data.add_argument("--csv-caption-key", default="caption")
    data.add_argument("--min-scale", type=number(float, 0.05, 1), default=0.6,
                      help="smallest random crop, fraction of the side")
    data.add_argument("--no-rotate", dest="dihedral", action="store_false", help="no 90 degree rotations/flips")
    data.add_argument("--colour-cast", dest="colour", type=number(float, 0, 1, high_open=True), default=0.0,
                      help="per-band colour gains drawn from [1-C, 1+C] (other sensors' colour balance; 0 = off)")
    data.add_argument("--coarsen", type=number(float, 1, 16), default=1.0,
                      help="half of the images down-sampled by a factor from [1, F] and back (coarser sensors; "
                           "1 = off)")
    opt = tune.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=number(int, 1, 1_000_000), default=10)
    opt.add_argument("--max-steps", type=number(int, 1, 10**9), default=None,
                     help="stop after this many optimiser steps")
    opt.add_argument("--batch-size", type=number(int, 1, 65536), default=64)
    opt.add_argument("--accum-steps", type=number(int, 1, 4096), default=1, help="micro-batches per optimiser step")
    opt.add_argument("--lr", type=number(float, 0, 10, low_open=True), default=5e-4)
    opt.add_argument("--weight-decay", type=number(float, 0, 10), default=0.1)
    opt.add_argument("--warmup-steps", type=number(int, 0, 10**9), default=100)
    opt.add_argument("--caption-loss-weight", type=number(float, 0, 1000), default=2.0, help="CoCa")
    opt.add_argument("--clip-loss-weight", type=number(float, 0, 1000), default=1.0, help="CoCa")
    opt.add_argument("--class-target", type=number(float, 0, 1, high_open=True), default=0.0,
                     help="share of the contrastive target given to other images of the same class "
                          "(labelled data; 0 = open_clip's ClipLoss)")
    opt.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    opt.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="auto: bf16/fp16 AMP on CUDA; on CPU bf16 where the CPU has bf16 units (AVX512-BF16, AMX), "
                          "else fp32")
    opt.add_argument("--device", default="auto")
    opt.add_argument("--threads", type=number(int, 1, 1024), default=None,
                     help="torch threads on CPU (default: $OMP_NUM_THREADS if set, else the cores this process may "
                          "use minus the load average: all of them on an idle machine)")
    run = tune.add_argument_group("checkpoints")
    run.add_argument("--save-every", type=number(int, 1, 10**9), default=500, help="checkpoint every N optimiser steps")
    run.add_argument("--keep-checkpoints", type=number(int, 1, 1000), default=2)
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    run.add_argument("--save-dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the saved weights")
    add_progress_options(tune)
    tune.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo finetune``: train, checkpoint, validate; prints where the weights are."""
    if "torch" not in sys.modules:  # OpenMP threads that wait sleep (an explicit setting is kept): spinning
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # ones stall a multi-thread run on busy cores
    from ..training import FinetuneConfig, finetune

    names = [f for f in FinetuneConfig.__dataclass_fields__ if hasattr(args, f)]
    values = {name: getattr(args, name) for name in names}
    values["splits"] = tuple(args.splits or ("train",))
    values["val_split"] = args.val_split or None
    record = finetune(FinetuneConfig(**values), resume=args.resume, progress=progress)
    output = Path(args.output)
    best = record.get("best") or {}
    summary = f"trained {record['arch']} for {record['steps']} steps: {output / 'model.safetensors'}"
    if best:
        summary += f"; best on validation at step {best['step']}: {output / 'best.safetensors'}"
    finish(args, progress, summary, output=str(output))
    if not args.quiet and progress.mode != "json" and record.get("final"):
        print("final validation: " + ", ".join(f"{k} {v:.1f}" for k, v in record["final"].items()), file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo eval``: metrics as a table and optionally JSON."""
    decoding = decoding_config(args) if args.task == "caption" else None  # checked before the model loads
    loaded = load_model(args.model, checkpoint=args.checkpoint, arch=args.arch, device=args.device,
                        trust_checkpoint=args.trust_checkpoint)
    if args.task == "caption":
        metrics = evaluate_captions(loaded, args.dataset, args.split, decoding, limit=args.limit)
    else:
        evaluate = evaluate_retrieval if args.task == "retrieval" else evaluate_zeroshot
        metrics = evaluate(loaded, args.dataset, args.split, limit=args.limit, views=args.views)
    report = {"task": args.task, "model": loaded.spec.name, "sha256": loaded.sha256, "split": args.split,
              **({"views": args.views} if args.views > 1 else {}), **metrics}
    if args.json_out:
        write_json(args.json_out, report, indent=2)
    if not args.quiet:
        for key, value in report.items():
            print(f"{key:<10} {value:.2f}" if isinstance(value, float) else f"{key:<10} {value}")
    return 0
