#!/usr/bin/env bash
# Run on a lent GPU machine (device tool), installing nothing: the validation suite for the GPU
# (real runs on cuda, quick GPU calibration first),
# report written under $OUT. Usage: OUT=/path bash benchmarks/gpu_validate.sh
set -euo pipefail
OUT="${OUT:-runs/gpu-validate}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.csv" || true
osdsim doctor --json > "$OUT/doctor.json" || true
timeout 480 osdsim validate validate/gpu.yaml --out "$OUT" || echo "validate exit code $?"
ls -la "$OUT"
