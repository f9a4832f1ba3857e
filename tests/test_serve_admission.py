"""The server's budget of body bytes and its workers (``brittle.deploy.serve.admission``)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import AsyncIterator

import anyio
import pytest

from brittle.deploy.serve.admission import (
    INLINE_BYTES,
    RECENT,
    Admission,
    max_bytes_default,
    max_concurrent_default,
)
from brittle.deploy.serve.body import decode_json, read_body
from brittle.deploy.serve.refusal import Refusal


async def _stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _unread() -> AsyncIterator[bytes]:
    raise AssertionError("a body refused by its Content-Length must not be read")
    yield b""  # pragma: no cover


def test_bodies_are_held_as_they_arrive_and_refused_when_they_do_not_fit() -> None:
    admission = Admission(max_bytes=100, max_concurrent=1)

    async def main() -> None:
        with admission.hold() as first:
            body = await read_body({}, _stream(b"a" * 30, b"b" * 30), 1000, first)
            assert body == b"a" * 30 + b"b" * 30 and admission.held == 60
            with admission.hold() as second:
                # Announced larger than what is left: refused before a byte is read.
                with pytest.raises(Refusal) as announced:
                    await read_body({"content-length": "41"}, _unread(), 1000, second)
                assert announced.value.status == 503
                assert announced.value.headers == {"Retry-After": "1"}
                # Announced to fit: read.
                await read_body({"content-length": "40"}, _stream(b"c" * 40), 1000, second)
                assert admission.held == 100
            assert admission.held == 60  # the second request gave its bytes back
            with admission.hold() as third:
                # Chunked: refused once the bytes that arrived do not fit.
                with pytest.raises(Refusal) as streamed:
                    await read_body({}, _stream(b"d" * 30, b"e" * 30), 1000, third)
                assert streamed.value.status == 503 and admission.held == 90
            # The body limit is still the first check: 413, not 503.
            with admission.hold() as fourth, pytest.raises(Refusal) as large:
                await read_body({"content-length": "2000"}, _unread(), 1000, fourth)
            assert large.value.status == 413
        assert admission.held == 0

    anyio.run(main)


def test_a_refused_hold_keeps_nothing_even_on_an_error() -> None:
    admission = Admission(max_bytes=10, max_concurrent=1)
    with pytest.raises(RuntimeError), admission.hold() as hold:
        hold.add(7)
        raise RuntimeError("the handler failed")
    assert admission.held == 0


def test_at_most_max_concurrent_requests_are_judged_at_once() -> None:
    admission = Admission(max_bytes=10, max_concurrent=2)
    lock = threading.Lock()
    running, most = 0, 0

    def judge() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.2)  # long enough that the six calls overlap on any machine
        with lock:
            running -= 1

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(admission.run, judge)

    anyio.run(main)
    assert most == 2


def _where_run(admission: Admission, calls: int, size: int | None, seconds: float) -> list[bool]:
    """For each of ``calls`` requests in turn, whether it ran on the event loop's thread."""
    on_loop: list[bool] = []

    def judge(where: list[int]) -> None:
        where.append(threading.get_ident())
        end = time.process_time() + seconds
        while time.process_time() < end:  # CPU time: what Admission counts
            pass

    async def main() -> None:
        loop = threading.get_ident()
        for _ in range(calls):
            where: list[int] = []
            await admission.run(judge, where, size=size)
            on_loop.append(where == [loop])

    anyio.run(main)
    return on_loop


def test_small_quick_requests_are_judged_on_the_event_loop() -> None:
    # The hand-over to a worker thread and back cost about 140 us of CPU per request,
    # half of a small model's whole request in the server.
    admission = Admission(max_bytes=10, max_concurrent=2)
    on_loop = _where_run(admission, RECENT + 4, size=1000, seconds=0.0)
    # The first RECENT run in threads (nothing measured yet), then on the loop.
    assert on_loop == [False] * RECENT + [True] * 4
    assert admission.quick()


