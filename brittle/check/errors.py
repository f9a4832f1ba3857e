"""The one error the command line turns into exit status 2."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A bad command-line argument: printed on one line, exit status 2, no traceback.

    Args:
        option: The argument at fault, as typed on the command line (``"--data"``).
        message: What is wrong with it and, where possible, how to fix it.

    Examples:
        >>> from brittle.check.errors import UsageError
        >>> str(UsageError("--data", "no such file: 'x.npz'"))
        "--data: no such file: 'x.npz'"

    """

    def __init__(self, option: str, message: str) -> None:
        # Keep the message on one line: it is the only thing the user sees.
        self.option = option
        self.message = " ".join(str(message).split())
        super().__init__(f"{option}: {self.message}")
