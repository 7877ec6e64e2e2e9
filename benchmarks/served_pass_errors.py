"""How well a profile prices a real served run's passes, pass by pass, by kind and batch size.

A batched `osdsim real` run (a `serve:` section) records per iteration its prefill, draft and verify
seconds and shapes (iterations.csv); every one is priced here with the cost model of the run's own
models (the twin's ModelSpecs, GGUF types included when llama.cpp served) on each profile given,
as the validator's serving-fitted cost step sees them (`osdsim.validate.costfit.passes_batched`).
No torch needed.

    python benchmarks/served_pass_errors.py RUN_DIR PROFILE.yaml [PROFILE.yaml ...]

e.g. after `osdsim real scenarios/real-smollm2-llamacpp-serve.yaml --out /tmp/llserve`:
    python benchmarks/served_pass_errors.py /tmp/llserve calibration/cpu-llamacpp-amd-epyc.yaml
Prints per profile the median |error| and median signed error (priced / measured − 1) per kind of
pass, then per batch size.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from osdsim.cost.model import CostModel
from osdsim.cost.profile import load_profile
from osdsim.models import ModelSpec
from osdsim.validate.costfit import passes_batched, price
from osdsim.validate.pipeline import run_model_specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="an `osdsim real` serving run (iterations.csv, summary.json)")
    ap.add_argument("profiles", type=Path, nargs="+")
    args = ap.parse_args()
    summary = json.loads((args.run_dir / "summary.json").read_text())
    with (args.run_dir / "iterations.csv").open() as fh:
        iterations = list(csv.DictReader(fh))
    specs = {role: ModelSpec(**spec) for role, spec in run_model_specs(summary).items()}
    rows = [(int(it["batch_size"] or 0), p) for it in iterations for p in passes_batched([it])]
    print(f"{args.run_dir}: {len(iterations)} iterations, {len(rows)} passes priced")
    for path in args.profiles:
        prof = load_profile(path)
        models = {role: CostModel(spec, prof) for role, spec in specs.items()}
        errs = [(b, p.kind, price(p, models) / p.measured_s - 1) for b, p in rows]
        print(f"\n{path}")
        print(f"  {'pass':<12} {'batch':>5} {'n':>6} {'median |err|':>13} {'median signed':>14}")
        groups: dict[tuple[str, str], list[float]] = {}
        for b, kind, e in errs:
            groups.setdefault((kind, "all"), []).append(e)
            if kind != "prefill":
                groups.setdefault((kind, str(b) if b < 4 else "4+"), []).append(e)
        for (kind, b), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "all", kv[0][1])):
            a = np.array(v)
            print(f"  {kind:<12} {b:>5} {len(a):>6} {np.median(np.abs(a)) * 100:>12.1f}% {np.median(a) * 100:>+13.1f}%")


if __name__ == "__main__":
    main()
