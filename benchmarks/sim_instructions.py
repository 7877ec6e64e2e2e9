"""Simulator work in instructions: a deterministic A/B of `build_and_run` (no wall-clock noise).

On a shared or noisy machine, wall time of one configuration varies by ±20% between runs, more
than most single changes to the simulator core move it. Instructions executed do not: this script
runs the simulation under valgrind's callgrind with collection switched on only around
`build_and_run` (`--instr-atstart=no`, then `callgrind_control -i on/off` from inside), so import,
scenario loading and writing results are left out, and prints the instructions of each source
tree and configuration. The same tree and configuration give the same count to within ~0.01%.

    python benchmarks/sim_instructions.py [--src DIR ...] [--requests 1500]
                                          [--config static:8 --config no-spec:1 ...]

--src DIR (repeatable; default: this checkout) is a folder holding an `osdsim` package, e.g. an
export of another commit: `git archive HEAD~1 | tar -x -C /tmp/base`. Configurations are
STRATEGY:REPLICAS on the Splitwise operating point of sim_speed.py (1.0 request/s per replica,
Splitwise conversation lengths). Needs valgrind (apt install valgrind); about 1 minute per run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sim_speed  # noqa: E402  (the Splitwise operating point, defined once)

CHILD = r"""
import json, os, subprocess, sys
from osdsim.scenario import scenario_from_dict
from osdsim.sim.engine import build_and_run
sc = scenario_from_dict(json.loads(sys.argv[1]))
subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True, check=True)
build_and_run(sc)
subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], capture_output=True, check=True)
"""


def instructions(src: Path, spec: dict, workdir: Path) -> int:
    """Instructions callgrind collected around build_and_run with the osdsim package in `src`."""
    import json

    out_file = workdir / "callgrind.out"
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
         sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True, text=True, cwd=workdir, env={**os.environ, "PYTHONPATH": str(src)},
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode or not found:
        sys.exit(f"callgrind run failed ({src}):\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, action="append", default=None)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--config", action="append", default=None, help="STRATEGY:REPLICAS (default static:8, no-spec:8)")
    ap.add_argument("--trace-dir", type=Path, default=sim_speed.TRACE_DIR)
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install valgrind (apt install valgrind)")
    srcs = [s.resolve() for s in (args.src or [sim_speed.REPO])]
    configs = args.config or ["static:8", "no-spec:8"]
    with tempfile.TemporaryDirectory() as tmp:
        files = sim_speed.splitwise_lengths(args.trace_dir, Path(tmp))
        if files is None:
            sys.exit(f"{args.trace_dir / 'splitwise_conv.csv'} not found (pass --trace-dir)")
        print(f"{'configuration':<16}{'source':<40}{'instructions':>16}{'vs first':>10}")
        for cfg in configs:
            strategy, replicas = cfg.split(":")
            spec = sim_speed.splitwise_config(strategy, int(replicas), args.requests, *files)
            first = None
            for src in srcs:
                n = instructions(src, spec, Path(tmp))
                first = first or n
                print(f"{cfg:<16}{str(src)[-39:]:<40}{n:>16,}{100.0 * (n / first - 1.0):>+9.2f}%")


if __name__ == "__main__":
    main()
