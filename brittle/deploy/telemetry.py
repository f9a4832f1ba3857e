"""Production telemetry of a monitor: counts, a margin histogram and the flag-rate alarm.

``Telemetry`` watches the outputs of a torch ``Monitor`` or an ``OnnxMonitor``
(the caller hands it each ``MonitorOutput``; ``Monitor.forward`` itself stays
free of Python-side state, so it still compiles with ``fullgraph=True``). It
counts samples, flagged samples and rejected ones (NaN, Inf, or outside the input
domain, by reason), keeps a histogram of margins whose bucket bounds come from
the calibration holdout's margins, and feeds the flags of the accepted samples
to a ``FlagRateAlarm`` against the holdout's flagged count. A rejected sample
(margin NaN: the monitor's fail-closed mark for an input it cannot judge) is
counted apart and never reaches the alarm, so a burst of bad requests does not
look like a shift toward brittle inputs. ``python -m brittle.serve`` exposes a
snapshot as Prometheus metrics.

This module needs numpy only (no torch, no prometheus-client), so it serves an
``OnnxMonitor`` in a process that never imports torch.
"""

from __future__ import annotations

import math
import threading
import warnings
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brittle.deploy.alarm import (
    DEFAULT_ODDS_RATIO,
    DEFAULT_RUN_LENGTH,
    AlarmState,
    FlagRateAlarm,
    UndetectableRiseError,
    monitor_reference,
)
from brittle.deploy.rejects import REASONS, Reason, reject_reasons
from brittle.output import MonitorOutput, as_array, rejected

__all__ = ["Telemetry", "TelemetrySnapshot", "margin_buckets", "BUCKET_QUANTILES"]

# Quantiles of the calibration margins that bound the histogram's buckets: fine in
# the lower tail, where the threshold and a shift toward brittle inputs show.
BUCKET_QUANTILES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)
# Up to this many samples an output is counted in plain Python (see Telemetry.observe).
_SMALL_BATCH = 16
# Multiples of the threshold that bound the buckets when no calibration margins are known.
_THRESHOLD_MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)


