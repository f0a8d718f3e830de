#!/usr/bin/env bash
# Builds the book into _build/html from the notebooks' stored outputs (set-up included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
exec jupyter-book build . -W --keep-going "$@"
