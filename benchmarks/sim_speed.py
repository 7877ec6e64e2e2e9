"""Simulator speed: simulated requests per wall-second, events per second, peak memory.

The fixed workload of issue 2 (Vidur's comparison point): Llama-2-70B, tensor parallel 2 on
A100-80G, Poisson arrivals, lognormal prompt/output lengths with means 1,147 / 211 tokens,
10,000 requests, chunked prefill 512, batch cap 128, on 1 and 8 replicas; then the same with
speculative decoding (static draft), and with OSD under a sharp shift (harvest placement).
Then the operating point of issue 14: 1.0 request/s per replica with the request lengths of the
Splitwise conversation trace (Vidur's processed_traces/splitwise_conv.csv, read from
../shared/vidur-data/processed_traces or --trace-dir; skipped with a message when absent).
Each configuration runs in a fresh subprocess (so peak RSS is its own), end to end: scenario
load, simulation, and results written to disk (Parquet + summary.json; no plots); "cpu req/s"
counts the child's CPU time instead of wall time (steadier on a shared machine).

    python benchmarks/sim_speed.py [--requests 10000] [--repeats 3] [--rate-per-replica 0.6]
                                   [--only splitwise] [--baseline-src DIR]

--baseline-src DIR runs every configuration also with the osdsim package found in DIR (e.g. an
export of another commit: `git archive main | tar -x -C /tmp/base`), alternating the two per
repeat, so a before/after comparison shares one run of the script (and its machine load).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
c0 = time.process_time()
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
print(json.dumps({"wall_s": t3 - t0, "cpu_s": time.process_time() - c0, "sim_s": t2 - t1, "write_s": t3 - t2, "events": events,
                  "finished": res.summary["requests"]["finished"], "mean_batch": res.summary["utilisation"]["mean_batch"],
                  "busy": res.summary["utilisation"]["busy_fraction"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


REPO = Path(__file__).resolve().parents[1]
TRACE_DIR = REPO.parent / "shared" / "vidur-data" / "processed_traces"
SPLITWISE_RATE_PER_REPLICA = 1.0  # requests/s per replica (issue 14's operating point)


def splitwise_lengths(trace_dir: Path, out_dir: Path) -> tuple[Path, Path] | None:
    """Prompt and output length files (one `tokens` column) from splitwise_conv.csv, or None."""
    src = trace_dir / "splitwise_conv.csv"
    if not src.is_file():
        return None
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))
    paths = []
    for name, col in (("prompt", "num_prefill_tokens"), ("output", "num_decode_tokens")):
        path = out_dir / f"splitwise_conv_{name}.csv"
        path.write_text("tokens\n" + "\n".join(str(int(float(r[col]))) for r in rows) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def splitwise_config(strategy: str, replicas: int, n: int, prompt_file: Path, output_file: Path) -> dict:
    spec = config(strategy, replicas, n, False, SPLITWISE_RATE_PER_REPLICA)
    lengths = {"prompt_tokens": {"kind": "empirical", "file": str(prompt_file)},
               "output_tokens": {"kind": "empirical", "file": str(output_file)}}
    spec["workload"]["domains"] = {d: lengths for d in spec["workload"]["domains"]}
    return spec


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
    ap.add_argument("--trace-dir", type=Path, default=TRACE_DIR,
                    help="folder holding Vidur's splitwise_conv.csv (default ../shared/vidur-data/processed_traces)")
    ap.add_argument("--only", choices=("all", "reference", "splitwise"), default="all")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also run each configuration with the osdsim package in this folder (A/B)")
    args = ap.parse_args()
    sources = [("", REPO)] + ([("base ", args.baseline_src.resolve())] if args.baseline_src else [])
    configs = []
    if args.only in ("all", "reference"):
        for strategy, shift in (("no-spec", False), ("static", False), ("osd", True)):
            for replicas in (1, 8):
                configs.append((strategy + (" +shift" if shift else ""), replicas,
                                config(strategy, replicas, args.requests, shift, args.rate_per_replica)))
    tmp_lengths = tempfile.TemporaryDirectory()
    if args.only in ("all", "splitwise"):
        files = splitwise_lengths(args.trace_dir, Path(tmp_lengths.name))
        if files is None:
            print(f"skipping the Splitwise operating point: {args.trace_dir / 'splitwise_conv.csv'} not found "
                  "(pass --trace-dir)")
        else:
            for strategy in ("no-spec", "static"):
                for replicas in (1, 8):
                    configs.append((f"{strategy} splitwise", replicas,
                                    splitwise_config(strategy, replicas, args.requests, *files)))
    rows = []
    for name, replicas, spec in configs:
        runs: dict[str, list[dict]] = {label: [] for label, _ in sources}
        for _ in range(args.repeats):
            for label, src in sources:  # alternate before/after: the same machine load for both
                env = {**os.environ, "PYTHONPATH": str(src)}
                with tempfile.TemporaryDirectory() as tmp:
                    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), str(Path(tmp) / "out")],
                                         capture_output=True, text=True, env=env, cwd=tmp)
                if out.returncode:
                    sys.exit(f"{label}{name} ({src}) failed:\n{out.stderr[-3000:]}")
                runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for label, _ in sources:
            rr = runs[label]
            wall = statistics.median(r["wall_s"] for r in rr)
            cpu = statistics.median(r["cpu_s"] for r in rr)
            r0 = rr[0]
            rows.append((label + name, replicas, r0["finished"], wall, r0["finished"] / wall, r0["finished"] / cpu,
                         r0["events"] / statistics.median(r["sim_s"] for r in rr),
                         max(r["peak_rss_mb"] for r in rr), r0["mean_batch"], r0["busy"]))
    tmp_lengths.cleanup()
    print(f"{'strategy':<24}{'replicas':>9}{'requests':>10}{'wall s':>9}{'req/s':>9}{'cpu req/s':>10}{'events/s':>10}"
          f"{'peak MB':>9}{'batch':>7}{'busy':>6}")
    for s, rep, n, wall, rps, cps, eps, mem, batch, busy in rows:
        print(f"{s:<24}{rep:>9}{n:>10}{wall:>9.2f}{rps:>9.0f}{cps:>10.0f}{eps:>10.0f}{mem:>9.0f}{batch:>7.1f}{busy:>6.2f}")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"(median of repeats; total {time.time() - t:.0f} s)")
