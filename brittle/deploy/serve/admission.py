"""``Admission``: how many bytes of request bodies the server holds, and how many it judges.

Each body is bounded by ``--max-body``, but nothing bounded how many the server
held at once: forty clients each sending a 5 MB batch grew the process by 770 MB
(every body held, and parsed in forty worker threads at once, each into Python
floats five times its size), and ``/healthz`` took 2 s to answer behind them.
A model with larger inputs, or more clients, runs the machine out of memory.

So the server holds at most ``max_bytes`` of request bodies at once: the bytes
received so far of every request still being read, waiting for a worker or being
judged. A request whose body does not fit gets 503 with ``Retry-After``: before a
byte of it is read when its Content-Length already says so, else as soon as the
bytes it has sent do not fit. At most ``max_concurrent`` requests are parsed and
judged at once, in worker threads of their own, so that their Python objects are
bounded too and the event loop (the health routes among them) is never queued
behind dozens of threads for the interpreter lock. The memory a server's requests
take is then about ``max_bytes`` plus, for each of the ``max_concurrent`` workers,
six bodies of ``--max-body`` (a parsed JSON number takes about five times its
text) and the model's activations at the largest batch.

Bytes are counted as they arrive rather than as a Content-Length announces them,
so that a client announcing large bodies and sending nothing holds nothing. The
budget is still shared: a client that keeps it full delays everyone else (until
the request deadline closes its connections); fairness between clients is a
reverse proxy's job.

Handing a request to a worker thread and back costs CPU of its own: about 140 µs
per request on a 2-core VM, half of all a small model's server spends on it. So a
request whose body is at most ``INLINE_BYTES`` is judged on the event loop itself
(still holding one of the ``max_concurrent`` places, taken only when one is free
at once) as long as judging such requests has been quick: each of the last
``RECENT`` took at most ``INLINE_SECONDS`` of the process's CPU time (a request
that waited for the cores or the interpreter lock was not slow; the work of
onnxruntime's own threads counts). A slow model, a large body, or a full house
sends requests to the worker threads. A small body
can still take longer than those before it (a large batch of short numbers: 64
KiB of zeros held the loop for 4 ms with the digits CNN and ``--max-batch
4096``; 64 KiB of empty objects among the inputs, refused with 422, about 8 ms):
it holds the event loop once, and the next ``RECENT`` such requests go to the
threads. (The test was the quickest of the last ``RECENT`` at first: one
cheap request among them, a batch of one or a 422, kept every small body on the
loop however long it took.) Longer requests gain more from the threads: the
model runs without the interpreter lock, so several of them overlap on the cores
(a ResNet-18 at 32x32 pixels, about 0.9 ms a request, served 9 % more requests a
second from threads than from the event loop, though each cost 20 % more CPU).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import anyio
import anyio.to_thread

from brittle.arguments import positive_int
from brittle.deploy.serve.refusal import Refusal

__all__ = [
    "Admission",
    "Hold",
    "max_concurrent_default",
    "max_bytes_default",
    "RETRY_AFTER",
    "INLINE_BYTES",
    "INLINE_SECONDS",
    "RECENT",
]

T = TypeVar("T")

# Seconds a client is asked to wait before it retries a request refused with 503.
RETRY_AFTER = 1
# The body budget is at least this many bytes, and at least _BODIES_HELD largest bodies.
_MIN_BYTES = 32 * 2**20
_BODIES_HELD = 8
# Requests judged at once, at most: one per core, up to this many.
_MAX_CONCURRENT = 4
# Bodies of at most this many bytes may be judged on the event loop (a batch of 16
# digits is 6 KB of JSON; json.loads takes about 440 us for 64 KB of numbers) ...
INLINE_BYTES = 64 * 2**10
# ... while each of the last RECENT such requests took at most this long.
INLINE_SECONDS = 5e-4
RECENT = 8


def max_concurrent_default(cpus: int | None = None) -> int:
    """Requests judged at once by default: one per CPU core, at most four.

    Examples:
        >>> max_concurrent_default(2), max_concurrent_default(64)
        (2, 4)
    """
    if cpus is None:
        # The cores this process may run on (a container's share), where the OS says.
        affinity = getattr(os, "sched_getaffinity", None)
        cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    return max(1, min(_MAX_CONCURRENT, cpus))


def max_bytes_default(max_body: int) -> int:
    """Bytes of bodies held at once by default: eight of the largest, and at least 32 MiB.

    Examples:
        >>> max_bytes_default(196_608) == 32 * 2**20
        True
        >>> max_bytes_default(10 * 2**20) == 80 * 2**20
        True
    """
    return max(_MIN_BYTES, _BODIES_HELD * max_body)


class Admission:
    """The budget of body bytes a server holds and the workers that judge requests.

    One instance per app; ``hold`` and ``Hold.add`` run on the event loop only.

    Args:
        max_bytes: Most bytes of request bodies held at once.
        max_concurrent: Most requests parsed and judged at once (worker threads, and the
            event loop for small quick ones).

    Examples:
        >>> admission = Admission(max_bytes=100, max_concurrent=1)
        >>> with admission.hold() as first, admission.hold() as second:
        ...     first.add(60)
        ...     try:
        ...         second.add(60)
        ...     except Refusal as err:
        ...         print(err.status, admission.held)
        503 60
        >>> admission.held
        0
    """

    def __init__(self, max_bytes: int, max_concurrent: int) -> None:
        self.max_bytes = positive_int("max_bytes", max_bytes)
        self.max_concurrent = positive_int("max_concurrent", max_concurrent)
        self.held = 0
        self._workers = anyio.CapacityLimiter(self.max_concurrent)
        # CPU seconds the last RECENT requests of at most INLINE_BYTES took to judge.
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._lock = threading.Lock()

    def hold(self) -> Hold:
        """A request's share of the budget, empty until its bytes arrive; a context manager."""
        return Hold(self)

    def busy(self) -> Refusal:
        """The 503 of a request whose body does not fit the budget now."""
        return Refusal(
            503,
            "the server holds as many request bodies as it can: retry later.",
            retry_after=RETRY_AFTER,
        )

    def quick(self) -> bool:
        """Whether each of the last ``RECENT`` small requests took ``INLINE_SECONDS`` or less."""
        with self._lock:
            return len(self._recent) == RECENT and max(self._recent) <= INLINE_SECONDS

    async def run(self, fn: Callable[..., T], *args: object, size: int | None = None) -> T:
        """``fn(*args)`` once one of ``max_concurrent`` places is free, on the loop or in a thread.

        A request of ``size`` bytes, at most ``INLINE_BYTES``, runs on the event loop
        while such requests are ``quick`` and a place is free at once; every other
        call (``size`` unknown among them) waits for a place and runs in a worker
        thread. A call that runs out of stack on the event loop (a ``RecursionError``,
        or an error raised from one, such as the 400 of JSON nested too deeply) runs
        again in a worker thread, whose stack starts far shallower: else a body nested
        a little less deeply than a thread can parse got a 400 on the loop and a 422
        (its inputs not of the model's shape) in a thread. ``fn`` must then have
        changed nothing, as parsing a body changes nothing.
        """
        small = size is not None and size <= INLINE_BYTES
        if small and self.quick():
            try:
                self._workers.acquire_nowait()
            except anyio.WouldBlock:
                pass
            else:
                try:
                    return self._timed(small, fn, *args)
                except Exception as err:
                    if not _out_of_stack(err):
                        raise
                finally:
                    self._workers.release()
        return await anyio.to_thread.run_sync(self._timed, small, fn, *args, limiter=self._workers)

    def _timed(self, small: bool, fn: Callable[..., T], *args: object) -> T:
        # CPU time: with each of RECENT bounding it, wall time would send every small
        # request to the threads for a while whenever one was preempted on a busy host.
        # The process's, not the thread's: onnxruntime's intra-op threads (--threads)
        # run part of the model, and the loop waits for them too. Work of other
        # requests' threads meanwhile counts as well, which only errs towards threads.
        start = time.process_time()
        try:
            return fn(*args)
        finally:
            if small:
                with self._lock:
                    self._recent.append(time.process_time() - start)


def _out_of_stack(error: BaseException) -> bool:
    """Whether ``error`` is a ``RecursionError`` or was raised from one.

    Examples:
        >>> try:
        ...     try:
        ...         raise RecursionError
        ...     except RecursionError as err:
        ...         raise ValueError("nested too deeply") from err
        ... except ValueError as err:
        ...     print(_out_of_stack(err), _out_of_stack(ValueError()))
        True False
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, RecursionError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class Hold:
    """The bytes one request holds of an ``Admission``'s budget, given back on exit."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.size = 0

    def check(self, announced: int) -> None:
        """Refuse now (503) a body of ``announced`` bytes that could not fit the budget."""
        budget = self.admission
        if budget.held - self.size + announced > budget.max_bytes:
            raise budget.busy()

    def add(self, n: int) -> None:
        """Hold ``n`` more bytes; 503 (and nothing held) when they do not fit."""
        budget = self.admission
        if budget.held + n > budget.max_bytes:
            raise budget.busy()
        budget.held += n
        self.size += n

    def release(self) -> None:
        """Give every byte held back to the budget."""
        self.admission.held -= self.size
        self.size = 0

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()
