#!/usr/bin/env bash
# Quick start, part 1: set up .venv and run the main job, the end-to-end demo on built-in data
# (about 10-18 minutes on 2 CPU cores). Extra arguments go to `diffaudit demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/diffaudit demo "$@"
