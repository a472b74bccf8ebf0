"""Training throughput: ``hqrs-geo finetune``'s loop vs a bare open_clip training step, in one run.

    python benchmarks/finetune.py [--arch hqrs-mini-clip] [--steps 40] [--warmup 3] [--batch 64]
                                  [--class-target 0.5] [--dataset ../shared/data/ucm/dataset_ucm.json] [--device cpu]

For each precision (fp32, and bf16 autocast when the device supports it) it measures

  * bare: ``model(images, texts)`` + open_clip ``ClipLoss``/``CoCaLoss`` + backward + AdamW step
    on one ready batch of random tensors, i.e. the model's own cost (after ``--warmup`` untimed steps);
  * finetune: :func:`hqrs_geo.training.finetune` for the same number of steps on real images
    (decoded once beforehand, then per step: caption sampling, tokenisation, batch
    augmentation, normalisation, forward/backward/step, logit-scale clamp, progress), timed by
    the trainer from its first to its last step (no validation, one final checkpoint).

and prints images/s both ways and their ratio (the share of time the loop adds).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hqrs_geo.models.precision import autocast, autocast_dtype  # noqa: E402
from hqrs_geo.training import FinetuneConfig, finetune  # noqa: E402
from hqrs_geo.training.trainer import _loss_fn, build_model  # noqa: E402

SHARED_UCM = ROOT.parent / "shared" / "data" / "ucm" / "dataset_ucm.json"
SAMPLES = ROOT / "tests" / "data" / "ucm_val_samples" / "dataset.json"


def bare_images_per_s(config: FinetuneConfig, steps: int, warmup: int = 3) -> float:
    """Images/s of forward + loss + backward + step on one fixed random batch, after ``warmup`` untimed steps."""
    device = torch.device(config.device)
    model, tokenizer, arch, kind, _ = build_model(config, device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    if kind == "clip":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    texts = tokenizer(["a river runs through a dense residential area with many trees"] * config.batch_size).to(device)
    labels = (torch.arange(config.batch_size) % 21).to(device)  # 21 classes, as UCM
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = autocast_dtype(device, config.precision)
    loss_fn = _loss_fn(kind, config)
    model.train()
    for i in range(steps + warmup):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device, amp):
            loss, _ = loss_fn(model(images, texts), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * config.batch_size / (time.perf_counter() - start)


def loop_images_per_s(config: FinetuneConfig, steps: int) -> float:
    """Images/s of the real training loop, as timed by the trainer."""
    with tempfile.TemporaryDirectory() as tmp:
        run = FinetuneConfig(**{**config.__dict__, "output": tmp, "max_steps": steps, "val_split": None,
                                "save_every": 10 ** 9})
        record = finetune(run)
    return steps * config.batch_size / record["seconds_this_session"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="hqrs-mini-clip")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="untimed bare steps before the timed ones")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--class-target", type=float, default=0.5, help="as the shipped hqrs-mini-clip recipe")
    parser.add_argument("--dataset", default=str(SHARED_UCM if SHARED_UCM.is_file() else SAMPLES))
    args = parser.parse_args()
    split = "train" if Path(args.dataset) == SHARED_UCM else "val"
    batch = args.batch if split == "train" else min(args.batch, 16)
    precisions = ["fp32"]
    if args.device.startswith("cuda") or torch.backends.mkldnn.is_available():
        precisions.append("bf16")
    print(f"arch {args.arch}, batch {batch}, {args.steps} steps, class target {args.class_target}, "
          f"device {args.device}, "
          f"{torch.get_num_threads()} threads, data {args.dataset} ({split})")
    for precision in precisions:
        config = FinetuneConfig(dataset=args.dataset, output="", arch=args.arch, splits=(split,), batch_size=batch,
                                device=args.device, precision=precision, seed=0,
                                class_target=args.class_target)
        bare = bare_images_per_s(config, args.steps, args.warmup)
        loop = loop_images_per_s(config, args.steps)
        print(f"{precision:>5}: bare step {bare:7.1f} img/s | finetune loop {loop:7.1f} img/s | "
              f"ratio {loop / bare:.2f}")


if __name__ == "__main__":
    main()
