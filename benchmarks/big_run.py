"""One big run: 1,000,000 requests over 64 replicas (Vicuna-7B + LLaMA-160M, OSD with harvest
training), with the binned iteration log. Prints wall time, simulated requests per wall-second and
peak RSS (the process's own, from getrusage).

    python benchmarks/big_run.py [--requests 1000000] [--replicas 64]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from osdsim.api import compare
from osdsim.report.writers import write_output
from osdsim.scenario import scenario_from_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--rate-per-replica", type=float, default=12.0)
    args = ap.parse_args()
    spec = {
        "name": "big-run",
        "seed": 0,
        "models": {"target": "vicuna-7b", "draft": "llama-160m"},
        "hardware": {"profile": "a100-80g", "replicas": args.replicas},
        "router": "least-outstanding",
        "batching": {"max_batch_size": 128, "chunked_prefill_tokens": 512},
        "strategy": "osd",
        "speculation": {"k": 4},
        "acceptance": {"domains": {"chat": {"alpha_0": 0.5, "alpha_inf": 0.7, "tau_tokens": 20000}}},
        "distill": {"placement": "harvest", "update_interval_requests": 8},
        "workload": {"arrival": "poisson", "rate_per_s": args.rate_per_replica * args.replicas,
                     "num_requests": args.requests,
                     "domains": {"chat": {"prompt_tokens": {"kind": "lognormal", "mean_tokens": 300, "cv": 0.8},
                                          "output_tokens": {"kind": "lognormal", "mean_tokens": 150, "cv": 0.8}}}},
        "report": {"iteration_log": "binned", "time_bin_s": 10.0},
    }
    t0 = time.perf_counter()
    cmp = compare(scenario_from_dict(spec))
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_output(cmp, Path(tmp) / "out", plots=False)
    t2 = time.perf_counter()
    s = cmp.results["osd"].summary
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"requests {s['requests']['finished']:,} / {args.requests:,} on {args.replicas} replicas; "
          f"mean batch {s['utilisation']['mean_batch']}, busy {s['utilisation']['busy_fraction']}")
    print(f"simulate {t1 - t0:.1f} s, write {t2 - t1:.1f} s, total {t2 - t0:.1f} s; "
          f"{args.requests / (t2 - t0):,.0f} simulated requests per wall-second; peak RSS {rss_mb:,.0f} MB")


if __name__ == "__main__":
    main()
