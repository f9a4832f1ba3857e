"""The flag-rate alarm: a Bernoulli CUSUM whose run length is promised despite a finite holdout.

``fit()`` stores how many of its calibration samples the monitor flagged, and
out of how many (the *reference*). In production every accepted sample is one
step of a cumulative sum of log-likelihood ratios between an out-of-control
flag rate ``p1`` (the reference's odds times ``odds_ratio``) and the in-control
rate ``p0``; the alarm fires while the sum is at or above a threshold ``h``. A
shift toward brittle inputs (noise, low contrast, a new camera, an attack
campaign) raises the share of small margins long before anyone reads single
flags; there is no warm-up window, so a stream that is all flagged fires within
tens of samples.

The promise is in the user's units: ``run_length``, the expected number of
clean samples before a false alarm (as alibi-detect's ``ert``). The reference
rate is an estimate, so the chart is designed at its one-sided Clopper-Pearson
upper bound: with probability at least ``confidence`` over the holdout the
true rate is below it, and since the run length falls as the rate rises, the
in-control run length is then at least the promise (a guaranteed conditional
performance chart, Gandy and Kvaløy 2013).

An upper bound from a small holdout makes the chart deaf: designed at the 90 %
bound of 1,000 samples it runs 7-22 times the promise on a typical holdout.
So the chart learns (a self-starting chart, as Hawkins's): a sample joins the
reference once ``lag`` later samples have passed without an alarm, and each
time the reference has doubled the chart is designed again at the new bound.
A rise is caught within its first ``lag`` samples (``lag`` is 20 times the
expected delay of the chart in use for the rise it is tuned to), before it could be
learned as normal. The samples waiting when the alarm switches on wait with
the episode's: all are learned once the alarm clears if it was on for at most
``lag`` samples (a false alarm is short, and dropping its flag-heavy stretch
biased the learned rate low: 4-10 % at a promise of 10^4 samples and a rate
of 1 %, so that later charts fired early), and dropped if it lasted longer.

The statistic runs on an integer scale (Reynolds and Stoumbos 1999): a flag
adds ``up``, a clean sample takes ``down`` away, the threshold is an integer,
and the run length is computed exactly from the Markov chain of that integer
statistic. Plain ``math`` and numpy only, so the serving path needs no scipy;
the tests check the maths against scipy and brute-force simulation.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

from brittle.arguments import positive_int
from brittle.output import as_array

__all__ = [
    "FlagRateAlarm",
    "AlarmState",
    "CusumDesign",
    "binomial_sf",
    "binomial_cdf",
    "critical_count",
    "upper_rate",
    "cusum_increments",
    "cusum_run_length",
    "cusum_threshold",
    "design_cusum",
    "monitor_reference",
    "DEFAULT_RUN_LENGTH",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_ODDS_RATIO",
    "MIN_REFERENCE_RATE",
    "MAX_REFERENCE_RATE",
    "MAX_RUN_LENGTH",
    "LAG_DELAYS",
    "MIN_LAG",
    "OLD_REFERENCE_WARNING",
    "parse_reference",
    "UndetectableRiseError",
]

DEFAULT_RUN_LENGTH = 10**6
DEFAULT_CONFIDENCE = 0.9
DEFAULT_ODDS_RATIO = 2.0
# The design rate is at least this: a reference on which nothing was flagged
# (given as a rate, with no count to bound it) must not make one flag an alarm,
# and a learned reference of a stream almost never flagged must not make a chart
# of tens of thousands of states, whose design takes seconds.
MIN_REFERENCE_RATE = 1e-3
# Above this design rate a rise is too small to detect within any useful delay.
MAX_REFERENCE_RATE = 0.95
# The largest promise the run length's solve can keep: its relative error grows as
# about 5e-17 times the run length (5e-5 here, against the exact Markov chain in
# extended precision), and past 1e15 it has no digit left, so a larger promise
# would get the chart of about 1e15 and call it kept (6,000 years at 5,000 samples/s).
MAX_RUN_LENGTH = 1e12
# A stream sample joins the learned reference once this many times the chart's expected
# delay for the rise it is tuned to has passed without an alarm, and at least MIN_LAG
# samples: a rise is caught long before it could be learned as the normal rate.
LAG_DELAYS = 20
MIN_LAG = 1000
# Said when a file carries the holdout's flag rate but not its counts.
OLD_REFERENCE_WARNING = (
    "this monitor was saved by a brittle that stored the holdout's flag rate but not its "
    "counts: the flag-rate alarm takes that rate as exact, so its false-alarm promise does "
    "not count the holdout's noise. Refit with monitor.fit(holdout) and save or export again."
)
# Largest up + down for references whose ratio needs no finer grid: the number of
# Markov states, and so the start-up cost, grows with it.
_RESOLUTION = 32
# The finest grid cusum_increments refines to: far past any chart that can be solved.
_FINEST_GRID = 2**20


class UndetectableRiseError(ValueError):
    """The reference flag rate is so high that no rise above it can be told from noise.

    ``Telemetry`` then serves without the alarm and says why.
    """


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``: the one-sided p-value of ``k`` flags in ``n``.

    Sums the upper tail term by term from ``k`` in log space (``math.lgamma``);
    exact to floating-point rounding for the sizes an alarm uses.

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


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, summed from the smaller side of the mean.

    Below the mean the terms are summed from ``k`` downwards, each from the last
    by one multiplication, so the cost is the tail's length (a few standard
    deviations), not ``n``: the Clopper-Pearson bound of a reference of ten
    million samples takes 0.04-0.13 s, not 3 s. Above the mean it is
    ``1 - binomial_sf(k + 1, n, p)``.

    Examples:
        >>> round(binomial_cdf(2, 10, 0.1), 6)
        0.929809
        >>> binomial_cdf(-1, 10, 0.1), binomial_cdf(10, 10, 0.1)
        (0.0, 1.0)
    """
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and p in [0, 1]. Got n={n}, p={p}.")
    if k < 0:
        return 0.0
    if k >= n or p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    if k > n * p:
        return 1.0 - binomial_sf(k + 1, n, p)
    q = 1.0 - p
    term = math.exp(
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    total, ratio = 0.0, q / p
    # Below the mean each term is smaller than the one above it: stop once one adds
    # nothing (a first term that underflowed leaves a tail below 1e-308).
    for i in range(k, -1, -1):
        total += term
        if term <= total * 1e-17:
            break
        term *= i / (n - i + 1) * ratio
    return min(total, 1.0)


def critical_count(n: int, p: float, level: float) -> int:
    """Smallest ``k`` with ``binomial_sf(k, n, p) <= level``; ``n + 1`` if none.

    A window of ``n`` samples with at least this many flags rejects, at ``level``,
    the hypothesis that the stream is flagged at rate ``p`` (the sliding-window
    test that ``benchmarks/bench_alarm.py`` compares the CUSUM with).

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


def upper_rate(flagged: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as ``flagged`` of ``n``.

    The ``p`` at which ``P(Binomial(n, p) <= flagged) = 1 - confidence``: for
    every true rate, the bound is at least that rate with probability at least
    ``confidence``. Equals ``scipy.stats.beta.ppf(confidence, flagged + 1, n - flagged)``.

    Examples:
        >>> round(upper_rate(0, 100, 0.9), 6)  # 1 - 0.1 ** (1 / 100)
        0.022763
        >>> upper_rate(5, 5)
        1.0
    """
    if n < 1 or not 0 <= flagged <= n:
        raise ValueError(f"need n >= 1 and 0 <= flagged <= n. Got flagged={flagged}, n={n}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1). Got {confidence}.")
    if flagged == n:
        return 1.0
    alpha = 1.0 - confidence
    # Invariant: P(X <= flagged) > alpha at low, <= alpha at high; the cdf falls as p rises.
    # From 0, not flagged / n: below a confidence of about 0.5 the bound lies under the rate.
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        if binomial_cdf(flagged, n, mid) > alpha:
            low = mid
        else:
            high = mid
    return high


def _risen(p: float, odds_ratio: float) -> float:
    """The flag rate ``p`` after its odds have been multiplied by ``odds_ratio``."""
    return odds_ratio * p / (1.0 - p + odds_ratio * p)


def cusum_increments(
    p0: float, odds_ratio: float = DEFAULT_ODDS_RATIO, resolution: int = _RESOLUTION
) -> tuple[int, int]:
    """Integer steps ``(up, down)`` of a Bernoulli CUSUM of ``p0`` against odds ``odds_ratio`` x.

    The log-likelihood ratio of one sample is ``log(odds_ratio) * (x - gamma)``
    with ``gamma = log((1 - p0) / (1 - p1)) / log(odds_ratio)``; on the integer
    scale a flag adds ``up`` and a clean sample takes ``down`` away, with
    ``down / (up + down)`` the closest fraction to ``gamma`` whose denominator is
    at most ``resolution`` (or about ``1 / gamma`` for a rare flag, so that
    ``down`` is never rounded to zero, and ``1 / (1 - gamma)`` for a large rise
    of a common flag, so that ``up`` is not), on a grid made finer until that
    fraction lies between ``p0`` and ``p1``, within a quarter of their distance
    of ``gamma``: the statistic then falls on average at ``p0`` and rises at ``p1``.

    Examples:
        >>> cusum_increments(0.1)  # p1 = 0.2 / 1.1; gamma = 0.1375
        (25, 4)
        >>> cusum_increments(0.95, odds_ratio=32)  # gamma = 0.9857: not 1 / 1
        (1, 69)
    """
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1). Got {p0}.")
    if not 1.0 < odds_ratio < math.inf:
        raise ValueError(f"odds_ratio must be above 1 and finite. Got {odds_ratio}.")
    p1 = _risen(p0, odds_ratio)
    gamma = math.log((1.0 - p0) / (1.0 - p1)) / math.log(odds_ratio)
    # On the coarse grid a gamma within 1 / (2 * resolution) of 0 or 1 would round to
    # 0 / 1 or 1 / 1, and the step clamped to 1 would then be as large as the other:
    # 1 / 2, below p0 when p0 is high, a chart that climbs on clean traffic.
    limit = max(resolution, round(1.0 / gamma), round(1.0 / (1.0 - gamma)))
    fraction = Fraction(gamma).limit_denominator(limit)
    # Near an odds ratio of 1, p0 and p1 can be closer than the grid: a ratio at or
    # below p0 climbs on clean traffic, one at or above p1 never rises, and one at a
    # hair from either barely moves. gamma lies between them, so a finer grid brings
    # the ratio within a quarter of their distance of it (never needed at odds of 1.2
    # and above; at 1.1, for 1 % of the rates).
    while not (p0 < fraction < p1 and abs(fraction - gamma) <= (p1 - p0) / 4):
        if limit > _FINEST_GRID:  # gamma itself rounded out of (p0, p1): odds of 1 + 1e-9
            raise UndetectableRiseError(
                f"odds_ratio {odds_ratio!r} is too close to 1 to tell its rise of the flag "
                f"rate from {p0:.4g} apart on the chart's integer scale."
            )
        limit *= 2
        fraction = Fraction(gamma).limit_denominator(limit)
    down = max(fraction.numerator, 1)
    return max(fraction.denominator - down, 1), down


