"""Fail-closed handling of non-finite inputs, at the cost of one read of the batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finite_rows", "zero_rows"]


def finite_rows(x: Tensor) -> Tensor:
    """``(B,)`` mask of the samples whose values are all finite.

    One pass of ``aminmax`` over the batch: NaN propagates to both extremes and
    an infinity shows in one of them, so no input-sized temporary is written.

    Examples:
        >>> import torch
        >>> from brittle.finite import finite_rows
        >>> finite_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [0.0, -float("inf")]]))
        tensor([ True, False, False])
    """
    low, high = torch.aminmax(x.reshape(x.shape[0], -1), dim=1)
    return torch.isfinite(low) & torch.isfinite(high)


def zero_rows(x: Tensor, ok: Tensor) -> Tensor:
    """``x`` with the samples where ``ok`` is False replaced by zeros.

    Non-finite samples are zeroed before the forward pass so that they cannot
    leak into other samples (batch statistics, attention over the batch). On
    the CPU a batch with nothing to zero is returned as it is, without a copy:
    reading the mask there costs no device synchronisation.
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and bool(ok.all()):
        return x
    return torch.where(ok.view(-1, *([1] * (x.dim() - 1))), x, 0.0)
