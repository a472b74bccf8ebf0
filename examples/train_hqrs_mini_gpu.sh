#!/usr/bin/env bash
# Reproduces the shipped models hqrs-mini-clip and hqrs-mini-coca on one CUDA GPU: the recipe of
# examples/train_hqrs_mini.sh (same data, stages, epochs, seeds, records and copies into the
# package) with mixed precision (AMP: bf16 on Ampere and newer, fp16 with a gradient scaler on
# older cards) and batches BATCH_SCALE times larger (default 4: 256 images; peak lr x sqrt(4),
# warm-up and checkpoint intervals / 4). It checks first that there is a GPU and that torch can
# use it, and stops with a one-line error otherwise.
#
#   bash examples/train_hqrs_mini_gpu.sh DATA DATA_EU DATA_EU6 [RUN_DIR]     # data: see train_hqrs_mini.sh
#   bash examples/train_hqrs_mini_gpu.sh --dry-run DATA DATA_EU DATA_EU6     # print the commands, check nothing
#
# Settings: BATCH_SCALE=K (default 4), PRECISION (default auto), PY (default .venv/bin/python: it
# needs a CUDA build of torch); CUDA_VISIBLE_DEVICES=N picks the GPU on a machine with several. Larger batches change the
# contrastive task (more negatives per image), so the weights are a reproduction of the recipe,
# not bit-identical to the CPU-trained files; compare their evaluation records (docs/gpu.md).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
PY=${PY:-.venv/bin/python}
fail() { echo "train_hqrs_mini_gpu.sh: $*" >&2; exit 1; }

if [ -z "$DRY" ]; then
    command -v nvidia-smi >/dev/null 2>&1 \
        || fail "no nvidia-smi here, so no NVIDIA GPU driver; train on CPU with examples/train_hqrs_mini.sh"
    nvidia-smi -L >/dev/null 2>&1 \
        || fail "nvidia-smi finds no GPU (nvidia-smi -L failed); train on CPU with examples/train_hqrs_mini.sh"
    "$PY" - <<'PYTHON' || exit 1
import sys

try:
    import torch
except ImportError:
    sys.exit(f"train_hqrs_mini_gpu.sh: {sys.executable} has no torch; install the project (pip install -e .)")
if not torch.cuda.is_available():
    sys.exit(f"train_hqrs_mini_gpu.sh: torch {torch.__version__} in {sys.executable} cannot use the GPU "
             f"(a CPU-only build, or CUDA_VISIBLE_DEVICES hides it?); install a CUDA build of torch")
index = 0
name = torch.cuda.get_device_name(index)
major, minor = torch.cuda.get_device_capability(index)
print(f"GPU {index}: {name} (compute capability {major}.{minor}, "
      f"{'bf16' if major >= 8 else 'fp16'} AMP), torch {torch.__version__}, CUDA {torch.version.cuda}")
PYTHON
fi

DEVICE=cuda PRECISION=${PRECISION:-auto} BATCH_SCALE=${BATCH_SCALE:-4} DRY_RUN=$DRY PY=$PY \
    exec bash "$HERE/train_hqrs_mini.sh" "$@"
