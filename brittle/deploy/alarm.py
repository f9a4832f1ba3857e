"""The flag-rate alarm: a one-sided binomial test of a sliding window against the holdout.

``fit()`` stores the monitor's flag rate on its calibration holdout (the
*reference rate*). In production the alarm keeps the flags of the last
``window`` samples; it fires when their count is so high that a stream flagged
at the reference rate would reach it with probability at most ``false_alarm``:
a shift toward brittle inputs (noise, low contrast, a new camera, an attack
campaign) raises the share of small margins long before anyone reads single
flags.

The maths is a hand-written binomial tail (``math.lgamma``), so the serving
path stays free of scipy; the tests check it against ``scipy.stats.binom.sf``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FlagRateAlarm",
    "AlarmState",
    "binomial_sf",
    "critical_count",
    "DEFAULT_WINDOW",
    "DEFAULT_FALSE_ALARM",
    "MIN_REFERENCE_RATE",
]

DEFAULT_WINDOW = 1000
DEFAULT_FALSE_ALARM = 1e-3
# The reference rate used is at least this: a holdout on which nothing was flagged
# must not make one flagged request an alarm.
MIN_REFERENCE_RATE = 1e-3
# Batches up to this size update the window in plain Python (cheaper than numpy calls).
_SHORT = 16


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``: the one-sided p-value of ``k`` flags in ``n``.

    Sums the upper tail term by term from ``k`` in log space (``math.lgamma``);
    exact to floating-point rounding for the window sizes an alarm uses.

    Examples:
        >>> round(binomial_sf(3, 10, 0.1), 6)
        0.070191
        >>> binomial_sf(0, 10, 0.1), binomial_sf(11, 10, 0.1)
        (1.0, 0.0)
    """
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and p in [0, 1]. Got n={n}, p={p}.")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    # Terms fall geometrically once i exceeds the mean, so the tail converges fast.
    total, i = 0.0, k
    while i <= n:
        term = math.exp(
            log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        )
        total += term
        # Past the mean each term is smaller than the last: once one adds nothing, or
        # underflows to 0 with nothing summed yet (a tail below 1e-308), none will.
        if i > n * p and term <= total * 1e-17:
            break
        i += 1
    return min(total, 1.0)


def critical_count(n: int, p: float, level: float) -> int:
    """Smallest ``k`` with ``binomial_sf(k, n, p) <= level``; ``n + 1`` if none.

    A window of ``n`` samples with at least this many flags rejects, at ``level``,
    the hypothesis that the stream is flagged at rate ``p``.

    Examples:
        >>> critical_count(100, 0.05, 0.001)
        14
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1). Got {level}.")
    low, high = 0, n + 1  # sf(n + 1) = 0 <= level; find the smallest k with sf(k) <= level
    while low < high:
        mid = (low + high) // 2
        if binomial_sf(mid, n, p) <= level:
            high = mid
        else:
            low = mid + 1
    return low


@dataclass(frozen=True)
class AlarmState:
    """A consistent snapshot of a ``FlagRateAlarm``.

    Attributes:
        firing: Whether the window's flag count reached the critical count.
        flagged: Flags among the samples in the window.
        seen: Samples in the window (at most ``window``).
        window: The window size.
        reference_rate: The rate the test is against (after the floor).
        critical: Flags in a full window at which the alarm fires.
    """

    firing: bool
    flagged: int
    seen: int
    window: int
    reference_rate: float
    critical: int

    @property
    def rate(self) -> float:
        """The window's flag rate (NaN before the first sample)."""
        return self.flagged / self.seen if self.seen else math.nan

    @property
    def p_value(self) -> float:
        """``P(X >= flagged)`` for ``X ~ Binomial(seen, reference_rate)``."""
        return binomial_sf(self.flagged, self.seen, self.reference_rate)


