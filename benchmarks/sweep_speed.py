"""Sweep throughput: a 64-point sweep of the shift scenario on 1 vs 2 local workers (and Ray).

Each point is scenarios/shift.yaml shortened to 3 × 200 requests, strategies no-spec/static/osd,
over 16 loads × 4 update intervals. Prints wall time per backend/worker count and the speed-up.

    python benchmarks/sweep_speed.py [--ray]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from osdsim.scenario import read_yaml
from osdsim.sweep.runner import run_sweep
from osdsim.sweep.spec import SweepSpec, points

REPO = Path(__file__).resolve().parents[1]


def spec() -> SweepSpec:
    return SweepSpec(
        name="bench", base="shift.yaml", strategies=["no-spec", "static", "osd"],
        axes={
            "workload.rate_per_s": [1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40],
            "distill.update_interval_requests": [4, 8, 16, 32],
            "workload.shift.phases": [[
                {"name": "gsm8k", "start": 0, "end": 200, "mix": {"gsm8k": 1.0}},
                {"name": "spider", "start": 200, "end": 400, "mix": {"spider": 1.0}},
                {"name": "finance", "start": 400, "end": 600, "mix": {"finance": 1.0}}]],
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ray", action="store_true", help="also time the Ray backend with 2 CPUs")
    args = ap.parse_args()
    sp = spec()
    pts = points(sp)
    base = read_yaml(REPO / "scenarios" / "shift.yaml")
    runs = [("pool", 1), ("pool", 2)] + ([("ray", 2)] if args.ray else [])
    results = {}
    for backend, workers in runs:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            table, ran, _ = run_sweep(sp, base, REPO / "scenarios", pts, Path(tmp) / "out", workers, backend)
            wall = time.perf_counter() - t0
        results[(backend, workers)] = wall
        failed = int((table["status"] != "ok").sum())
        print(f"{backend:<5} workers={workers}: {len(pts)} points in {wall:6.1f} s ({failed} failed)")
    one = results[("pool", 1)]
    for (backend, workers), wall in results.items():
        print(f"  {backend} x{workers}: speed-up {one / wall:.2f}x over 1 worker")


if __name__ == "__main__":
    main()
