"""What ``fit()`` hands to a ``Monitor``: one calibration, applied in one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

if TYPE_CHECKING:
    from brittle.calibrate.report import ConsistencyReport

__all__ = ["Calibration", "ScoreKind"]

ScoreKind = Literal["logit", "feature", "pseudo"]


@dataclass(frozen=True)
class Calibration:
    """The outcome of calibrating a monitor on a holdout.

    ``brittle.calibrate.fit.calibrate`` computes it without touching the monitor;
    ``Monitor.apply_calibration`` installs it. A fit that raises or is
    interrupted therefore leaves the monitor exactly as it was.

    Attributes:
        eps: Budget defining a non-robust decision.
        min_tau: Consistency bar the score choice used.
        chosen: Score kind the flag thresholds.
        threshold: Flag threshold on the chosen score.
        pseudo: The trained pseudo-margin network, or ``None``.
        report: The consistency report of the holdout.
        reference_flag_rate: Share of the calibration samples the monitor flags: the
            reference of the flag-rate alarm (``brittle.deploy.alarm``). ``None`` if unknown.
        reference_counts: ``(flagged, n)``: the flagged calibration samples and all
            those the monitor accepted (margin not NaN), whose ratio is
            ``reference_flag_rate``; the alarm bounds the rate from them. ``None`` if unknown.
        margin_buckets: Histogram bucket bounds from the calibration samples' scores
            (``brittle.deploy.telemetry.margin_buckets``). ``None`` if unknown.
        input_range: Smallest and largest input value of the holdout: the monitor
            rejects samples outside it (with a tolerance). ``None`` if unknown.
    """

    eps: float
    min_tau: float
    chosen: ScoreKind
    threshold: float
    pseudo: nn.Module | None
    report: ConsistencyReport
    reference_flag_rate: float | None = None
    reference_counts: tuple[int, int] | None = None
    margin_buckets: tuple[float, ...] | None = None
    input_range: tuple[float, float] | None = None