@lru_cache(maxsize=4096)
def cusum_run_length(up: int, down: int, threshold: int, p: float) -> float:
    """Expected samples until the integer CUSUM first reaches ``threshold``, from zero.

    The statistic ``C`` starts at 0 and becomes ``max(0, C + up)`` after a
    flag (probability ``p``) and ``max(0, C - down)`` after a clean sample; the
    run length ends at the first ``C >= threshold``. Exact: it solves
    ``(I - Q) L = 1`` for the Markov chain of the states ``0 .. threshold - 1``
    with LAPACK's banded solver (``scipy.linalg.solve_banded``), in
    ``O(threshold * down * (up + down))``: about 0.1 ms for a chart of a few
    hundred states, where the elimination written in numpy took 3 ms.

    Examples:
        >>> cusum_run_length(1, 1, 1, 0.5)  # the first flag: geometric, mean 1 / p
        2.0
        >>> round(cusum_run_length(1, 1, 2, 0.5), 6)  # two flags in a row: 1/p + 1/p**2
        6.0
    """
    if up < 1 or down < 1 or threshold < 1:
        raise ValueError(f"up, down and threshold must be >= 1. Got {up}, {down}, {threshold}.")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1]. Got {p}.")
    # Imported here: the torch serving path imports this module and designs no chart.
    from scipy.linalg import solve_banded

    size, q = threshold, 1.0 - p
    # I - Q in LAPACK's band storage: entry (i, j) sits at band[up + i - j, j].
    band = np.zeros((up + down + 1, size))
    band[up] = 1.0
    band[0, up:] -= p  # a flag moves state i to i + up, while that stays below the threshold
    rows = np.arange(size)
    cols = np.maximum(rows - down, 0)  # a clean sample moves i to max(0, i - down)
    band[up + rows - cols, cols] -= q
    result = solve_banded((down, up), band, np.ones(size), overwrite_ab=True, check_finite=False)
    value = float(result[0])
    # Past about 1e15 samples the solve loses every digit (and may turn negative):
    # such a run length exceeds any promise, which is all the threshold search asks.
    return value if 0.0 < value < 1e15 else math.inf


