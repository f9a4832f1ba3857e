"""The named tuple a monitor returns."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["MonitorOutput"]


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
