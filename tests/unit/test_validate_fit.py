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


def test_joint_fit_recovers_curves_and_transfer():
    """Two domains in sequence, a held-out check of every domain after every step: fit_joint
    recovers α_0, α_∞, τ per domain and the cross-domain transfer from the simulator's own law."""
    from osdsim.validate.fit import effective_tokens, fit_joint

    truth = {"a": (0.05, 0.6, 2000.0), "b": (0.10, 0.45, 1500.0)}
    transfer = 0.3
    steps = 24
    step_tokens = np.zeros((steps, 2))
    step_tokens[:12, 0] = 400.0  # 12 steps on domain a, then 12 on b
    step_tokens[12:, 1] = 400.0
    n = effective_tokens(step_tokens, transfer)
    obs_d, obs_s, obs_a, obs_w = [], [], [], []
    for s in range(steps + 1):
        for d, name in enumerate(truth):
            a0, ainf, tau = truth[name]
            obs_d.append(d)
            obs_s.append(s)
            obs_a.append(alpha_curve(n[s, d], a0, ainf, tau))
            obs_w.append(400.0)
    fit = fit_joint(list(truth), step_tokens, np.array(obs_d), np.array(obs_s), np.array(obs_a), np.array(obs_w))
    assert fit.transfer == pytest.approx(transfer, rel=0.05)
    for name, (a0, ainf, tau) in truth.items():
        c = fit.curves[name]
        assert c.alpha_0 == pytest.approx(a0, rel=0.05)
        assert c.alpha_inf == pytest.approx(ainf, rel=0.05)
        assert c.tau_tokens == pytest.approx(tau, rel=0.05)


def test_joint_fit_takes_alpha_0_from_the_untrained_observations():
    """α_0 of a domain observed before any training step is their pooled α̂ (weights = positions),
    not a free parameter; a domain never observed untrained still has its α_0 fitted."""
    from osdsim.validate.fit import effective_tokens, fit_joint

    step_tokens = np.zeros((10, 2))
    step_tokens[:5, 0] = 500.0
    step_tokens[5:, 1] = 500.0
    n = effective_tokens(step_tokens, 0.1)
    obs_d, obs_s, obs_a, obs_w = [0, 0], [0, 0], [0.01, 0.04], [100.0, 300.0]  # untrained a: pooled 0.0325
    for s in range(1, 11):
        for d, (a0, ainf, tau) in enumerate(((0.2, 0.5, 1500.0), (0.08, 0.4, 1000.0))):
            obs_d.append(d)
            obs_s.append(s)
            obs_a.append(float(alpha_curve(n[s, d], a0, ainf, tau)))
            obs_w.append(300.0)
    fit = fit_joint(["a", "b"], step_tokens, np.array(obs_d), np.array(obs_s), np.array(obs_a), np.array(obs_w))
    assert fit.curves["a"].alpha_0 == pytest.approx((0.01 * 100 + 0.04 * 300) / 400, abs=1e-12)
    assert fit.curves["b"].alpha_0 == pytest.approx(0.08, abs=0.01)  # fitted: b was never seen untrained


def test_effective_tokens_floors_forgetting_at_the_untrained_draft():
    from osdsim.validate.fit import effective_tokens

    n = effective_tokens(np.array([[100.0, 0.0], [0.0, 1000.0]]), -0.5)
    assert n[1].tolist() == [100.0, 0.0] and n[2].tolist() == [0.0, 1000.0]


def test_regain_requests_counts_requests_until_the_pre_shift_alpha_is_back():
    from osdsim.validate.pipeline import regain_requests as recovery_requests

    # 10 requests at α = 0.5, then α 0.1 for 5 requests and 0.6 after: with a 3-request window the
    # pooled α of requests 15..17 is the first back at 0.5 → 8 requests into the new phase.
    alpha = np.array([0.5] * 10 + [0.1] * 5 + [0.6] * 10)
    acc, rej = alpha * 100, (1 - alpha) * 100
    assert recovery_requests(acc, rej, 10, 25, 3) == 8.0
    assert recovery_requests(acc, rej, 10, 15, 3) is None  # never within the phase


def test_alpha_regained_is_resolved_by_pooled_thirds():
    from osdsim.validate.pipeline import _bootstrap_regain_ci, alpha_regained

    # 30-request phase: α 0.2 for the first 10 requests, 0.5 for the last 10 (100 positions each).
    alpha = np.array([0.6] * 10 + [0.2] * 10 + [0.35] * 10 + [0.5] * 10)
    acc, rej = alpha * 100, (1 - alpha) * 100
    assert alpha_regained(acc, rej, 10, 40) == pytest.approx(0.3)
    lo, hi = _bootstrap_regain_ci(acc, rej, 10, 40)
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)  # no spread within the thirds
    noisy = acc.copy()
    noisy[30:] = np.random.default_rng(0).uniform(20, 80, 10)
    lo, hi = _bootstrap_regain_ci(noisy, rej, 10, 40)
    assert lo < alpha_regained(noisy, rej, 10, 40) < hi and hi - lo > 0.01


