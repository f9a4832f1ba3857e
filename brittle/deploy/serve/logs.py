"""What the server's log keeps of warnings a client can repeat at will.

uvicorn logs two warnings for every request that asks to upgrade to a
WebSocket, a protocol this server does not speak (the request itself is
answered as plain HTTP): one client repeating such requests fills the log, two
lines each. ``LoggedOnce`` lets each of them through once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

__all__ = ["UPGRADE_WARNINGS", "LoggedOnce"]

# The beginnings of uvicorn's two warnings about an upgrade request (as uvicorn 0.55 words them).
UPGRADE_WARNINGS = ("Unsupported upgrade request.", "No supported WebSocket library detected.")


class LoggedOnce(logging.Filter):
    """A logging filter that passes the first record starting with each prefix, and drops the rest.

    The record let through says that its repeats are not logged.

    Examples:
        >>> import logging
        >>> once = LoggedOnce(["Unsupported upgrade request."])
        >>> def record() -> logging.LogRecord:
        ...     text = "Unsupported upgrade request."
        ...     return logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, text, (), None)
        >>> first = record()
        >>> once.filter(first), first.getMessage()
        (True, 'Unsupported upgrade request. (logged once: its repeats are not)')
        >>> once.filter(record())
        False
    """

    def __init__(self, prefixes: Iterable[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is logged."""
        message = record.getMessage()
        for prefix in self.prefixes:
            if message.startswith(prefix):
                if prefix in self.seen:
                    return False
                self.seen.add(prefix)
                record.msg, record.args = f"{message} (logged once: its repeats are not)", ()
        return True
