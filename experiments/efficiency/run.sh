#!/usr/bin/env bash
# The efficiency study (issue #5), one command:  bash experiments/efficiency/run.sh [Hydra overrides for every run]
#
# Four methods, each a whole greenlab run (pre-training -> linear probes on frozen embeddings -> compute/energy):
#   token_reconstruction  RETFound-Green (ViT-S/14 + registers)     +experiment=retfound_green
#   mae_vit_l16           RETFound-MEH-like MAE (ViT-L/16, mask .75) +experiment=mae_baseline
#   sparse_cnn_mae        SparK on nn-MobileNet                      +experiment=sparse_cnn_mae (probes, not 5-fold FT)
#   must_vision           GreenRFM / MUST (3D ResNet-18 + text)      +experiment=greenrfm (3D CT data)
# then `python -m greenlab.study --efficiency` writes table.md / table.csv / PNGs to $OUT and logs them to W&B.
#
# Environment: BUDGET=cpu (default: the 2D methods on the same data at 224 px for EPOCHS epochs, batch 32; MUST at
# its demo budget) | paper (each experiment's own schedule, scale=paper; add trainer=gpu and your data);
# EPOCHS (cpu budget, default 1); DATA_2D / DATA_3D (Hydra overrides for the fundus / CT runs, default: the
# embedded data); PRICE (USD per device-hour, default 2.5); SWEEP (default logs/efficiency/<time>; run again with
# the same SWEEP after a failure: methods with a results.json there are kept, not run again); OUT (default
# experiments/efficiency).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
extra=("$@")
SWEEP=${SWEEP:-logs/efficiency/$(date +%Y-%m-%d_%H-%M-%S)}
OUT=${OUT:-experiments/efficiency}
read -r -a data2d <<< "${DATA_2D:-}"
read -r -a data3d <<< "${DATA_3D:-}"
if [ "${BUDGET:-cpu}" = paper ]; then
  budget2d=(scale=paper); budget3d=(scale=paper); sparse_scale=()
else  # same images, same resolution, same epochs and batch for the three 2D methods
  e=${EPOCHS:-1}
  budget2d=(img_size=224 trainer.max_epochs="$e" data.batch_size=32 objective.warmup_epochs=0
            objective.cosine_epochs="$e" evaluate_initial_backbone=false)
  budget3d=()
  sparse_scale=(scale=demo)  # its own demo scale is sized for 5-fold fine-tuning, which the study replaces
fi
run() {  # run <folder> <overrides...>
  if [ -f "$SWEEP/$1/results.json" ]; then echo "kept: $SWEEP/$1 (finished earlier)"; return; fi
  "$PYTHON" -m greenlab "${@:2}" "${extra[@]}" hydra.run.dir="$SWEEP/$1" >/dev/null 2>"$SWEEP.$1.log" || {
    echo "error: run $1 failed; see $SWEEP.$1.log" >&2; exit 1; }
  echo "done: $SWEEP/$1"
}
mkdir -p "$(dirname "$SWEEP")"
run token_reconstruction +experiment=retfound_green "${budget2d[@]}" "${data2d[@]}"
run mae_vit_l16 +experiment=mae_baseline "${budget2d[@]}" "${data2d[@]}"
run sparse_cnn_mae +experiment=sparse_cnn_mae evaluation=linear_probe "${sparse_scale[@]}" \
    objective.figure_every_n_epochs=0 "${budget2d[@]}" "${data2d[@]}"
run must_vision +experiment=greenrfm "${budget3d[@]}" "${data3d[@]}"
"$PYTHON" -m greenlab.study "$SWEEP" --out "$OUT" --efficiency --price-per-device-hour "${PRICE:-2.5}" --wandb
