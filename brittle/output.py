"""What a monitor returns: ``MonitorOutput`` per call, ``MonitorPass`` from ``inspect``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # this module stays free of torch: OnnxMonitor returns MonitorOutput too
    from torch import Tensor

__all__ = ["MonitorOutput", "MonitorPass", "flagged", "rejected", "as_array"]


def rejected(margin: Any) -> Any:
    """Which samples could not be judged: the monitor marks them with a NaN margin.

    NaN or Inf in the input, values outside the fitted input domain, or logits
    that are not finite all end as a NaN margin. ``+inf`` is a margin, not a
    reject (no boundary to cross). Works on arrays, tensors and floats alike.

    Examples:
        >>> import numpy as np
        >>> rejected(np.array([0.5, np.nan, np.inf]))
        array([False,  True, False])
    """
    return margin != margin


def flagged(margin: Any, threshold: Any) -> Any:
    """The monitor's flag: a brittle decision (``margin <= threshold``) or a reject, fail-closed.

    The one definition that ``Monitor.forward``, ``fit``'s rates and alarm
    reference, ``evaluate`` and the analyses share. Works on arrays, tensors and
    floats alike. Written as "not above the threshold", which NaN never is: in an
    exported graph that is two nodes, where ``(m <= t) | (m != m)`` takes four.

    Examples:
        >>> import numpy as np
        >>> flagged(np.array([0.1, 0.5, np.nan, np.inf]), 0.2)
        array([ True, False,  True, False])
        >>> flagged(float("nan"), 0.2), flagged(0.5, 0.2)
        (True, False)
    """
    return (margin > threshold) ^ True


def as_array(values: Any) -> np.ndarray:
    """``values`` as a numpy array; a torch tensor from any device, with or without gradients.

    A tensor is detached and copied to the CPU first, and a bfloat16 one, a type
    numpy lacks, is widened to float32 (exactly). Arrays, lists and numbers go to
    ``np.asarray`` as they are. Needs no torch import: a tensor is known by its
    ``detach``.

    Examples:
        >>> import torch
        >>> as_array(torch.tensor([0.5, 1.0], requires_grad=True))
        array([0.5, 1. ], dtype=float32)
        >>> as_array(torch.tensor([0.5], dtype=torch.bfloat16)).dtype
        dtype('float32')
    """
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        try:
            values = values.numpy()
        except TypeError:  # bfloat16, which numpy lacks
            values = values.float().numpy()
    return np.asarray(values)


class MonitorOutput(NamedTuple):
    """What ``Monitor`` (tensors) and ``OnnxMonitor`` (arrays) return.

    Attributes:
        logits: ``(B, K)`` model outputs, NaN rows for inputs that could not be judged.
        pred: ``(B,)`` predicted classes, ``-1`` for inputs that could not be judged.
        margin: ``(B,)`` margin score of the active score kind; lower is more brittle.
            NaN for inputs that contain NaN or Inf.
        flag: ``(B,)`` booleans, True for brittle (non-robust) decisions and for every
            input that could not be judged; ``None`` while the monitor has no threshold.
    """

    logits: Any
    pred: Any
    margin: Any
    flag: Any | None


@dataclass(frozen=True)
class MonitorPass:
    """Everything one forward pass of a monitor yields for a batch.

    Returned by ``Monitor.inspect``: the one call that fit, export, the analyses
    and the command line share, so that each of them sees the numbers that
    ``forward`` serves.

    Attributes:
        logits: ``(B, K)`` the model's logits (NaN rows where ``bad``).
        features: ``(B, d)`` the head's input when asked for and available, else ``None``.
        scores: Each available score kind's ``(B,)`` values (NaN where ``bad``).
        bad: ``(B,)`` True for samples that could not be judged (NaN or Inf in the
            input or the logits, or values outside the monitor's fitted input domain).
        flag: ``(B,)`` the flag ``forward`` serves, ``None`` without a threshold.
    """

    logits: Tensor
    features: Tensor | None
    scores: dict[str, Tensor]
    bad: Tensor
    flag: Tensor | None
