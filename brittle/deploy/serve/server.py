"""``Server``: uvicorn's server, with SIGTERM as a normal shutdown."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

__all__ = ["Server"]


class Server(uvicorn.Server):
    """uvicorn's server, except that SIGTERM ends it with exit status 0.

    uvicorn shuts down gracefully on SIGTERM and then raises the signal again, so
    the process ends with status 143; orchestrators stop servers with SIGTERM and
    read anything but 0 as a failure. The graceful shutdown is unchanged.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Shut down; SIGTERM is not raised again afterwards."""
        if sig == signal.SIGTERM:
            self.should_exit = True
            return
        super().handle_exit(sig, frame)
