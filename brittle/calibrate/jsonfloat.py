"""Floats in strict JSON and back, exactly: NaN as ``null``, ±inf as ``"Infinity"``.

JSON has neither NaN nor infinity. A report holds both, with different meanings:
an infinite input margin is a censored one (no adversarial found), a NaN score
or rate one that does not exist. Writing both as ``null`` made a censored margin
indistinguishable from a missing one, and a score or threshold of ±inf came back
as NaN. ``"Infinity"`` and ``"-Infinity"`` are what both Python's ``float`` and
JavaScript's ``Number`` read as infinities.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["dump_float", "load_float", "dump_floats", "load_floats"]

_INFINITIES = {"Infinity": math.inf, "-Infinity": -math.inf}


def dump_float(value: float) -> float | str | None:
    """``value`` as a strict JSON value: NaN is ``None``, ±inf ``"Infinity"``/``"-Infinity"``.

    Examples:
        >>> dump_float(0.5), dump_float(float("nan")), dump_float(float("-inf"))
        (0.5, None, '-Infinity')
    """
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return None
    return "Infinity" if value > 0 else "-Infinity"


def load_float(value: float | str | None, null: float = math.nan) -> float:
    """The float ``dump_float`` wrote; ``null`` for ``None`` (NaN unless told otherwise).

    Raises:
        ValueError: for a string other than ``"Infinity"`` and ``"-Infinity"``.

    Examples:
        >>> load_float("Infinity"), load_float(None), load_float(2)
        (inf, nan, 2.0)
    """
    if value is None:
        return null
    if isinstance(value, str):
        if value not in _INFINITIES:
            raise ValueError(f"expected a number, null, 'Infinity' or '-Infinity'. Got {value!r}.")
        return _INFINITIES[value]
    return float(value)


def dump_floats(values: Iterable[float] | np.ndarray) -> list[float | str | None]:
    """``dump_float`` of each value, as a flat list.

    Examples:
        >>> import numpy as np
        >>> dump_floats(np.array([1.0, np.inf, np.nan]))
        [1.0, 'Infinity', None]
    """
    return [dump_float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1).tolist()]


def load_floats(values: Iterable[Any], null: float = math.nan) -> np.ndarray:
    """``load_float`` of each value, as a float64 array.

    Examples:
        >>> load_floats([1.0, "Infinity", None])
        array([ 1., inf, nan])
    """
    return np.array([load_float(v, null) for v in values], dtype=np.float64)
