#!/usr/bin/env bash
# A cohort with a plain shell loop: one `cellseg predict` per slide, the failures listed in a file.
#
# Usage: examples/cohort_loop.sh OUT_DIR SLIDE... [-- cellseg predict options]
#   e.g. examples/cohort_loop.sh results/ cohort/*.svs -- --device cuda
# One process per slide loads the model each time; `cellseg predict cohort/*.svs --out-dir results/`
# does the same in one process. A loop is handy to add per-slide steps (copy in, upload, clean up).
# Slides that are done are skipped, so the loop can simply be run again. Every run also records
# its slide in OUT_DIR/cohort.csv; Ctrl-C (exit 130) stops the loop.
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR SLIDE... [-- options]}
shift
slides=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do slides+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
CELLSEG=${CELLSEG:-cellseg}
mkdir -p "$OUT"
failed="$OUT/failed.txt"
: >"$failed"
for slide in "${slides[@]}"; do
  # shellcheck disable=SC2086
  $CELLSEG predict "$slide" --out-dir "$OUT" "$@"
  status=$?
  [ "$status" -eq 130 ] && exit 130
  [ "$status" -ne 0 ] && echo "$slide" >>"$failed"
done
n_failed=$(wc -l <"$failed")
echo "${#slides[@]} slides, ${n_failed} failed (listed in $failed)" >&2
[ "$n_failed" -eq 0 ]
