"""``TelemetryCollector``: a ``brittle.Telemetry`` as Prometheus metrics.

A custom collector for ``prometheus_client``: on each scrape it reads one
snapshot of the telemetry, so the counters, the histogram and the alarm gauge
always describe the same set of samples.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from brittle.deploy.serve.admission import Admission
from brittle.deploy.telemetry import Telemetry

__all__ = [
    "TelemetryCollector",
    "LabelledCounter",
    "RequestCounter",
    "ClosedConnections",
    "AdmissionCollector",
]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class LabelledCounter(Collector):
    """A counter by one label, as ``<name>_total{<label>="..."}``; thread-safe.

    Args:
        name: The metric's name, without ``_total``.
        documentation: Its help text.
        label: The label's name.

    Examples:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> closed = LabelledCounter("brittle_closed", "Connections closed.", "reason")
        >>> closed.count("request_timeout")
        >>> registry = CollectorRegistry()
        >>> registry.register(closed)
        >>> b'brittle_closed_total{reason="request_timeout"} 1.0' in generate_latest(registry)
        True
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def count(self, value: object) -> None:
        """Count one event whose label is ``str(value)``."""
        key = str(value)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """The counts by label value."""
        with self._lock:
            counts = sorted(self._counts.items())
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, n in counts:
            family.add_metric([value], n)
        yield family


class RequestCounter(LabelledCounter):
    """HTTP responses by status code, as ``<prefix>_requests_total{code="..."}``.

    The server's middleware calls ``count`` once per response, 4xx and 5xx
    included, so an operator sees rejected requests as well as judged samples.

    Examples:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> counter = RequestCounter()
        >>> counter.count(200); counter.count(413)
        >>> registry = CollectorRegistry()
        >>> registry.register(counter)
        >>> b'brittle_requests_total{code="413"} 1.0' in generate_latest(registry)
        True
    """

    def __init__(self, prefix: str = "brittle") -> None:
        super().__init__(f"{prefix}_requests", "HTTP responses by status code.", "code")


class ClosedConnections(LabelledCounter):
    """Connections the server closed on a client, by reason.

    Exposed as ``<prefix>_connections_closed_total{reason="..."}``; the reasons
    are ``request_timeout`` (a request not whole in time), ``send_timeout`` (an
    answer left unread), ``fragmented_body`` (a body in too many pieces),
    ``too_many_pipelined`` (requests pipelined too deep) and ``too_many_connections``
    (``brittle.deploy.serve.connections``).
    """

    def __init__(self, prefix: str = "brittle") -> None:
        super().__init__(
            f"{prefix}_connections_closed",
            "Connections the server closed on a client: a request not whole in time, an "
            "answer left unread, or too many connections.",
            "reason",
        )


class AdmissionCollector(Collector):
    """An ``Admission``'s state as gauges, so that an operator sees the server fill up.

    ``<prefix>_body_bytes_held`` (bytes of request bodies held now: being received,
    waiting for a worker or being judged) and ``<prefix>_body_bytes_budget`` (the
    most it holds; a request beyond it gets 503, counted in ``_requests_total``).

    Examples:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> from brittle.deploy.serve.admission import Admission
        >>> registry = CollectorRegistry()
        >>> registry.register(AdmissionCollector(Admission(max_bytes=4096, max_concurrent=2)))
        >>> b"brittle_body_bytes_budget 4096.0" in generate_latest(registry)
        True
    """

    def __init__(self, admission: Admission, prefix: str = "brittle") -> None:
        self.admission = admission
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        """The bytes held and the budget."""
        yield GaugeMetricFamily(
            f"{self.prefix}_body_bytes_held",
            "Bytes of request bodies the server holds now (being received, waiting for a "
            "worker or being judged).",
            self.admission.held,
        )
        yield GaugeMetricFamily(
            f"{self.prefix}_body_bytes_budget",
            "Most bytes of request bodies the server holds at once; a request beyond it gets "
            "503 with Retry-After.",
            self.admission.max_bytes,
        )


