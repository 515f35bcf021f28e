#!/usr/bin/env bash
# 3D self-supervision on AdrenalMNIST3D at one shared CPU budget: SparK-3D, MAE-3D, Token Reconstruction 3D and
# GreenRFM stage 1 (label-supervised) against the same encoders at random initialisation, one greenlab.compare
# table (see README.md). Pre-training on the 1,188 train volumes, probes fit on them, scored on the 98 val volumes.
#   bash experiments/ssl3d/run.sh [OUT]        # OUT: a new folder (default logs/ssl3d)
set -euo pipefail
PYTHON="${PYTHON:-python3}"
OUT="${1:-logs/ssl3d}"
ADRENAL="${ADRENAL:-../shared/data/adrenalmnist3d/adrenalmnist3d_64_trainval.npz}"
[ -e "$OUT" ] && { echo "ssl3d: $OUT exists; give a new folder" >&2; exit 2; }
# the shared budget: volumes resized to 32^3, batches of 16, 32 optimiser steps (512 volumes seen), no warm-up
DATA="data=medmnist data.path=$ADRENAL data.volume_size=[32,32,32] data.crop_size=null"
BUDGET="data.batch_size=16 data.eval_batch_size=32 trainer.max_epochs=1 trainer.limit_train_batches=32"
R3D="backbone.stem_kernel=2 backbone.weights=random"            # GreenRFM's r3d_18 stem, random start
VIT="backbone.volume_size=[32,32,32] backbone.patch_size=8"     # demo_3d_vit's 192-d, 4-block 3D ViT: 4^3 patches
COSINE="objective.warmup_epochs=0 objective.cosine_epochs=1"
run() { echo "== $1"; shift; "$PYTHON" "$@"; }
run spark_3d -m greenlab +experiment=spark_3d $DATA $BUDGET $R3D $COSINE hydra.run.dir="$OUT/spark_3d"
run mae_3d -m greenlab +experiment=mae_3d $DATA $BUDGET $VIT $COSINE hydra.run.dir="$OUT/mae_3d"
run token_reconstruction_3d -m greenlab +experiment=token_reconstruction_3d $DATA $BUDGET $R3D \
    hydra.run.dir="$OUT/token_reconstruction_3d"
run greenrfm_stage1 -m greenlab +experiment=greenrfm_stage1_medmnist3d $DATA $BUDGET $R3D \
    hydra.run.dir="$OUT/greenrfm_stage1"
run random_r3d_18 -m greenlab.evaluate backbone=resnet3d18 $R3D $DATA evaluation.pooling=mean_patch \
    hydra.run.dir="$OUT/random_r3d_18"
run random_vit3d -m greenlab.evaluate backbone=vit3d $VIT backbone.embed_dim=192 backbone.depth=4 backbone.num_heads=3 \
    $DATA evaluation.pooling=mean_patch hydra.run.dir="$OUT/random_vit3d"
"$PYTHON" -m greenlab.compare "$OUT"/{spark_3d,mae_3d,token_reconstruction_3d,greenrfm_stage1,random_r3d_18,random_vit3d} \
    --names spark_3d mae_3d token_reconstruction_3d greenrfm_stage1 random_r3d_18 random_vit3d \
    --out "$OUT/compare" --wandb disabled
