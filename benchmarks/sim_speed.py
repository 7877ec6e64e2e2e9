"""Simulator speed: simulated requests per wall-second, events per second, peak memory.

The fixed workload of issue 2 (Vidur's comparison point): Llama-2-70B, tensor parallel 2 on
A100-80G, Poisson arrivals, lognormal prompt/output lengths with means 1,147 / 211 tokens,
10,000 requests, chunked prefill 512, batch cap 128, on 1 and 8 replicas; then the same with
speculative decoding (static draft), and with OSD under a sharp shift (harvest placement).
Each configuration runs in a fresh subprocess (so peak RSS is its own), end to end: scenario
load, simulation, and results written to disk (Parquet + summary.json; no plots).

    python benchmarks/sim_speed.py [--requests 10000] [--repeats 3] [--rate-per-replica 0.6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = {
    "name": "bench-70b",
    "seed": 0,
    "models": {"target": "llama-2-70b", "draft": "llama-160m"},
    "hardware": {"profile": "a100-80g", "tensor_parallel": 2, "replicas": 1},
    "batching": {"max_batch_size": 128, "chunked_prefill_tokens": 512},
    "speculation": {"k": 4},
    "acceptance": {"domains": {
        "gsm8k": {"alpha_0": 0.58, "alpha_inf": 0.75, "tau_tokens": 4000},
        "spider": {"alpha_0": 0.28, "alpha_inf": 0.76, "tau_tokens": 4000},
    }},
    "distill": {"placement": "harvest", "update_interval_requests": 8},
    "workload": {
        "arrival": "poisson",
        "domains": {d: {"prompt_tokens": {"kind": "lognormal", "mean_tokens": 1147, "cv": 0.8, "max_tokens": 4000},
                        "output_tokens": {"kind": "lognormal", "mean_tokens": 211, "cv": 0.8, "max_tokens": 2000}}
                    for d in ("gsm8k", "spider")},
    },
}

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from osdsim.api import compare
from osdsim.report.writers import write_output
from osdsim.scenario import scenario_from_dict
spec = json.loads(sys.argv[1]); out = sys.argv[2]
sc = scenario_from_dict(spec)
t1 = time.perf_counter()
cmp = compare(sc)
t2 = time.perf_counter()
write_output(cmp, out, fmt="parquet", plots=False)
t3 = time.perf_counter()
res = next(iter(cmp.results.values()))
events = len(res.iterations) + 2 * len(res.requests)  # iterations + arrivals + finishes
print(json.dumps({"wall_s": t3 - t0, "sim_s": t2 - t1, "write_s": t3 - t2, "events": events,
                  "finished": res.summary["requests"]["finished"], "mean_batch": res.summary["utilisation"]["mean_batch"],
                  "busy": res.summary["utilisation"]["busy_fraction"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def config(strategy: str, replicas: int, n: int, shift: bool, rate_per_replica: float) -> dict:
    spec = json.loads(json.dumps(BASE))
    spec["strategy"] = strategy
    spec["hardware"]["replicas"] = replicas
    spec["workload"]["rate_per_s"] = rate_per_replica * replicas
    if shift:
        half = n // 2
        spec["workload"]["shift"] = {"unit": "requests", "phases": [
            {"start": 0, "end": half, "mix": {"gsm8k": 1.0}},
            {"start": half, "end": n, "mix": {"spider": 1.0}}]}
    else:
        spec["workload"]["num_requests"] = n
        spec["workload"]["mix"] = {"gsm8k": 0.5, "spider": 0.5}
    return spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate-per-replica", type=float, default=0.6,
                    help="arrivals per second per replica (0.6 ≈ 75%% busy without speculation)")
    args = ap.parse_args()
    rows = []
    for strategy, shift in (("no-spec", False), ("static", False), ("osd", True)):
        for replicas in (1, 8):
            spec = config(strategy, replicas, args.requests, shift, args.rate_per_replica)
            runs = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), str(Path(tmp) / "out")],
                                         check=True, capture_output=True, text=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            wall = statistics.median(r["wall_s"] for r in runs)
            r0 = runs[0]
            rows.append((strategy + (" +shift" if shift else ""), replicas, r0["finished"], wall,
                         r0["finished"] / wall, r0["events"] / statistics.median(r["sim_s"] for r in runs),
                         max(r["peak_rss_mb"] for r in runs), r0["mean_batch"], r0["busy"]))
    print(f"{'strategy':<14}{'replicas':>9}{'requests':>10}{'wall s':>9}{'req/s':>9}{'events/s':>10}"
          f"{'peak MB':>9}{'batch':>7}{'busy':>6}")
    for s, rep, n, wall, rps, eps, mem, batch, busy in rows:
        print(f"{s:<14}{rep:>9}{n:>10}{wall:>9.2f}{rps:>9.0f}{eps:>10.0f}{mem:>9.0f}{batch:>7.1f}{busy:>6.2f}")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"(median of repeats; total {time.time() - t:.0f} s)")
