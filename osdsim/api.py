"""The Python API: one call does the work (the CLI only parses, calls and prints)."""

from __future__ import annotations

from pathlib import Path

from osdsim.scenario import Scenario, load_scenario
from osdsim.sim.engine import ProgressFn, build_and_run
from osdsim.sim.results import Comparison, Result, compare_summary, summarise
from osdsim.sim.workload import generate_requests


def simulate(scenario: Scenario | str | Path, progress: ProgressFn | None = None) -> Result:
    """Simulate one strategy (scenario.strategy); returns DataFrames and a summary dict."""
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(Path(scenario))
    return summarise(build_and_run(sc, progress=progress))


def compare(
    scenario: Scenario | str | Path,
    strategies: list[str] | None = None,
    progress: ProgressFn | None = None,
    variants: dict[str, Scenario] | None = None,
) -> Comparison:
    """Simulate several strategies (or scenario variants) on the same request stream.

    Common random numbers: every variant whose workload and seed equal the base scenario's reuses
    the same generated requests. The no-speculation baseline (when present) runs first so that
    per-phase speedups can be computed against it.
    """
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(Path(scenario))
    if variants is None:
        names = list(dict.fromkeys(strategies or sc.compare or [sc.strategy]))
        names.sort(key=lambda s: s != "no-spec")
        variants = {name: sc.with_strategy(name) for name in names}
    base_key = (sc.workload.model_dump_json(), sc.seed)
    requests = generate_requests(sc)
    results: dict[str, Result] = {}
    baseline = None
    order = sorted(variants, key=lambda v: variants[v].strategy != "no-spec")
    for i, label in enumerate(order):
        variant = variants[label]
        cb = None
        if progress is not None:
            def cb(done: int, total: int, i=i) -> None:
                progress(i * total + done, total * len(order))
        same = (variant.workload.model_dump_json(), variant.seed) == base_key
        raw = build_and_run(variant, requests=requests if same else None, progress=cb)
        res = summarise(raw, baseline=baseline if same else None)
        if variant.strategy == "no-spec" and baseline is None:
            baseline = res.requests
        results[label] = res
    return Comparison(scenario_name=sc.name, results=results, summary=compare_summary(results))
