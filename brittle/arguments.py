"""Checks of arguments shared across brittle's layers (no torch: the serving path uses them)."""

from __future__ import annotations

import contextlib
import math
import numbers
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["positive_int", "is_range", "are_bounds", "file_path", "parent_folders", "written_whole"]


def positive_int(name: str, value: object, *, minimum: int = 1, what: str = "") -> int:
    """``value`` as an ``int`` when it is an integer of at least ``minimum``; else ``ValueError``.

    Any integral number passes (``int``, ``numpy.int64``), booleans do not: ``True``
    is an ``int`` to Python but never a count the caller meant.

    Args:
        name: The argument's name, for the message.
        value: What the caller passed.
        minimum: The smallest value allowed.
        what: What the message says the argument must be (default: "a positive
            integer", or "an integer >= minimum").

    Returns:
        ``value`` as a plain ``int``.

    Raises:
        ValueError: ``value`` is not an integer, is a boolean, or is below ``minimum``.

    Examples:
        >>> import numpy as np
        >>> from brittle.arguments import positive_int
        >>> positive_int("n_samples", np.int64(200))
        200
        >>> positive_int("lag", True)
        Traceback (most recent call last):
            ...
        ValueError: lag must be a positive integer. Got True.
    """
    if (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and int(value) >= minimum
    ):
        return int(value)
    if not what:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name} must be {what}. Got {value!r}.")


def is_range(low: float, high: float) -> bool:
    """Whether ``[low, high]`` is a range of values an input may take: finite, ``low <= high``.

    Args:
        low: The smallest value.
        high: The largest value.

    Returns:
        ``True`` when both are finite and ``low <= high``.

    Examples:
        >>> from brittle.arguments import is_range
        >>> is_range(0.0, 1.0), is_range(1.0, 0.0), is_range(0.0, float("inf"))
        (True, False, False)
    """
    return math.isfinite(low) and math.isfinite(high) and low <= high


def are_bounds(values: Sequence[float]) -> bool:
    """Whether ``values`` are histogram bounds: finite and strictly increasing.

    Examples:
        >>> from brittle.arguments import are_bounds
        >>> are_bounds([0.1, 0.2]), are_bounds([0.2, 0.1]), are_bounds([0.1, float("inf")])
        (True, False, False)
    """
    return all(math.isfinite(v) for v in values) and all(
        a < b for a, b in zip(values, values[1:], strict=False)
    )


def file_path(path: str | Path, what: str, example: str) -> Path:
    """``path`` as a ``Path`` to write a file to; ``IsADirectoryError`` when it is a folder.

    Args:
        path: Where the caller asked the file to go.
        what: The file, for the message ("the monitor file").
        example: A file name to suggest inside the folder.

    Returns:
        ``Path(path)``.

    Examples:
        >>> import tempfile
        >>> from brittle.arguments import file_path
        >>> file_path(tempfile.gettempdir(), "the ONNX file", "m.onnx")
        Traceback (most recent call last):
            ...
        IsADirectoryError: '...' is a directory; give the ONNX file's path, such as '...m.onnx'.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a directory; give {what}'s path, such as {str(path / example)!r}."
        )
    return path


@contextlib.contextmanager
def parent_folders(path: Path) -> Iterator[None]:
    """Create ``path``'s missing parent folders; remove them again if the block fails.

    Only the folders this call created are removed (innermost first, each only if
    it is still empty): a folder that existed before is never touched, and a
    failed write leaves the file system as it was.

    Args:
        path: The file about to be written.

    Examples:
        >>> import shutil, tempfile
        >>> from pathlib import Path
        >>> from brittle.arguments import parent_folders
        >>> root = Path(tempfile.mkdtemp())
        >>> try:
        ...     with parent_folders(root / "a" / "b" / "m.pt"):
        ...         raise OSError("disk full")
        ... except OSError:
        ...     pass
        >>> (root / "a").exists()
        False
        >>> shutil.rmtree(root)
    """
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in created:  # innermost first; each is empty unless someone wrote there
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A new temporary file beside ``path`` to write in the block, then renamed onto it.

    The file has a name of its own (``<name>.<16 hex>.tmp``, created exclusively),
    so two writers of one path at once, threads or processes, never write, rename
    or delete each other's: ``path`` holds one of their files, whole. It is created
    as ``open`` creates a file, readable by whom the umask allows (not private, as
    ``tempfile.mkstemp`` makes it), since it becomes the written file. If the block
    fails, the temporary file is removed and ``path`` is left as it was.

    Args:
        path: The file to write; its folder must exist.

    Yields:
        The temporary file's path.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from brittle.arguments import written_whole
        >>> target = Path(tempfile.mkdtemp()) / "m.txt"
        >>> with written_whole(target) as tmp:
        ...     _ = tmp.write_text("whole")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('whole', ['m.txt'])
    """
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            with open(tmp, "xb"):
                break
        except FileExistsError:  # another writer's file of that name: draw again
            continue
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written copy left beside the target
        raise
