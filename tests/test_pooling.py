"""The attack's max-pooling through the channels-last kernel: bitwise F.max_pool2d, no more."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brittle.attacks import pooling
from brittle.attacks.attack import AttackSettings, attack_batch
from brittle.attacks.fab import fab_attack
from brittle.attacks.pooling import FastPooling, channels_last_max_pool2d
from brittle.digits import DigitsSplit

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    ((6, 64, 8, 8), {"kernel_size": 2}),
    ((3, 32, 16, 16), {"kernel_size": 3, "stride": 2, "padding": 1}),  # ResNet's stem
    ((2, 16, 7, 9), {"kernel_size": 2}),  # odd sizes: the last row and column dropped
    ((2, 16, 7, 9), {"kernel_size": 2, "ceil_mode": True}),
    ((2, 24, 11, 11), {"kernel_size": (3, 2), "stride": (2, 1), "dilation": (1, 2)}),
    ((1, 16, 4, 4), {"kernel_size": 4, "stride": ()}),
]


@pytest.mark.parametrize(("shape", "kwargs"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_the_library_forward_and_backward(shape, kwargs, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    # ReLU zeros and rounding to quarters tie many windows: the gradient must go to
    # the same position of each as the library's (its first maximum).
    x = (torch.relu(torch.randn(shape, generator=gen, dtype=dtype)) * 4).round() / 4
    x[0, 0, 0, 0], x[-1, -1, 1, 1] = math.nan, -math.inf
    x.requires_grad_(True)
    ours, theirs = channels_last_max_pool2d(x, **kwargs), F.max_pool2d(x, **kwargs)
    assert ours.is_contiguous() and ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    grad = torch.randn(theirs.shape, generator=gen, dtype=dtype)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_theirs,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():  # the forward without indices
        torch.testing.assert_close(
            channels_last_max_pool2d(x, **kwargs), theirs, rtol=0, atol=0, equal_nan=True
        )


class _Pools(nn.Module):
    """Pooling as models call it: a module, the functional form with keywords, indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.MaxPool2d(2)(x)
        b = F.max_pool2d(x, kernel_size=2, stride=2)
        c, _ = F.max_pool2d(x, 2, return_indices=True)
        return a + b + c


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread of each call routed to ``channels_last_max_pool2d``."""
    calls: list[str] = []
    real = pooling.channels_last_max_pool2d

    def counting(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(pooling, "channels_last_max_pool2d", counting)
    return calls


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        # The module and the keyword call are routed; the call that wants indices is not.
        (torch.rand(2, 16, 8, 8), 2),
        # Three channels (an image): the channels-last kernel gains nothing there.
        (torch.rand(2, 3, 8, 8), 0),
        # Another layout or dtype: the library's own path.
        (torch.rand(2, 16, 8, 8).mT, 0),
        (torch.rand(2, 16, 8, 8, dtype=torch.bfloat16), 0),
    ],
    ids=["16-channels", "3-channels", "transposed", "bfloat16"],
)
def test_only_pooling_that_gains_is_routed(
    routed: list[str], x: torch.Tensor, expected: int
) -> None:
    model = _Pools()
    torch.testing.assert_close(FastPooling(model)(x), model(x), rtol=0, atol=0)
    assert len(routed) == expected


def test_other_threads_pool_as_usual(routed: list[str]) -> None:
    inside, done = threading.Event(), threading.Event()

    class Waits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inside.set()
            assert done.wait(30)
            return F.max_pool2d(x, 2)

    def other() -> None:
        assert inside.wait(30)
        F.max_pool2d(torch.rand(2, 16, 8, 8), 2)  # while the main thread is in the mode
        done.set()

    thread = threading.Thread(target=other, name="other")
    thread.start()
    FastPooling(Waits())(torch.rand(2, 16, 8, 8))
    thread.join(30)
    assert routed == ["MainThread"]


def test_margins_are_those_of_the_model_as_given(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    """The engine through FastPooling gives bitwise the margins of the plain model."""
    x = digits.x_holdout[:24]
    with torch.no_grad():
        pred = robust_model(x).argmax(dim=1)
    settings = AttackSettings("Linf", steps=30)
    through = attack_batch(robust_model, x, pred, settings, "brittle")  # uses FastPooling
    plain = fab_attack(robust_model, x, pred, norm="Linf", steps=30).margin
    torch.testing.assert_close(through, plain.double(), rtol=0, atol=0)


def test_a_compiled_model_is_attacked_without_the_routing(
    routed: list[str], robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # A compiled model pools with its compiler's kernels: tracing through the routing
    # only cost compile time (1.9 s -> 3.8 s for 16 digits with the default compiler).
    x = digits.x_holdout[:8]
    with torch.no_grad():
        pred = robust_model(x).argmax(dim=1)
    settings = AttackSettings("Linf", steps=10)
    compiled = torch.compile(robust_model, backend="eager")
    margins = attack_batch(compiled, x, pred, settings, "brittle")
    assert not routed
    torch.testing.assert_close(
        margins, attack_batch(robust_model, x, pred, settings, "brittle"), rtol=0, atol=0
    )
    assert routed  # the plain model's pooling is routed
