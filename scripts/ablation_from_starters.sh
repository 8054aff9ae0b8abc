#!/usr/bin/env bash
# The slice-aggregation ablation with models that read the scan: every variant starts from the shipped
# model's recipe trained for that variant (scripts/train_tiny_model.sh WORK VARIANT; tgis is the shipped
# bundled:tiny_model itself, whose last round also had the relevant-slice loss), then `med2e3 ablation`
# fine-tunes each on the benchmark of data seed 0 (never seen by the starting points) with one budget, the
# answer loss only, three seeds, two runs at a time, and fills the table between the ablation markers.
# The two starting points train at once, one torch thread each (a 2-core machine; logs in
# runs/tiny-model-VARIANT.log). Resumable: rerun the same command; finished rounds, runs and evaluations
# are reused.
# Usage: bash scripts/ablation_from_starters.sh [RESULTS_MD]   (default runs/ablation-starters/results.md)
set -euo pipefail
results=${1:-runs/ablation-starters/results.md}
mkdir -p runs
set -m  # each starting point in its own process group, so that an interrupt stops all of it
pids=()
trap 'for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null; done; exit 130' INT TERM
for variant in none mean; do
  OMP_NUM_THREADS=1 bash scripts/train_tiny_model.sh "runs/tiny-model-$variant" "$variant" \
    >>"runs/tiny-model-$variant.log" 2>&1 &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if [ "$failed" = 1 ]; then echo "a starting point failed: see runs/tiny-model-*.log" >&2; exit 1; fi
med2e3 ablation runs/ablation-starters --volumes 400 --seeds 0 1 2 --jobs 2 \
  --start none=runs/tiny-model-none/round8 --start mean=runs/tiny-model-mean/round8 \
  --start tgis=bundled:tiny_model --override lr=2e-4 --results "$results"
