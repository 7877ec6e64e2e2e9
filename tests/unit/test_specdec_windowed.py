"""The one windowed α (osdsim.specdec.windowed_alpha) and the array form of alpha_from_counts."""

import numpy as np
import pandas as pd

from osdsim.specdec import alpha_from_counts, windowed_alpha


def test_windowed_alpha_is_the_pooled_trailing_window():
    rng = np.random.default_rng(0)
    acc = rng.integers(0, 50, 300)
    rej = rng.integers(0, 10, 300)
    rej[:3] = 0
    acc[:3] = 0  # nothing examined at the start: NaN
    for w in (1, 7, 50, 400):
        got = windowed_alpha(acc, rej, w)
        a = pd.Series(acc).rolling(w, min_periods=1).sum()
        r = pd.Series(rej).rolling(w, min_periods=1).sum()
        want = (a / (a + r)).to_numpy()
        assert np.allclose(got, want, equal_nan=True, rtol=0, atol=1e-15)
        brute = [alpha_from_counts(acc[max(0, i - w + 1): i + 1].sum(), rej[max(0, i - w + 1): i + 1].sum())
                 for i in range(acc.size)]
        assert np.array_equal(got, np.array(brute), equal_nan=True)


def test_alpha_from_counts_scalar_and_array():
    assert alpha_from_counts(3, 1) == 0.75 and isinstance(alpha_from_counts(3, 1), float)
    assert np.isnan(alpha_from_counts(0, 0))
    got = alpha_from_counts(np.array([3, 0, 0]), np.array([1, 2, 0]))
    assert np.array_equal(got, np.array([0.75, 0.0, np.nan]), equal_nan=True)
