"""Fit the simulator's acceptance parameters from a real run (docs/architecture.md: α dynamics; the validator).

Per domain, the real run gives for every served request its accepted drafts a and rejections r
(steps ending in a rejection), and n = distilled tokens of that domain before it. The simulator's
law is α(n) = α_∞ − (α_∞ − α_0)·exp(−n/τ) with α̂ = a/(a + r) (osdsim.specdec.alpha_from_counts),
so we fit (α_0, α_∞, τ) by least squares weighted by the examined positions a + r of each
observation (residuals × √(a + r)): each request counts as many positions as it had. The binomial
variance factor 1/(α(1−α)) is not applied (it would weight near-0 and near-1 α̂ without bound). Accepted-length histograms grouped by the request's α̂ give the empirical law
(a family indexed by α) in the schema `acceptance.empirical_file` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from osdsim.sim.distill import alpha_curve, next_effective_tokens
from osdsim.specdec import alpha_from_accepted_lengths, alpha_from_counts

# The suites' `fit_forgetting` field (validate.pipeline.Suite and validate.load.LoadSuite): one text.
FIT_FORGETTING_DESCRIPTION = (
    "Fit a forgetting scale (acceptance.forgetting_tokens) beside the transfer: training on another domain "
    "erodes a domain's progress. Off by default: it gained one gated row on each cpu-load run and lost one on "
    "cpu-llamacpp (docs/architecture.md).")


@dataclass(frozen=True)
class CurveFit:
    alpha_0: float
    alpha_inf: float
    tau_tokens: float
    rmse: float
    requests: int

    def as_acceptance(self, source: str) -> dict:
        return {"alpha_0": round(self.alpha_0, 5), "alpha_inf": round(self.alpha_inf, 5),
                "tau_tokens": round(self.tau_tokens, 3), "source": source}


def fit_alpha_curve(n_tokens: np.ndarray, accepted: np.ndarray, rejections: np.ndarray) -> CurveFit:
    """Weighted least squares of α̂_i = a_i/(a_i + r_i) on α(n_i) for one domain (fit_joint with one
    domain, no transfer: each distinct n is a step)."""
    n = np.asarray(n_tokens, dtype=float)
    a = np.asarray(accepted, dtype=float)
    r = np.asarray(rejections, dtype=float)
    m = (a + r) > 0
    n, a, r = n[m], a[m], r[m]
    if n.size < 3:
        raise ValueError("need at least 3 requests with examined draft positions to fit α(n)")
    levels, obs_steps = np.unique(n, return_inverse=True)  # n of each observation = levels[obs_steps]
    step_tokens = np.diff(levels, prepend=0.0)[:, None]  # [S, 1]; row 0 moves n from 0 to levels[0]
    alpha = np.array([alpha_from_counts(x, y) for x, y in zip(a, r, strict=True)])
    fit = fit_joint(["d"], step_tokens, np.zeros(n.size, dtype=int), obs_steps + 1, alpha, a + r,
                    fit_transfer=False)
    return fit.curves["d"]


def empirical_law(alpha_per_request: np.ndarray, lengths_per_request: list[list[int]], k: int, groups: int = 4) -> dict:
    """Histograms of accepted lengths in `groups` quantile groups of the requests' α̂."""
    alpha = np.asarray(alpha_per_request, dtype=float)
    ok = np.isfinite(alpha) & np.array([len(x) > 0 for x in lengths_per_request])
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        raise ValueError("no requests with speculative steps")
    order = idx[np.argsort(alpha[idx], kind="stable")]
    entries = []
    for chunk in np.array_split(order, min(groups, order.size)):
        lengths = np.concatenate([np.asarray(lengths_per_request[i], dtype=int) for i in chunk])
        hist = np.bincount(np.clip(lengths, 0, k), minlength=k + 1)
        # The group's α is estimated from its own steps (the definition in osdsim.specdec).
        group_alpha = alpha_from_accepted_lengths(lengths, k)
        entries.append({"alpha": round(group_alpha, 5) if np.isfinite(group_alpha) else 0.0,
                        "histogram": [int(x) for x in hist]})
    return {"k": k, "entries": entries}


