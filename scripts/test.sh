#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite (the README's test command; .ci/run runs it):
#   Debian packages: WordNet 3.0 for offline METEOR (docs/evaluation.md), Chromium and its driver for the
#   web app's end-to-end test (docs/server.md) -- installed when this runs as root or with sudo;
#   a virtualenv .venv with the pinned CPU torch and med2e3 with all its extras.
# METEOR's NLTK data is built from the WordNet files on first use. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(wordnet-base wordnet-sense-index chromium chromium-driver)
if ! dpkg -s "${apt_packages[@]}" >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=(env)
  elif command -v sudo >/dev/null; then
    as_root=(sudo env)
  else
    as_root=()
    echo "scripts/test.sh: cannot install ${apt_packages[*]} (needs root or sudo): run" \
      "apt-get install -y --no-install-recommends ${apt_packages[*]} as root" >&2
  fi
  if [ ${#as_root[@]} -gt 0 ]; then
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${apt_packages[@]}" >/dev/null
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0 -e ".[test,server,bertscore]"
exec .venv/bin/python -m pytest "$@"
