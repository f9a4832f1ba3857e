"""The argument checks shared across layers (``brittle.arguments``)."""

from __future__ import annotations

import numpy as np
import pytest

from brittle.arguments import is_range, positive_int
from brittle.deploy.alarm import FlagRateAlarm


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (1, True),
        (7, True),
        (np.int64(7), True),
        (np.uint8(3), True),
        (0, False),
        (-3, False),
        (True, False),
        (np.bool_(True), False),
        (2.0, False),
        ("3", False),
        (None, False),
    ],
)
def test_positive_int_accepts_integers_only(value: object, ok: bool) -> None:
    if ok:
        number = positive_int("n", value)
        assert number == value and type(number) is int
    else:
        with pytest.raises(ValueError, match=r"^n must be a positive integer\. Got "):
            positive_int("n", value)


def test_positive_int_minimum_and_wording() -> None:
    assert positive_int("opset", 18, minimum=17) == 18
    with pytest.raises(ValueError, match=r"^opset must be an integer >= 17\. Got 13\.$"):
        positive_int("opset", 13, minimum=17)
    with pytest.raises(ValueError, match=r"^max_body must be a positive number of bytes\."):
        positive_int("max_body", 0, what="a positive number of bytes")


def test_numpy_integers_reach_the_entry_points() -> None:
    # Before, a numpy integer (a count computed with numpy) was refused as "not a
    # positive integer", with its value quoted in the message.
    alarm = FlagRateAlarm((10, 400), lag=np.int64(50))
    assert alarm.lag == 50 and type(alarm.lag) is int


@pytest.mark.parametrize(
    ("low", "high", "ok"),
    [
        (0.0, 1.0, True),
        (0.5, 0.5, True),
        (1.0, 0.0, False),
        (0.0, float("inf"), False),
        (float("nan"), 1.0, False),
        (-float("inf"), 0.0, False),
    ],
)
def test_is_range(low: float, high: float, ok: bool) -> None:
    assert is_range(low, high) is ok
