"""glibc's heap kept for the attack's passes, instead of handed back and faulted in again.

An attack runs the model a few hundred times per sample, on batches that
shrink as samples finish. glibc's ``free`` hands the top of its heap back to
the system once more than its trim threshold lies free there, and the next
pass faults those pages in again, zeroed. Both thresholds start low and are
raised by glibc itself when a block it mapped on its own (``mmap``) is freed:
the mmap threshold to that block's size, at most 32 MiB on 64-bit systems,
and the trim threshold to twice that. A process that has freed one large
tensor (a batch of images, a model's weights) has them raised already; a small
model's attack in a fresh process has not, and spent a fifth of its CPU time
in page faults (55,000-60,000 on 128 digits; ``benchmarks/README.md``).

``settle_heap`` frees one untouched block of just under 32 MiB, once per
process: what such a process would have done, with the same effect. The
process may then keep up to 64 MiB of freed memory for its next allocations
instead of handing it back. Nothing is set: a threshold fixed by the user
(``mallopt``, ``GLIBC_TUNABLES``) stays as it is, and on other C libraries
nothing is done. A process that must hand freed
memory back at once sets ``SETTLED`` before its first attack.
"""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["settle_heap", "BLOCK_BYTES", "SETTLED"]

# Just under glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX,
# 32 MiB on 64-bit systems): a freed mapped block raises the threshold only when
# its size, page-rounded with its header, is at most that.
BLOCK_BYTES = 32 * 2**20 - 2 * 4096
# Set once the block was freed. Set it before the first attack to leave glibc's
# thresholds as they are (a process that must hand freed memory back at once).
SETTLED = threading.Event()


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):  # not a glibc system
        return False


def settle_heap() -> bool:
    """Raise glibc's mmap and trim thresholds as a freed 32 MiB block does, once per process.

    Returns:
        Whether this call freed the block (``False`` when an earlier call did, or
        the C library is not glibc).

    Examples:
        >>> from brittle.attacks.heap import settle_heap
        >>> _ = settle_heap()
        >>> settle_heap()
        False
    """
    if SETTLED.is_set() or not _glibc():
        return False
    SETTLED.set()
    block = torch.empty(BLOCK_BYTES, dtype=torch.uint8)  # mapped, never touched
    del block
    return True
