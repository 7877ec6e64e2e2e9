"""The simulator against closed forms: M/D/1 waiting, tokens per step, speculative speedup."""

import numpy as np
import pytest

from osdsim.api import compare, simulate
from osdsim.specdec import expected_tokens_per_step
from tests.conftest import TINY_DRAFT, TINY_TARGET, analytic_profile


def _one_domain(output: int, prompt: int = 1, alpha: float = 0.6, **acc):
    return {
        "acceptance": {"__replace__": True, "domains": {"a": {"alpha_0": alpha, **acc}}},
        "workload": {
            "__replace__": True,
            "arrival": "poisson",
            "rate_per_s": 1.0,
            "num_requests": 100,
            "domains": {"a": {"prompt_tokens": {"kind": "fixed", "value_tokens": prompt},
                              "output_tokens": {"kind": "fixed", "value_tokens": output}}},
        },
    }


def test_md1_waiting_time_matches_pollaczek_khinchine(tmp_path, make_scenario):
    # One replica serving one request at a time; each request is a single 10 ms pass
    # (prompt 1, output 1 → the prefill pass emits the only token): an M/D/1 queue.
    prof = analytic_profile(tmp_path, kernel_s=1e-3)
    service = 10 * 1e-3
    lam = 50.0  # ρ = 0.5
    sc = make_scenario({
        "models": {"target": {**TINY_TARGET, "n_layers": 10}, "draft": None},
        "hardware": {"profile": str(prof)},
        "strategy": "no-spec",
        "batching": {"max_batch_size": 1},
        **_one_domain(output=1),
    })
    sc = sc.model_copy(update={"workload": sc.workload.model_copy(update={"rate_per_s": lam, "num_requests": 150_000})})
    res = simulate(sc)
    rho = lam * service
    wq_theory = lam * service**2 / (2 * (1 - rho))
    wq = res.requests["queue_s"].mean()
    assert wq == pytest.approx(wq_theory, rel=0.03)
    assert res.requests["e2e_s"].mean() == pytest.approx(wq_theory + service, rel=0.03)


def test_tokens_per_step_matches_closed_form(tmp_path, make_scenario):
    prof = analytic_profile(tmp_path)
    sc = make_scenario({
        "models": {"target": TINY_TARGET, "draft": TINY_DRAFT},
        "hardware": {"profile": str(prof)},
        "speculation": {"k": 4},
        **_one_domain(output=4001, alpha=0.7),
    })
    sc = sc.model_copy(update={"workload": sc.workload.model_copy(update={"num_requests": 30, "rate_per_s": 0.01})})
    res = simulate(sc)
    # Steps whose emission was not truncated by the output length: accepted + 1 per step.
    req = res.requests
    tokens_per_step = (req["accepted_tokens"].sum() + req["steps"].sum()) / req["steps"].sum()
    assert tokens_per_step == pytest.approx(expected_tokens_per_step(0.7, 4), rel=0.01)


@pytest.mark.parametrize("alpha,k", [(0.6, 3), (0.8, 5)])
def test_low_load_speedup_matches_leviathan_formula(tmp_path, make_scenario, alpha, k):
    # Every pass costs L·1 ms: target 40 layers, draft 4 layers → c = 0.1 exactly.
    prof = analytic_profile(tmp_path)
    sc = make_scenario({
        "models": {"target": TINY_TARGET, "draft": TINY_DRAFT},
        "hardware": {"profile": str(prof)},
        "speculation": {"k": k},
        **_one_domain(output=2001, alpha=alpha),
    })
    sc = sc.model_copy(update={"workload": sc.workload.model_copy(update={"num_requests": 20, "rate_per_s": 0.001})})
    cmp = compare(sc, strategies=["no-spec", "static"])
    base = cmp.results["no-spec"].requests["tpot_s"].mean()
    spec = cmp.results["static"].requests["tpot_s"].mean()
    c = 0.1
    theory = (1 - alpha ** (k + 1)) / ((1 - alpha) * (c * k + 1))
    assert base / spec == pytest.approx(theory, rel=0.03)


def test_k_auto_picks_optimal_k_from_cost_ratio(tmp_path, make_scenario):
    prof = analytic_profile(tmp_path)
    sc = make_scenario({
        "models": {"target": TINY_TARGET, "draft": TINY_DRAFT},
        "hardware": {"profile": str(prof)},
        "speculation": {"k": "auto", "k_max": 12},
        **_one_domain(output=50, alpha=0.6),
    })
    res = simulate(sc)
    served = res.iterations[(res.iterations["kind"] == "serve") & (res.iterations["decode_seqs"] > 0)]
    assert set(served["k"].unique()) == {3}  # c = 0.1 at α = 0.6 → k* = 3 (OSD's choice)
    assert np.isfinite(res.summary["speculation"]["mean_k"])