def cusum_threshold(up: int, down: int, p: float, run_length: float) -> int:
    """Smallest integer threshold whose run length at flag rate ``p`` is at least ``run_length``.

    The run length grows with the threshold, about exponentially, so the search
    doubles to bracket the answer and then bisects on the logarithm.

    Examples:
        >>> h = cusum_threshold(25, 4, 0.1, 1e4)
        >>> cusum_run_length(25, 4, h - 1, 0.1) < 1e4 <= cusum_run_length(25, 4, h, 0.1)
        True
    """
    if not 1.0 <= run_length <= MAX_RUN_LENGTH:
        raise ValueError(f"run_length must be in [1, {MAX_RUN_LENGTH:g}]. Got {run_length}.")
    if cusum_run_length(up, down, 1, p) >= run_length:
        return 1
    # Invariant: run length < run_length at low, >= run_length at high.
    low, high = 1, 2
    while cusum_run_length(up, down, high, p) < run_length:
        low, high = high, 2 * high
    while high - low > 1:
        # Interpolate log run length between the ends (nearly linear in the
        # threshold), kept strictly inside so that every step shrinks the bracket.
        a, b = (
            math.log(cusum_run_length(up, down, low, p)),
            math.log(cusum_run_length(up, down, high, p)),
        )
        guess = low + (math.log(run_length) - a) / (b - a) * (high - low)
        mid = min(max(round(guess), low + 1), high - 1)
        if cusum_run_length(up, down, mid, p) < run_length:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class CusumDesign:
    """A Bernoulli CUSUM chart: its integer steps and threshold, and what they were set for.

    Attributes:
        up: Added to the statistic by a flagged sample.
        down: Taken from the statistic by a clean sample.
        threshold: The alarm switches on when the statistic reaches this.
        rate: The flag rate the chart was designed at (the reference's upper bound).
        run_length: Expected clean samples to a false alarm at ``rate`` (at least the promise).
        nats: Log-likelihood ratio per unit of the integer statistic.
    """

    up: int
    down: int
    threshold: int
    rate: float
    run_length: float
    nats: float


