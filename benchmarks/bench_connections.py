"""What the server's connection limits cost per request: uvicorn's protocol against the bounded one.

``python -m brittle.serve`` wraps uvicorn's HTTP protocol in
``brittle.deploy.serve.connections.bounded_protocol`` (a deadline to receive each
request, a cap on open connections). This script times both protocol classes
in one process, without sockets: a fake transport, one keep-alive connection,
and a minimal ASGI app answering ``200`` with a 2-byte body, so that what is
timed is the HTTP protocol's own work per request (parsing the request, running
the app, writing the response) with as little else around it as possible. Blocks
of ``--requests`` requests alternate between the two classes (ABBA); the table gives
each class's minimum and median CPU time per request over ``--blocks`` blocks.

Run: ``python benchmarks/bench_connections.py [--blocks 15] [--requests 5000]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.server import ServerState

from brittle.deploy.serve.connections import bounded_protocol

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal ASGI app: 200 with ``ok``."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Transport(asyncio.Transport):
    """A transport that keeps nothing: the protocol writes into it and never closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def per_request(protocol: type[asyncio.Protocol], requests: int) -> float:
    """CPU seconds per request over ``requests`` requests on one connection."""
    config = uvicorn.Config(app, log_level="warning", http=protocol, access_log=False)
    config.load()
    state = ServerState()
    connection: Any = config.http_protocol_class(config=config, server_state=state, app_state={})
    connection.connection_made(Transport())
    start = time.process_time()
    for _ in range(requests):
        served = state.total_requests
        connection.data_received(REQUEST)
        while state.total_requests == served:
            await asyncio.sleep(0)
    spent = time.process_time() - start
    connection.connection_lost(None)
    return spent / requests


async def compare(blocks: int, requests: int) -> dict[str, list[float]]:
    """Interleaved blocks of each protocol class; CPU seconds per request, per block."""
    variants = {
        f"uvicorn ({AutoHTTPProtocol.__name__})": AutoHTTPProtocol,
        "bounded (brittle.serve)": bounded_protocol(AutoHTTPProtocol),
    }
    for protocol in variants.values():  # warm-up
        await per_request(protocol, requests // 10)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for _ in range(blocks):
        for name, protocol in order:
            times[name].append(await per_request(protocol, requests))
        order.reverse()  # ABBA: neither class always runs right after the other
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--requests", type=int, default=5000, help="requests per block")
    args = parser.parse_args()
    times = asyncio.run(compare(args.blocks, args.requests))
    print(f"{args.blocks} interleaved blocks of {args.requests} requests, CPU time per request")
    print("\n| protocol | min µs | median µs |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values) * 1e6:.2f} | {statistics.median(values) * 1e6:.2f} |")
    base, bounded = (min(values) for values in times.values())
    print(f"\nbounded - uvicorn: {(bounded - base) * 1e6:+.2f} µs per request (minimums)")


if __name__ == "__main__":
    main()
