"""Per-sample margin scores computed from logits and the last linear layer.

Every function here is pure: tensors in, tensors out, no module state. The
``Monitor`` calls the same functions in its forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from brittle.scores.norms import Norm, dual_order

__all__ = [
    "logit_margin",
    "feature_margin",
    "pair_norm_table",
    "pair_norm_rows",
    "has_distinct_rows",
]


def _exportable_range(dtype: torch.dtype) -> tuple[float, float]:
    """``dtype``'s smallest normal and largest numbers, within float32's.

    ``feature_margin`` divides by pair norms of at least the first and compares
    gaps with norms times the second. The ONNX exporter holds a Python scalar as a
    float32 constant: float64's smallest normal (2.2e-308) became 0 there, so a
    tie of identical weight rows gave 0/0 = NaN, which onnxruntime's ``ReduceMin``
    skips (the margin to another class instead of 0); and float64's largest
    (1.8e308) became inf, and ``0 * inf`` = NaN skipped the step that makes a
    class of an identical row unreachable.

    Examples:
        >>> f32 = torch.finfo(torch.float32)
        >>> _exportable_range(torch.float64) == (f32.tiny, f32.max)
        True
        >>> f16 = torch.finfo(torch.float16)
        >>> _exportable_range(torch.float16) == (f16.tiny, f16.max)
        True
    """
    own, f32 = torch.finfo(dtype), torch.finfo(torch.float32)
    return max(own.tiny, f32.tiny), min(own.max, f32.max)


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, classes). Got {tuple(logits.shape)}.")
    if logits.shape[1] < 2:
        raise ValueError(f"a margin needs at least 2 classes. Got {logits.shape[1]}.")


def logit_margin(logits: Tensor) -> Tensor:
    """Top-1 logit minus top-2 logit, per sample.

    Args:
        logits: ``(B, K)`` logits with ``K >= 2``.

    Returns:
        ``(B,)`` non-negative margins; 0 means a tie between the two top classes.

    Examples:
        >>> import torch
        >>> from brittle.functional import logit_margin
        >>> logit_margin(torch.tensor([[2.0, 5.0, 1.0], [0.0, 0.0, 3.0]]))
        tensor([3., 3.])
    """
    _check_logits(logits)
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def pair_norm_table(weight: Tensor, norm: Norm = "Linf") -> Tensor:
    """``(K, K)`` table of ``||w_i - w_j||_q`` for the rows of a linear head.

    ``q`` is the dual exponent of ``norm``. The table is computed in float64
    without the matrix-product shortcut for L2, then cast back, so entries are
    exact to the weight's precision.

    Args:
        weight: ``(K, d)`` weight of the last linear layer.
        norm: Threat-model norm of the input margin.

    Examples:
        >>> import torch
        >>> from brittle.functional import pair_norm_table
        >>> pair_norm_table(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), norm="L2")
        tensor([[0., 5.],
                [5., 0.]])
    """
    w = weight.detach().to(torch.float64)
    table = torch.cdist(w, w, p=dual_order(norm), compute_mode="donot_use_mm_for_euclid_dist")
    return table.to(weight.dtype)


def has_distinct_rows(pair_norms: Tensor) -> bool:
    """Whether a ``pair_norm_table`` has no zero off its diagonal: no two rows are equal.

    Examples:
        >>> import torch
        >>> from brittle.scores.margins import has_distinct_rows, pair_norm_table
        >>> has_distinct_rows(pair_norm_table(torch.tensor([[0.0, 1.0], [1.0, 0.0]])))
        True
        >>> has_distinct_rows(pair_norm_table(torch.tensor([[1.0, 1.0], [1.0, 1.0]])))
        False
    """
    return int((pair_norms == 0).sum()) == min(pair_norms.shape)


def pair_norm_rows(weight: Tensor, classes: Tensor, norm: Norm = "Linf") -> Tensor:
    """Rows ``classes`` of ``pair_norm_table``, without building the whole table.

    For heads with so many classes that a ``(K, K)`` table does not fit in memory.
    A half-precision weight is measured in float32 (``torch.cdist`` has no float16
    or bfloat16 kernel) and the rows are cast back, as the table is.

    Examples:
        >>> import torch
        >>> from brittle.functional import pair_norm_rows
        >>> w = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.bfloat16)
        >>> pair_norm_rows(w, torch.tensor([1]), norm="L2")
        tensor([[5., 0.]], dtype=torch.bfloat16)
    """
    w = weight.detach()
    wide = w.float() if w.element_size() < 4 else w
    rows = torch.cdist(
        wide.index_select(0, classes),
        wide,
        p=dual_order(norm),
        compute_mode="donot_use_mm_for_euclid_dist",
    )
    return rows.to(weight.dtype)


def feature_margin(
    logits: Tensor,
    weight: Tensor,
    norm: Norm = "Linf",
    pair_norms: Tensor | None = None,
    *,
    distinct_rows: bool = False,
) -> Tensor:
    """Exact distance in feature space to the nearest decision boundary of a linear head.

    For features ``h``, logits ``z = W h + b`` and the predicted class ``c``::

        min_{j != c} (z_c - z_j) / ||w_c - w_j||_q

    with ``q`` the dual exponent of ``norm``. The bias is already inside ``z``.

    Args:
        logits: ``(B, K)`` outputs of the linear head.
        weight: ``(K, d)`` weight of the linear head.
        norm: Threat-model norm; its dual measures the weight differences.
        pair_norms: Optional precomputed ``pair_norm_table`` of ``weight``.
            With it, the cost is one gather instead of a ``(B, K, d)`` reduction.
        distinct_rows: Whether no two rows of ``weight`` are equal, as a caller
            that built the table knows (``Monitor`` does). ``True`` skips the step
            that makes a class whose row equals the predicted one's unreachable
            (``inf``): three elementwise operations per call.

    Returns:
        ``(B,)`` non-negative margins (``inf`` when no other class can be reached).

    Examples:
        >>> import torch
        >>> from brittle.functional import feature_margin
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> feature_margin(torch.tensor([[3.0, 1.0]]), w, norm="L2")  # (3 - 1) / sqrt(2)
        tensor([1.4142])
    """
    _check_logits(logits)
    if weight.dim() != 2 or weight.shape[0] != logits.shape[1]:
        raise ValueError(
            f"weight must have shape ({logits.shape[1]}, features) to match the logits. "
            f"Got {tuple(weight.shape)}."
        )
    pred = logits.argmax(dim=1)
    gaps = logits.gather(1, pred[:, None]) - logits
    if pair_norms is None:
        denom = pair_norm_rows(weight, pred, norm)
    else:
        denom = pair_norms.index_select(0, pred)
    # Identical weight rows give 0/0 for a tie and gap/0 otherwise. The clamp keeps
    # the division (and its gradient) finite: a tie gives 0, and any other gap, which
    # no move of the features can close, is set to inf (gap/tiny is only 16384 times
    # the gap in float16): gap > denom * max holds for those, and otherwise only where
    # the ratio is beyond float32's range. A NaN logit still gives NaN.
    smallest, largest = _exportable_range(denom.dtype)
    ratio = gaps / denom.clamp_min(smallest)
    if not distinct_rows:
        ratio = ratio.masked_fill(gaps > denom * largest, math.inf)
    ratio = ratio.scatter(1, pred[:, None], math.inf)
    return ratio.amin(dim=1)
