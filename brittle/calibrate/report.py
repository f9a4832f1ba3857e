"""The consistency report that ``Monitor.fit`` produces."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brittle.calibrate.jsonfloat import dump_float, dump_floats, load_float, load_floats
from brittle.calibrate.metrics import ScoreMetrics

__all__ = ["ConsistencyReport", "percent", "report_margins"]

# How to_dict writes an infinity; reports written before it wrote them as null.
_INFINITE_AS = "Infinity"


def report_margins(data: dict[str, Any]) -> np.ndarray:
    """The input margins of a ``ConsistencyReport.to_dict`` dictionary (a ``report.json``).

    ``null`` is NaN; in a report written before infinities were ``"Infinity"``, it
    is a censored margin, ``inf``.

    Examples:
        >>> report_margins({"input_margins": [0.1, "Infinity", None], "infinite_as": "Infinity"})
        array([0.1, inf, nan])
        >>> report_margins({"input_margins": [0.1, None]})  # an older report
        array([0.1, inf])
    """
    null = math.nan if data.get("infinite_as") == _INFINITE_AS else math.inf
    return load_floats(data["input_margins"], null=null)


def _interval(values: list[float | str | None] | None) -> tuple[float, float]:
    if values is None:  # a report saved before the intervals
        return (math.nan, math.nan)
    low, high = (load_float(v) for v in values)
    return (low, high)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def percent(value: float) -> str:
    """A rate as a percentage with the digits it has, for a target TPR: 0.975 is 97.5%.

    A guarantee is a bound: rounded to whole percent, a target TPR of 0.995 read
    ">= 100%".

    Examples:
        >>> from brittle.calibrate.report import percent
        >>> percent(0.95), percent(0.975), percent(0.995)
        ('95%', '97.5%', '99.5%')
    """
    return f"{100 * value:.6g}%"


def _fmt_ci(interval: tuple[float, float]) -> str:
    return f"[{_fmt(interval[0], '.1%')}, {_fmt(interval[1], '.1%')}]"


@dataclass
class ConsistencyReport:
    """What ``Monitor.fit`` measured on the holdout.

    Arrays cover every attacked holdout sample in loader order. The holdout is
    divided into disjoint parts: the *choice* samples (``choice`` mask; only with
    ``score="auto"`` and several candidate scores) on which the score was chosen,
    the samples the pseudo-margin network trained on (when it trained on the
    holdout), and the *calibration* samples (``calibration`` mask). The metrics,
    the threshold, and the achieved TPR and FPR all come from the calibration
    samples, which no choice and no training has seen: for the chosen score they
    are out-of-sample. The threshold's guarantee (split conformal): the expected
    TPR on new non-robust samples exchangeable with the calibration ones is at
    least ``target_tpr``. The achieved TPR on the calibration samples is at least
    the target by construction; ``tpr_ci`` says how far the TPR of this
    threshold can lie from it.

    Attributes:
        n: Number of attacked holdout samples.
        eps: Budget defining a non-robust decision (input margin ``<= eps``).
        norm: Threat model of the input margins.
        accuracy: Clean accuracy on the holdout, ``None`` without labels.
        nonrobust_fraction: Share of samples with input margin ``<= eps``.
        censored: Samples where the attack found no adversarial (margin ``inf``).
        input_margins: ``(n,)`` FAB input margins, ``inf`` where censored.
        score_values: Score name -> ``(n,)`` values in the same order.
        metrics: Score name -> ``ScoreMetrics`` on the calibration samples.
        chosen: The score the monitor uses.
        reason: Why that score was chosen.
        threshold: Flag threshold on the chosen score.
        target_tpr: Target true-positive rate of the threshold.
        tpr: Achieved true-positive rate on the calibration samples.
        fpr: Achieved false-positive rate on the calibration samples.
        tpr_ci: Two-sided 95 % Clopper-Pearson interval of the TPR.
        fpr_ci: Two-sided 95 % Clopper-Pearson interval of the FPR.
        timings: Seconds spent per phase.
        predictions: ``(n,)`` predicted classes.
        labels: ``(n,)`` labels, ``None`` when the loader had none.
        calibration: ``(n,)`` booleans, True for calibration samples.
        choice: ``(n,)`` booleans, True for the samples the score was chosen on
            (all False when the score was fixed or had no rival).
        excluded: Holdout samples skipped because they contain NaN or Inf (and, in
            ``evaluate``, samples outside the monitor's fitted input domain).
        settings: Attack and fit settings (engine, steps, restarts, seed, ...).
    """

    n: int
    eps: float
    norm: str
    accuracy: float | None
    nonrobust_fraction: float
    censored: int
    input_margins: np.ndarray
    score_values: dict[str, np.ndarray]
    metrics: dict[str, ScoreMetrics]
    chosen: str
    reason: str
    threshold: float
    target_tpr: float
    tpr: float
    fpr: float
    timings: dict[str, float]
    predictions: np.ndarray
    labels: np.ndarray | None
    calibration: np.ndarray
    excluded: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    tpr_ci: tuple[float, float] = (math.nan, math.nan)
    fpr_ci: tuple[float, float] = (math.nan, math.nan)
    choice: np.ndarray | None = None

    @property
    def n_calibration(self) -> int:
        """Samples the threshold and every reported figure come from."""
        return int(self.calibration.sum())

    @property
    def n_choice(self) -> int:
        """Samples the score was chosen on (0 when it was fixed)."""
        return 0 if self.choice is None else int(self.choice.sum())

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON dictionary: NaN is ``None``, ±inf ``"Infinity"``/``"-Infinity"``.

        ``from_dict`` reads it back exactly (``brittle.calibrate.jsonfloat``).
        """
        return {
            "n": self.n,
            "eps": self.eps,
            "norm": self.norm,
            "accuracy": self.accuracy,
            "nonrobust_fraction": dump_float(self.nonrobust_fraction),
            "censored": self.censored,
            "infinite_as": _INFINITE_AS,
            "input_margins": dump_floats(self.input_margins),
            "score_values": {k: dump_floats(v) for k, v in self.score_values.items()},
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "chosen": self.chosen,
            "reason": self.reason,
            "threshold": dump_float(self.threshold),
            "target_tpr": self.target_tpr,
            "tpr": dump_float(self.tpr),
            "fpr": dump_float(self.fpr),
            "tpr_ci": dump_floats(self.tpr_ci),
            "fpr_ci": dump_floats(self.fpr_ci),
            "n_calibration": self.n_calibration,
            "n_choice": self.n_choice,
            "timings": dict(self.timings),
            "predictions": [int(p) for p in self.predictions],
            "labels": None if self.labels is None else [int(v) for v in self.labels],
            "calibration": [bool(c) for c in self.calibration],
            "choice": None if self.choice is None else [bool(c) for c in self.choice],
            "excluded": self.excluded,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConsistencyReport:
        """Inverse of ``to_dict``; a report saved before the intervals loads with a warning.

        A report written before infinities were ``"Infinity"`` wrote a censored
        margin as ``null``: there ``null`` is read as ``inf``, elsewhere as NaN.
        """
        labels = data["labels"]
        if "tpr_ci" not in data:
            warnings.warn(
                "this report was saved before brittle reported exact TPR/FPR intervals and "
                "the choice samples; they are missing (NaN). Fit again to get them.",
                stacklevel=2,
            )
        choice = data.get("choice")
        return cls(
            n=data["n"],
            eps=data["eps"],
            norm=data["norm"],
            accuracy=data["accuracy"],
            nonrobust_fraction=load_float(data["nonrobust_fraction"]),
            censored=data["censored"],
            input_margins=report_margins(data),
            score_values={k: load_floats(v) for k, v in data["score_values"].items()},
            metrics={k: ScoreMetrics.from_dict(m) for k, m in data["metrics"].items()},
            chosen=data["chosen"],
            reason=data["reason"],
            threshold=load_float(data["threshold"]),
            target_tpr=data["target_tpr"],
            tpr=load_float(data["tpr"]),
            fpr=load_float(data["fpr"]),
            timings=dict(data["timings"]),
            predictions=np.asarray(data["predictions"], dtype=np.int64),
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            calibration=np.asarray(data["calibration"], dtype=bool),
            excluded=data.get("excluded", 0),
            settings=dict(data.get("settings", {})),
            tpr_ci=_interval(data.get("tpr_ci")),
            fpr_ci=_interval(data.get("fpr_ci")),
            choice=None if choice is None else np.asarray(choice, dtype=bool),
        )

    def to_json(self, path: str | Path) -> Path:
        """Write ``to_dict`` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return path

    def __str__(self) -> str:
        acc = "-" if self.accuracy is None else f"{self.accuracy:.1%}"
        # Monitor.evaluate measures a threshold chosen elsewhere (by a fit, or by hand):
        # these samples calibrated nothing, and the fit's guarantee is what they test.
        evaluated = bool(self.settings.get("evaluated"))
        where = "evaluated" if evaluated else "calibration"
        split = f"{where} samples {self.n_calibration}"
        if self.n_choice:
            split += f", choice samples {self.n_choice}"
        lines = [
            f"brittle consistency report: n={self.n}, norm={self.norm}, eps={self.eps:.4g}",
            f"accuracy {acc}, non-robust {self.nonrobust_fraction:.1%}, "
            f"censored {self.censored}, {split}",
            "",
            f"{'score':<10}{'tau':>7}  {'95% CI':<15}{'AUROC':>7}{'AUPR':>7}"
            f"{'FPR@' + percent(self.target_tpr):>9}",
        ]
        for name, m in self.metrics.items():
            ci = f"[{_fmt(m.tau_ci[0])}, {_fmt(m.tau_ci[1])}]"
            mark = " *" if name == self.chosen else ""
            lines.append(
                f"{name:<10}{_fmt(m.tau):>7}  {ci:<15}{_fmt(m.auroc):>7}{_fmt(m.aupr):>7}"
                f"{_fmt(m.fpr_at_tpr):>9}{mark}"
            )
        lines += [
            "",
            f"chosen: {self.chosen} ({self.reason})",
            f"threshold {self.threshold:.4g} on the {self.n_calibration} {where} samples: "
            f"TPR {self.tpr:.1%} {_fmt_ci(self.tpr_ci)}, FPR {self.fpr:.1%} "
            f"{_fmt_ci(self.fpr_ci)} (exact 95% intervals)",
        ]
        if not evaluated:
            target = percent(self.target_tpr)
            lines.append(f"guarantee: expected TPR on new exchangeable samples >= {target}")
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)
