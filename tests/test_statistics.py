"""Statistical helpers against independent references: scipy, brute-force loops, exact formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from brittle.calibrate.analyses import estimate_threshold
from brittle.calibrate.metrics import kendall_tau_ci
from brittle.deploy import alarm
from brittle.deploy.telemetry import margin_buckets


# ------------------------------------------------------------ estimate_threshold
def _achievable_above(scores: np.ndarray) -> set[int]:
    """Every count of scores strictly above some threshold (brute force)."""
    candidates = np.concatenate([[-math.inf], np.unique(scores)])
    return {int((scores > t).sum()) for t in candidates}


def test_estimate_threshold_leaves_the_nearest_achievable_count_above() -> None:
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.9])
    # Three above cannot be had: the tie at 0.5 moves together; four is nearer than one.
    assert (scores > estimate_threshold(scores, 3)).sum() == 4
    rng = np.random.default_rng(0)
    for _ in range(500):
        values = rng.integers(0, 6, size=int(rng.integers(1, 15))).astype(float) / 5
        target = int(rng.integers(0, values.size + 1))
        above = int((values > estimate_threshold(values, target)).sum())
        best = min(abs(a - target) for a in _achievable_above(values))
        assert abs(above - target) == best, (values, target, above)
        if target in _achievable_above(values):
            assert above == target


# ----------------------------------------------------------------- kendall_tau_ci
def test_kendall_tau_ci_is_defined_when_some_resamples_are_degenerate() -> None:
    # One margin differs from the other five: about a third of resamples miss it.
    score = np.array([0.1, 0.4, 0.2, 0.5, 0.3, 0.9])
    margin = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    low, high = kendall_tau_ci(score, margin, n_resamples=300)
    assert math.isfinite(low) and math.isfinite(high)
    # A percentile interval of a skewed bootstrap need not hold the point estimate.
    assert -1.0 <= low <= high <= 1.0


def test_kendall_tau_ci_matches_scipy_bootstrap() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=150)
    y = x + rng.normal(size=150)
    low, high = kendall_tau_ci(x, y, seed=0)
    reference = stats.bootstrap(
        (x, y),
        lambda a, b: stats.kendalltau(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=1000,
        method="percentile",
        rng=np.random.default_rng(1000),
    ).confidence_interval
    # Both are Monte Carlo: over 20 seed pairs the ends differed by at most 0.013
    # (mean 0.004), for an interval 0.15 wide.
    assert low == pytest.approx(reference.low, abs=0.03)
    assert high == pytest.approx(reference.high, abs=0.03)


# ------------------------------------------------------------------ binomial_sf
class _CountingMath:
    """``math`` with ``exp`` counted: the work ``binomial_sf`` does, without timing it."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(math, name)

    def exp(self, value: float) -> float:
        self.calls += 1
        return math.exp(value)


def test_binomial_sf_stops_once_its_terms_underflow(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingMath()
    monkeypatch.setattr(alarm, "math", counting)
    n, p = 10**6, 1e-3
    assert alarm.binomial_sf(n // 2, n, p) == stats.binom.sf(n // 2 - 1, n, p) == 0.0
    # Every term past the mean is below the last: the first that underflows ends the sum.
    assert counting.calls <= 2


# ----------------------------------------------------------------- margin_buckets
def test_margin_buckets_split_exactly_at_the_threshold() -> None:
    rng = np.random.default_rng(0)
    margins = rng.exponential(1.0, size=1000)
    threshold = float(np.sort(margins)[123])  # a calibration score, many digits long
    buckets = margin_buckets(margins, threshold)
    assert threshold in buckets
    # The bucket le=threshold counts exactly the samples the flag (margin <= t) marks.
    assert (margins <= buckets[buckets.index(threshold)]).sum() == 124
