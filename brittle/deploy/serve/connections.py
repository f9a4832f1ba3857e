"""Bounded connections for uvicorn: a deadline to receive each request, a cap on open ones.

uvicorn times a connection out only while it is idle *between* two requests
(``timeout_keep_alive``, armed when a response completes, cancelled by the next
byte). A client that connects and sends nothing, or sends a request's head or
body a byte at a time, holds its connection for ever, and its file descriptor
with it. Measured on ``python -m brittle.serve`` before this module: under a limit
of 128 descriptors, 200 idle connections made ``/healthz`` time out for as long
as they stayed open and asyncio logged 50,000 lines of "Too many open files" in
25 s; one request body left half-sent kept SIGTERM from ending the server.

``bounded_protocol`` wraps uvicorn's HTTP protocol class (httptools' or h11's,
whichever uvicorn picked) so that:

- a request must arrive whole, head and body, within ``request_timeout``
  seconds of the connection opening or of the previous response (checked every
  tenth of that time); otherwise the connection is closed, as nginx does on its
  header and body timeouts. The clock stops once the request has arrived:
  judging it and answering take what they take;
- an answer must leave: a connection whose unsent answer has not shrunk for
  ``request_timeout`` seconds is dropped, as nginx's ``send_timeout`` does. A
  client that pipelined requests and never read the answers held its connection
  for ever (closing a socket waits for its unsent bytes), and 20 such clients
  filled a cap of 20 so that no one else could connect;
- a request body may arrive in at most 1,024 pieces plus one per 256 bytes
  received (chunks of ``Transfer-Encoding: chunked``, or reads of the socket);
  beyond that the connection is closed. Parsing a piece costs the same whatever
  its size (6 us in h11, 0.35 us in httptools), so a body sent in 1-byte chunks
  made the server parse for 1 us per byte the client sent: 1 MB of body in
  1-byte chunks took 6.8 s of the event loop (h11), and ``/healthz`` waited
  3.6 s behind it. Common clients send chunks of 8 KiB (``http.client``) to 64
  KiB (httpx, curl), and a body of rows streamed one chunk per row passes too;
- a request's head or trailers of more than ``MAX_HEAD_BYTES`` get uvicorn's
  400 for an invalid request, with either parser. With httptools uvicorn kept
  every header, so one client sending headers without end grew the server by
  2.6 GB in 5 s (trailers without end: 2.3 GB in 3 s); h11 bounds only a head
  still arriving, and both served a 250 KB head that came in one read. Now the
  target and the fields parsed are counted (``name: value`` and its line end),
  and with httptools a request is also refused once the reads that brought it
  nothing but head or trailer bytes (no body, no end of its head or of the
  request) add up to more than ``MAX_HEAD_BYTES``: with the read in which the
  head began (at most 256 KiB), that bounds what one connection holds;
- a request whose body is framed both by ``Transfer-Encoding`` and by
  ``Content-Length`` gets uvicorn's 400, with either parser. httptools refused
  it; h11 read it by its chunks and kept the connection open, which RFC 9112
  (6.3) forbids: a proxy in front that read the length took the chunks for a
  request of its own, and the server answered that one too (request smuggling);
- with httptools, a client may pipeline at most ``MAX_PIPELINED`` requests
  behind the one being answered; one more gets uvicorn's 400 once those are
  answered, and the connection is closed. uvicorn parses every request of a
  read at once with httptools (2.5 KB each, queued) and read on after every
  answer, so 20 clients pipelining 1 MiB of small requests each and reading
  nothing grew the server by 760 MB in 6 s, and on. Now a connection is read on
  only once its queue is empty. h11 parses one request at a time and keeps the
  rest as bytes;
- a connection beyond ``max_connections`` open ones is closed as soon as it is
  accepted, so the process keeps descriptors for the connections it serves;
- on shutdown (SIGTERM) a request still being received is dropped at once
  instead of being waited for.

Each closed connection is counted by reason (``"request_timeout"``,
``"send_timeout"``, ``"fragmented_body"``, ``"too_many_pipelined"``,
``"too_many_connections"``) into the app's
``brittle_connections_closed_total``.
The deadlines, the pieces and the cap close without an answer: the request was
not read, and closing a socket with unread data resets it, which would destroy
an answer anyway. A head too large and a pipeline too deep get the 400 uvicorn
gives any request its parser refuses; with httptools, which parses every request
of a read at once, that 400 waits for the answers to the requests before it (h11
parses one request at a time), so that clients receive what the app counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

from brittle.arguments import positive_int

__all__ = [
    "bounded_protocol",
    "connection_limits",
    "ConnectionLimits",
    "REQUEST_TIMEOUT",
    "MAX_CONNECTIONS",
    "ACCEPT_BACKLOG",
    "FREE_PIECES",
    "MAX_HEAD_BYTES",
    "MAX_PIPELINED",
]

# Seconds a client has to send one whole request: nginx's client_header_timeout and
# client_body_timeout default to 60 s each, Kubernetes' grace period to 30 s.
REQUEST_TIMEOUT = 30.0
# Most open connections by default (fewer under a low open-file limit).
MAX_CONNECTIONS = 1000
# The listening socket's backlog (uvicorn's default is 2048; fewer under a low
# open-file limit). asyncio accepts up to this many connections in one turn of the
# event loop, before any of them reaches the protocol that would close it; and
# when an accept fails for want of descriptors, CPython 3.11's accept loop goes on
# trying the rest of the backlog, logging each failure and scheduling a retry for
# each (50,000 lines in 25 s above). So the cap leaves room for two turns' worth
# of accepts.
ACCEPT_BACKLOG = 128
# The deadlines are checked by one sweep over the open connections every tenth of
# the timeout, not by a timer per request: a request then costs one read of the
# loop's clock instead of arming and cancelling a timer (2.3 us measured), and a
# connection is closed between 1 and 1.1 timeouts after its clock started.
_SWEEPS_PER_TIMEOUT = 10
# A request body may arrive in this many pieces, plus one per _PIECE_BYTES received:
# its parsing then costs at most about 6 us per 256 bytes with h11 (twice what json
# spends on them) and bounds how long one body holds the event loop.
FREE_PIECES = 1024
_PIECE_BYTES = 256
# The largest request head, as h11 has by default (its max_incomplete_event_size).
MAX_HEAD_BYTES = 16 * 1024
# Requests a client may pipeline behind the one being answered (httptools; h11 parses
# one at a time): about 320 KB of queued requests per connection.
MAX_PIPELINED = 128
# What uvicorn answers (and logs) when a parser refuses a request.
_INVALID = "Invalid HTTP request received."
# Descriptors kept for everything else a server holds open (its listening socket,
# the model file, onnxruntime's and Python's own files: 9 measured at start-up).
_RESERVED_DESCRIPTORS = 64


class ConnectionLimits(NamedTuple):
    """The cap on open connections and the listening socket's backlog."""

    max_connections: int
    backlog: int


