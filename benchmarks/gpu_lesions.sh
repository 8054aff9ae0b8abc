#!/usr/bin/env bash
# Issue #13's open question on one lent GPU: does a small 2D encoder of the paper's kind (SigLIP) learn to find
# the synthetic benchmark's lesions when trained far longer, wider or on larger slices than a CPU allows?
# (docs/results.md, fifth status: on the CPU, 35-150 epochs of dense per-token targets left the volume-level
# answer at the majority rate.) Five `benchmarks.dense_lesions` runs at once, each until the deadline, each
# writing one JSON line per epoch and its encoder's weights after every epoch (lesion_probe reads them):
#   preset   the tiny preset's encoder (64-pixel slices, 16-pixel patches, width 64, 2 layers)
#   patch8   8-pixel patches (64 tokens a slice): a patch embedding that keeps every pixel (64 pixels -> width
#            64), as SigLIP-large's does (256 pixels -> 1024); the preset's squeezes 256 pixels into 64
#   wide     width 128, 4 layers
#   size128  128-pixel slices (64 tokens a slice)
#   size256  256-pixel slices (256 tokens a slice, as the paper's SigLIP), width 128, 4 layers, 800 volumes
# The wheels travel as for the ablation (benchmarks/gpu_parts.sh; the same archive serves both):
#   here:   bash benchmarks/gpu_lesions.sh pack                 # prints the chunk count K
#   device: bash benchmarks/gpu_lesions.sh receive              # carry .gpu-parts/1, then 2, ..., K-1
#   device: bash benchmarks/gpu_lesions.sh run [SECONDS]        # carry .gpu-parts/K; default 480 s
# `run` stops every run SECONDS after the call began (setup and data generation included); $OUT gets
# NAME.jsonl and NAME.safetensors for each run, and gpu_lesions.log. Then, here, for each encoder:
#   python -m benchmarks.lesion_probe --encoder NAME.safetensors [its --size/--width/--layers]
# Records go under benchmarks/results/gpu_lesions/.
#   here:   bash benchmarks/gpu_lesions.sh dry-run              # the five runs on CPU, 4 volumes, 1 epoch
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_parts.sh

declare -A RUNS=(
  [preset]=""
  [patch8]="--patch 8"
  [wide]="--width 128 --layers 4"
  [size128]="--size 128"
  [size256]="--size 256 --width 128 --layers 4 --batch-size 2 --train-volumes 800"
)

study() {  # DEVICE SECONDS OUT [dense_lesions options for all runs]
  local device=$1 seconds=$2 out=$3 name
  shift 3
  mkdir -p "$out"
  for name in "${!RUNS[@]}"; do
    # shellcheck disable=SC2086  # the options are words
    timeout -s TERM "$seconds" python3 -m benchmarks.dense_lesions ${RUNS[$name]} --device "$device" \
      --save "$out/$name.safetensors" "$@" >"$out/$name.jsonl" 2>>"$out/gpu_lesions.log" &
  done
  wait || true
  for name in "${!RUNS[@]}"; do
    echo "$name: $(grep -c '"epoch"' "$out/$name.jsonl" || true) epochs; last: $(tail -n 1 "$out/$name.jsonl" | cut -c1-400)"
  done
}

run() {
  local seconds=${1:-480} out
  out=$(realpath -m "${OUT:-runs/gpu-lesions-out}")
  site
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$out/gpu_lesions.log" 2>&1 || true
  study cuda $((seconds - SECONDS - 10)) "$out" --epochs 100000
}

case ${1:-} in
  pack) pack ;;
  receive) receive ;;
  run) run "${2:-480}" ;;
  dry-run) study cpu 600 runs/gpu-lesions-dry --train-volumes 4 --test-volumes 2 --epochs 1 ;;
  *) echo "usage: bash benchmarks/gpu_lesions.sh pack | receive | run [SECONDS] | dry-run" >&2; exit 2 ;;
esac
