#!/usr/bin/env bash
# Quick start, part 1: set up and run the main job on built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if .venv/bin/diffaudit --help | grep -q " demo "; then
  .venv/bin/diffaudit demo "$@"
else
  .venv/bin/diffaudit train --preset digits-8 --out runs/quickstart-digits --resume
  .venv/bin/diffaudit sample --model runs/quickstart-digits --num-images 100 --out runs/quickstart-digits/samples.npz
  echo "sample grid: runs/quickstart-digits/samples.png"
fi
