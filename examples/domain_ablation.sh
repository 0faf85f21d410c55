#!/usr/bin/env bash
# Issue 10 points 2-3: does the CIM help across domains, and what does stain augmentation do?
# Three runs with the same data (MoNuSeg + CoNSeP), budget, seed and warm start, differing in
# one switch each; each run's best epoch (selected on the mean of the two validation Dice) is
# reported per validation set by examples/domain_ablation_summary.py.
# Usage: examples/domain_ablation.sh EPOCHS SEED [INIT]     e.g. THREADS=1 examples/domain_ablation.sh 6 0
# Resumable: re-running continues unfinished runs from their last epoch.
set -euo pipefail
EPOCHS=${1:-6}; SEED=${2:-0}; INIT=${3:-cellseg/weights/default.safetensors}
SHARED=${SHARED:-../shared/data}
declare -A FLAGS=([full]="" [no-cim]="--no-cim" [no-stain-aug]="--no-stain-aug")
for name in full no-cim no-stain-aug; do
  out="runs/domains-e${EPOCHS}-s${SEED}/${name}"
  resume=""; [ -f "$out/last_state.pt" ] && resume="--resume"
  # shellcheck disable=SC2086
  cellseg train --data "$SHARED/monuseg" --data "$SHARED/consep" --init "$INIT" \
      --epochs "$EPOCHS" --lr 0.0005 --seed "$SEED" --threads "${THREADS:-2}" --out "$out" ${FLAGS[$name]} $resume
done
python "$(dirname "$0")/domain_ablation_summary.py" "runs/domains-e${EPOCHS}-s${SEED}"
