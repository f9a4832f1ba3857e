"""Why a sample was rejected (margin NaN, flag True): read from the input itself.

The monitor rejects a sample that holds NaN or Inf, or whose values leave the
input domain it was fitted on, and says only *that* it did (margin NaN). An
operator also wants to know *why*: a client sending NaN is a bug, traffic outside
the domain is drift. This module tells the reasons apart from the inputs, with
numpy only (the serving path imports no torch), and only for the rejected rows,
so that a batch with nothing rejected costs nothing.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import numpy as np

__all__ = ["Reason", "REASONS", "reject_reasons", "count_reasons"]

Reason = Literal["nan", "inf", "out_of_domain", "other"]
# "other": rejected although the input is finite and inside the domain (the model's
# own logits were not finite), or the input was not available to look at.
REASONS: tuple[Reason, ...] = get_args(Reason)


def reject_reasons(rows: Any, domain: tuple[float, float] | None = None) -> list[Reason]:
    """The reason each of ``rows`` was rejected: NaN first, then Inf, then the domain.

    Args:
        rows: ``(R, ...)`` inputs of the rejected samples (a numpy array or nested lists).
        domain: The accepted ``(low, high)`` input values, ``None`` when unknown.

    Examples:
        >>> import numpy as np
        >>> x = np.array([[np.nan, np.inf], [0.0, -np.inf], [0.0, 1e30], [0.0, 0.5]])
        >>> reject_reasons(x, domain=(0.0, 1.0))
        ['nan', 'inf', 'out_of_domain', 'other']
    """
    flat = np.asarray(rows, dtype=np.float64)
    flat = flat.reshape(flat.shape[0], -1)
    has_nan = np.asarray(np.isnan(flat).any(axis=1), dtype=bool)
    has_inf = np.asarray(np.isinf(flat).any(axis=1), dtype=bool)
    outside = np.zeros_like(has_nan)
    if domain is not None and all(math.isfinite(b) for b in domain):
        with np.errstate(invalid="ignore"):  # NaN rows are named by has_nan already
            outside = np.asarray(np.any((flat < domain[0]) | (flat > domain[1]), axis=1))
    reasons: list[Reason] = []
    for nan, inf, out in zip(has_nan.tolist(), has_inf.tolist(), outside.tolist(), strict=True):
        reasons.append("nan" if nan else "inf" if inf else "out_of_domain" if out else "other")
    return reasons


def count_reasons(reasons: list[Reason]) -> dict[Reason, int]:
    """``{reason: count}`` with every reason present, zeros included.

    Examples:
        >>> count_reasons(["nan", "nan", "other"])
        {'nan': 2, 'inf': 0, 'out_of_domain': 0, 'other': 1}
    """
    counts = dict.fromkeys(REASONS, 0)
    for reason in reasons:
        counts[reason] += 1
    return counts
