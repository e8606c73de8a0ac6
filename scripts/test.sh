#!/usr/bin/env bash
# Quick start, part 2: set up (with the test tools) and run the test suite (slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m pytest -q "$@"
