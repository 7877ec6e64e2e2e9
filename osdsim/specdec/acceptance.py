"""Speculative-decoding math shared by the simulator and the real side.

Definitions (the one place they live):

* α, the token acceptance rate, is the *conditional* rate of Leviathan et al. (2023) and OSD
  (Liu et al. 2024): the probability that a drafted token is accepted given all earlier drafted
  tokens of the step were accepted, E[Σ_x min(p_target(x), p_draft(x))]. It is estimated from
  observed steps as  α̂ = Σ a / (Σ a + #{steps with a < k}),  i.e. accepted drafts over the
  drafted positions examined up to and including the first rejection.
* The accepted length a ∈ [0, k] of one step is the number of drafted tokens accepted; the step
  emits a + 1 tokens (the target's correction, or its bonus token when a = k).

With i.i.d. acceptance, P(a = j) = α^j (1 − α) for j < k and P(a = k) = α^k, so
    E[tokens per step] = (1 − α^(k+1)) / (1 − α)
and with draft/target step-time ratio c the speedup over plain decoding is
    S(α, k, c) = (1 − α^(k+1)) / ((1 − α)(c·k + 1))          (Leviathan et al. 2023, Thm 3.8)
"""

from __future__ import annotations

import numpy as np


def expected_tokens_per_step(alpha: float | np.ndarray, k: int) -> float | np.ndarray:
    """E[a + 1] = (1 − α^(k+1))/(1 − α); equals k + 1 at α = 1."""
    a = np.asarray(alpha, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.isclose(a, 1.0), k + 1.0, (1.0 - a ** (k + 1)) / (1.0 - a))
    return float(out) if np.ndim(out) == 0 else out


def expected_accepted(alpha: float, k: int) -> float:
    """E[a] = E[tokens per step] − 1."""
    return float(expected_tokens_per_step(alpha, k)) - 1.0


def speedup(alpha: float, k: int, c: float) -> float:
    """Expected speedup over target-only decoding, S(α, k, c) (Leviathan et al. 2023)."""
    return float(expected_tokens_per_step(alpha, k)) / (c * k + 1.0)


def optimal_k(alpha: float, c: float, k_max: int = 99) -> int:
    """k* = argmax_{1..k_max} S(α, k, c) — OSD's cost model searches k over 1..99."""
    ks = np.arange(1, k_max + 1)
    a = min(max(alpha, 0.0), 1.0)
    if a >= 1.0:
        gains = (ks + 1.0) / (c * ks + 1.0)
    else:
        gains = (1.0 - a ** (ks + 1)) / ((1.0 - a) * (c * ks + 1.0))
    return int(ks[int(np.argmax(gains))])


def alpha_from_counts(accepted, rejections):
    """α̂ = accepted / (accepted + rejections); NaN when nothing was examined.

    Scalars give a float; arrays give the element-wise estimate (one per request, say)."""
    if np.ndim(accepted) == 0 and np.ndim(rejections) == 0:
        total = accepted + rejections
        return float(accepted / total) if total > 0 else float("nan")
    acc = np.asarray(accepted)
    with np.errstate(divide="ignore", invalid="ignore"):
        return acc / (acc + np.asarray(rejections))


def bootstrap_ratio_ci(numerators, denominators, resamples: int = 2000,
                       level: float = 0.95) -> tuple[float, float] | None:
    """`level` interval of Σ num / Σ den when the items (requests, held-out prompts) are resampled
    with replacement: how far another sample of as many items could land. Fixed seed, so the same
    items give the same interval; None with fewer than 2 items or nothing counted."""
    num = np.asarray(numerators, dtype=float)
    den = np.asarray(denominators, dtype=float)
    if num.size < 2 or den.sum() <= 0:
        return None
    idx = np.random.default_rng(0).integers(0, num.size, size=(resamples, num.size))
    boot = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(lo), float(hi)


def windowed_alpha(accepted: np.ndarray, rejections: np.ndarray, window: int) -> np.ndarray:
    """Pooled α̂ over a trailing window: element i is Σa / (Σa + Σrejections) over items
    max(0, i − window + 1) … i (fewer at the start; NaN where nothing was examined). The one
    windowed α of the project: items are requests in arrival order for the validator's curves."""
    acc = np.concatenate(([0.0], np.cumsum(np.asarray(accepted, dtype=float))))
    rej = np.concatenate(([0.0], np.cumsum(np.asarray(rejections, dtype=float))))
    hi = np.arange(1, acc.size)
    lo = np.maximum(hi - int(window), 0)
    a = acc[hi] - acc[lo]
    return alpha_from_counts(a, rej[hi] - rej[lo])


def alpha_from_accepted_lengths(lengths: np.ndarray, k: int) -> float:
    """MLE of α for truncated-geometric accepted lengths a ∈ [0, k] (one per step)."""
    a = np.asarray(lengths)
    return alpha_from_counts(float(a.sum()), float(np.count_nonzero(a < k)))


