"""Split-conformal thresholds with a finite-sample true-positive-rate guarantee."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from brittle.errors import CalibrationError
from brittle.output import as_array, flagged

__all__ = ["conformal_threshold", "min_positives", "rates", "check_target_tpr"]


def _rank(n: int, target_tpr: float) -> int:
    # The small slack keeps (n + 1) * 0.95 == 19.000000000000004 from rounding up to 20.
    return math.ceil((n + 1) * target_tpr - 1e-9)


def min_positives(target_tpr: float) -> int:
    """Fewest non-robust calibration samples for which the guarantee can hold.

    Examples:
        >>> from brittle.functional import min_positives
        >>> min_positives(0.95), min_positives(0.9)
        (19, 9)
    """
    check_target_tpr(target_tpr)
    # The first n with _rank(n) <= n, by bisection: n * (1 - t) grows with n, so
    # the test turns true once and stays true (counting up from 1 took minutes
    # for a target near 1, as fit() does for its report).
    low, high = 0, 1  # _rank(low) > low, unless low is 0
    while _rank(high, target_tpr) > high:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if _rank(middle, target_tpr) > middle:
            low = middle
        else:
            high = middle
    return high


def check_target_tpr(target_tpr: float) -> None:
    """Raise ``ValueError`` unless ``target_tpr`` lies in ``(0, 1)``."""
    if not 0.0 < target_tpr < 1.0:
        raise ValueError(f"target_tpr must be in (0, 1). Got {target_tpr}.")


def conformal_threshold(positive_scores: ArrayLike, target_tpr: float) -> float:
    """Threshold ``t`` such that ``P(score <= t) >= target_tpr`` for a new non-robust sample.

    With ``n`` non-robust calibration scores, ``t`` is the ``ceil((n + 1) * target_tpr)``-th
    smallest. If a new non-robust sample is exchangeable with the calibration ones,
    its rank among the ``n + 1`` is uniform, which gives the guarantee in expectation
    over calibration sets (split conformal prediction).

    Args:
        positive_scores: Scores of the non-robust calibration samples.
        target_tpr: Target true-positive rate in ``(0, 1)``.

    Raises:
        ValueError: with fewer than ``min_positives`` scores, where no finite
            threshold can keep the guarantee.

    Examples:
        >>> from brittle.functional import conformal_threshold
        >>> conformal_threshold(range(1, 20), 0.95)  # the 19th smallest of 19
        19.0
    """
    check_target_tpr(target_tpr)
    scores = np.sort(np.asarray(as_array(positive_scores), dtype=np.float64).ravel())
    if np.isnan(scores).any():
        raise ValueError("positive_scores contain NaN.")
    n = scores.size
    k = _rank(n, target_tpr)
    if k > n:
        raise CalibrationError(
            f"a threshold at TPR {target_tpr} needs at least {min_positives(target_tpr)} "
            "non-robust "
            f"calibration samples. Got {n}: use more samples or a larger eps.",
            blame="eps",
        )
    return float(scores[k - 1])


def rates(score: ArrayLike, positive: ArrayLike, threshold: float) -> tuple[float, float]:
    """True- and false-positive rates of the flag ``score <= threshold``."""
    s = np.asarray(as_array(score), dtype=np.float64)
    y = np.asarray(as_array(positive), dtype=bool)
    flag = flagged(s, threshold)
    tpr = float(flag[y].mean()) if y.any() else math.nan
    fpr = float(flag[~y].mean()) if (~y).any() else math.nan
    return tpr, fpr
