#!/usr/bin/env bash
# Reproduces the shipped demo models hqrs-mini-clip and hqrs-mini-coca with `hqrs-geo finetune`
# from the training sets of examples/build_training_set.py (UCM-captions + AID through the class
# caption rules; EuroSAT added for the CLIP's third stage; docs/training-data.md), evaluates
# them, and copies the weights into the package.
#
#   python examples/build_training_set.py --ucm ../shared/data/ucm/dataset_ucm.json \
#       --aid AID_DIR --holdout-siri SIRI_DIR -o DATA            # once (see docs/training-data.md)
#   python examples/build_training_set.py --ucm ../shared/data/ucm/dataset_ucm.json \
#       --aid AID_DIR --eurosat EUROSAT_DIR --holdout-siri SIRI_DIR -o DATA_EU   # + EuroSAT (stage 3)
#   python examples/build_training_set.py --ucm ../shared/data/ucm/dataset_ucm.json --ucm-repeat 6 \
#       --aid AID_DIR --eurosat EUROSAT_DIR --eurosat-val 200 --holdout-siri SIRI_DIR -o DATA_EU6  # stage 4
#   bash examples/train_hqrs_mini.sh DATA DATA_EU DATA_EU6 [RUN_DIR]
#
# Time, CPU only. Measured with benchmarks/finetune.py (docs/gpu.md) on a shared 2-core Xeon with
# AVX512-BF16 and AMX, batch 64: with free cores (no other training run) and the defaults (both
# cores, bf16) the CLIP trains at 74 steps/min and the CoCa at 48 (one thread in fp32: 36 and 29;
# one thread in bf16: 55 and 32), so the steps of stage 1 (2532) take about 35 min and those of
# the CoCa (1800) about 38 min, plus validation. With another training run on the cores (load
# 4-5) the default drops to one thread: CLIP 46 steps/min, CoCa 26 (two threads there: the CLIP
# in bf16 10 steps/min). The first full runs (one
# thread per run, OMP_NUM_THREADS=1, bf16, both runs side by side): CLIP 23 steps/min (stage 1,
# 2532 steps, about 1 h 50 min), CoCa 14 steps/min (1800 steps, about 2 h 10 min); CLIP stage 2
# (1266 steps) 55 min. On an AVX2-only CPU bf16 is emulated (2 steps/min against 21 in fp32;
# auto picks fp32 there): stage 3 1104 steps in 57 min beside a CoCa run, stage 4 1437 steps in
# 89 min beside another training run. All resume with --resume after an interruption. On a CUDA
# GPU use examples/train_hqrs_mini_gpu.sh (AMP, 4x batches).
#
# Settings (environment variables; examples/train_hqrs_mini_gpu.sh sets them for a CUDA GPU):
#   DEVICE=auto|cpu|cuda      PRECISION=auto|fp32|bf16|fp16 (auto: bf16 on CPUs with AVX512-BF16/AMX, else fp32;
#                             AMP on CUDA)      THREADS=N (default: the usable cores minus the load average)
#   BATCH_SCALE=K             batches K times larger than the recipe's 64, peak lr x sqrt(K), warm-up and
#                             checkpoint intervals / K (same epochs, so K times fewer steps)
#   DRY_RUN=1                 print the commands instead of running them
set -euo pipefail
USAGE="usage: train_hqrs_mini.sh DATA_DIR DATA_EUROSAT_DIR DATA_EUROSAT_UCM6_DIR [RUN_DIR]"
DATA=${1:?$USAGE}
DATA_EU=${2:?$USAGE}
DATA_EU6=${3:?$USAGE}
RUNS=${4:-runs}
DEVICE=${DEVICE:-auto}
PRECISION=${PRECISION:-auto}
THREADS=${THREADS:-}
BATCH_SCALE=${BATCH_SCALE:-1}
PROGRESS=${PROGRESS:-bar}
DRY_RUN=${DRY_RUN:-}
PY=${PY:-.venv/bin/python}
HG="$PY -m hqrs_geo"
WEIGHTS=hqrs_geo/models/weights
UCM=${UCM:-../shared/data/ucm/dataset_ucm.json}
case $BATCH_SCALE in
    ''|*[!0-9]*|0) echo "train_hqrs_mini.sh: BATCH_SCALE must be a whole number of 1 or more, not '$BATCH_SCALE'" >&2
                   exit 2 ;;
esac

run() {  # run a command, or print it (DRY_RUN=1)
    if [ -n "$DRY_RUN" ]; then echo "$*"; else "$@"; fi
}

sized() {  # sized BATCH LR WARMUP SAVE_EVERY: the recipe's values for BATCH_SCALE
    awk -v b="$1" -v lr="$2" -v w="$3" -v s="$4" -v k="$BATCH_SCALE" 'BEGIN {
        printf "--batch-size %d --lr %g --warmup-steps %d --save-every %d", b * k, lr * sqrt(k),
               (w + k - 1) / k, (s + k - 1) / k }'
}

train() {  # hqrs-geo finetune with this machine's settings (DEVICE, PRECISION, THREADS, PROGRESS)
    run $HG finetune "$@" --device "$DEVICE" --precision "$PRECISION" ${THREADS:+--threads "$THREADS"} \
        --save-dtype fp16 --progress "$PROGRESS"
}

# CLIP: ResNet image tower (128 px, layers 1-2-2-1, width 32), 4-layer text tower, 16000-merge BPE.
# Captions: UCM-captions + rule captions of the class labels; half of each contrastive target goes
# to the other images of the same (unified) class in the batch (--class-target 0.5).
train "$DATA/train_clip.json" --arch hqrs-mini-clip -o "$RUNS/hqrs-mini-clip" --split train \
    --class-target 0.5 --epochs 12 $(sized 64 1e-3 200 500) --seed 0

