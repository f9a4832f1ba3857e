"""The bounded protocol's caps on a request's head, its body's pieces and a pipeline, per parser.

uvicorn parses HTTP with h11 or httptools, whichever is installed (httptools comes
with the ``serve`` extra, h11 with uvicorn). Each protocol class here is driven
without sockets: bytes go straight into ``data_received``, as the event loop would
pass them, and a fake transport records what is written and whether it was closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # the serve extra's
from uvicorn.server import ServerState

from brittle.deploy.serve.connections import (
    FREE_PIECES,
    MAX_HEAD_BYTES,
    MAX_PIPELINED,
    bounded_protocol,
)

PARSERS = [H11Protocol, HttpToolsProtocol]


class Transport(asyncio.Transport):
    """Keeps what the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False
        self.paused = False
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def write(self, data: Any) -> None:
        if not self.closing:  # as asyncio's transports, which drop writes after close()
            self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Recorder:
    """An ASGI app that reads each request's whole body and answers with its length.

    With ``close`` every answer says ``Connection: close``.
    """

    def __init__(self, close: bool = False) -> None:
        self.bodies: list[int] = []
        self.disconnected = 0
        self.headers = [(b"connection", b"close")] if close else []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected += 1
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.bodies.append(size)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": str(size).encode()})


def _reads(wire: bytes, size: int) -> list[bytes]:
    """``wire`` as reads of ``size`` bytes."""
    return [wire[i : i + size] for i in range(0, len(wire), size)]


def _chunked(body: bytes, chunk: int) -> bytes:
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HEAD = b"POST /predict HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _exchange(
    parser: type[Any],
    sends: list[bytes],
    answers: list[int] | None = None,
    half_close: bool = False,
    app: Recorder | None = None,
) -> tuple[Recorder, Transport, list[str], Any]:
    """Feed ``sends`` (one ``data_received`` each) to a bounded ``parser`` connection.

    Returns the app, the transport, the reasons of closes and the connection; the
    status codes of the answers the protocol gives without the app go to ``answers``.
    With ``half_close`` the client shuts its side right after its last read, before
    the app runs: the event loop calls ``eof_received`` and closes the transport
    unless it returns True.
    """
    reasons: list[str] = []
    app = Recorder() if app is None else app
    on_answer = None if answers is None else answers.append
    protocol = bounded_protocol(parser, on_close=reasons.append, on_answer=on_answer)
    config = uvicorn.Config(app, log_level="warning", http=protocol, access_log=False)
    config.load()
    connection: Any = config.http_protocol_class(
        config=config, server_state=ServerState(), app_state={}
    )
    transport = Transport()
    connection.connection_made(transport)
    for data in sends:
        for _ in range(100_000):  # a paused transport reads nothing until resumed
            if not transport.paused or transport.closing:
                break
            await asyncio.sleep(0)
        if transport.closing:
            break
        assert not transport.paused, "the connection was never read on"
        connection.data_received(data)
        if half_close and data is sends[-1] and not connection.eof_received():
            transport.close()
        for _ in range(20):  # let the app take what arrived
            await asyncio.sleep(0)
    if transport.closing:
        connection.connection_lost(None)  # what the event loop does after close()
    quiet = 0
    while quiet < 50:  # until 50 turns of the loop write nothing (pipelined answers)
        written = len(transport.written)
        await asyncio.sleep(0)
        quiet = quiet + 1 if len(transport.written) == written else 0
    return app, transport, reasons, connection


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_a_body_in_one_byte_chunks_is_dropped_after_the_free_pieces(parser: type[Any]) -> None:
    # Before the cap: 1 MB of body in 1-byte chunks held the event loop 6.8 s (h11)
    # or 0.35 s (httptools), and the request was answered.
    body = b"7" * 20_000
    sends = _reads(HEAD + _chunked(body, 1), 65536)
    app, transport, reasons, connection = asyncio.run(_exchange(parser, sends))
    assert reasons == ["fragmented_body"]
    assert transport.closing and transport.written == b""  # no answer, as for a timeout
    assert app.bodies == [] and app.disconnected == 1
    # 1,024 pieces and one per 256 bytes: the 1,029th one-byte piece is one too many
    # (1,028 bytes allow 1,024 + 4), and none is counted after it.
    assert connection.pieces == FREE_PIECES + 5 and connection.piece_bytes == 1029


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("chunk", [256, 8192])
def test_bodies_in_ordinary_chunks_are_read_whole(parser: type[Any], chunk: int) -> None:
    # 256 bytes: about one row of digits per chunk; 8 KiB: http.client's chunks.
    body = b"7" * 1_000_000
    sends = _reads(HEAD + _chunked(body, chunk), 65536)
    app, transport, reasons, _ = asyncio.run(_exchange(parser, sends))
    assert reasons == [] and not transport.closing
    assert app.bodies == [len(body)] and b"\r\n1000000\r\n" in transport.written


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_each_request_on_a_connection_has_its_own_pieces(parser: type[Any]) -> None:
    # 1,000 small chunks per request, three requests on one keep-alive connection:
    # 3,000 pieces in all, which would be too many for one body.
    request = HEAD + _chunked(b"7" * 1000, 1)
    app, transport, reasons, _ = asyncio.run(_exchange(parser, [request] * 3))
    assert reasons == [] and app.bodies == [1000] * 3
    assert transport.written.count(b"HTTP/1.1 200 OK") == 3


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_a_body_read_a_byte_at_a_time_counts_each_read(parser: type[Any]) -> None:
    # With Content-Length a piece is whatever one read of the socket brought.
    body = b"7" * 3000
    head = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 3000\r\n\r\n"
    app, transport, reasons, _ = asyncio.run(_exchange(parser, [head, *(bytes([b]) for b in body)]))
    assert reasons == ["fragmented_body"] and app.bodies == []


