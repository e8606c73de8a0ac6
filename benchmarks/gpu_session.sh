#!/usr/bin/env bash
# GPU checks for a session that is lent a CUDA machine (see docs/benchmarks.md, "GPU").
# Usage on the GPU machine, from the repo root, with diffusers importable:
#   bash benchmarks/gpu_session.sh OUT_DIR [tests|throughput|loop PRESET SEEDS...]
# tests:      the device tests and the train / MIA / loop tests, on the GPU (DIFFAUDIT_DEVICE=cuda)
# throughput: training and sampling throughput of the CPU and GPU presets (images/s from each run's log)
# loop PRESET SEEDS...: a full loop preset (nepotism-digits, mad-digits), one run per seed, timed
set -euo pipefail
out=${1:?output directory}; shift
what=${1:-tests}; shift || true
work=${DIFFAUDIT_GPU_WORK:-/tmp/diffaudit-gpu}  # run directories (many files); only summaries go to OUT
mkdir -p "$out" "$work"
export DIFFAUDIT_DEVICE=cuda PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
timed() {  # timed LABEL CMD...: run CMD, print its last output line and its wall time
  local label=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" 2>&1 | tail -1
  echo "$label wall $($py -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))' "$t0" "$(date +%s.%N)") s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
case "$what" in
tests)
  $py -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_train.py tests/test_model.py \
    tests/test_mia.py tests/test_loop.py tests/test_extraction.py 2>&1 | tail -15 | tee "$out/tests.txt"
  ;;
throughput)
  for preset in digits-8 faces-32 digits-32-gpu glyphs-64-gpu faces-64-gpu; do
    timed "train $preset 300 steps" $py -m diffaudit train --preset "$preset" --out "$work/run-$preset" \
      --set train.steps=300 --set train.log_every=50 --set train.checkpoint_every=1000
    $py - "$work/run-$preset" "$preset" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl")]
print(sys.argv[2], "train images/s (last logged window):", round(rows[-1]["images_per_s"]))
PY
    timed "sample $preset 1000 images (sample CLI defaults)" $py -m diffaudit sample --model "$work/run-$preset" \
      --num-images 1000 --out "$work/samples-$preset.npz"
  done 2>&1 | tee "$out/throughput.txt"
  ;;
loop)
  preset=$1; shift
  for seed in "$@"; do
    timed "$preset seed $seed" $py -m diffaudit loop --preset "$preset" --out "$work/$preset-seed$seed" --set seed="$seed"
    tar czf "$out/$preset-seed$seed.tgz" -C "$work" --exclude=model --exclude=train --exclude='*.npz' "$preset-seed$seed"
  done 2>&1 | tee -a "$out/loop.txt"
  ;;
esac