def margin_buckets(margins: Any, threshold: float | None = None) -> tuple[float, ...]:
    """Histogram bucket bounds from calibration margins: quantiles, plus the threshold.

    The quantile bounds are rounded to four significant digits (they become
    Prometheus ``le`` labels); the threshold is kept exact, so that the bucket
    ``le=threshold`` counts exactly the flagged samples. Non-finite margins are
    ignored.

    Args:
        margins: The calibration holdout's scores of the active score kind.
        threshold: The flag threshold, added as a bound so the histogram splits there.

    Examples:
        >>> import numpy as np
        >>> margin_buckets(np.linspace(0.0, 1.0, 101), threshold=0.123)
        (0.01, 0.02, 0.05, 0.1, 0.123, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)
    """
    values = np.asarray(margins, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    quantiles = np.quantile(values, BUCKET_QUANTILES) if values.size else np.empty(0)
    bounds = {float(f"{v:.4g}") for v in quantiles}
    if threshold is not None and math.isfinite(threshold):
        bounds.add(float(threshold))
    return tuple(sorted(bounds))


def _fallback_buckets(threshold: float | None) -> tuple[float, ...]:
    if threshold is None or not math.isfinite(threshold):
        return (0.0,)
    if threshold <= 0:
        return (float(threshold),)
    # The threshold itself stays exact (see margin_buckets).
    return tuple(
        float(threshold) if m == 1.0 else float(f"{threshold * m:.4g}")
        for m in _THRESHOLD_MULTIPLES
    )


@dataclass(frozen=True)
class TelemetrySnapshot:
    """What a ``Telemetry`` has counted, read under one lock so the figures agree.

    Attributes:
        samples: Samples observed.
        flagged: Samples flagged (brittle decisions and rejected samples).
        rejected: Samples that could not be judged (NaN, Inf or outside the input
            domain: margin NaN); they are flagged here but do not feed the alarm.
        bounds: The histogram's bucket upper bounds (``le``), ascending.
        bucket_counts: Margins per bucket, not cumulative; one more than ``bounds``
            (the last is the ``+Inf`` bucket). Rejected samples are not in it.
        margin_sum: Sum of the finite margins.
        alarm: The alarm's state, ``None`` when the alarm is unavailable.
        rejected_by_reason: ``rejected`` split by reason (``brittle.deploy.rejects``).
    """

    samples: int
    flagged: int
    rejected: int
    bounds: tuple[float, ...]
    bucket_counts: tuple[int, ...]
    margin_sum: float
    alarm: AlarmState | None
    rejected_by_reason: dict[Reason, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    @property
    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """``(le, count of margins <= le)`` pairs, ending with ``(inf, all finite margins)``."""
        counts = np.cumsum(self.bucket_counts)
        return [(b, int(c)) for b, c in zip((*self.bounds, math.inf), counts, strict=True)]


class Telemetry:
    """Thread-safe counters, margin histogram and flag-rate alarm for a monitor's outputs.

    Build it with ``Telemetry.from_monitor(monitor)`` and pass every output to
    ``observe``. Concurrent callers may observe at once: each batch is counted
    whole, and a snapshot never sees half a batch.

    Args:
        buckets: Histogram bucket upper bounds (ascending, finite).
        reference: ``(flagged, n)`` of the monitor's calibration holdout (or a rate
            taken as exact; see ``FlagRateAlarm``); ``None`` leaves the alarm unavailable.
        run_length: The alarm's promised expected clean samples between false alarms.
        odds_ratio: The rise the alarm is tuned to detect fastest (see ``FlagRateAlarm``).
        learn: Whether the alarm's reference learns from the stream (see ``FlagRateAlarm``).
        unavailable: Why the alarm is unavailable, when ``reference`` is ``None``.
        alarm: An alarm built by the caller, used instead of one from ``reference``.
        domain: The monitor's accepted ``(low, high)`` input values, to tell a sample
            rejected for leaving them from one rejected for NaN or Inf.

    Examples:
        >>> import torch, brittle
        >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), eps=0.1)
        >>> monitor.set_threshold(0.2)
        >>> telemetry = brittle.Telemetry.from_monitor(monitor, warn=False)
        >>> out = telemetry.observe(monitor(torch.rand(8, 4)))
        >>> snap = telemetry.snapshot()
        >>> snap.samples, snap.flagged == int(out.flag.sum()), snap.rejected
        (8, True, 0)
        >>> telemetry.alarm is None  # no holdout flag rate without fit()
        True
    """

    def __init__(
        self,
        buckets: Sequence[float],
        *,
        reference: tuple[int, int] | float | None = None,
        run_length: float = DEFAULT_RUN_LENGTH,
        odds_ratio: float = DEFAULT_ODDS_RATIO,
        learn: bool = True,
        unavailable: str | None = None,
        alarm: FlagRateAlarm | None = None,
        domain: tuple[float, float] | None = None,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"buckets must be finite numbers, at least one. Got {bounds}.")
        if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"buckets must be strictly increasing. Got {bounds}.")
        self.bounds = bounds
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self.alarm: FlagRateAlarm | None = alarm
        self.alarm_unavailable: str | None = None
        if alarm is None and reference is None:
            self.alarm_unavailable = unavailable or "no reference flag rate was given."
        elif alarm is None and reference is not None:
            self.alarm = FlagRateAlarm(
                reference, run_length=run_length, odds_ratio=odds_ratio, learn=learn
            )
        self._lock = threading.Lock()
        self._samples = 0
        self._flagged = 0
        self._rejected = 0
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self.domain = domain
        self._reasons = dict.fromkeys(REASONS, 0)

    @classmethod
    def from_monitor(
        cls,
        monitor: Any,
        *,
        run_length: float = DEFAULT_RUN_LENGTH,
        odds_ratio: float = DEFAULT_ODDS_RATIO,
        learn: bool = True,
        warn: bool = True,
    ) -> Telemetry:
        """Telemetry for a ``Monitor`` or an ``OnnxMonitor``, calibrated by its ``fit``.

        The buckets are the monitor's ``margin_buckets`` (quantiles of the
        calibration margins); the alarm's reference is its ``reference_counts``
        (or, for a file that stored the rate alone, its ``reference_flag_rate``).
        A monitor without them (a hand-set threshold, a file saved by an older
        brittle) gets buckets around its threshold and no alarm, with a warning
        that says how to get one; so does one whose holdout flag rate is too high
        for a rise to be detected.

        Args:
            monitor: A ``brittle.Monitor`` or ``brittle.OnnxMonitor`` with a threshold.
            run_length: The alarm's promised expected clean samples between false alarms.
            odds_ratio: The rise the alarm is tuned to detect fastest.
            learn: Whether the alarm's reference learns from the stream.
            warn: Warn when the alarm is unavailable.
        """
        threshold = float(monitor.threshold) if monitor.has_threshold else None
        buckets = monitor.margin_buckets or _fallback_buckets(threshold)
        reference = monitor_reference(monitor)
        unavailable = None
        if reference is None:
            unavailable = (
                "the monitor carries no reference flag rate (its threshold was set by hand, or "
                "it was fitted by a brittle older than the alarm): refit it with "
                "monitor.fit(holdout) and save or export it again to get the flag-rate alarm."
            )
        alarm = None
        if reference is not None:
            try:
                alarm = FlagRateAlarm(
                    reference, run_length=run_length, odds_ratio=odds_ratio, learn=learn
                )
            except UndetectableRiseError as err:
                unavailable = str(err)
        if unavailable is not None and warn:
            warnings.warn(f"flag-rate alarm unavailable: {unavailable}", stacklevel=2)
        return cls(
            buckets,
            alarm=alarm,
            unavailable=unavailable,
            domain=getattr(monitor, "input_domain", None),
        )

    def observe(self, output: MonitorOutput, inputs: Any = None) -> MonitorOutput:
        """Count one batch's output and return it unchanged.

        An error, or an interrupt while the alarm takes the batch (a redesign takes up
        to 0.3 s), leaves the counts, the histogram and the alarm as they were.

        Args:
            output: What the monitor returned (tensors on any device, or arrays).
            inputs: The batch the output is for; with it, each rejected sample is
                counted under its reason (NaN, Inf, outside the domain), else under
                ``"other"``. Only rejected rows are read.

        Raises:
            ValueError: if the output has no flags (the monitor has no threshold), or
                its margins, flags and ``inputs`` are not one per sample.
        """
        if output.flag is None:
            raise ValueError(
                "telemetry needs flags: the monitor has no threshold; call monitor.fit(holdout) "
                "or monitor.set_threshold(value) first."
            )
        margin = as_array(output.margin).reshape(-1)
        flag = as_array(output.flag).astype(bool, copy=False).reshape(-1)
        n = margin.size
        if flag.size != n or (inputs is not None and len(inputs) != n):
            sizes = f"{flag.size} flags" + ("" if inputs is None else f", {len(inputs)} inputs")
            raise ValueError(
                f"the output has {n} margins and {sizes}: pass one batch's output as the "
                "monitor returned it, with that batch. Nothing was counted."
            )
        if n <= _SMALL_BATCH:
            # A few samples per request (the serving case): numpy's per-call overhead
            # would cost more than the counting. ``v != v`` is ``brittle.output.rejected``.
            flags = flag.tolist()
            margins = margin.tolist()
            # The bucket of each judged sample, added in place below: a batch touches
            # few of the buckets, and rebuilding the list would cost more.
            buckets: list[int] = []
            total, rejected_rows = 0.0, []
            for i, value in enumerate(margins):
                if value != value:
                    rejected_rows.append(i)
                    continue
                buckets.append(bisect_left(self.bounds, value))  # +inf: the last bucket
                if math.isfinite(value):
                    total += value
            counts: list[int] | None = None
            n_judged = len(buckets)
            flagged = sum(flags)
            # A rejected sample never reaches the alarm.
            accepted: Any = flags
            if rejected_rows:
                accepted = [f for f, v in zip(flags, margins, strict=True) if v == v]
            rejected_mask: Any = rejected_rows
        else:
            rejected_mask = rejected(margin)
            good = margin[~rejected_mask] if rejected_mask.any() else margin
            found = np.bincount(
                np.searchsorted(self._bounds, good, side="left"), minlength=len(self.bounds) + 1
            )
            counts = found.tolist()
            n_judged = int(good.size)
            flagged = int(np.count_nonzero(flag))
            total = float(good[np.isfinite(good)].sum(dtype=np.float64))
            accepted = flag[~rejected_mask] if rejected_mask.any() else flag
        n_rejected = n - n_judged
        reasons: list[Reason] = []
        if n_rejected:
            if inputs is None:
                reasons = ["other"] * n_rejected
            else:
                reasons = reject_reasons(as_array(inputs)[rejected_mask], self.domain)
        with self._lock:
            # The alarm first: a batch is all or nothing there, so an error or an
            # interrupt inside it (a redesign takes up to 0.3 s) leaves nothing counted.
            if self.alarm is not None:
                self.alarm.feed(accepted)
            self._samples += n
            self._flagged += flagged
            self._rejected += n_rejected
            if counts is None:
                for bucket in buckets:
                    self._counts[bucket] += 1
            else:
                self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total
            for reason in reasons:
                self._reasons[reason] += 1
        return output

    def snapshot(self) -> TelemetrySnapshot:
        """The counts, histogram and alarm state, consistent with each other."""
        with self._lock:
            return TelemetrySnapshot(
                samples=self._samples,
                flagged=self._flagged,
                rejected=self._rejected,
                bounds=self.bounds,
                bucket_counts=tuple(self._counts),
                margin_sum=self._sum,
                alarm=None if self.alarm is None else self.alarm.state,
                rejected_by_reason=dict(self._reasons),
            )

    def __repr__(self) -> str:
        snap = self.snapshot()
        return (
            f"Telemetry(samples={snap.samples}, flagged={snap.flagged}, "
            f"rejected={snap.rejected}, alarm={self.alarm!r})"
        )