class TelemetryCollector(Collector):
    """Expose a ``Telemetry`` through a ``prometheus_client`` registry.

    Metrics (``prefix`` defaults to ``brittle``): ``_samples_total``,
    ``_flagged_total``, ``_rejected_total{reason}`` (counters; reasons ``nan``, ``inf``,
    ``out_of_domain`` and ``other``), ``_margin`` (histogram, bucket
    bounds from the calibration margins), ``_flag_rate_alarm`` (gauge, 0 or 1),
    ``_flag_rate_alarm_available`` (gauge, 0 when the monitor has no reference
    rate), ``_flag_rate_alarm_statistic`` and ``_flag_rate_alarm_threshold``
    (gauges: the CUSUM statistic and the value at which it fires, in nats),
    ``_alarm_episodes_total`` (counter: times the alarm switched on),
    ``_reference_flag_rate`` and ``_alarm_design_flag_rate`` (gauges: the holdout's
    flag rate and the upper bound the alarm was designed at).

    Args:
        telemetry: The telemetry to expose.
        prefix: Metric name prefix.

    Examples:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> from brittle import Telemetry
        >>> registry = CollectorRegistry()
        >>> registry.register(TelemetryCollector(Telemetry([0.1, 1.0], reference=(40, 400))))
        >>> b"brittle_flag_rate_alarm 0.0" in generate_latest(registry)
        True
    """

    def __init__(self, telemetry: Telemetry, prefix: str = "brittle") -> None:
        self.telemetry = telemetry
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        """One consistent snapshot of the telemetry as metric families."""
        p = self.prefix
        snap = self.telemetry.snapshot()
        yield CounterMetricFamily(f"{p}_samples", "Samples the monitor judged.", snap.samples)
        yield CounterMetricFamily(
            f"{p}_flagged",
            "Samples flagged brittle (non-robust), rejected samples included.",
            snap.flagged,
        )
        rejected = CounterMetricFamily(
            f"{p}_rejected",
            "Samples that could not be judged (flagged, margin NaN), by reason: NaN or Inf "
            "in the input, outside the input domain the monitor was fitted on, or other.",
            labels=["reason"],
        )
        for reason, n in snap.rejected_by_reason.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield HistogramMetricFamily(
            f"{p}_margin",
            "Margin score of the judged samples (lower is more brittle); buckets from the "
            "calibration holdout's margins.",
            buckets=[(_le(le), count) for le, count in snap.cumulative_buckets],
            sum_value=snap.margin_sum,
        )
        alarm = snap.alarm
        yield GaugeMetricFamily(
            f"{p}_flag_rate_alarm",
            "1 while the flag-rate CUSUM is at or above its threshold: the flag rate of the "
            "accepted samples has risen above the calibration holdout's.",
            float(alarm is not None and alarm.firing),
        )
        yield GaugeMetricFamily(
            f"{p}_flag_rate_alarm_available",
            "1 when the monitor carries a reference flag rate, so the alarm can fire.",
            float(alarm is not None),
        )
        yield CounterMetricFamily(
            f"{p}_alarm_episodes",
            "Times the flag-rate alarm switched on (off to on).",
            0 if alarm is None else alarm.episodes,
        )
        if alarm is not None:
            yield GaugeMetricFamily(
                f"{p}_flag_rate_alarm_statistic",
                "The flag-rate CUSUM statistic (log-likelihood ratio, nats) over the accepted "
                "samples.",
                alarm.statistic,
            )
            yield GaugeMetricFamily(
                f"{p}_flag_rate_alarm_threshold",
                "The statistic at which the flag-rate alarm fires (nats).",
                alarm.threshold,
            )
            yield GaugeMetricFamily(
                f"{p}_reference_flag_rate",
                "Flag rate on the calibration holdout (flagged / accepted samples).",
                alarm.reference_rate,
            )
            yield GaugeMetricFamily(
                f"{p}_alarm_design_flag_rate",
                "The flag rate the alarm is designed at: the upper bound of the holdout's rate "
                "and the samples it has learned.",
                alarm.design_rate,
            )
            yield GaugeMetricFamily(
                f"{p}_alarm_learned_samples",
                "Accepted samples the alarm has added to its reference (each after enough "
                "later samples without an alarm).",
                alarm.learned,
            )