def design_cusum(
    rate: float,
    run_length: float = DEFAULT_RUN_LENGTH,
    odds_ratio: float = DEFAULT_ODDS_RATIO,
) -> CusumDesign:
    """The chart for an in-control flag rate ``rate``: steps, then the smallest threshold.

    Raises:
        UndetectableRiseError: if ``rate`` is above ``MAX_REFERENCE_RATE``.

    Examples:
        >>> d = design_cusum(0.1, run_length=1e4)
        >>> (d.up, d.down), d.run_length >= 1e4
        ((25, 4), True)
    """
    if not 0.0 < rate <= MAX_REFERENCE_RATE:
        raise UndetectableRiseError(
            f"the design flag rate must be in (0, {MAX_REFERENCE_RATE}]. Got {rate:.4g}: a "
            "monitor that flags almost everything on its holdout leaves no rise to detect."
        )
    up, down = cusum_increments(rate, odds_ratio)
    threshold = cusum_threshold(up, down, rate, run_length)
    return CusumDesign(
        up=up,
        down=down,
        threshold=threshold,
        rate=rate,
        run_length=cusum_run_length(up, down, threshold, rate),
        nats=math.log(odds_ratio) / (up + down),
    )


@dataclass(frozen=True)
class AlarmState:
    """A consistent snapshot of a ``FlagRateAlarm``.

    Attributes:
        firing: On since the statistic reached the threshold, until it is back at zero.
        statistic: The CUSUM statistic, in nats of log-likelihood ratio.
        threshold: The statistic at which the alarm fires, in nats.
        samples: Samples seen since construction or ``reset``.
        flagged: Flagged samples among them.
        episodes: Times the alarm switched on (off to on) since construction.
        reference_rate: The holdout's flag rate (``flagged / n`` of the reference).
        design_rate: The rate the chart is designed at now (the upper bound of the
            holdout and the samples learned).
        run_length: The promised expected clean samples between false alarms.
        learned: Stream samples in the reference so far (0 without learning).
        pooled_rate: The flag rate of the reference as it stands (the holdout and
            the samples learned), whose upper bound is the design rate; NaN for a
            reference given as a bare rate.
    """

    firing: bool
    statistic: float
    threshold: float
    samples: int
    flagged: int
    episodes: int
    reference_rate: float
    design_rate: float
    run_length: float
    learned: int = 0
    pooled_rate: float = math.nan

    @property
    def rate(self) -> float:
        """The flag rate since construction or ``reset`` (NaN before the first sample)."""
        return self.flagged / self.samples if self.samples else math.nan


