"""An array of floats as JSON numbers: NaN as ``null``, an infinity beyond the dtype's range.

JSON has no NaN and no infinity. NaN marks a sample the monitor rejected
(margin and logits), and ``null`` stands for it in both protocols. An infinite
margin is a judged sample whose logits differ by more than the dtype holds
(``3e38 - (-3e38)`` in float32), not a rejected one: it is written as twice the
dtype's largest value, a JSON number that numpy reads back as the same infinity
when it casts to the tensor's datatype, as ``tritonclient.http`` and MLServer's
codecs do (``np.array(data, dtype=np.float32)``). float64 has no finite number
beyond its range, so there an infinity is its largest value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["json_floats"]


def json_floats(values: np.ndarray) -> list[Any]:
    """The values of a float array as a flat list of JSON numbers, NaN as ``None``.

    Args:
        values: A float array of any shape (read row-major).

    Returns:
        Python floats and ``None``: NaN is ``None``; ``±inf`` is ``±2 * finfo.max``
        of the array's dtype (``±finfo.max`` for float64).

    Examples:
        >>> import numpy as np
        >>> out = json_floats(np.array([1.5, np.nan, np.inf], dtype=np.float32))
        >>> out
        [1.5, None, 6.805646932770577e+38]
        >>> np.array(out, dtype=np.float32)
        array([1.5, nan, inf], dtype=float32)
    """
    flat = values.reshape(-1)
    beyond = float(np.finfo(flat.dtype).max)
    if flat.dtype != np.float64:
        beyond *= 2
    return [
        v if math.isfinite(v) else None if v != v else math.copysign(beyond, v)
        for v in flat.tolist()
    ]
