#!/usr/bin/env bash
# Calibrate the local GPU and print the held-out errors of the fitted cost model (issue 4).
#
#   OUT=/tmp/cal bash benchmarks/gpu_calibrate.sh [NAME]     NAME: h200 (default), h100, a100-80g, ... or auto
#
# Installs nothing: needs torch (CUDA build), transformers, numpy, scipy, pydantic, typer, rich, pyyaml,
# simpy already present. Writes $OUT/<NAME>.yaml and $OUT/<NAME>.csv (raw measurements) and
# $OUT/calibrate.json; the GPU grid (osdsim/calibrate/passes.py cuda_plan) is sized to finish in a few
# minutes on an H100/H200. A device that is not NAME exits 2 with one line saying what was found.
set -euo pipefail
NAME="${1:-h200}"
OUT="${OUT:-runs/gpu-calibrate}"
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
if [ "$NAME" = auto ]; then
  sel=(--device auto); dest="$OUT"
else
  sel=(--gpu "$NAME"); dest="$OUT/$NAME.yaml"
fi
start=$(date +%s)
timeout 560 "$PY" -c 'from osdsim.cli import main; main()' calibrate "${sel[@]}" --out "$dest" --force --json \
  > "$OUT/calibrate.json"
echo "wall: $(( $(date +%s) - start )) s"
"$PY" - "$OUT/calibrate.json" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
print("profile:", doc["profile"], "| device:", doc["device"], "| calibrate wall:", doc["wall_s"], "s")
print("efficiency:", json.dumps(doc["efficiency"]))
print(f"{'pass/dtype':<14} {'held-out median %':>18} {'held-out max %':>15} {'n':>3}")
for key, s in sorted(doc["heldout_errors"].items()):
    print(f"{key:<14} {s['median_ape_pct']:>18.2f} {s['max_ape_pct']:>15.2f} {int(s['n']):>3}")
PYEOF