def connection_limits(descriptors: int | None = None) -> ConnectionLimits:
    """The default connection cap and backlog under an open-file limit.

    With descriptors to spare: ``MAX_CONNECTIONS`` and ``ACCEPT_BACKLOG``. Under a
    lower limit both shrink so that the cap, two backlogs of accepts in flight and
    64 reserved descriptors fit in it: the backlog takes a quarter of what the
    reserve leaves, the cap the rest.

    Args:
        descriptors: The open-file limit; by default the process's soft
            ``RLIMIT_NOFILE`` (none on a system without it).

    Returns:
        The limits.

    Examples:
        >>> from brittle.deploy.serve.connections import connection_limits
        >>> connection_limits(1024)
        ConnectionLimits(max_connections=704, backlog=128)
        >>> connection_limits(256)
        ConnectionLimits(max_connections=96, backlog=48)
    """
    if descriptors is None:
        descriptors = _open_file_limit()
    if descriptors is None:
        return ConnectionLimits(MAX_CONNECTIONS, ACCEPT_BACKLOG)
    spare = max(4, descriptors - _RESERVED_DESCRIPTORS)
    backlog = min(ACCEPT_BACKLOG, spare // 4)
    return ConnectionLimits(min(MAX_CONNECTIONS, spare - 2 * backlog), backlog)


def _open_file_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


class _TooManyPipelined(Exception):
    """Raised inside httptools' parser to stop it: a client pipelined too many requests."""


class _HeadTooLarge(Exception):
    """Raised inside httptools' parser to stop it: a head or trailers past ``MAX_HEAD_BYTES``."""


def _field_bytes(name: bytes, value: bytes) -> int:
    """Bytes a header or trailer field takes on the wire: ``name: value`` and its line end."""
    return len(name) + len(value) + 4


def _framed_twice(headers: Any) -> bool:
    """Whether a request head frames its body both by Transfer-Encoding and Content-Length.

    RFC 9112 (6.3) lets a server read such a body by its chunks only if it then
    closes the connection: a proxy in front that read the Content-Length instead
    takes the rest for another request (request smuggling). httptools refuses it.
    """
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


def bounded_protocol(
    base: type[Any],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    on_close: Callable[[str], None] | None = None,
    on_answer: Callable[[int], None] | None = None,
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's protocol ``base`` with deadlines and caps (see the module).

    The deadlines, the caps on a body's pieces, a head's bytes and a pipeline's
    depth, and the cap on open connections work with h11's and httptools'
    protocols alike.

    Args:
        base: uvicorn's protocol class, e.g.
            ``uvicorn.protocols.http.auto.AutoHTTPProtocol``.
        request_timeout: Seconds within which a whole request must arrive, and
            the longest a client may leave an answer's bytes unread.
        max_connections: Most connections open at once; more are closed on accept.
        on_close: Called with the reason of every connection closed here.
        on_answer: Called with the status code of every answer given here, without
            the app: uvicorn's 400 to a request its parser refuses (a malformed
            head, a head or a pipeline too large), which the app never sees and so
            never counts.

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
    max_connections = positive_int("max_connections", max_connections)

    period = request_timeout / _SWEEPS_PER_TIMEOUT
    sweeps: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}  # one per event loop

    def closed(reason: str) -> None:
        if on_close is not None:
            on_close(reason)

    def answered(status: int) -> None:
        if on_answer is not None:
            on_answer(status)

    def sweep(loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        del sweeps[loop]
        now = loop.time()
        for connection in list(connections):
            if not isinstance(connection, BoundedProtocol):
                continue
            if connection.overdue(now):
                closed("request_timeout")
                connection.dropped = True
                connection.transport.close()
            elif connection.stalled(now):
                if not connection.dropped:  # each connection is counted once
                    closed("send_timeout")
                connection.transport.abort()  # close() would wait for the unsent bytes
        if connections:
            sweeps[loop] = loop.call_later(period, sweep, loop, connections)

    class BoundedProtocol(base):
        """``base`` with the deadlines and caps of ``bounded_protocol``."""

        started = 0.0  # the event loop's time when the current request's clock started
        unsent = 0  # bytes of answers waiting in the transport at the last sweep
        moved = 0.0  # the loop's time when those bytes last shrank (or began to wait)
        dropped = False  # closed here, and counted (at most once per connection)
        pieces = 0  # pieces of the current request's body received so far
        piece_bytes = 0  # and their bytes
        in_message = False  # httptools: a request has begun and not yet ended
        progressed = False  # httptools: the read being parsed brought more than head bytes
        head_bytes = 0  # httptools: bytes of the request's reads that brought only those
        field_bytes = 0  # bytes of the request's target, header and trailer fields parsed
        before: Any = None  # httptools: the newest request's cycle before this one's head
        half_closed = False  # the client shut its side with a request whole: close once answered
        refused = ""  # httptools: a refused request's 400, sent once the answers before it are

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                closed("too_many_connections")
                transport.close()
                return
            conn = getattr(self, "conn", None)  # h11's connection; httptools has on_body
            if conn is not None:
                conn.next_event = self.counted(conn.next_event)
            self.started = self.loop.time()
            if self.loop not in sweeps:
                sweeps[self.loop] = self.loop.call_later(period, sweep, self.loop, self.connections)

        def data_received(self, data: bytes) -> None:
            self.progressed = False
            super().data_received(data)
            # A read that began, ended or carried nothing of a request but head or
            # trailer bytes: all of it is held by the parser or by uvicorn.
            if self.in_message and not self.progressed and not self.transport.is_closing():
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES:
                    self.logger.warning(_INVALID)
                    self.send_400_response(_INVALID)

        def on_message_begin(self) -> None:  # httptools: a request begins
            self.pieces = self.piece_bytes = self.head_bytes = self.field_bytes = 0
            self.in_message = self.progressed = True
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:  # httptools: (a piece of) the target
            self.parsed_field(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:  # httptools: a field
            self.parsed_field(_field_bytes(name, value))
            super().on_header(name, value)

        def parsed_field(self, size: int) -> None:
            """Count a parsed part of the head or trailers; refuse past ``MAX_HEAD_BYTES``.

            The reads counted in ``data_received`` bound what a head still arriving
            holds; this bounds a head that arrives whole in one read.
            """
            self.field_bytes += size
            if self.field_bytes > MAX_HEAD_BYTES:
                # httptools stops parsing the read; uvicorn answers 400 and closes.
                raise _HeadTooLarge(f"a head or trailers of more than {MAX_HEAD_BYTES} bytes")

        def on_headers_complete(self) -> None:  # httptools: its head has arrived
            self.progressed = True
            self.before = getattr(self, "cycle", None)
            super().on_headers_complete()
            if len(getattr(self, "pipeline", ())) > MAX_PIPELINED:
                closed("too_many_pipelined")
                self.dropped = True
                self.unqueue()  # refused, not queued: those before it are answered first
                # httptools stops parsing the read; uvicorn answers 400 and closes.
                raise _TooManyPipelined(f"more than {MAX_PIPELINED} requests pipelined")

        def unqueue(self) -> None:
            """httptools: drop the newest request from the queue; the one before is current."""
            self.pipeline.popleft()
            self.cycle = self.before

        def on_response_complete(self) -> None:
            super().on_response_complete()  # with httptools this reads on (and starts the next)
            self.started = self.loop.time()  # the next request's clock
            if getattr(self, "pipeline", None) or self.refused:  # read once they are done
                self.flow.pause_reading()
            if self.refused and self.receiving():  # the answers before the refused request
                msg, self.refused = self.refused, ""
                if not self.transport.is_closing():  # the last answer may have closed it
                    self.send_400_response(msg)
            elif self.half_closed and self.receiving():  # all answered; nothing more can come
                self.transport.close()

        def eof_received(self) -> bool | None:
            # A client may shut its side once its request is sent (a half-close). uvicorn
            # then closed at once: the answer was counted and never sent. A request read
            # whole is now answered first; one still arriving can never end, and its
            # connection is closed as before.
            if self.receiving():
                return super().eof_received()
            self.half_closed = True
            return True

        def on_body(self, body: bytes) -> None:  # httptools: a piece of the body
            self.progressed = True
            if self.body_piece(len(body)):
                super().on_body(body)

        def on_message_complete(self) -> None:  # httptools: the request has ended
            self.in_message = False
            self.progressed = True
            super().on_message_complete()

        def counted(self, next_event: Callable[[], Any]) -> Callable[[], Any]:
            """h11's ``Connection.next_event``, counting the pieces of each body."""
            import h11

            def next_counted() -> Any:
                event = next_event()
                if isinstance(event, (h11.Request, h11.EndOfMessage)):
                    # h11 bounds only a head still arriving (max_incomplete_event_size).
                    size = sum(_field_bytes(name, value) for name, value in event.headers)
                    if isinstance(event, h11.Request):
                        self.pieces = self.piece_bytes = 0
                        self.field_bytes = len(event.target) + size
                        if _framed_twice(event.headers):
                            # h11 read it by its chunks and kept the connection open.
                            raise h11.RemoteProtocolError("a body framed twice")
                    else:
                        self.field_bytes += size
                    if self.field_bytes > MAX_HEAD_BYTES:
                        # uvicorn answers a protocol error with its 400 and closes.
                        raise h11.RemoteProtocolError("a head or trailers too large")
                elif isinstance(event, h11.Data) and not self.body_piece(len(event.data)):
                    return h11.NEED_DATA  # stops uvicorn's loop over the buffered events
                return event

            return next_counted

        def body_piece(self, size: int) -> bool:
            """Count a piece of ``size`` bytes of a request body; ``False`` once too many.

            The connection is then closed (and counted once): a body that arrives in
            more than ``FREE_PIECES`` pieces plus one per 256 bytes is not read on.
            """
            if self.dropped:  # httptools goes on through what was already read
                return False
            self.pieces += 1
            self.piece_bytes += size
            if self.pieces <= FREE_PIECES + self.piece_bytes // _PIECE_BYTES:
                return True
            closed("fragmented_body")
            self.dropped = True
            self.transport.close()
            return False

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to a request its parser refused, which closes the connection.
            # httptools parses every request of a read at once, so it may refuse one behind
            # requests read whole and still being answered (or queued): their answers
            # come first, as h11 (which parses one request at a time) gives them. Before,
            # the app's answers were counted and dropped on the closed connection.
            pipeline = getattr(self, "pipeline", None)  # httptools only: h11 is not ahead
            if pipeline and pipeline[0][0] is self.cycle and self.cycle.more_body:
                self.unqueue()  # a queued request refused in its body never reached the app
            if pipeline is not None and not self.receiving():
                self.refused = self.refused or msg
                self.flow.pause_reading()
                return
            # One whose head reached the app (its body refused) is counted there, as the
            # app answers it (that answer is dropped on the closed connection).
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                answered(400)
            super().send_400_response(msg)

        def shutdown(self) -> None:
            if self.receiving():
                self.transport.close()
                return
            super().shutdown()

        def receiving(self) -> bool:
            """Whether a request is expected or still arriving (nothing is being answered)."""
            cycle = self.cycle
            return cycle is None or cycle.response_complete or cycle.more_body

        def stalled(self, now: float) -> bool:
            """Whether the unsent answer has not shrunk for a whole timeout at loop time ``now``.

            Called by every sweep: the client taking any bytes restarts the clock,
            the server writing more does not.
            """
            size = self.transport.get_write_buffer_size()
            if size == 0:
                self.unsent = 0
                return False
            if self.unsent == 0 or size < self.unsent:
                self.moved = now
            self.unsent = size
            return now - self.moved > request_timeout

        def overdue(self, now: float) -> bool:
            """Whether the request being received has run out of time at loop time ``now``."""
            return (
                now - self.started > request_timeout
                and not self.transport.is_closing()
                and self.receiving()
            )

    BoundedProtocol.__name__ = BoundedProtocol.__qualname__ = f"Bounded{base.__name__}"
    return BoundedProtocol