HEADER = b"X-A: " + b"a" * 1000 + b"\r\n"
ENDLESS = {  # what a request starts with, and what it goes on with for ever
    "headers": (b"GET /healthz HTTP/1.1\r\nHost: test\r\n", HEADER),
    "one header": (b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-A: ", b"a" * 1000),
    "target": (b"GET /", b"a" * 1000),
    "trailers": (HEAD + b"1\r\n7\r\n0\r\n", HEADER),
}


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("part", list(ENDLESS))
def test_a_head_or_trailers_without_end_get_400(parser: type[Any], part: str) -> None:
    # Before, with httptools, uvicorn kept every header: headers sent without end grew
    # the server by 2.6 GB in 5 s, trailers by 2.3 GB in 3 s. h11 refused them already.
    start, repeat = ENDLESS[part]
    reads = [start] + [repeat * 4] * 1000  # 4 MB in reads of 4 KB
    app, transport, reasons, connection = asyncio.run(_exchange(parser, reads))
    assert transport.closing and transport.written.startswith(b"HTTP/1.1 400 ")
    assert b"Invalid HTTP request received." in transport.written
    assert app.bodies == [] and reasons == []
    if parser is HttpToolsProtocol:  # refused at the first read past the limit, or before
        assert connection.head_bytes <= MAX_HEAD_BYTES + len(reads[1])


WHOLE = {  # a request whose head or trailers pass the limit by 4 KB, all in one read
    "header": b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
    "headers": b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + HEADER * 20 + b"\r\n",
    "target": b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: test\r\n\r\n",
    "trailers": HEAD + b"1\r\n7\r\n0\r\n" + HEADER * 20 + b"\r\n",
}


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("part", list(WHOLE))
def test_a_head_or_trailers_past_the_limit_in_one_read_get_400(
    parser: type[Any], part: str
) -> None:
    # Before, both parsers served a head of up to about 250 KB that came in one read:
    # h11 bounds only a head still arriving, and the reads counted with httptools
    # began with the one that brought the head.
    app, transport, reasons, _ = asyncio.run(_exchange(parser, [WHOLE[part]]))
    assert transport.closing and transport.written.startswith(b"HTTP/1.1 400 ")
    assert b"Invalid HTTP request received." in transport.written
    assert app.bodies == [] and reasons == []


POSTED = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("requests", [1, 3])
def test_a_client_that_half_closes_after_its_requests_gets_the_answers(
    parser: type[Any], requests: int
) -> None:
    # Before, uvicorn closed the connection on the client's half-close: the app
    # answered (and the server counted the answer), but nothing was sent.
    app, transport, reasons, _ = asyncio.run(
        _exchange(parser, [POSTED * requests], half_close=True)
    )
    assert app.bodies == [5] * requests and app.disconnected == 0
    assert transport.written.count(b"HTTP/1.1 200 OK") == requests
    assert transport.written.endswith(b"0\r\n\r\n")  # the last answer ended
    assert transport.closing and reasons == []


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_a_client_that_half_closes_inside_its_request_is_closed_unanswered(
    parser: type[Any],
) -> None:
    app, transport, reasons, _ = asyncio.run(_exchange(parser, [POSTED[:-2]], half_close=True))
    assert transport.closing and transport.written == b"" and app.bodies == []


PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"p" * 600 + b"\r\n\r\n"


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_heads_within_the_limit_and_pipelined_requests_are_served(parser: type[Any]) -> None:
    # A 12 KB head sent 100 bytes at a time, then 1,000 pipelined requests in 64 KiB
    # reads of about 100 requests each (each read ends inside some request's head).
    # With httptools the next read comes once the last one's requests are answered:
    # reading on after each answer, as uvicorn did, queues more than 128.
    big = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-A: " + b"a" * 12_000 + b"\r\n\r\n"
    reads = _reads(big, 100) + _reads(PIPELINED * 1000, 65536)
    app, transport, reasons, _ = asyncio.run(_exchange(parser, reads))
    assert not transport.closing and reasons == []
    assert transport.written.count(b"HTTP/1.1 200 OK") == 1001


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_a_pipeline_deeper_than_the_queue_is_refused_with_httptools(parser: type[Any]) -> None:
    # 1,000 requests in one read. Before, httptools queued them all (2.5 KB each) and
    # read on after every answer: 20 clients pipelining 1 MiB each and reading nothing
    # grew the server by 760 MB in 6 s. h11 parses one request at a time.
    # The requests within the limit are answered first, then the 400 (before, it came at
    # once, and the answers the app had been counted for were dropped).
    answers: list[int] = []
    app, transport, reasons, _ = asyncio.run(_exchange(parser, [PIPELINED * 1000], answers))
    if parser is HttpToolsProtocol:
        assert reasons == ["too_many_pipelined"] and transport.closing
        assert transport.written.count(b"HTTP/1.1 200 OK") == 1 + MAX_PIPELINED
        assert transport.written.count(b"HTTP/1.1 400 ") == 1 and answers == [400]
        assert transport.written.rindex(b"HTTP/1.1 400 ") > transport.written.rindex(b" 200 OK")
    else:
        assert reasons == [] and transport.written.count(b"HTTP/1.1 200 OK") == 1000


MALFORMED = {
    "header-without-colon": b"GET /healthz HTTP/1.1\r\nHost: test\r\nBroken\r\n\r\n",
    "two-content-lengths": (
        b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "head-without-end": b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + b"X-A: a\r\n" * 4000,
}


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_the_400_for_a_request_the_parser_refuses_is_counted(parser: type[Any], case: str) -> None:
    # uvicorn answers these itself, and the app never saw them: brittle_requests_total
    # counted none of the 400s clients received.
    answers: list[int] = []
    wire = MALFORMED[case]
    reads = _reads(wire, 4096)
    app, transport, _, _ = asyncio.run(_exchange(parser, reads, answers))
    assert transport.written.startswith(b"HTTP/1.1 400 ") and app.bodies == []
    assert answers == [400]


# A body framed twice: chunked, and by a Content-Length a proxy in front may read
# instead, which then takes the chunks for a request of its own (request smuggling).
FRAMED_TWICE = {
    "length-first": b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
    "chunked-first": b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
}


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("order", list(FRAMED_TWICE))
def test_a_body_framed_by_length_and_chunks_gets_400_and_a_close(
    parser: type[Any], order: str
) -> None:
    # RFC 9112, 6.3: a server may refuse such a request or read it by its chunks, and
    # either way must close the connection after answering. httptools refused it; h11
    # read it by its chunks and kept the connection, so the request behind it (what
    # the proxy took for a body) was answered too.
    head = b"POST /predict HTTP/1.1\r\nHost: test\r\n" + FRAMED_TWICE[order] + b"\r\n"
    answers: list[int] = []
    wire = head + _chunked(b"7" * 10, 10) + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    app, transport, _, _ = asyncio.run(_exchange(parser, [wire], answers))
    assert transport.written.startswith(b"HTTP/1.1 400 ") and transport.closing
    assert b"200 OK" not in transport.written and app.bodies == []
    assert answers == [400]


REFUSED = {  # a request the parser refuses, in its head or in its body
    "head": MALFORMED["header-without-colon"],
    "body": HEAD + b"zz\r\n",
}
GOOD = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("refused", list(REFUSED))
def test_a_request_refused_behind_others_is_answered_after_them(
    parser: type[Any], refused: str
) -> None:
    # Requests in one read, the last malformed. httptools parses them all at once:
    # before, its 400 came at once and closed the connection, so the client received
    # only the 400 while the app's 200s were counted; h11 answered the first, then refused.
    answers: list[int] = []
    app, transport, _, _ = asyncio.run(_exchange(parser, [GOOD * 2 + REFUSED[refused]], answers))
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2 and app.bodies == [0, 0]
    assert transport.written.index(b"HTTP/1.1 400 ") > transport.written.rindex(b" 200 OK")
    assert transport.closing
    if parser is H11Protocol and refused == "body":
        # h11 reached the malformed request in its turn: its head went to the app, which
        # counts its own answer (test_answers_of_the_app_are_not_counted_by_the_protocol).
        assert answers == [] and app.disconnected == 1
    else:
        assert answers == [400]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_an_answer_that_closes_the_connection_cancels_the_400_behind_it(
    parser: type[Any],
) -> None:
    # The app's answer says Connection: close: the refused request behind it gets no
    # 400, and none is counted (one was counted, and written to a closed transport).
    answers: list[int] = []
    app, transport, _, _ = asyncio.run(
        _exchange(parser, [GOOD + REFUSED["head"]], answers, app=Recorder(close=True))
    )
    assert transport.written.count(b"HTTP/1.1 200 OK") == 1 and transport.closing
    assert b"HTTP/1.1 400 " not in transport.written and answers == []


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_answers_of_the_app_are_not_counted_by_the_protocol(parser: type[Any]) -> None:
    # A request that reached the app is counted there, also when its body is then
    # refused by the parser (a chunk size that is not hexadecimal).
    good = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    answers: list[int] = []
    app, transport, _, _ = asyncio.run(_exchange(parser, [good, HEAD + b"zz\r\n"], answers))
    assert transport.written.count(b"HTTP/1.1 200 OK") == 1
    assert transport.written.count(b"HTTP/1.1 400 ") == 1 and app.disconnected == 1
    assert answers == []
