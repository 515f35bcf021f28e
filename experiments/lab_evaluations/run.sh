#!/usr/bin/env bash
# The lab evaluations (issue #28) on RetinaMNIST (../shared/data, 1,080 train / 120 val images, 5-class DR grade):
# a RETFound-Green demo pre-training watched by the probe monitor, then label efficiency (1-100 % of the training
# labels, 5 nested subsets per point), calibration, kNN, the embedding map, for the trained backbone, the same
# ViT at random initialisation and a timm ResNet-50 (random: no ImageNet weights offline); one greenlab.compare
# table with the curves overlaid; greenlab.embed's throughput on the trained backbone.
#   bash experiments/lab_evaluations/run.sh [OUT]        # OUT: a new folder (default logs/lab_evaluations)
set -euo pipefail
PYTHON="${PYTHON:-python3}"
OUT="${1:-logs/lab_evaluations}"
RETINA="${RETINA:-../shared/data/retinamnist/retinamnist_28_trainval.npz}"
[ -e "$OUT" ] && { echo "lab_evaluations: $OUT exists; give a new folder" >&2; exit 2; }
DATA="data=medmnist data.path=$RETINA"
EVAL="evaluation.label_fractions=[0.01,0.05,0.1,0.25,0.5,1.0] evaluation.knn={k:20,temperature:0.07}"
run() { echo "== $1 ($(date +%T))"; shift; "$PYTHON" "$@"; }
run retfound_green -m greenlab +experiment=retfound_green $DATA $EVAL callbacks.probe_monitor.every_n_epochs=1 \
    logger=csv hydra.run.dir="$OUT/retfound_green"
run random_vit -m greenlab.evaluate backbone.weights=random img_size=112 $DATA $EVAL logger=csv \
    hydra.run.dir="$OUT/random_vit"
run resnet50 -m greenlab.evaluate backbone=resnet50 img_size=112 $DATA $EVAL evaluation.pooling=mean_patch logger=csv \
    hydra.run.dir="$OUT/resnet50"
"$PYTHON" -m greenlab.compare "$OUT"/{retfound_green,random_vit,resnet50} --names retfound_green_demo random_vit \
    resnet50_random --out "$OUT/compare" --wandb disabled
run embed -m greenlab.embed backbone.weights="$OUT/retfound_green/backbone.pth" img_size=112 $DATA \
    out="$OUT/embeddings" hydra.run.dir="$OUT/embed_log"
