"""Fit the simulator's acceptance parameters from a real run (DESIGN.md §4.3, §5).

Per domain, the real run gives for every served request its accepted drafts a and rejections r
(steps ending in a rejection), and n = distilled tokens of that domain before it. The simulator's
law is α(n) = α_∞ − (α_∞ − α_0)·exp(−n/τ) with α̂ = a/(a + r), so we fit (α_0, α_∞, τ) by weighted
least squares with binomial weights (a + r)/(α(1−α)) — each request counts as many examined
positions as it had. Accepted-length histograms grouped by the request's α̂ give the empirical law
(a family indexed by α) in the schema `acceptance.empirical_file` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares


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


def alpha_curve(n: np.ndarray, a0: float, ainf: float, tau: float) -> np.ndarray:
    return ainf - (ainf - a0) * np.exp(-np.asarray(n, dtype=float) / tau)


def fit_alpha_curve(n_tokens: np.ndarray, accepted: np.ndarray, rejections: np.ndarray) -> CurveFit:
    """Weighted least squares of α̂_i = a_i/(a_i + r_i) on α(n_i); τ fitted in log space."""
    n = np.asarray(n_tokens, dtype=float)
    a = np.asarray(accepted, dtype=float)
    r = np.asarray(rejections, dtype=float)
    m = (a + r) > 0
    n, a, r = n[m], a[m], r[m]
    if n.size < 3:
        raise ValueError("need at least 3 requests with examined draft positions to fit α(n)")
    y = a / (a + r)
    w = np.sqrt(a + r)
    span = max(float(n.max()), 1.0)
    k = max(3, n.size // 10)
    a0_guess = float(np.clip(y[:k].mean(), 0.01, 0.99))
    ainf_guess = float(np.clip(y[-k:].mean(), 0.01, 0.99))

    def resid(p: np.ndarray) -> np.ndarray:
        return w * (alpha_curve(n, p[0], p[1], np.exp(p[2])) - y)

    best = None
    for log_tau in np.log(span * np.array([0.05, 0.2, 0.5, 1.0, 3.0])):
        sol = least_squares(resid, x0=[a0_guess, max(ainf_guess, a0_guess), log_tau],
                            bounds=([0.0, 0.0, np.log(1e-3)], [1.0, 1.0, np.log(1e3 * span)]))
        if best is None or sol.cost < best.cost:
            best = sol
    a0, ainf, log_tau = best.x
    pred = alpha_curve(n, a0, ainf, np.exp(log_tau))
    rmse = float(np.sqrt(np.average((pred - y) ** 2, weights=a + r)))
    return CurveFit(float(a0), float(ainf), float(np.exp(log_tau)), rmse, int(n.size))


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
        acc, rej = float(lengths.sum()), float(np.count_nonzero(lengths < k))
        entries.append({"alpha": round(acc / (acc + rej), 5) if acc + rej > 0 else 0.0,
                        "histogram": [int(x) for x in hist]})
    return {"k": k, "entries": entries}