# CLIP stage 2: a warm restart from stage 1's last weights on the same data, lower peak lr (stage 1
# was still improving on val when its schedule ended).
train "$DATA/train_clip.json" --arch hqrs-mini-clip --init-from "$RUNS/hqrs-mini-clip/model.safetensors" \
    -o "$RUNS/hqrs-mini-clip-s2" --split train --class-target 0.5 --epochs 6 $(sized 64 4e-4 60 500) --seed 1

# CLIP stage 3: a warm restart from stage 2 on the set with EuroSAT added (Sentinel-2, 10 m,
# Europe: another sensor, scale and continent), 3 epochs.
train "$DATA_EU/train_clip.json" --arch hqrs-mini-clip --init-from "$RUNS/hqrs-mini-clip-s2/model.safetensors" \
    -o "$RUNS/hqrs-mini-clip-s3" --split train --class-target 0.5 --epochs 3 $(sized 64 4e-4 60 200) --seed 2

# CLIP stage 4: a warm restart from stage 3 on the same images with UCM's human-captioned images
# listed 6 times instead of 2 (--ucm-repeat 6: a third of the batches), 3 epochs at a lower peak lr.
train "$DATA_EU6/train_clip.json" --arch hqrs-mini-clip --init-from "$RUNS/hqrs-mini-clip-s3/model.safetensors" \
    -o "$RUNS/hqrs-mini-clip-s4" --split train --class-target 0.5 --epochs 3 $(sized 64 3e-4 60 200) --seed 4

# CoCa: ViT image tower (96 px, 12 px patches), contrastive + captioning loss; UCM's human
# captions and the plain-statement rule captions of AID.
train "$DATA/train_coca.json" --arch hqrs-mini-coca -o "$RUNS/hqrs-mini-coca" --split train \
    --epochs 8 $(sized 64 1e-3 200 500) --seed 0

# CLIP stage 5: a short warm restart from stage 4 (400 steps, lr 2e-4) where a quarter of the
# labelled images' captions are class prompts drawn from the synonym table
# (hqrs_geo/models/prompts.py), so the text tower sees the wording zero-shot classes use.
train "$DATA_EU6/train_clip.json" --arch hqrs-mini-clip --init-from "$RUNS/hqrs-mini-clip-s4/model.safetensors" \
    -o "$RUNS/hqrs-mini-clip-s5" --split train --class-target 0.5 --class-prompts 0.25 --epochs 1 \
    --max-steps $(( (400 + BATCH_SCALE - 1) / BATCH_SCALE )) $(sized 64 2e-4 30 100) --seed 6

# CoCa stage 2: a warm restart from stage 1 on UCM-captions' human sentences only (1480 train
# images x 5 sentences, 8 epochs, lr 2e-4): the captions come back to the human wording.
train "$UCM" --arch hqrs-mini-coca --init-from "$RUNS/hqrs-mini-coca/model.safetensors" \
    -o "$RUNS/hqrs-mini-coca-s2" --split train --epochs 8 $(sized 64 2e-4 20 100) --seed 5

# Both ship their last weights (val is reported per epoch in train.json, not used to choose).
run cp "$RUNS/hqrs-mini-clip-s5/model.safetensors" "$WEIGHTS/hqrs-mini-clip.safetensors"
run cp "$RUNS/hqrs-mini-coca-s2/model.safetensors" "$WEIGHTS/hqrs-mini-coca.safetensors"
run cp "$RUNS/hqrs-mini-clip/train.json" "$WEIGHTS/hqrs-mini-clip.stage1.train.json"
run cp "$RUNS/hqrs-mini-clip-s2/train.json" "$WEIGHTS/hqrs-mini-clip.stage2.train.json"
run cp "$RUNS/hqrs-mini-clip-s3/train.json" "$WEIGHTS/hqrs-mini-clip.stage3.train.json"
run cp "$RUNS/hqrs-mini-clip-s4/train.json" "$WEIGHTS/hqrs-mini-clip.stage4.train.json"
run cp "$RUNS/hqrs-mini-clip-s5/train.json" "$WEIGHTS/hqrs-mini-clip.train.json"
run cp "$DATA_EU6/manifest.json" "$WEIGHTS/training-set.manifest.json"
run cp "$RUNS/hqrs-mini-coca/train.json" "$WEIGHTS/hqrs-mini-coca.stage1.train.json"
run cp "$RUNS/hqrs-mini-coca-s2/train.json" "$WEIGHTS/hqrs-mini-coca.train.json"

# evaluation: UCM val split (210 images of UCM-captions) and the held-out SIRI-WHU set
run $HG eval retrieval "$UCM" --model hqrs-mini-clip --json "$WEIGHTS/eval-retrieval.json"
run $HG eval zeroshot "$UCM" --model hqrs-mini-clip --json "$WEIGHTS/eval-zeroshot.json"
run $HG eval zeroshot "$DATA_EU6/val_eurosat.json" --split val --model hqrs-mini-clip --json "$WEIGHTS/eval-zeroshot-eurosat.json"
run $HG eval zeroshot "$DATA_EU/holdout_siri.json" --split test --model hqrs-mini-clip --json "$WEIGHTS/eval-zeroshot-siri.json"
run $HG eval caption "$UCM" --model hqrs-mini-coca --decoding beam --beams 3 --json "$WEIGHTS/eval-caption.json"
run $HG eval caption "$UCM" --model hqrs-mini-coca --decoding consensus --json "$WEIGHTS/eval-caption-consensus.json"
run $PY benchmarks/demo_ap.py --model hqrs-mini-clip --json "$WEIGHTS/eval-demo-ap.json"
