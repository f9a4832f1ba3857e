"""Fail-closed handling of non-finite inputs, at the cost of one read of the batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finite_rows", "zero_rows"]


def finite_rows(x: Tensor) -> Tensor:
    """``(B,)`` mask of the samples whose values are all finite.

    A sample is finite when the sum of its values is: NaN propagates through the
    sum, an infinity shows in it, and opposite infinities give NaN. One
    vectorised read of the batch and no input-sized temporary (``isfinite(x)``
    writes one and then reduces it, about 25 times slower on a CPU). A sample
    whose finite values are so large that their sum overflows (beyond about
    1e38 in float32) is treated as non-finite: it fails closed. Half-precision
    inputs are summed in float32, so that ordinary images cannot overflow.

    Examples:
        >>> import torch
        >>> from brittle.scores.finite import finite_rows
        >>> finite_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [0.0, -float("inf")]]))
        tensor([ True, False, False])
    """
    flat = x.reshape(x.shape[0], -1)
    wide = torch.float32 if flat.element_size() < 4 else None
    return torch.isfinite(flat.sum(dim=1, dtype=wide))


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