def _count(value: Any) -> int | None:
    """``value`` as a count when it is a whole number (3, 3.0, np.int64(3)); else None."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    return int(number) if number.is_integer() else None  # NaN and infinities are not


def parse_reference(reference: Any) -> tuple[int, int] | float:
    """An alarm's reference as ``(flagged, n)`` counts or a rate; ``ValueError`` for anything else.

    Counts are whole numbers with ``0 <= flagged <= n`` and ``n >= 1``; a rate lies in
    ``[0, 1]``, as the counts' ``flagged / n`` does (the alarm then refuses a rate
    above ``MAX_REFERENCE_RATE`` with ``UndetectableRiseError``, as it refuses ``(n, n)``).

    Examples:
        >>> from brittle.deploy.alarm import parse_reference
        >>> parse_reference((12.0, 400)), parse_reference(0.03)
        ((12, 400), 0.03)
    """
    if isinstance(reference, np.ndarray) and reference.shape == (2,):
        reference = tuple(reference.tolist())
    if isinstance(reference, tuple | list) and len(reference) == 2:
        flagged, n = _count(reference[0]), _count(reference[1])
        if flagged is None or n is None:
            raise ValueError(f"reference counts must be integers. Got {tuple(reference)}.")
        if not 0 <= flagged <= n or n < 1:
            raise ValueError(
                f"reference must be (flagged, n) with 0 <= flagged <= n and n >= 1. Got "
                f"{tuple(reference)}."
            )
        return int(flagged), int(n)
    try:
        if isinstance(reference, str | bytes | bool | np.bool_):  # float() reads "0.1", True
            raise TypeError
        rate = float(reference)
    except (TypeError, ValueError):
        raise ValueError(
            f"reference must be (flagged, n) counts or a rate. Got {reference!r}."
        ) from None
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"a reference rate must be in [0, 1]. Got {reference}.")
    return rate


def monitor_reference(monitor: Any) -> tuple[int, int] | float | None:
    """A fitted monitor's alarm reference: its ``reference_counts``, else its rate, else ``None``.

    The rate alone comes from a file saved before the counts were stored (it warned
    when loaded); the alarm then takes it as exact. ``None``: a hand-set threshold.

    Examples:
        >>> from types import SimpleNamespace
        >>> monitor_reference(SimpleNamespace(reference_counts=(12, 400), reference_flag_rate=0.03))
        (12, 400)
        >>> monitor_reference(SimpleNamespace(reference_counts=None, reference_flag_rate=None))
    """
    counts = getattr(monitor, "reference_counts", None)
    if counts is not None:
        return (int(counts[0]), int(counts[1]))
    rate = getattr(monitor, "reference_flag_rate", None)
    return None if rate is None else float(rate)


@lru_cache(maxsize=1024)
def _design_from_counts(
    flagged: int, n: int, confidence: float, run_length: float, odds_ratio: float
) -> CusumDesign:
    """The chart at the ``confidence`` upper bound of ``flagged`` of ``n``, floored.

    The floor, ``MIN_REFERENCE_RATE``, bounds the chart's size: below it the
    steps and threshold grow as one over the rate, and the design's cost as its
    square (0.3 s at the floor, 3 s at a quarter of it), which a stream that is
    almost never flagged would otherwise pay at every redesign, inside ``update``.
    Cached: the alarms of one holdout, in tests and benchmarks, learn the same counts.
    """
    rate = max(upper_rate(flagged, n, confidence), MIN_REFERENCE_RATE)
    return _design_at(rate, run_length, odds_ratio)


@lru_cache(maxsize=1024)
def _design_at(rate: float, run_length: float, odds_ratio: float) -> CusumDesign:
    """``design_cusum``, cached: a learned reference at the floor repeats its rate."""
    return design_cusum(rate, run_length, odds_ratio)


class FlagRateAlarm:
    """Fires when the stream's flag rate has risen above the holdout's: a Bernoulli CUSUM.

    Each sample is one step: the statistic gains ``up`` for a flag, loses
    ``down`` for a clean sample, never drops below zero, and the alarm fires
    while it is at or above the threshold. The threshold is set so that a
    stream flagged at the design rate runs ``run_length`` samples on average
    before the first alarm; the design rate is the reference's ``confidence``
    upper bound, so with that probability over the holdout the promise holds
    for the true rate. A reference given as a bare rate is taken as exact
    (with a floor of ``MIN_REFERENCE_RATE``) and is not learned.

    With ``learn`` (the default) the reference grows with the stream: a sample
    joins it once ``lag`` later samples have passed without the alarm switching
    on, and each time the reference has doubled the chart is designed again at
    its new upper bound (the statistic keeps its value in nats). A tighter
    bound makes a less deaf chart: on holdouts of 1,000 the typical run length
    falls from 7-22 times the promise to under 2 (``benchmarks/bench_alarm.py``).
    The samples waiting when the alarm switches on, and those seen while it is
    on, are learned once it clears if it was on for at most ``lag`` samples,
    and never if it was on longer. A rise slow enough to stay unnoticed for ``lag``
    samples is learned as the new normal; ``learn=False`` keeps the holdout's.
    Each redesign takes 1-12 ms for references of up to 10^6 samples flagged at
    5-30 % (17-120 ms at 10^7, mostly the bound), inside the ``update`` that
    reaches it; a stream almost never flagged is designed at the floor
    ``MIN_REFERENCE_RATE``, once, in about 0.3 s.

    Batches of any size: the result equals feeding the samples one by one.
    Safe to update from several threads at once. The alarm switches on when the
    statistic reaches the threshold (one *episode*) and off when it is back at
    zero, so a shift that hovers about the threshold is one episode, not many;
    while firing the statistic is held at the threshold, so the alarm clears
    in about ``threshold / down`` clean samples once a shift ends. ``reset()``
    clears it at once.

    Args:
        reference: ``(flagged, n)``: how many of the ``n`` calibration samples the
            monitor flagged (``monitor.reference_counts``); or a rate taken as exact.
        run_length: Promised expected number of clean samples between false alarms, at
            most ``MAX_RUN_LENGTH``.
        confidence: Probability over the holdout that the promise holds.
        odds_ratio: The rise the chart is tuned to detect fastest (odds of a flag
            multiplied by this).
        learn: Whether the reference learns from the stream (counts only).
        lag: Samples a sample waits before it is learned; by default ``LAG_DELAYS``
            times the chart's expected delay for a rise of ``odds_ratio``, at
            least ``MIN_LAG``, computed again at each redesign.

    Examples:
        >>> import numpy as np
        >>> alarm = FlagRateAlarm(reference=(60, 400), run_length=10**6)
        >>> alarm.update(np.zeros(1000, dtype=bool)).firing
        False
        >>> state = alarm.update(np.ones(30, dtype=bool))
        >>> state.firing, state.statistic >= state.threshold, state.episodes
        (True, True, 1)
        >>> alarm = FlagRateAlarm((60, 400), run_length=10**6, lag=100)
        >>> state = alarm.update(np.arange(1000) % 7 == 0)  # clean: a rate of 1/7
        >>> state.learned, state.design_rate < FlagRateAlarm((60, 400)).design.rate
        (900, True)
    """

    def __init__(
        self,
        reference: tuple[int, int] | float,
        *,
        run_length: float = DEFAULT_RUN_LENGTH,
        confidence: float = DEFAULT_CONFIDENCE,
        odds_ratio: float = DEFAULT_ODDS_RATIO,
        learn: bool = True,
        lag: int | None = None,
    ) -> None:
        if isinstance(run_length, bool) or not 1.0 <= float(run_length) <= MAX_RUN_LENGTH:
            raise ValueError(
                f"run_length must be a number of samples in [1, {MAX_RUN_LENGTH:g}] (past it "
                f"no run length can be computed to keep the promise). Got {run_length!r}."
            )
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1). Got {confidence}.")
        if not 1.0 < float(odds_ratio) < math.inf:
            raise ValueError(f"odds_ratio must be above 1 and finite. Got {odds_ratio}.")
        if lag is not None:
            lag = positive_int("lag", lag, what="a positive number of samples")
        self.run_length = float(run_length)
        self.confidence = float(confidence)
        self.odds_ratio = float(odds_ratio)
        ref = parse_reference(reference)
        if isinstance(ref, tuple):
            self.reference_counts: tuple[int, int] | None = ref
            self.reference_rate = ref[0] / ref[1]
            design = _design_from_counts(*ref, self.confidence, self.run_length, self.odds_ratio)
        else:
            self.reference_counts = None
            self.reference_rate = ref
            design = design_cusum(max(ref, MIN_REFERENCE_RATE), self.run_length, self.odds_ratio)
        self.learn = bool(learn) and self.reference_counts is not None
        # A lag not given follows the chart: each redesign changes its delay.
        self._given_lag = lag
        self.lag = _default_lag(design, self.odds_ratio) if lag is None else lag
        self._holdout_design = design
        self._lock = threading.Lock()
        self._firing = False
        self._statistic = 0
        self._samples = 0
        self._flagged = 0
        self._episodes = 0
        self._forget()

    def _lag_for(self, design: CusumDesign) -> int:
        """The lag given, else the one that follows ``design``."""
        return _default_lag(design, self.odds_ratio) if self._given_lag is None else self._given_lag

    def _install(self, design: CusumDesign, lag: int) -> None:
        self.design = design
        self._up, self._down = design.up, design.down
        self._threshold = design.threshold
        self.lag = lag

    def _forget(self) -> None:
        """Back to the holdout's reference and chart; nothing learned or waiting."""
        self._pool_flagged, self._pool_n = self.reference_counts or (0, 0)
        self._next_design = 2 * self._pool_n
        # The samples waiting to be learned, oldest first: while the alarm is on, an
        # episode's (and those that led up to it), learned whole if it is short.
        self._waiting: deque[bool] = deque()
        self._episode_length = 0
        self._install(self._holdout_design, self._lag_for(self._holdout_design))

    @classmethod
    def from_monitor(
        cls,
        monitor: Any,
        *,
        run_length: float = DEFAULT_RUN_LENGTH,
        confidence: float = DEFAULT_CONFIDENCE,
        odds_ratio: float = DEFAULT_ODDS_RATIO,
        learn: bool = True,
        lag: int | None = None,
    ) -> FlagRateAlarm:
        """The alarm of a fitted ``Monitor`` or ``OnnxMonitor``, against its holdout's counts.

        Raises:
            ValueError: if the monitor carries no reference (a hand-set threshold);
                refit it with ``monitor.fit(holdout)``.
        """
        reference = monitor_reference(monitor)
        if reference is None:
            raise ValueError(
                "the monitor carries no reference flag rate (its threshold was set by hand): "
                "fit it with monitor.fit(holdout) to get the flag-rate alarm."
            )
        return cls(
            reference,
            run_length=run_length,
            confidence=confidence,
            odds_ratio=odds_ratio,
            learn=learn,
            lag=lag,
        )

    def update(self, flags: Any) -> AlarmState:
        """Push a batch of flags (oldest first), one CUSUM step each; returns the new state.

        Args:
            flags: One flag or a batch: a list, a numpy array, or a torch tensor on
                any device (a ``Monitor``'s ``flag`` as it comes).

        Raises:
            ValueError: if ``flags`` are not booleans (or the integers 0 and 1); the
                alarm is then left as it was.
        """
        values = _as_flags(flags)
        with self._lock:
            self._push(values)
            return self._state()

    def feed(self, flags: Any) -> None:
        """``update`` without building the returned state: the serving path's call.

        Building an ``AlarmState`` costs more than stepping the chart through a
        small batch; ``Telemetry`` reads the state only when metrics are scraped.
        """
        values = _as_flags(flags)
        with self._lock:
            self._push(values)

    def _push(self, values: list[bool]) -> None:
        """One CUSUM step per value; the caller holds the lock.

        All or nothing: the batch is run on local copies and the alarm changed only
        at the end, so an error or a ``KeyboardInterrupt`` inside it (a redesign
        takes up to 0.3 s) leaves the alarm as it was, and the batch can be fed again.
        """
        design, lag = self.design, self.lag
        up, down, threshold = design.up, design.down, design.threshold
        statistic, firing = self._statistic, self._firing
        episodes, flagged = self._episodes, 0
        learn, episode = self.learn, self._episode_length
        pool_flagged, pool_n, next_design = self._pool_flagged, self._pool_n, self._next_design
        # The waiting queue is the stored one less its first ``taken`` samples (all of
        # them once ``dropped``), then ``added[start:]``; nothing stored is changed here.
        stored = self._waiting
        left = size = len(stored)  # stored samples not taken; samples waiting
        oldest = iter(stored)
        dropped, taken = False, 0
        added: list[bool] = []
        start = 0
        for value in values:
            if value:
                flagged += 1
                # Held at the threshold: evidence beyond it would only delay the clear.
                statistic = min(statistic + up, threshold)
            else:
                statistic = max(statistic - down, 0)
            if statistic >= threshold and not firing:
                # The samples that led up to the alarm wait with the episode's.
                firing, episodes = True, episodes + 1
                episode = 0
            elif statistic == 0 and firing:
                # A short episode (a false alarm, most often) is learned whole: dropping
                # the flag-heavy stretches of clean traffic would bias the reference low.
                # A lasting one has nothing waiting any more.
                firing = False
            if not learn:
                continue
            if firing:
                # Redesigns happen only while the alarm is off: the lag holds for the episode.
                episode += 1
                if episode <= lag:
                    added.append(value)
                    size += 1
                elif episode == lag + 1:  # a lasting rise: not learned as normal
                    dropped, left, size, added, start = True, 0, 0, [], 0
                continue
            added.append(value)
            size += 1
            while size > lag:
                size -= 1
                if left:
                    sample = next(oldest)
                    left, taken = left - 1, taken + 1
                else:
                    sample, start = added[start], start + 1
                pool_flagged += sample
                pool_n += 1
                if pool_n >= next_design:
                    # The chart at the learned reference's bound, the statistic kept in
                    # nats; below the new threshold, as the alarm is off.
                    next_design = 2 * pool_n
                    try:
                        redesigned = _design_from_counts(
                            pool_flagged, pool_n, self.confidence, self.run_length, self.odds_ratio
                        )
                    except UndetectableRiseError:
                        continue  # a reference flagged almost everywhere: the last chart stays
                    nats = statistic * design.nats
                    design, lag = redesigned, self._lag_for(redesigned)
                    up, down, threshold = design.up, design.down, design.threshold
                    statistic = min(round(nats / design.nats), threshold - 1)
        if dropped:
            stored.clear()
        else:
            for _ in range(taken):
                stored.popleft()
        stored.extend(added[start:])
        if design is not self.design:
            self._install(design, lag)
        self._pool_flagged, self._pool_n, self._next_design = pool_flagged, pool_n, next_design
        self._statistic, self._firing, self._episodes = statistic, firing, episodes
        self._episode_length = episode
        self._samples += len(values)
        self._flagged += flagged

    def reset(self, *, forget: bool = False) -> None:
        """Clear the statistic and counts (after an incident, or a deliberate change of traffic).

        Samples waiting to be learned are dropped. With ``forget`` the learned
        reference goes too: the chart is the holdout's again.
        """
        with self._lock:
            self._statistic = self._samples = self._flagged = 0
            self._firing = False
            self._waiting.clear()
            self._episode_length = 0
            if forget:
                self._forget()

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
        counts = self.reference_counts
        return AlarmState(
            firing=self._firing,
            statistic=self._statistic * self.design.nats,
            threshold=self._threshold * self.design.nats,
            samples=self._samples,
            flagged=self._flagged,
            episodes=self._episodes,
            reference_rate=self.reference_rate,
            design_rate=self.design.rate,
            run_length=self.run_length,
            learned=self._pool_n - (counts[1] if counts else 0),
            pooled_rate=self._pool_flagged / self._pool_n if self._pool_n else math.nan,
        )

    def __repr__(self) -> str:
        d = self.design
        return (
            f"FlagRateAlarm(reference_rate={self.reference_rate:.4g}, design_rate={d.rate:.4g}, "
            f"run_length={self.run_length:g}, threshold={self._threshold * d.nats:.4g} nats, "
            f"learn={self.learn})"
        )


