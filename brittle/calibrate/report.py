"""The consistency report that ``Monitor.fit`` produces."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brittle.calibrate.metrics import ScoreMetrics

__all__ = ["ConsistencyReport"]


def _array_to_list(values: np.ndarray) -> list[float | None]:
    """JSON-safe list: ``inf`` (censored) and NaN become ``None``."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def _margins_from_list(values: list[float | None]) -> np.ndarray:
    return np.array([math.inf if v is None else v for v in values], dtype=np.float64)


def _scores_from_list(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


@dataclass
class ConsistencyReport:
    """What ``Monitor.fit`` measured on the holdout.

    Arrays cover every attacked holdout sample in loader order. Metrics and the
    threshold come from the calibration samples (``calibration`` mask), which are
    disjoint from the samples the pseudo-margin network trained on.

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
        timings: Seconds spent per phase.
        predictions: ``(n,)`` predicted classes.
        labels: ``(n,)`` labels, ``None`` when the loader had none.
        calibration: ``(n,)`` booleans, True for calibration samples.
        excluded: Holdout samples skipped because they contain NaN or Inf.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary; censored margins and NaN scores become ``None``."""
        return {
            "n": self.n,
            "eps": self.eps,
            "norm": self.norm,
            "accuracy": self.accuracy,
            "nonrobust_fraction": self.nonrobust_fraction,
            "censored": self.censored,
            "input_margins": _array_to_list(self.input_margins),
            "score_values": {k: _array_to_list(v) for k, v in self.score_values.items()},
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "chosen": self.chosen,
            "reason": self.reason,
            "threshold": self.threshold,
            "target_tpr": self.target_tpr,
            "tpr": self.tpr,
            "fpr": self.fpr,
            "timings": dict(self.timings),
            "predictions": [int(p) for p in self.predictions],
            "labels": None if self.labels is None else [int(v) for v in self.labels],
            "calibration": [bool(c) for c in self.calibration],
            "excluded": self.excluded,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConsistencyReport:
        """Inverse of ``to_dict``."""
        labels = data["labels"]
        return cls(
            n=data["n"],
            eps=data["eps"],
            norm=data["norm"],
            accuracy=data["accuracy"],
            nonrobust_fraction=data["nonrobust_fraction"],
            censored=data["censored"],
            input_margins=_margins_from_list(data["input_margins"]),
            score_values={k: _scores_from_list(v) for k, v in data["score_values"].items()},
            metrics={k: ScoreMetrics.from_dict(m) for k, m in data["metrics"].items()},
            chosen=data["chosen"],
            reason=data["reason"],
            threshold=data["threshold"],
            target_tpr=data["target_tpr"],
            tpr=data["tpr"],
            fpr=data["fpr"],
            timings=dict(data["timings"]),
            predictions=np.asarray(data["predictions"], dtype=np.int64),
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            calibration=np.asarray(data["calibration"], dtype=bool),
            excluded=data.get("excluded", 0),
            settings=dict(data.get("settings", {})),
        )

    def to_json(self, path: str | Path) -> Path:
        """Write ``to_dict`` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return path

    def __str__(self) -> str:
        acc = "-" if self.accuracy is None else f"{self.accuracy:.1%}"
        lines = [
            f"brittle consistency report: n={self.n}, norm={self.norm}, eps={self.eps:.4g}",
            f"accuracy {acc}, non-robust {self.nonrobust_fraction:.1%}, "
            f"censored {self.censored}, calibration samples {int(self.calibration.sum())}",
            "",
            f"{'score':<10}{'tau':>7}  {'95% CI':<15}{'AUROC':>7}{'AUPR':>7}"
            f"{'FPR@' + format(self.target_tpr, '.0%'):>9}",
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
            f"threshold {self.threshold:.4g}: TPR {self.tpr:.1%}, FPR {self.fpr:.1%} "
            f"(target TPR {self.target_tpr:.0%})",
            "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()),
        ]
        return "\n".join(lines)