# --- the joint model: every domain's curve and the cross-domain transfer ---------------------------
@dataclass(frozen=True)
class JointFit:
    """α_d(n_d) per domain with n_d moved by own tokens and transfer × other domains' tokens, and
    (forgetting_tokens) eroded by training on other domains."""

    curves: dict[str, CurveFit]
    transfer: float
    rmse: float
    forgetting_tokens: float | None = None


def effective_tokens(step_tokens: np.ndarray, transfer: float, forgetting_tokens: float | None = None) -> np.ndarray:
    """n_eff per domain after each training step, [S + 1, D] (row 0: untrained).

    The simulator's DraftState.train, step by step:
        n ← max(n · exp(−others/τ_f) + own + transfer·others, 0)
    (others = the step's tokens of the other domains; no erosion without forgetting_tokens τ_f)."""
    steps, d = step_tokens.shape
    n = np.zeros((steps + 1, d))
    for s in range(steps):
        n[s + 1] = next_effective_tokens(n[s], step_tokens[s], transfer, forgetting_tokens)
    return n


@dataclass(frozen=True)
class RunObservations:
    """One real run's training schedule and α observations (the arrays fit_joint takes)."""

    step_tokens: np.ndarray  # [S, D] tokens each training step moved α by (the simulator's progress)
    obs_domain: np.ndarray  # [N] domain index of each observation
    obs_steps: np.ndarray  # [N] training steps applied before it
    obs_alpha: np.ndarray  # [N] measured α̂
    obs_weight: np.ndarray  # [N] examined positions behind it (binomial weight)


def fit_joint(
    domains: list[str],
    step_tokens: np.ndarray,  # [S, D] tokens each training step moved α by (the simulator's progress)
    obs_domain: np.ndarray,  # [N] domain index of each observation
    obs_steps: np.ndarray,  # [N] training steps applied before it
    obs_alpha: np.ndarray,  # [N] measured α̂
    obs_weight: np.ndarray,  # [N] examined positions behind it (binomial weight)
    fit_transfer: bool = True,
    fit_forgetting: bool = False,
) -> JointFit:
    """fit_joint_runs on one run."""
    return fit_joint_runs(domains, [RunObservations(step_tokens, obs_domain, obs_steps, obs_alpha, obs_weight)],
                          fit_transfer, fit_forgetting)