def _as_flags(flags: Any) -> list[bool]:
    """A batch of flags as a list of bools, converted before the lock is taken.

    Only booleans (or the integers 0 and 1) are flags: NaN, strings or ``None``
    would otherwise be counted as flagged or clean without a word. A torch
    ``Monitor``'s flags are taken from any device, as ``as_array`` gives them.
    """
    if isinstance(flags, list) and all(type(v) is bool for v in flags):
        return flags
    try:
        array = as_array(flags)
    except (TypeError, ValueError) as err:  # ragged lists
        raise ValueError(f"flags must be booleans: {err}") from None
    zeros_and_ones = array.dtype.kind in "iu" and bool(((array == 0) | (array == 1)).all())
    if array.dtype.kind == "b" or array.size == 0 or zeros_and_ones:  # no flags: any dtype
        return array.astype(bool).ravel().tolist()
    raise ValueError(f"flags must be booleans (or the integers 0 and 1). Got {array.dtype} values.")


def _default_lag(design: CusumDesign, odds_ratio: float) -> int:
    """``LAG_DELAYS`` times the chart's expected delay at the rise it is tuned to."""
    risen = _risen(design.rate, odds_ratio)
    delay = cusum_run_length(design.up, design.down, design.threshold, risen)
    return max(MIN_LAG, math.ceil(LAG_DELAYS * delay))