@pytest.mark.parametrize(
    ("size", "seconds"),
    [
        (INLINE_BYTES + 1, 0.0),  # a large body: its parse may take long
        (None, 0.0),  # size unknown
        (1000, 0.005),  # a slow model: 5 ms per request, above INLINE_SECONDS
    ],
)
def test_large_unknown_or_slow_requests_are_judged_in_worker_threads(
    size: int | None, seconds: float
) -> None:
    admission = Admission(max_bytes=10, max_concurrent=2)
    assert _where_run(admission, RECENT + 4, size, seconds) == [False] * (RECENT + 4)
    assert not admission.quick()


def test_a_model_turned_slow_goes_back_to_the_worker_threads() -> None:
    admission = Admission(max_bytes=10, max_concurrent=2)
    assert _where_run(admission, RECENT + 1, 1000, 0.0)[-1]
    # The first slow request is timed on the loop; the next ones leave it.
    slow = _where_run(admission, RECENT + 3, 1000, 0.005)
    assert slow == [True] + [False] * (RECENT + 2)


def test_slow_requests_among_quick_ones_are_judged_in_worker_threads() -> None:
    # One quick request in the last RECENT (a batch of one, a cheap 422) kept every small
    # body on the event loop, however long it took: a large batch of compact numbers in
    # 64 KiB held the loop for 4 ms (digits CNN, --max-batch 4096), each time.
    admission = Admission(max_bytes=10, max_concurrent=2)
    assert _where_run(admission, RECENT + 1, 1000, 0.0)[-1]
    slow_on_loop = []
    for _ in range(6):
        _where_run(admission, 1, 1000, 0.0)
        slow_on_loop += _where_run(admission, 1, 1000, 0.005)
    # The first is timed on the loop; the rest go to the threads while it is recent.
    assert slow_on_loop == [True] + [False] * 5


def test_a_small_request_takes_a_free_place_or_waits_for_a_thread() -> None:
    # Judged on the event loop, a request still holds one of max_concurrent places: with
    # the only place taken, a small quick one waits in the thread queue.
    admission = Admission(max_bytes=10, max_concurrent=1)
    assert _where_run(admission, RECENT + 1, 1000, 0.0)[-1]
    lock = threading.Lock()
    running, most = 0, 0

    def judge(seconds: float) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(seconds)
        with lock:
            running -= 1

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(admission.run, judge, 0.2)  # holds the place in a thread
            await anyio.sleep(0.05)
            for _ in range(3):
                await admission.run(judge, 0.0, size=1000)

    anyio.run(main)
    assert most == 1


def test_a_body_too_deep_for_the_event_loops_stack_is_parsed_in_a_worker_thread() -> None:
    # The event loop's stack under a server is deeper than a worker thread's: JSON
    # nested 960 levels got 400 (nested too deeply) on the loop and 422 (not of the
    # model's shape) in a thread, depending on the requests before it.
    admission = Admission(max_bytes=10, max_concurrent=1)
    assert _where_run(admission, RECENT + 1, 1000, 0.0)[-1]
    depth = sys.getrecursionlimit() - 100  # a thread parses it; 200 frames more do not
    body = b"[" * depth + b"]" * depth
    assert len(body) <= INLINE_BYTES

    async def deep(frames: int) -> object:
        if frames:
            return await deep(frames - 1)
        return await admission.run(decode_json, body, size=len(body))

    parsed = anyio.run(deep, 200)
    for _ in range(depth - 1):
        assert isinstance(parsed, list) and len(parsed) == 1
        parsed = parsed[0]
    assert parsed == []


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_concurrent": 0}, {"max_bytes": 1.5}, {"max_concurrent": True}],
)
def test_admission_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    settings: dict[str, object] = {"max_bytes": 10, "max_concurrent": 1, **kwargs}
    with pytest.raises(ValueError, match="positive integer"):
        Admission(**settings)  # type: ignore[arg-type]


def test_defaults() -> None:
    assert [max_concurrent_default(n) for n in (1, 2, 3, 8, 128)] == [1, 2, 3, 4, 4]
    assert max_bytes_default(1) == 32 * 2**20
    assert max_bytes_default(64 * 2**20) == 512 * 2**20
