"""Consistency and detection metrics between a score and the input margin.

Thin, tested wrappers over scipy (Kendall tau, bootstrap) and scikit-learn
(ROC and precision-recall), with brittle's conventions: a *lower* score means
*more* brittle, and the positive class is "non-robust" (input margin <= eps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from sklearn import metrics as skm

from brittle.arguments import positive_int
from brittle.calibrate.jsonfloat import dump_float, dump_floats, load_float
from brittle.output import as_array, flagged

__all__ = [
    "ScoreMetrics",
    "kendall_tau",
    "kendall_tau_ci",
    "nonrobust",
    "detection_metrics",
    "fpr_at_tpr",
    "score_metrics",
    "clopper_pearson",
    "wilson_interval",
    "rate_intervals",
]


@dataclass(frozen=True)
class ScoreMetrics:
    """How well one score ranks input margins and detects non-robust samples.

    Attributes:
        tau: Kendall tau-b between score and input margin (1 = same ranking).
        tau_ci: Bootstrap 95 % interval of ``tau``.
        auroc: Area under the ROC curve for detecting non-robust samples.
        aupr: Average precision for the same task.
        fpr_at_tpr: False-positive rate at the target true-positive rate.
        n: Number of samples the figures come from.
    """

    tau: float
    tau_ci: tuple[float, float]
    auroc: float
    aupr: float
    fpr_at_tpr: float
    n: int

    def to_dict(self) -> dict[str, object]:
        """Strict-JSON dictionary (NaN as ``None``, ±inf as ``"Infinity"``/``"-Infinity"``)."""
        return {
            "tau": dump_float(self.tau),
            "tau_ci": dump_floats(self.tau_ci),
            "auroc": dump_float(self.auroc),
            "aupr": dump_float(self.aupr),
            "fpr_at_tpr": dump_float(self.fpr_at_tpr),
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreMetrics:
        """Inverse of ``to_dict``."""
        low, high = (load_float(v) for v in data["tau_ci"])
        return cls(
            tau=load_float(data["tau"]),
            tau_ci=(low, high),
            auroc=load_float(data["auroc"]),
            aupr=load_float(data["aupr"]),
            fpr_at_tpr=load_float(data["fpr_at_tpr"]),
            n=int(data["n"]),
        )


def _pair(score: ArrayLike, margin: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(as_array(score), dtype=np.float64).ravel()
    m = np.asarray(as_array(margin), dtype=np.float64).ravel()
    if s.shape != m.shape:
        raise ValueError(f"score and margin must have the same length. Got {s.size} and {m.size}.")
    return s, m


def kendall_tau(score: ArrayLike, margin: ArrayLike) -> float:
    """Kendall tau-b between a score and the input margin (scipy).

    Censored margins (``inf``) rank above every finite one and tie with each other.

    Examples:
        >>> from brittle.functional import kendall_tau
        >>> kendall_tau([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 4.0, float("inf")])
        1.0
    """
    s, m = _pair(score, margin)
    if s.size < 2:
        return math.nan
    return float(stats.kendalltau(s, m).statistic)


def kendall_tau_ci(
    score: ArrayLike,
    margin: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``kendall_tau`` over paired resamples.

    A resample in which the score or the margin is constant has no tau (scipy
    returns NaN); it is drawn again, so the interval is that of the bootstrap
    distribution given a defined tau rather than NaN. When fewer than half of
    ``n_resamples`` draws are defined the interval is ``(nan, nan)``; so it is when
    a score or a margin is NaN, whose tau is NaN too (resamples that miss the NaN
    would give an interval of another sample's tau).

    Examples:
        >>> from brittle.functional import kendall_tau_ci
        >>> low, high = kendall_tau_ci([1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 2], n_resamples=200)
        >>> -1.0 <= low <= high <= 1.0
        True
    """
    s, m = _pair(score, margin)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1). Got {confidence}.")
    n_resamples = positive_int("n_resamples", n_resamples)
    if s.size < 3 or np.unique(s).size < 2 or np.unique(m).size < 2:
        return (math.nan, math.nan)
    if np.isnan(s).any() or np.isnan(m).any():
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    taus: list[float] = []
    # Each round draws what is still missing; two draws per missing one bound the work
    # when most resamples are degenerate.
    for _ in range(2):
        missing = n_resamples - len(taus)
        for rows in rng.integers(0, s.size, size=(missing, s.size)):
            tau = stats.kendalltau(s[rows], m[rows]).statistic
            if math.isfinite(tau):
                taus.append(float(tau))
        if len(taus) == n_resamples:
            break
    if len(taus) < n_resamples / 2:
        return (math.nan, math.nan)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(taus), [alpha, 1.0 - alpha])
    return (float(low), float(high))


