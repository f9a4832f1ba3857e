"""Timing shared by the benchmark scripts: interleaved repeats, medians of CPU and wall time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """Median (CPU seconds, wall seconds) per call of each function, calls interleaved.

    CPU time (``time.process_time``, all threads of this process) is the figure the
    ratios use: on a CPU shared with other jobs, wall time also counts the periods
    this process waits for a core, which hit variants at random.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in fns}
