"""Shared fixtures: small scenarios built from dicts, and an analytic hardware profile."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def analytic_profile(tmp_path: Path, kernel_s: float = 1e-3, pass_s: float = 0.0) -> Path:
    """A profile whose passes cost exactly L·kernel_s + pass_s (roofline terms ~1e-12 s)."""
    doc = {
        "schema_version": 1,
        "name": "analytic",
        "device": "analytic test device",
        "peak_flops_per_s": {"bf16": 1e30, "fp32": 1e30},
        "memory_bandwidth_bytes_per_s": 1e30,
        "memory_bytes": 1e15,
        "interconnect_bandwidth_bytes_per_s": 1e30,
        "efficiency": {
            "flops_max": 1.0, "flops_half_tokens": 0.0, "bandwidth": 1.0,
            "kernel_overhead_s_per_layer": kernel_s, "pass_overhead_s": pass_s, "allreduce_latency_s": 0.0,
        },
        "provenance": {"source": "datasheet", "efficiencies_are_defaults": True, "notes": "unit tests"},
    }
    path = tmp_path / "analytic.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


TINY_TARGET = {"name": "t40", "n_layers": 40, "hidden": 64, "n_heads": 4, "ffn": 128, "vocab": 256}
TINY_DRAFT = {"name": "d4", "n_layers": 4, "hidden": 64, "n_heads": 4, "ffn": 128, "vocab": 256}

BASE = {
    "name": "test",
    "seed": 1,
    "models": {"target": "vicuna-7b", "draft": "llama-160m"},
    "hardware": {"profile": "a100-80g-datasheet"},  # the classic roofline numbers these tests were written on
    "batching": {"max_batch_size": 32, "chunked_prefill_tokens": 512},
    "strategy": "static",
    "speculation": {"k": 4},
    "acceptance": {"domains": {"a": {"alpha_0": 0.6}, "b": {"alpha_0": 0.4}}},
    "workload": {
        "arrival": "poisson",
        "rate_per_s": 4.0,
        "num_requests": 200,
        "domains": {
            "a": {"prompt_tokens": {"kind": "uniform", "low_tokens": 20, "high_tokens": 200},
                  "output_tokens": {"kind": "uniform", "low_tokens": 10, "high_tokens": 120}},
            "b": {"prompt_tokens": {"kind": "lognormal", "mean_tokens": 300, "cv": 0.5},
                  "output_tokens": {"kind": "fixed", "value_tokens": 40}},
        },
    },
}


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.pop("__replace__", False):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture
def make_scenario():
    from osdsim.scenario import scenario_from_dict

    def _make(update: dict | None = None, base_dir: Path | None = None):
        return scenario_from_dict(merge(BASE, update or {}), base_dir=base_dir or REPO)

    return _make


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch at one thread for a module's tests (timings and reductions as the real runs use)."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
