"""Refit a measured profile from its raw CSV (no torch, no device): checks that the shipped fit is
reproducible and lets one try fit changes without re-measuring.

    python benchmarks/calibrate_refit.py calibration/cpu-amd-epyc.yaml

Prints the fitted efficiencies per dtype and the held-out / in-sample errors per pass type.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from osdsim.calibrate.fit import fit_passes
from osdsim.calibrate.measure import rows_from_csv
from osdsim.cost.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", type=Path, help="measured profile YAML (its CSV beside it)")
    args = ap.parse_args()
    prof = load_profile(args.profile)
    csv_name = prof.provenance.raw_measurements or args.profile.with_suffix(".csv").name
    rows = rows_from_csv((args.profile.parent / csv_name).read_text())
    launch = [r.median_s for r in rows if r.kind == "launch"]
    fit = fit_passes(rows, prof.peak_flops_per_s, prof.memory_bandwidth_bytes_per_s,
                     overhead_guess_s=launch[0] if launch else 1e-5)
    print(json.dumps({d: e.model_dump() for d, e in fit.efficiency.items()}, indent=1))
    print(f"{'pass/dtype':<14} {'held-out med%':>13} {'max%':>7} {'n':>3} {'fit med%':>9} {'max%':>7}")
    for key in sorted(set(fit.heldout) | set(fit.insample)):
        h, f = fit.heldout.get(key, {}), fit.insample.get(key, {})
        print(f"{key:<14} {h.get('median_ape_pct', float('nan')):>13.2f} {h.get('max_ape_pct', float('nan')):>7.2f} "
              f"{int(h.get('n', 0)):>3} {f.get('median_ape_pct', float('nan')):>9.2f} {f.get('max_ape_pct', float('nan')):>7.2f}")


if __name__ == "__main__":
    main()