def accepted_length_pmf(alpha: float, k: int) -> np.ndarray:
    """P(a = j), j = 0..k, under i.i.d. acceptance."""
    j = np.arange(k + 1)
    pmf = alpha**j * (1.0 - alpha)
    pmf[k] = alpha**k
    return pmf


# --- samplers -------------------------------------------------------------------------------------
def sample_geometric(rng: np.random.Generator, alpha: np.ndarray, k: int) -> np.ndarray:
    """Accepted lengths a_i ~ truncated geometric(α_i) on [0, k], vectorised over sequences.

    a = min(⌊E / (−ln α)⌋, k) with E ~ Exp(1): P(a ≥ j) = P(E ≥ j·(−ln α)) = α^j.
    α is clipped to [1e-12, 1 − 1e-12] so the logarithm stays finite; that changes P(a ≥ 1) by at
    most 1e-12 at the edges α = 0 and α = 1.
    """
    e = rng.standard_exponential(np.shape(alpha))
    inv_neg_log_alpha = -1.0 / np.log(np.clip(alpha, 1e-12, 1.0 - 1e-12))
    return np.minimum(e * inv_neg_log_alpha, k).astype(np.int64)


class GeometricLaw:
    """i.i.d. acceptance at α: accepted lengths are truncated geometric (sample_geometric).

    `stretch`: the law can draw many iterations at once. With a = min(⌊E·(−1/ln α)⌋, k), E ~ Exp(1)
    i.i.d., the draws of m iterations are m·b exponentials in a row, whatever the α of each
    sequence, so a simulator may draw a stretch ahead and rewind to the rows it used."""

    stretch = True

    def sample(self, rng: np.random.Generator, alpha: np.ndarray, k: int) -> np.ndarray:
        return sample_geometric(rng, alpha, k)


class EmpiricalLaw:
    """Accepted-length distributions measured at several α (a family indexed by α).

    Each entry is a histogram over a = 0..k_file measured by the validator while the draft had
    acceptance α_j. For a sequence with current α, the law mixes the two bracketing entries with
    linear weights (so the distribution moves continuously with α); outside the measured range the
    nearest entry is used (and reported). Lengths are truncated at the scenario's k: a ≥ k → k,
    which is exact when k ≤ k_file because a step with larger k accepts at least as far.
    """

    stretch = False  # draws depend on the per-iteration α brackets: one iteration at a time

    def __init__(self, alphas: np.ndarray, histograms: np.ndarray):
        order = np.argsort(alphas)
        self.alphas = np.asarray(alphas, dtype=float)[order]
        h = np.asarray(histograms, dtype=float)[order]
        if h.ndim != 2 or h.shape[0] != self.alphas.size or np.any(h < 0) or np.any(h.sum(1) <= 0):
            raise ValueError("empirical law: need one non-negative, non-empty histogram per α")
        self.pmfs = h / h.sum(axis=1, keepdims=True)
        self.k_file = h.shape[1] - 1
        self._cdf_cache: dict[int, np.ndarray] = {}

    def cdf(self, k: int) -> np.ndarray:
        """Per-entry CDF over a = 0..k (entries × (k+1)), mass at ≥ k folded into k."""
        if k > self.k_file:
            raise ValueError(f"empirical law measured with k={self.k_file}; cannot serve k={k}")
        cached = self._cdf_cache.get(k)
        if cached is None:
            pmf = self.pmfs[:, : k + 1].copy()
            pmf[:, k] += self.pmfs[:, k + 1 :].sum(axis=1)
            cached = np.cumsum(pmf, axis=1)
            cached[:, -1] = 1.0
            self._cdf_cache[k] = cached
        return cached

    def mean_tokens_per_step(self, alpha: float, k: int) -> float:
        lo, hi, w = self._bracket(np.array([alpha]))
        cdf = self.cdf(k)
        pmf = np.diff(np.concatenate([[0.0], (1 - w[0]) * cdf[lo[0]] + w[0] * cdf[hi[0]]]))
        return float((np.arange(k + 1) + 1) @ pmf)

    def _bracket(self, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = np.clip(alpha, self.alphas[0], self.alphas[-1])
        hi = np.searchsorted(self.alphas, a, side="left").clip(0, self.alphas.size - 1)
        lo = (hi - 1).clip(0)
        span = self.alphas[hi] - self.alphas[lo]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(span > 0, (a - self.alphas[lo]) / span, 1.0)
        return lo, hi, w

    def sample(self, rng: np.random.Generator, alpha: np.ndarray, k: int) -> np.ndarray:
        """Accepted lengths for sequences with acceptance α_i (vectorised)."""
        alpha = np.asarray(alpha, dtype=float)
        lo, hi, w = self._bracket(alpha)
        u_mix, u = rng.random((2,) + alpha.shape)
        row = np.where(u_mix < w, hi, lo)
        cdf = self.cdf(k)[row]  # (n, k+1)
        return (u[..., None] > cdf).sum(axis=-1).astype(np.int64)

    @property
    def alpha_range(self) -> tuple[float, float]:
        return float(self.alphas[0]), float(self.alphas[-1])
