"""What the fitted GPU profiles change (issue 13, item 4): each scenario run twice, with the old
datasheet profile and with the profile fitted on Vidur's CUDA timings, side by side.

    PYTHONPATH=. python benchmarks/gpu_profile_effects.py [--old a100-80g-datasheet] [--new a100-80g]
        [--json out.json] [--set key=value ...] scenarios/shift.yaml scenarios/steady.yaml ...

Prints per strategy: e2e and TPOT speedup over no-spec, TTFT/TPOT p50 (ms), and for harvest
scenarios the arrival rate at which training first fell behind (stalled_at_rate_per_s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from osdsim.api import compare
from osdsim.report.writers import comparison_document
from osdsim.scenario import load_scenario


def run(path: Path, profile: str, sets: list[str] | None = None) -> dict:
    sc = load_scenario(path, [*(sets or []), f"hardware.profile={profile}"])
    t0 = time.perf_counter()
    doc = comparison_document(compare(sc))
    out = {"wall_s": round(time.perf_counter() - t0, 1), "variants": {}}
    for row in doc["comparison"]["variants"]:
        v = doc["variants"][row["variant"]]
        out["variants"][row["variant"]] = {
            "speedup_e2e": row["speedup_e2e_mean"], "speedup_tpot": row["speedup_tpot_mean"],
            "ttft_p50_ms": row["ttft_p50_s"] * 1e3, "tpot_p50_ms": row["tpot_p50_s"] * 1e3,
            "mean_k": (v.get("speculation") or {}).get("mean_k"),
            "stalled_at_rate_per_s": (v.get("training") or {}).get("stalled_at_rate_per_s"),
            "steps_skipped": (v.get("training") or {}).get("steps_skipped"),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", nargs="+", type=Path)
    ap.add_argument("--old", default="a100-80g-datasheet")
    ap.add_argument("--new", default="a100-80g")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--set", action="append", default=[], help="scenario override (as `osdsim run --set`)")
    a = ap.parse_args()
    results = {}
    for path in a.scenarios:
        old, new = run(path, a.old, a.set), run(path, a.new, a.set)
        results[path.stem] = {"old": old, "new": new}
        print(f"\n## {path.stem} ({a.old} {old['wall_s']} s | {a.new} {new['wall_s']} s)")
        print("| strategy | speedup e2e old / new | speedup TPOT old / new | TTFT p50 ms old / new | "
              "TPOT p50 ms old / new | harvest fell behind at req/s old / new |")
        print("|---|---|---|---|---|---|")
        for name, o in old["variants"].items():
            n = new["variants"][name]
            print(f"| {name} | {o['speedup_e2e']:.2f} / {n['speedup_e2e']:.2f} | {o['speedup_tpot']:.2f} / "
                  f"{n['speedup_tpot']:.2f} | {o['ttft_p50_ms']:.1f} / {n['ttft_p50_ms']:.1f} | "
                  f"{o['tpot_p50_ms']:.2f} / {n['tpot_p50_ms']:.2f} | {o['stalled_at_rate_per_s']} / "
                  f"{n['stalled_at_rate_per_s']} |")
        sys.stdout.flush()
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
