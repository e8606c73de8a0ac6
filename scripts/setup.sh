#!/usr/bin/env bash
# Create .venv and install diffaudit. torch==2.13.0 (the CPU build) goes in first, so that nothing
# later pulls a multi-GB CUDA build. Pass "dev" to also install the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
if [ "$extras" = "dev" ]; then
  .venv/bin/python -m pip install --quiet -e ".[dev]"
else
  .venv/bin/python -m pip install --quiet -e .
fi
