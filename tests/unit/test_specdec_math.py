"""Acceptance math: α defined once, accepted-length laws, the k optimiser."""

import numpy as np
import pytest

from osdsim.specdec import (
    EmpiricalLaw,
    accepted_length_pmf,
    alpha_from_accepted_lengths,
    expected_tokens_per_step,
    optimal_k,
    sample_geometric,
    speedup,
)


def test_expected_tokens_closed_form():
    assert expected_tokens_per_step(0.6, 4) == pytest.approx((1 - 0.6**5) / 0.4)
    assert expected_tokens_per_step(1.0, 4) == 5
    assert expected_tokens_per_step(0.0, 4) == 1
    pmf = accepted_length_pmf(0.7, 5)
    assert pmf.sum() == pytest.approx(1)
    assert (np.arange(6) + 1) @ pmf == pytest.approx(expected_tokens_per_step(0.7, 5))


def test_geometric_sampler_matches_pmf_and_alpha_estimator():
    rng = np.random.default_rng(0)
    a = sample_geometric(rng, np.full(400_000, 0.65), 4)
    assert a.min() == 0 and a.max() == 4
    freq = np.bincount(a, minlength=5) / a.size
    assert freq == pytest.approx(accepted_length_pmf(0.65, 4), abs=3e-3)
    assert alpha_from_accepted_lengths(a, 4) == pytest.approx(0.65, abs=3e-3)


def test_geometric_sampler_edges():
    rng = np.random.default_rng(1)
    assert np.all(sample_geometric(rng, np.zeros(10), 3) == 0)
    assert np.all(sample_geometric(rng, np.ones(10), 3) == 3)


@pytest.mark.parametrize("c,k", [(0.01, 7), (0.02, 6), (0.05, 4), (0.1, 3)])
def test_optimal_k_matches_osd_choices(c, k):
    assert optimal_k(0.6, c) == k


def test_speedup_formula():
    assert speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / (0.2 * 1.2))


def test_empirical_law_follows_alpha():
    hist_lo = np.array([70, 20, 7, 2, 1.0])
    hist_hi = np.array([10, 10, 15, 25, 40.0])
    law = EmpiricalLaw(np.array([0.3, 0.8]), np.stack([hist_lo, hist_hi]))
    rng = np.random.default_rng(2)
    lo = law.sample(rng, np.full(50_000, 0.3), 4).mean()
    mid = law.sample(rng, np.full(50_000, 0.55), 4).mean()
    hi = law.sample(rng, np.full(50_000, 0.8), 4).mean()
    assert lo < mid < hi
    # At the measured α the law reproduces the histogram.
    assert lo == pytest.approx((np.arange(5) @ hist_lo) / hist_lo.sum(), abs=0.02)
    # Midway the law is the 50/50 mixture.
    expect_mid = 0.5 * (np.arange(5) @ hist_lo / hist_lo.sum() + np.arange(5) @ hist_hi / hist_hi.sum())
    assert mid == pytest.approx(expect_mid, abs=0.03)
    # Truncation at a smaller k folds the tail into k.
    a2 = law.sample(rng, np.full(1000, 0.8), 2)
    assert a2.max() == 2
