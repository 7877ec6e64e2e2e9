"""A/B bit-identity check: random scenarios simulated by this checkout and by another osdsim source.

Every request's times and outcomes, every iteration record, busy and spare seconds must be the same
bit for bit (one SHA-256 digest per scenario). Use it before/after a change to the simulator core:

    git -C . archive main | tar -x -C /tmp/base
    python benchmarks/ab_identity.py --baseline-src /tmp/base [--scenarios 100] [--seed 0]

Scenarios are drawn with numpy from a seeded generator (as the property tests draw them: small
models, every strategy, placement, router and k setting), and some larger ones on the a100 profile
with long prompts and chunked prefill (where stretches are long and arrivals cut them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys
import numpy as np
from osdsim.scenario import scenario_from_dict
from osdsim.sim.engine import build_and_run
FIELDS = ("replica", "arrival", "admitted", "first_token", "finish", "steps", "accepted", "proposed",
          "rejections", "emitted", "alpha_model", "rejected")
out = []
for spec in json.loads(sys.stdin.read()):
    raw = build_and_run(scenario_from_dict(spec, base_dir=sys.argv[1]))
    h = hashlib.sha256()
    for f in FIELDS:
        h.update(np.ascontiguousarray(getattr(raw.table, f)).tobytes())
    it = raw.iterations
    for c in it.columns:
        col = it[c].to_numpy()
        h.update((col.astype(str).tobytes() if col.dtype == object else np.ascontiguousarray(col).tobytes()))
    h.update(json.dumps([raw.busy_s, raw.stats.spare_s_available, raw.sim_time_s]).encode())
    out.append(h.hexdigest())
print(json.dumps(out))
"""


def small_spec(rng: np.random.Generator, i: int) -> dict:
    """A small random valid scenario (the ranges of tests/property/test_properties.py)."""
    n = int(rng.integers(5, 60))
    a0 = float(rng.uniform(0, 1))
    ainf = float(rng.uniform(a0, 1))
    lo = int(rng.integers(1, 51))
    hi = int(rng.integers(lo, 121))
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return {
        "name": f"ab{i}", "seed": int(rng.integers(2**31 - 1)),
        "models": {"target": "vicuna-7b", "draft": "llama-160m"},
        "hardware": {"profile": pick(["a100-80g", "a100-80g-datasheet", "cpu-amd-epyc"]),
                     "replicas": int(rng.integers(1, 4))},
        "router": pick(["round-robin", "least-outstanding", "random"]),
        "batching": {"max_batch_size": int(rng.integers(1, 17)),
                     "chunked_prefill_tokens": pick([None, int(rng.integers(8, 1025))]),
                     "kv_cache_tokens": pick([None, int(rng.integers(60, 5001))])},
        "strategy": pick(["no-spec", "static", "offline", "osd", "osd-per-domain"]),
        "speculation": {"k": pick([int(rng.integers(1, 7)), "auto"]), "k_max": 6},
        "acceptance": {"transfer": float(rng.uniform(-1, 1)),
                       "domains": {"a": {"alpha_0": a0, "alpha_inf": ainf, "tau_tokens": float(rng.uniform(10, 1e5))},
                                   "b": {"alpha_0": a0 / 2, "alpha_inf": ainf}}},
        "distill": {"placement": pick(["inline", "harvest", "dedicated"]),
                    "update_interval_requests": int(rng.integers(1, 9)), "tokens": pick(["target", "all"]),
                    "interference": float(rng.uniform(0, 0.5)), "max_pending_steps": int(rng.integers(1, 4))},
        "workload": {"arrival": pick(["poisson", "gamma"]), "rate_per_s": float(rng.uniform(0.1, 200)),
                     "cv": float(rng.uniform(0.2, 4)),
                     "domains": {d: {"prompt_tokens": {"kind": "uniform", "low_tokens": lo, "high_tokens": hi},
                                     "output_tokens": {"kind": "uniform", "low_tokens": 1, "high_tokens": hi}}
                                 for d in ("a", "b")},
                     "shift": {"unit": "requests", "phases": [
                         {"start": 0, "end": n // 2 + 1, "mix": {"a": 1.0}},
                         {"start": n // 2 + 1, "end": n + 1, "mix": {"a": 0.3, "b": 0.7}, "mix_end": {"b": 1.0}}]}},
    }


def large_spec(rng: np.random.Generator, i: int) -> dict:
    """Long prompts, chunked prefill and a few hundred requests near saturation (long stretches)."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    strategy = pick(["no-spec", "static", "osd"])
    lengths = {"prompt_tokens": {"kind": "lognormal", "mean_tokens": int(rng.integers(100, 2000)), "cv": 0.8,
                                 "max_tokens": 4000},
               "output_tokens": {"kind": "lognormal", "mean_tokens": int(rng.integers(20, 400)), "cv": 0.8,
                                 "max_tokens": 2000}}
    return {
        "name": f"ab-large{i}", "seed": int(rng.integers(2**31 - 1)),
        "models": {"target": "llama-2-7b", "draft": "llama-160m"},
        "hardware": {"profile": "a100-80g", "replicas": int(rng.integers(1, 3))},
        "router": pick(["round-robin", "least-outstanding"]),
        "batching": {"max_batch_size": pick([8, 32, 128]), "chunked_prefill_tokens": pick([256, 512, 2048]),
                     "kv_cache_tokens": pick([None, 20000, 60000])},
        "strategy": strategy,
        "speculation": {"k": pick([4, "auto"]), "k_max": 6},
        "acceptance": {"domains": {"a": {"alpha_0": 0.5, "alpha_inf": 0.8, "tau_tokens": 4000},
                                   "b": {"alpha_0": 0.3, "alpha_inf": 0.7, "tau_tokens": 4000}}},
        "distill": {"placement": pick(["harvest", "inline"]), "update_interval_requests": 8},
        "workload": {"arrival": pick(["poisson", "gamma"]), "rate_per_s": float(rng.uniform(1, 40)),
                     "cv": float(rng.uniform(0.5, 3)), "num_requests": int(rng.integers(100, 400)),
                     "mix": {"a": 0.5, "b": 0.5}, "domains": {"a": lengths, "b": lengths}},
    }


def digests(src: Path, specs: list[dict]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.TemporaryDirectory() as tmp:  # not the repository: `python -c` imports from its cwd first
        out = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], input=json.dumps(specs), capture_output=True,
                             text=True, env=env, cwd=tmp)
    if out.returncode:
        sys.exit(f"{src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-src", type=Path, required=True, help="folder holding the other osdsim package")
    ap.add_argument("--scenarios", type=int, default=100, help="small random scenarios")
    ap.add_argument("--large", type=int, default=10, help="larger a100 scenarios with long prompts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    specs = [small_spec(rng, i) for i in range(args.scenarios)] + [large_spec(rng, i) for i in range(args.large)]
    mine, base = digests(REPO, specs), digests(args.baseline_src.resolve(), specs)
    bad = [s["name"] for s, a, b in zip(specs, mine, base, strict=True) if a != b]
    print(f"{len(specs) - len(bad)}/{len(specs)} scenarios bit-identical")
    if bad:
        sys.exit("differ: " + ", ".join(bad))


if __name__ == "__main__":
    main()
