"""c = draft / target decode step time (issue 13, item 5), from the cost model and a profile.

    PYTHONPATH=. python benchmarks/draft_cost_ratio.py [--context 512] a100-80g h100 a100-80g-datasheet

Also prints what the per-operator tables say about the smallest measured model (phi-2) at small
token counts next to the fitted profile's price of one of its layers.
"""

from __future__ import annotations

import argparse

from osdsim.cost.model import CostModel
from osdsim.cost.profile import load_profile, resolve_profile_path
from osdsim.models import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profiles", nargs="+")
    ap.add_argument("--draft", default="llama-160m")
    ap.add_argument("--target", default="vicuna-7b")
    ap.add_argument("--context", type=float, default=512.0)
    ap.add_argument("--tables", default=None, help="Vidur profiling dir: print phi-2's measured small-T layers")
    a = ap.parse_args()
    if a.tables:
        small_model_check(a.tables, a.profiles)
    print("| profile | batch | draft step ms | target step ms | c = draft/target |")
    print("|---|---|---|---|---|")
    for name in a.profiles:
        prof = load_profile(resolve_profile_path(name))
        d, t = CostModel(PRESETS[a.draft], prof), CostModel(PRESETS[a.target], prof)
        for b in (1, 8, 32):
            td, tt = d.decode_time(b, a.context), t.decode_time(b, a.context)
            print(f"| {name} | {b} | {td * 1e3:.3f} | {tt * 1e3:.3f} | {td / tt:.3f} |")


def small_model_check(tables: str, profiles: list[str]) -> None:
    """phi-2 (the smallest measured model): one layer's GEMMs + non-GEMM ops, measured vs priced."""
    import numpy as np

    from osdsim.calibrate import gpufit
    from osdsim.calibrate.tables import import_measurements

    for name in profiles:
        prof = load_profile(resolve_profile_path(name))
        dev = {"a100-80g": "a100", "h100": "h100", "a40": "a40"}.get(prof.name)
        if dev is None:
            continue
        t = next(x for x in import_measurements(tables, dev).mlp if x.model.endswith("phi-2"))
        cm = CostModel(gpufit.layer_spec(t).model_copy(update={"vocab": 1}), prof)
        cells = []
        for tok in (1, 8, 32, 128):
            i = np.where((t.tokens == tok) & (t.tp == 1))[0][0]
            meas = t.linear_s[i] + t.nongemm_s[i]
            # one layer, no attention pairs; minus the per-pass overheads
            got = cm.pass_time(tok, 0, 0.0, 0.0)[0] - prof.efficiency.pass_overhead_s
            cells.append(f"T={tok}: {meas * 1e6:.0f} / {got * 1e6:.0f} us")
        print(f"phi-2 layer on {dev}, measured (GEMMs + non-GEMM) / priced (incl. attention's per-layer "
              f"launch {prof.efficiency.kernel_overhead_s_per_layer * 1e6:.0f} us total fixed): " + "; ".join(cells))
    print()


if __name__ == "__main__":
    main()
