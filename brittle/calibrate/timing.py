"""``timed``: wall time of named steps, for the timings that reports carry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["timed"]


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Add the block's wall time to ``timings[step]`` (steps that run twice add up).

    Examples:
        >>> timings: dict[str, float] = {}
        >>> with timed(timings, "fit"):
        ...     pass
        >>> with timed(timings, "fit"):
        ...     pass
        >>> list(timings), timings["fit"] >= 0
        (['fit'], True)
    """
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start