def fit_joint_runs(domains: list[str], runs: list[RunObservations], fit_transfer: bool = True,
                   fit_forgetting: bool = False) -> JointFit:
    """Weighted least squares of every α̂ on α_d(n_eff) jointly: 3 parameters per domain + transfer,
    over one or more runs (each with its own training schedule; the parameters are shared).

    Observations are the stream's requests (α̂ = accepted/(accepted + rejections) at the draft the
    request was served with) and held-out evaluations at checkpoints (same quantity, other prompts);
    the latter see every domain at every stage, which is what identifies the transfer. A run sees the
    transfer only into the domains not yet trained: with the domains in one order, the transfer from
    the domain trained second to the one trained first is never observed from scratch, so a second
    run in the other order (a load suite's `fit_reverse`) identifies both directions.

    α_0 of a domain is not fitted where it was observed untrained: it is the pooled α̂ of that
    domain's observations made before any training step (the stream's first requests and the initial
    held-out evaluation, of every run), weighted as in the fit. Left free, α_0 trades off against the
    transfer: on two fit runs of the same suite the free fit found two minima of nearly equal cost,
    transfer +0.13 and −1.0 (the bound), with α_0 of the second seven times the measured untrained α."""
    dn = len(domains)
    parts = []
    for r in runs:
        w = np.sqrt(np.maximum(r.obs_weight, 0.0))
        keep = w > 0
        parts.append((np.asarray(r.step_tokens, dtype=float), r.obs_domain[keep], r.obs_steps[keep].astype(int),
                      r.obs_alpha[keep], w[keep]))
    od = np.concatenate([q[1] for q in parts])
    os_ = np.concatenate([q[2] for q in parts])
    y = np.concatenate([q[3] for q in parts])
    w = np.concatenate([q[4] for q in parts])
    span = max(max(float(q[0].sum(axis=0).max()) if q[0].size else 0.0 for q in parts), 1.0)
    untrained = [(od == d) & (os_ == 0) for d in range(dn)]
    alpha_0_measured = np.array([np.average(y[m], weights=w[m] ** 2) if m.any() else np.nan for m in untrained])
    pinned = np.isfinite(alpha_0_measured)

    extra = [fit_transfer, fit_forgetting]

    def unpack(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float | None]:
        q = p[: 3 * dn].reshape(dn, 3)
        a0 = np.where(pinned, alpha_0_measured, q[:, 0])
        t = float(p[3 * dn]) if fit_transfer else 0.0
        f = float(np.exp(p[3 * dn + fit_transfer])) if fit_forgetting else None
        return a0, q[:, 1], np.exp(q[:, 2]), t, f

    def predict(p: np.ndarray) -> np.ndarray:
        a0, ainf, tau, t, f = unpack(p)
        out = []
        for st, d_, s_, _, _ in parts:
            out.append(alpha_curve(effective_tokens(st, t, f)[s_, d_], a0[d_], ainf[d_], tau[d_]))
        return np.concatenate(out)

    def resid(p: np.ndarray) -> np.ndarray:
        return w * (predict(p) - y)

    # Bounds: τ within 10^±3 of the tokens trained; forgetting τ_f from 1/20 of them (a domain
    # keeps e^-20 of its progress after one run's worth of other training) to 10^3 × (none).
    lo = np.tile([0.0, 0.0, np.log(1e-3 * span)], dn).tolist() + ([-1.0] if fit_transfer else []) \
        + ([np.log(0.05 * span)] if fit_forgetting else [])
    hi = np.tile([1.0, 1.0, np.log(1e3 * span)], dn).tolist() + ([1.0] if fit_transfer else []) \
        + ([np.log(1e3 * span)] if fit_forgetting else [])
    first = np.array([y[od == d][:3].mean() if np.any(od == d) else 0.05 for d in range(dn)])
    last = np.array([y[od == d][-5:].mean() if np.any(od == d) else 0.2 for d in range(dn)])
    best = None
    for tau0 in span * np.array([0.1, 0.3, 1.0, 3.0]):
        for t0 in ((0.0, 0.3, -0.3) if fit_transfer else (0.0,)):
            for f0 in ((1e3, 1.0, 0.2) if fit_forgetting else (None,)):
                x0 = np.column_stack([np.clip(first, 0.0, 0.99), np.clip(np.maximum(last, first), 0.01, 0.99),
                                      np.full(dn, np.log(tau0))]).ravel().tolist() \
                    + ([t0] if fit_transfer else []) + ([np.log(f0 * span)] if fit_forgetting else [])
                x0 = np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
                sol = least_squares(resid, x0, bounds=(lo, hi))
                if best is None or sol.cost < best.cost:
                    best = sol
    assert best is not None and len(best.x) == 3 * dn + sum(extra)
    a0, ainf, tau, t, f = unpack(best.x)
    pred = predict(best.x)
    curves = {}
    for d, name in enumerate(domains):
        m = od == d
        err = float(np.sqrt(np.average((pred[m] - y[m]) ** 2, weights=w[m] ** 2))) if m.any() else float("nan")
        curves[name] = CurveFit(float(a0[d]), float(ainf[d]), float(tau[d]), err, int(m.sum()))
    rmse = float(np.sqrt(np.average((pred - y) ** 2, weights=w**2)))
    return JointFit(curves, t, rmse, f)