def test_alpha_helpers_are_the_specdec_ones():
    import inspect

    from osdsim.validate import fit, pipeline

    for mod in (fit, pipeline):
        src = inspect.getsource(mod)
        assert "alpha_from_counts" in src
        assert "a / (a + r)" not in src and "acc / np.maximum(acc + rej" not in src


def test_joint_fit_recovers_transfer_and_forgetting():
    """With a forgetting scale τ_f (training on b erodes a's progress by exp(−b tokens/τ_f)) and a
    held-out check of both domains after every step, a → b → a: fit_joint with fit_forgetting
    recovers the transfer and τ_f; the fitted model reproduces a's rise, decay and regain."""
    from osdsim.validate.fit import effective_tokens, fit_joint

    truth = {"a": (0.05, 0.5, 1500.0), "b": (0.08, 0.4, 1200.0)}
    transfer, tau_f = 0.3, 2500.0
    step_tokens = np.zeros((30, 2))
    step_tokens[:10, 0] = 300.0
    step_tokens[10:20, 1] = 300.0
    step_tokens[20:, 0] = 300.0
    n = effective_tokens(step_tokens, transfer, tau_f)
    assert n[20, 0] < n[10, 0]  # a forgot while b trained ...
    assert n[20, 0] > n[10, 0] * np.exp(-3000.0 / tau_f)  # ... less than erosion alone: transfer adds
    obs_d, obs_s, obs_a = [], [], []
    for s in range(31):
        for d, (a0, ainf, tau) in enumerate(truth.values()):
            obs_d.append(d)
            obs_s.append(s)
            obs_a.append(float(alpha_curve(n[s, d], a0, ainf, tau)))
    w = np.full(len(obs_a), 300.0)
    fit = fit_joint(list(truth), step_tokens, np.array(obs_d), np.array(obs_s), np.array(obs_a), w, fit_forgetting=True)
    assert fit.transfer == pytest.approx(transfer, rel=0.05)
    assert fit.forgetting_tokens == pytest.approx(tau_f, rel=0.05)
    assert fit.rmse < 1e-4
    for name, (_a0, ainf, _tau) in truth.items():
        assert fit.curves[name].alpha_inf == pytest.approx(ainf, rel=0.05)
    # Without the forgetting scale the same data cannot be fitted as well.
    plain = fit_joint(list(truth), step_tokens, np.array(obs_d), np.array(obs_s), np.array(obs_a), w)
    assert plain.forgetting_tokens is None and plain.rmse > 10 * fit.rmse


def test_effective_tokens_follow_the_simulators_draft_state_with_forgetting():
    """fit.effective_tokens is the simulator's DraftState.train, step by step (one law, two users)."""
    from osdsim.sim.distill import DraftState
    from osdsim.validate.fit import effective_tokens

    rng = np.random.default_rng(3)
    step_tokens = rng.uniform(0, 500, size=(12, 3)) * (rng.uniform(size=(12, 3)) < 0.6)
    for transfer, tau_f in ((0.2, 800.0), (-0.3, 5000.0), (0.0, None)):
        st = DraftState(0, np.full(3, 0.1), np.full(3, 0.6), np.full(3, 1000.0), transfer, trainable=True,
                        forgetting_tokens=tau_f)
        n = effective_tokens(step_tokens, transfer, tau_f)
        for s in range(12):
            st.train(step_tokens[s])
            np.testing.assert_allclose(st.n_eff, n[s + 1], rtol=1e-12, atol=1e-9)
        assert np.all(st.alpha >= 0.1 - 1e-12) and np.all(st.alpha <= 0.6 + 1e-12)


def test_bootstrap_ratio_ci_covers_the_pooled_ratio_and_narrows_with_more_items():
    from osdsim.specdec import bootstrap_ratio_ci

    rng = np.random.default_rng(1)
    den = rng.integers(20, 60, size=8).astype(float)
    num = np.round(den * rng.uniform(0.1, 0.5, size=8))
    lo, hi = bootstrap_ratio_ci(num, den)
    assert lo < num.sum() / den.sum() < hi
    assert bootstrap_ratio_ci(num, den) == (lo, hi)  # fixed seed: deterministic
    lo4, hi4 = bootstrap_ratio_ci(np.tile(num, 4), np.tile(den, 4))
    assert hi4 - lo4 < 0.7 * (hi - lo)  # four times the prompts: about half as wide
    assert bootstrap_ratio_ci(num[:1], den[:1]) is None and bootstrap_ratio_ci([0, 0], [0, 0]) is None
    same = bootstrap_ratio_ci([5, 5, 5], [10, 10, 10])
    assert same == pytest.approx((0.5, 0.5))
