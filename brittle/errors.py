"""Exceptions raised by brittle."""

from __future__ import annotations

from typing import Literal

__all__ = ["NotFittedError", "CalibrationError", "Blame"]

Blame = Literal["eps", "n_samples"]


class NotFittedError(RuntimeError):
    """Raised when something needs a fitted monitor and ``fit()`` has not run.

    Examples:
        >>> import torch, brittle
        >>> monitor = brittle.wrap(torch.nn.Linear(4, 3))
        >>> try:
        ...     monitor.report
        ... except brittle.NotFittedError as err:
        ...     print("fit" in str(err))
        True
    """


class CalibrationError(ValueError):
    """Raised when ``fit()`` cannot calibrate with this holdout and these settings.

    A ``ValueError``, so code that catches bad arguments catches it too. ``blame``
    names the argument of ``fit`` whose change the message recommends, so that a
    caller (the command line) can point at its own option without reading the text.

    Args:
        message: What went wrong and what to change.
        blame: ``"eps"`` or ``"n_samples"``.

    Examples:
        >>> from brittle.errors import CalibrationError
        >>> err = CalibrationError("no sample is non-robust at eps=0.01", blame="eps")
        >>> isinstance(err, ValueError), err.blame
        (True, 'eps')
    """

    def __init__(self, message: str, *, blame: Blame) -> None:
        super().__init__(message)
        self.blame: Blame = blame
