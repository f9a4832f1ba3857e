"""Bounded connections for uvicorn: a deadline to receive each request, a cap on open ones.

uvicorn times a connection out only while it is idle *between* two requests
(``timeout_keep_alive``, armed when a response completes, cancelled by the next
byte). A client that connects and sends nothing, or sends a request's head or
body a byte at a time, holds its connection for ever, and its file descriptor
with it. Measured on ``python -m brittle.serve`` before this module, with a limit
of 128 descriptors: 200 idle connections made ``/healthz`` time out for as long
as they stayed open, asyncio logged 50,000 lines of "Too many open files" in 25
s, and SIGTERM did not end the server.

``bounded_protocol`` wraps uvicorn's HTTP protocol class (httptools' or h11's,
whichever uvicorn picked) so that:

- a request must arrive whole, head and body, within ``request_timeout``
  seconds of the connection opening or of the previous response; otherwise the
  connection is closed, as nginx does on its header and body timeouts. The
  clock stops once the request has arrived: judging it and answering take what
  they take;
- a connection beyond ``max_connections`` open ones is closed as soon as it is
  accepted, so the process keeps descriptors for the connections it serves;
- on shutdown (SIGTERM) a request still being received is dropped at once
  instead of being waited for.

Each closed connection is counted by reason (``"request_timeout"``,
``"too_many_connections"``) into the app's ``brittle_connections_closed_total``.
No response is written: the request was not read, and closing a socket with
unread data resets it, which would destroy the response anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = [
    "bounded_protocol",
    "default_max_connections",
    "REQUEST_TIMEOUT",
    "MAX_CONNECTIONS",
    "ACCEPT_BACKLOG",
]

# Seconds a client has to send one whole request: nginx's client_header_timeout and
# client_body_timeout default to 60 s each, Kubernetes' grace period to 30 s.
REQUEST_TIMEOUT = 30.0
# Most open connections by default (fewer when the descriptor limit is lower).
MAX_CONNECTIONS = 1000
# The listening socket's backlog (uvicorn's default is 2048). asyncio accepts up to
# this many connections in one turn of the event loop, before any of them reaches
# the protocol that would close it; and when an accept fails for want of
# descriptors, CPython 3.11's accept loop goes on trying the rest of the backlog,
# logging each failure and scheduling a retry for each (50,000 lines in 25 s
# above). So the cap leaves room for two turns' worth of accepts.
ACCEPT_BACKLOG = 128
# Descriptors kept for everything else a server holds open (its listening socket,
# the model file, onnxruntime's and Python's own files: 9 measured at start-up).
_RESERVED_DESCRIPTORS = 64


def default_max_connections() -> int:
    """``MAX_CONNECTIONS``, or fewer when the process's descriptor limit is low.

    The limit less 64 reserved descriptors and two backlogs of accepts in flight
    (``ACCEPT_BACKLOG``): 704 under Linux's usual soft limit of 1024.

    Examples:
        >>> from brittle.deploy.serve.connections import default_max_connections
        >>> 1 <= default_max_connections() <= 1000
        True
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return MAX_CONNECTIONS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - _RESERVED_DESCRIPTORS - 2 * ACCEPT_BACKLOG))


def bounded_protocol(
    base: type[Any],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    on_close: Callable[[str], None] | None = None,
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's protocol ``base`` with a request deadline and a connection cap.

    Args:
        base: uvicorn's protocol class, e.g.
            ``uvicorn.protocols.http.auto.AutoHTTPProtocol``.
        request_timeout: Seconds within which a whole request must arrive.
        max_connections: Most connections open at once; more are closed on accept.
        on_close: Called with the reason of every connection closed here.

    Returns:
        A subclass of ``base``, to pass as ``uvicorn.Config(app, http=...)``.

    Raises:
        ValueError: for a non-positive or non-finite ``request_timeout`` or
            ``max_connections``.

    Examples:
        >>> import uvicorn
        >>> from uvicorn.protocols.http.auto import AutoHTTPProtocol
        >>> from brittle.deploy.serve.connections import bounded_protocol
        >>> protocol = bounded_protocol(AutoHTTPProtocol, request_timeout=10, max_connections=100)
        >>> config = uvicorn.Config("app:app", http=protocol)
        >>> issubclass(protocol, AutoHTTPProtocol)
        True
    """
    if not (isinstance(request_timeout, (int, float)) and 0 < request_timeout < float("inf")):
        raise ValueError(
            f"request_timeout must be a positive number of seconds. Got {request_timeout!r}."
        )
    if (
        isinstance(max_connections, bool)
        or not isinstance(max_connections, int)
        or max_connections < 1
    ):
        raise ValueError(f"max_connections must be a positive integer. Got {max_connections!r}.")

    def closed(reason: str) -> None:
        if on_close is not None:
            on_close(reason)

    class BoundedProtocol(base):
        """``base`` with a deadline to receive each request and a cap on connections."""

        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                closed("too_many_connections")
                transport.close()
                return
            self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm()  # the next request's clock starts now

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            if self.receiving():
                self.disarm()
                self.transport.close()
                return
            super().shutdown()

        def receiving(self) -> bool:
            """Whether a request is expected or still arriving (nothing is being answered)."""
            cycle = self.cycle
            return cycle is None or cycle.response_complete or cycle.more_body

        def arm(self) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(request_timeout, self.expire)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def expire(self) -> None:
            self.deadline = None
            if self.transport.is_closing() or not self.receiving():
                return
            closed("request_timeout")
            self.transport.close()

    BoundedProtocol.__name__ = BoundedProtocol.__qualname__ = f"Bounded{base.__name__}"
    return BoundedProtocol