def _ranks(score: ArrayLike) -> np.ndarray:
    """Ranks of the scores, ties averaged: what ROC and precision-recall depend on.

    scikit-learn refuses infinite scores, yet ``inf`` is a margin (no boundary to
    reach, ``brittle.output.rejected``) and ranks above every finite one. A NaN
    score makes every rank NaN (scipy), which scikit-learn refuses.
    """
    return stats.rankdata(np.asarray(as_array(score), dtype=np.float64).ravel())


def nonrobust(margin: ArrayLike, eps: float) -> np.ndarray:
    """Boolean mask of non-robust samples: input margin ``<= eps``."""
    return np.asarray(as_array(margin), dtype=np.float64) <= eps


def fpr_at_tpr(score: ArrayLike, positive: ArrayLike, target_tpr: float) -> float:
    """Smallest false-positive rate at which the true-positive rate reaches ``target_tpr``.

    ``positive`` marks the non-robust samples; low scores are predicted positive
    (the flag ``score <= t``). Exact under tied scores; infinite scores rank at the ends.

    Examples:
        >>> from brittle.functional import fpr_at_tpr
        >>> fpr_at_tpr([0, -1, -1, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0, 1, 1], 0.5)
        0.6
    """
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"target_tpr must be in (0, 1]. Got {target_tpr}.")
    y = np.asarray(as_array(positive), dtype=bool)
    if y.all() or not y.any():
        return math.nan
    # Every distinct threshold is a point (drop_intermediate=False): with tied
    # scores the dropped points can be the first to reach the target TPR.
    fpr, tpr, _ = skm.roc_curve(y, -_ranks(score), drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, target_tpr, side="left")])


def detection_metrics(
    score: ArrayLike, margin: ArrayLike, eps: float, target_tpr: float = 0.95
) -> tuple[float, float, float]:
    """AUROC, AUPR (average precision) and FPR at ``target_tpr`` for non-robust detection.

    Examples:
        >>> from brittle.functional import detection_metrics
        >>> detection_metrics([0.1, 0.2, 0.8, 0.9], [0.01, 0.02, 0.5, 0.6], eps=0.1)
        (1.0, 1.0, 0.0)
    """
    s, m = _pair(score, margin)
    y = nonrobust(m, eps)
    if y.all() or not y.any():
        return (math.nan, math.nan, math.nan)
    ranks = _ranks(s)
    auroc = float(skm.roc_auc_score(y, -ranks))
    aupr = float(skm.average_precision_score(y, -ranks))
    return (auroc, aupr, fpr_at_tpr(s, y, target_tpr))


def score_metrics(
    score: ArrayLike,
    margin: ArrayLike,
    eps: float,
    target_tpr: float = 0.95,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> ScoreMetrics:
    """All figures of ``ScoreMetrics`` for one score."""
    s, m = _pair(score, margin)
    auroc, aupr, fpr = detection_metrics(s, m, eps, target_tpr)
    return ScoreMetrics(
        tau=kendall_tau(s, m),
        tau_ci=kendall_tau_ci(s, m, n_resamples=n_resamples, seed=seed),
        auroc=auroc,
        aupr=aupr,
        fpr_at_tpr=fpr,
        n=int(s.size),
    )


def _check_count(k: int, n: int, confidence: float) -> None:
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n. Got k={k}, n={n}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1). Got {confidence}.")


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided (Clopper-Pearson) interval of a rate: ``k`` successes in ``n`` trials.

    Beta quantiles (scipy); ``(nan, nan)`` when ``n == 0``.

    Examples:
        >>> from brittle.functional import clopper_pearson
        >>> [round(v, 4) for v in clopper_pearson(19, 19)]
        [0.8235, 1.0]
    """
    _check_count(k, n, confidence)
    if n == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return (low, high)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate: ``k`` successes in ``n`` trials.

    Examples:
        >>> from brittle.functional import wilson_interval
        >>> [round(v, 4) for v in wilson_interval(15, 50)]
        [0.191, 0.4375]
    """
    _check_count(k, n, confidence)
    if n == 0:
        return (math.nan, math.nan)
    z = float(stats.norm.ppf(1 - (1.0 - confidence) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_intervals(
    score: ArrayLike, positive: ArrayLike, threshold: float, confidence: float = 0.95
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Clopper-Pearson intervals of the TPR and FPR of the flag (``brittle.output.flagged``).

    Examples:
        >>> from brittle.calibrate.metrics import rate_intervals
        >>> tpr_ci, fpr_ci = rate_intervals([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0], 0.5)
        >>> round(tpr_ci[0], 3), fpr_ci[1] > 0.8
        (0.158, True)
    """
    flag = flagged(np.asarray(as_array(score), dtype=np.float64), threshold)
    y = np.asarray(as_array(positive), dtype=bool)
    return (
        clopper_pearson(int(flag[y].sum()), int(y.sum()), confidence),
        clopper_pearson(int(flag[~y].sum()), int((~y).sum()), confidence),
    )