class FlagRateAlarm:
    """Fires when the flag rate of the last ``window`` samples is significantly above reference.

    A one-sided binomial test: with ``k`` flags among the last ``window``
    samples it fires when ``P(Binomial(window, p0) >= k) <= false_alarm``, with
    ``p0 = max(reference_rate, min_reference)``. The critical count is computed
    once, so a check is one comparison. It stays silent until the window is full.

    ``false_alarm`` is the probability that one check on a full window of traffic
    flagged at the reference rate fires (at most; the binomial is discrete). The
    alarm is checked after every update, and overlapping windows are correlated,
    so over a long clean stream expect about ``false_alarm`` times the number of
    disjoint windows seen, not times the number of checks.

    Safe to update from several threads at once.

    Args:
        reference_rate: The monitor's flag rate on the calibration holdout
            (``monitor.reference_flag_rate``).
        window: Number of most recent samples tested.
        false_alarm: Level of the test (probability that a clean full window fires).
        min_reference: Floor on the reference rate.

    Examples:
        >>> import numpy as np
        >>> alarm = FlagRateAlarm(0.1, window=100, false_alarm=1e-3)
        >>> alarm.critical
        21
        >>> alarm.update(np.zeros(100, dtype=bool)).firing
        False
        >>> alarm.update(np.ones(30, dtype=bool)).firing
        True
    """

    def __init__(
        self,
        reference_rate: float,
        *,
        window: int = DEFAULT_WINDOW,
        false_alarm: float = DEFAULT_FALSE_ALARM,
        min_reference: float = MIN_REFERENCE_RATE,
    ) -> None:
        rate = float(reference_rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"reference_rate must be in [0, 1]. Got {reference_rate}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer. Got {window!r}.")
        if not 0.0 < false_alarm < 1.0:
            raise ValueError(f"false_alarm must be in (0, 1). Got {false_alarm}.")
        if not 0.0 <= min_reference < 1.0:
            raise ValueError(f"min_reference must be in [0, 1). Got {min_reference}.")
        self.window = window
        self.false_alarm = float(false_alarm)
        self.observed_reference = rate
        self.reference_rate = max(rate, min_reference)
        self.critical = critical_count(window, self.reference_rate, self.false_alarm)
        self._ring = np.zeros(window, dtype=bool)
        self._pos = 0
        self._seen = 0
        self._flagged = 0
        self._lock = threading.Lock()

    def update(self, flags: Any) -> AlarmState:
        """Push a batch of flags (oldest first) into the window; returns the new state."""
        n = self.window
        # One request's few flags: plain Python beats numpy's per-call overhead.
        new: np.ndarray | None = None
        values: list[Any] | None = None
        if isinstance(flags, list) and len(flags) <= _SHORT and len(flags) < n:
            values = flags
        else:
            new = np.asarray(flags, dtype=bool).reshape(-1)
            if new.size <= _SHORT and new.size < n:
                values = new.tolist()
        with self._lock:
            if values is not None:
                ring, pos = self._ring, self._pos
                for value in values:
                    self._flagged += bool(value) - bool(ring[pos])
                    ring[pos] = value
                    pos = pos + 1 if pos + 1 < n else 0
                self._pos = pos
                self._seen = min(n, self._seen + len(values))
            elif new is not None and new.size >= n:
                self._ring[:] = new[-n:]
                self._pos, self._seen = 0, n
                self._flagged = int(self._ring.sum())
            elif new is not None:
                m = new.size
                slots = (self._pos + np.arange(m)) % n
                self._flagged += int(new.sum()) - int(self._ring[slots].sum())
                self._ring[slots] = new
                self._pos = (self._pos + m) % n
                self._seen = min(n, self._seen + m)
            return self._state()

    def reset(self) -> None:
        """Empty the window (after an incident is handled, or a deliberate change of traffic)."""
        with self._lock:
            self._ring[:] = False
            self._pos = self._seen = self._flagged = 0

    @property
    def state(self) -> AlarmState:
        """The current state."""
        with self._lock:
            return self._state()

    @property
    def firing(self) -> bool:
        """Whether the alarm fires now."""
        return self.state.firing

    def _state(self) -> AlarmState:
        full = self._seen == self.window
        return AlarmState(
            firing=full and self._flagged >= self.critical,
            flagged=self._flagged,
            seen=self._seen,
            window=self.window,
            reference_rate=self.reference_rate,
            critical=self.critical,
        )

    def __repr__(self) -> str:
        return (
            f"FlagRateAlarm(reference_rate={self.reference_rate:.4g}, window={self.window}, "
            f"false_alarm={self.false_alarm:g}, critical={self.critical})"
        )
