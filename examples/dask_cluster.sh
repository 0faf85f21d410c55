#!/usr/bin/env bash
# A cohort on a Dask cluster: start a scheduler and workers, then `cellseg predict --scheduler`.
#
# Usage: examples/dask_cluster.sh SLIDE_LIST OUT_DIR [extra cellseg predict options]
#   e.g. examples/dask_cluster.sh cohort.csv results/ --device cuda --batch-size 256
# Needs: pip install "causal-cellseg[distributed]" on every machine (same versions everywhere).
#
# This script starts everything on this machine (N_WORKERS workers, default 2) and stops it at the
# end. On a real cluster, start the scheduler once on a head node and the workers on the compute
# nodes (ssh, Slurm, Kubernetes...), then run only the `cellseg predict` line:
#   head:    dask scheduler --port 8786
#   CPU:     dask worker tcp://head:8786 --nthreads 1 --nworkers 4
#   GPU:     CUDA_VISIBLE_DEVICES=0 dask worker tcp://head:8786 --nthreads 1 --resources GPU=1
#            (one worker per GPU, each seeing one; --device cuda sends slides only to such workers)
# --nthreads 1: each worker runs one slide at a time (a slide keeps several cores busy); each
# worker gives torch its share of the host's cores. Workers import cellseg themselves: restart
# them after upgrading it. Paths (slides, --out-dir, --model) must be the same on every machine
# (a shared file system); relative ones are made absolute against this folder.
# DASK_DISTRIBUTED__WORKER__DAEMON=False lets a worker read slides in processes (--workers) rather
# than a thread, which keeps a GPU busier.
set -euo pipefail
LIST=${1:?usage: $0 SLIDE_LIST OUT_DIR [cellseg predict options]}
OUT=${2:?usage: $0 SLIDE_LIST OUT_DIR [cellseg predict options]}
shift 2
CELLSEG=${CELLSEG:-cellseg}
PORT=${PORT:-8786}
N_WORKERS=${N_WORKERS:-2}
ADDRESS="tcp://127.0.0.1:${PORT}"
LOGS="${OUT}/dask-logs"
mkdir -p "$LOGS"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

dask scheduler --host 127.0.0.1 --port "$PORT" --no-dashboard >"$LOGS/scheduler.log" 2>&1 &
pids+=($!)
for i in $(seq 1 "$N_WORKERS"); do
  dask worker "$ADDRESS" --nthreads 1 --name "worker-$i" --no-dashboard >"$LOGS/worker-$i.log" 2>&1 &
  pids+=($!)
done

# Exit status: 0 when every slide is done, 1 when some failed: they are named on stderr and have
# status 'failed' in OUT_DIR/cohort.csv (a worker that died on a slide counts as a failure).
# shellcheck disable=SC2086
$CELLSEG predict --slides "$LIST" --out-dir "$OUT" --scheduler "$ADDRESS" "$@"
