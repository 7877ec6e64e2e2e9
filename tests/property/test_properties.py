"""Property-based tests over random small valid scenarios (hypothesis).

Fast by default (a few dozen examples); `pytest -m slow` runs the long mode.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osdsim.api import simulate
from osdsim.scenario import scenario_from_dict
from osdsim.sim.engine import build_and_run
from osdsim.sim.results import summarise
from tests.conftest import REPO
from tests.integration.test_sim_invariants import check_invariants

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenarios(draw):
    n = draw(st.integers(5, 40))
    a0 = draw(st.floats(0.0, 1.0))
    ainf = draw(st.floats(a0, 1.0))
    lo = draw(st.integers(1, 50))
    hi = draw(st.integers(lo, 120))
    strategy = draw(st.sampled_from(["no-spec", "static", "offline", "osd", "osd-per-domain"]))
    return {
        "name": "prop",
        "seed": draw(st.integers(0, 2**31 - 1)),
        "models": {"target": "vicuna-7b", "draft": "llama-160m"},
        "hardware": {"profile": "a100-80g", "replicas": draw(st.integers(1, 3))},
        "router": draw(st.sampled_from(["round-robin", "least-outstanding", "random"])),
        "batching": {"max_batch_size": draw(st.integers(1, 16)),
                     "chunked_prefill_tokens": draw(st.one_of(st.none(), st.integers(8, 1024))),
                     "kv_cache_tokens": draw(st.one_of(st.none(), st.integers(60, 5000))),
                     "prefill_pass": draw(st.sampled_from(["fused", "separate"]))},
        "strategy": strategy,
        "speculation": {"k": draw(st.one_of(st.integers(1, 6), st.just("auto"))), "k_max": 6},
        "acceptance": {"transfer": draw(st.floats(-1, 1)),
                       "domains": {"a": {"alpha_0": a0, "alpha_inf": ainf, "tau_tokens": draw(st.floats(10, 1e5))},
                                   "b": {"alpha_0": a0 / 2, "alpha_inf": ainf}}},
        "distill": {"placement": draw(st.sampled_from(["inline", "harvest", "dedicated"])),
                    "update_interval_requests": draw(st.integers(1, 8)),
                    "tokens": draw(st.sampled_from(["target", "all"])),
                    "interference": draw(st.floats(0, 0.5)), "max_pending_steps": draw(st.integers(1, 3))},
        "workload": {"arrival": draw(st.sampled_from(["poisson", "gamma"])),
                     "rate_per_s": draw(st.floats(0.1, 200)), "cv": draw(st.floats(0.2, 4)),
                     "domains": {d: {"prompt_tokens": {"kind": "uniform", "low_tokens": lo, "high_tokens": hi},
                                     "output_tokens": {"kind": "uniform", "low_tokens": 1, "high_tokens": hi}}
                                 for d in ("a", "b")},
                     "shift": {"unit": "requests", "phases": [
                         {"start": 0, "end": n // 2 + 1, "mix": {"a": 1.0}},
                         {"start": n // 2 + 1, "end": n + 1, "mix": {"a": 0.3, "b": 0.7}, "mix_end": {"b": 1.0}}]}},
    }


def _check(spec: dict) -> None:
    sc = scenario_from_dict(spec, base_dir=REPO)
    raw = build_and_run(sc)
    res = summarise(raw)
    n = len(res.requests)
    check_invariants(res, n)
    s = res.summary
    assert s["requests"]["finished"] + s["requests"]["rejected_too_long"] == n  # nothing lost without a time cap
    # The engine's own completion counter (one count per finish or rejection event) agrees: a request
    # finished or rejected twice counts twice here (and would end the run before every request was served).
    assert raw.table.done == n
    # Every request was routed to one of the replicas.
    assert ((res.requests["replica"] >= 0) & (res.requests["replica"] < sc.hardware.replicas)).all()
    t = s["training"]
    if t["placement"] == "harvest":
        assert t["train_work_flops_used"] <= t["spare_flops_available"] * (1 + 1e-9) + 1e-6
    alpha_cols = [c for c in res.alpha.columns if c.startswith("alpha_")]
    assert ((res.alpha[alpha_cols] >= 0) & (res.alpha[alpha_cols] <= 1)).all().all()
    assert t["steps_done"] + t["steps_skipped"] <= t["steps_due"]
    again = simulate(scenario_from_dict(spec, base_dir=REPO))
    assert json.dumps(again.summary) == json.dumps(s)


@FAST
@given(scenarios())
def test_invariants_on_random_scenarios(spec):
    _check(spec)


@pytest.mark.slow
@SLOW
@given(scenarios())
def test_invariants_on_random_scenarios_long(spec):
    _check(spec)


def _check_macro(spec: dict) -> None:
    """Macro steps change nothing: the same request table and iteration log as one event per iteration."""
    import numpy as np

    from osdsim.sim.engine import build_and_run

    sc = scenario_from_dict(spec, base_dir=REPO)
    slow, fast = build_and_run(sc, macro_steps=0), build_and_run(sc, macro_steps=64)
    for f in ("arrival", "admitted", "first_token", "finish", "accepted", "rejections", "steps", "emitted"):
        assert np.array_equal(getattr(slow.table, f), getattr(fast.table, f), equal_nan=True), f
    assert slow.iterations.equals(fast.iterations)


@FAST
@given(scenarios())
def test_macro_steps_change_nothing_on_random_scenarios(spec):
    _check_macro(spec)


@pytest.mark.slow
@SLOW
@given(scenarios())
def test_macro_steps_change_nothing_on_random_scenarios_long(spec):
    _check_macro(spec)
