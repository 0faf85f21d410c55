#!/usr/bin/env bash
# Paper Tables 1 and 2 under the paper protocol (224 px, 24 train / 6 val, test for reporting only).
# Usage: examples/tables.sh EPOCHS SEED [RUN...]     e.g. examples/tables.sh 60 0 backbone full
# Each run is resumable: re-running the script continues unfinished runs from their last epoch.
set -euo pipefail
EPOCHS=${1:-400}; SEED=${2:-0}; shift 2 || true
DATA=${DATA:-../shared/data/monuseg}
declare -A FLAGS=(
  [backbone]="--no-dac --no-cim"
  [backbone-cim]="--no-dac"
  [backbone-dac]="--no-cim"
  [full]=""
  [unet]="--arch unet --no-cim"
  [attention-unet]="--arch attention_unet --no-cim"
)
RUNS=("$@"); [ ${#RUNS[@]} -eq 0 ] && RUNS=(backbone backbone-cim backbone-dac full unet attention-unet)
for name in "${RUNS[@]}"; do
  out="runs/table-e${EPOCHS}-s${SEED}/${name}"
  resume=""; [ -f "$out/last_state.pt" ] && resume="--resume"
  # shellcheck disable=SC2086
  cellseg train --data "$DATA" --preset paper --epochs "$EPOCHS" --seed "$SEED" --threads 1 \
      --out "$out" ${FLAGS[$name]} $resume
  cellseg evaluate --data "$DATA/test" --model "$out/best.safetensors" --protocol paper \
      --json "$out/test-paper.json" --device cpu
done
