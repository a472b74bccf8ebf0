#!/usr/bin/env bash
# Reproduces the shipped demo models hqrs-mini-clip and hqrs-mini-coca from UC Merced
# (../shared/data/ucm) with `hqrs-geo finetune`, evaluates them on the val split, and copies
# the weights into the package. CPU: about 23 + 25 minutes on 2 cores with AVX512-BF16
# (--precision bf16); on a CUDA GPU, drop --precision (AMP is automatic) and it takes minutes.
#
#   bash examples/train_hqrs_mini.sh [DATASET_JSON] [RUN_DIR]
set -euo pipefail
DATA=${1:-../shared/data/ucm/dataset_ucm.json}
RUNS=${2:-runs}
PY=${PY:-.venv/bin/python}
HG="$PY -m hqrs_geo"
WEIGHTS=hqrs_geo/models/weights

# CLIP: ResNet image tower (128 px), 4-layer text tower, reduced 8000-merge BPE vocabulary.
# The unlabelled UCM images are used with class prompts only; 30% of the sentences of the
# captioned images are also swapped for class prompts ("an aerial image of {class}.");
# half of each contrastive target goes to the other images of the same class (--class-target).
$HG finetune "$DATA" --arch hqrs-mini-clip -o "$RUNS/hqrs-mini-clip" --split train --split unlabelled \
    --class-prompts 0.3 --class-target 0.5 --epochs 80 --batch-size 64 --lr 1e-3 --warmup-steps 100 --seed 0 \
    --precision bf16 --save-every 200 --save-dtype fp16 --progress bar

# CoCa: ViT image tower (96 px, 12 px patches), contrastive + captioning loss, UCM sentences only.
$HG finetune "$DATA" --arch hqrs-mini-coca -o "$RUNS/hqrs-mini-coca" --split train \
    --epochs 50 --batch-size 64 --lr 1e-3 --warmup-steps 100 --seed 0 \
    --precision bf16 --save-every 200 --save-dtype fp16 --progress bar

# The CLIP ships its best epoch on val (mean of mR and zero-shot top-1); the CoCa its last
# weights (val not used to choose them, so its caption scores below are held-out numbers).
cp "$RUNS/hqrs-mini-clip/best.safetensors" "$WEIGHTS/hqrs-mini-clip.safetensors"
cp "$RUNS/hqrs-mini-coca/model.safetensors" "$WEIGHTS/hqrs-mini-coca.safetensors"
cp "$RUNS/hqrs-mini-clip/train.json" "$WEIGHTS/hqrs-mini-clip.train.json"
cp "$RUNS/hqrs-mini-coca/train.json" "$WEIGHTS/hqrs-mini-coca.train.json"

# evaluation on the held-out val split (210 images of UCM-captions)
$HG eval retrieval "$DATA" --model hqrs-mini-clip --json "$WEIGHTS/eval-retrieval.json"
$HG eval zeroshot "$DATA" --model hqrs-mini-clip --json "$WEIGHTS/eval-zeroshot.json"
$HG eval caption "$DATA" --model hqrs-mini-coca --decoding beam --beams 3 --json "$WEIGHTS/eval-caption.json"
