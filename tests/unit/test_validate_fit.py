"""Fitting acceptance parameters from trajectories (the validator's step a)."""

import numpy as np
import pytest

from osdsim.specdec import EmpiricalLaw, sample_geometric
from osdsim.validate.fit import alpha_curve, empirical_law, fit_alpha_curve


def synthetic(a0, ainf, tau, n_req=600, tokens=40, k=4, seed=0, steps=250):
    rng = np.random.default_rng(seed)
    n = np.arange(n_req) * tokens
    acc, rej, lengths = [], [], []
    for ni in n:
        alpha = alpha_curve(ni, a0, ainf, tau)
        a = sample_geometric(rng, np.full(steps, alpha), k)
        acc.append(a.sum())
        rej.append(np.count_nonzero(a < k))
        lengths.append(a.tolist())
    return n, np.array(acc), np.array(rej), lengths


@pytest.mark.parametrize("a0,ainf,tau", [(0.3, 0.8, 3000.0), (0.1, 0.45, 1500.0), (0.55, 0.75, 6000.0)])
def test_fit_recovers_known_parameters(a0, ainf, tau):
    n, acc, rej, _ = synthetic(a0, ainf, tau)
    fit = fit_alpha_curve(n, acc, rej)
    assert fit.alpha_0 == pytest.approx(a0, rel=0.05)
    assert fit.alpha_inf == pytest.approx(ainf, rel=0.05)
    assert fit.tau_tokens == pytest.approx(tau, rel=0.05)


def test_fit_needs_data():
    with pytest.raises(ValueError):
        fit_alpha_curve(np.array([0, 1]), np.array([1, 1]), np.array([1, 1]))


def test_empirical_law_file_round_trips_into_the_simulator_law():
    n, acc, rej, lengths = synthetic(0.2, 0.8, 2000.0, n_req=200)
    alpha = acc / (acc + rej)
    doc = empirical_law(alpha, lengths, k=4, groups=4)
    law = EmpiricalLaw(np.array([e["alpha"] for e in doc["entries"]]), np.array([e["histogram"] for e in doc["entries"]]))
    lo, hi = law.alpha_range
    assert lo < 0.5 < 0.75 < hi
    assert law.mean_tokens_per_step(hi, 4) > law.mean_tokens_per_step(lo, 4)
