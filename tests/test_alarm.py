"""The flag-rate alarm: its binomial tail against scipy, its false-alarm rate by simulation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.stats import binom

from brittle.deploy.alarm import FlagRateAlarm, binomial_sf, critical_count


@pytest.mark.parametrize("n", [1, 10, 100, 1000, 5000])
@pytest.mark.parametrize("p", [1e-3, 0.05, 0.3, 0.9])
def test_binomial_sf_matches_scipy(n: int, p: float) -> None:
    for k in sorted({0, 1, 2, n // 10, n // 2, int(n * p), int(n * p) + 5, n - 1, n, n + 1}):
        expected = binom.sf(k - 1, n, p)
        assert binomial_sf(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300), (k, n, p)


@pytest.mark.parametrize(
    ("n", "p", "level"), [(100, 0.05, 1e-3), (1000, 0.2, 1e-3), (300, 0.01, 0.05)]
)
def test_critical_count_is_the_smallest_significant_count(n: int, p: float, level: float) -> None:
    k = critical_count(n, p, level)
    assert binom.sf(k - 1, n, p) <= level < binom.sf(k - 2, n, p)


def _disjoint_window_alarms(alarm: FlagRateAlarm, p: float, windows: int, seed: int) -> float:
    """Share of disjoint full windows of a Bernoulli(p) stream on which the alarm fires."""
    rng = np.random.default_rng(seed)
    fired = 0
    for _ in range(windows):
        stream = rng.random(alarm.window) < p
        # Fed in requests of 1 to 16 samples, as a server would.
        cuts = np.cumsum(rng.integers(1, 17, size=alarm.window))
        for chunk in np.split(stream, cuts[cuts < alarm.window]):
            state = alarm.update(chunk)
        fired += state.firing
    return fired / windows


def test_false_alarm_rate_by_simulation() -> None:
    # Level 0.02 so that 3,000 windows measure it: the share of clean windows that fire
    # must not exceed the level by more than three binomial standard errors.
    level, windows = 0.02, 3000
    alarm = FlagRateAlarm(0.15, window=200, false_alarm=level)
    rate = _disjoint_window_alarms(alarm, 0.15, windows, seed=0)
    assert rate <= level + 3 * np.sqrt(level * (1 - level) / windows)
    # The test is exact but discrete: it uses most of its level, not a sliver of it.
    assert rate >= level / 4


def test_power_against_a_shift() -> None:
    alarm = FlagRateAlarm(0.15, window=200, false_alarm=1e-3)
    assert _disjoint_window_alarms(alarm, 0.3, 200, seed=1) > 0.95
    assert _disjoint_window_alarms(alarm, 0.15, 500, seed=2) < 0.01


def test_zero_reference_has_a_floor() -> None:
    alarm = FlagRateAlarm(0.0, window=1000)
    assert alarm.reference_rate == 1e-3 and alarm.observed_reference == 0.0
    state = alarm.update(np.r_[np.ones(1, bool), np.zeros(999, bool)])
    assert state.seen == 1000 and state.flagged == 1 and not state.firing
    assert alarm.critical > 2


def test_window_slides_and_waits_until_full() -> None:
    alarm = FlagRateAlarm(0.1, window=50, false_alarm=1e-3)
    assert not alarm.update(np.ones(49, bool)).firing  # not full yet
    state = alarm.update(np.ones(1, bool))
    assert state.firing and state.flagged == 50 and state.rate == 1.0 and state.p_value < 1e-3
    state = alarm.update(np.zeros(45, bool))  # 5 of the flags are still in the window
    assert state.flagged == 5 and not state.firing
    state = alarm.update(np.zeros(500, bool))  # a batch larger than the window
    assert state.flagged == 0 and state.seen == 50
    alarm.reset()
    assert alarm.state.seen == 0 and np.isnan(alarm.state.rate)


def test_concurrent_updates_keep_the_count() -> None:
    alarm = FlagRateAlarm(0.5, window=100_000)
    rng = np.random.default_rng(0)
    batches = [rng.random(int(rng.integers(1, 30))) < 0.5 for _ in range(800)]

    def push(part: list[np.ndarray]) -> None:
        for b in part:
            alarm.update(b)

    threads = [threading.Thread(target=push, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert alarm.state.seen == sum(b.size for b in batches)
    assert alarm.state.flagged == sum(int(b.sum()) for b in batches)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference_rate": 1.5}, r"reference_rate must be in \[0, 1\]. Got 1.5"),
        ({"window": 0}, "window must be a positive integer. Got 0"),
        ({"false_alarm": 0.0}, r"false_alarm must be in \(0, 1\). Got 0.0"),
        ({"min_reference": 1.0}, r"min_reference must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"reference_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        FlagRateAlarm(**args)
