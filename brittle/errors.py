"""Exceptions raised by brittle."""

__all__ = ["NotFittedError"]


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
