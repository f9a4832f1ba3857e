"""Max-pooling through PyTorch's channels-last CPU kernel, for the attack's many passes.

PyTorch's CPU ``max_pool2d`` on a contiguous (NCHW) tensor is several times
slower than on a channels-last one, whose kernel is vectorised over channels
(pytorch/pytorch#51393, #28733): on the digits CNN's 64 x 8 x 8 maps it took
1.7 ms per 91 samples against 0.24 ms through a channels-last copy, a fifth
of the attack's time. The attack runs the model a few hundred times per
sample, so ``FastPooling`` runs it with every ``F.max_pool2d`` call on such a
tensor routed through ``channels_last_max_pool2d``: the same kernel's
arithmetic on a channels-last copy, whose maxima and indices are those of the
contiguous kernel (a maximum is exact), and the contiguous kernel's backward.
Outputs and gradients are bitwise equal to ``F.max_pool2d``'s; the user's
model is not changed, and other threads are not affected (PyTorch keeps its
function modes per thread).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["FastPooling", "channels_last_max_pool2d", "MIN_CHANNELS"]

# Fewer channels than this (an RGB input) gain nothing from the channels-last kernel,
# vectorised over channels, and pay for the copy.
MIN_CHANNELS = 16
_FLOATS = (torch.float32, torch.float64)
_SIGNATURE = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)


def _pair(value: Any) -> list[int]:
    return [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]


class _ChannelsLastMaxPool(torch.autograd.Function):
    """``max_pool2d`` forward on a channels-last copy, backward by the contiguous kernel."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        kernel: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        ceil_mode: bool,
    ) -> Tensor:
        copy = x.contiguous(memory_format=torch.channels_last)
        args = (kernel, stride, padding, dilation, ceil_mode)
        if ctx.needs_input_grad[0]:
            out, indices = torch.ops.aten.max_pool2d_with_indices(copy, *args)
            # Indices count positions within each (H, W) plane, whatever the layout.
            ctx.save_for_backward(x, indices.contiguous())
            ctx.args = args
        else:
            out = torch.ops.aten.max_pool2d(copy, *args)
        return out.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *ctx.args, indices
        )
        return grad_x, None, None, None, None, None


def channels_last_max_pool2d(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """``F.max_pool2d`` of a contiguous ``(N, C, H, W)`` tensor, through the channels-last kernel.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> x = torch.rand(2, 32, 8, 8, requires_grad=True)
        >>> torch.equal(channels_last_max_pool2d(x, 2), F.max_pool2d(x, 2))
        True
    """
    kernel = _pair(kernel_size)
    steps = kernel if stride is None or stride == () else _pair(stride)
    out: Tensor = _ChannelsLastMaxPool.apply(
        x, kernel, steps, _pair(padding), _pair(dilation), bool(ceil_mode)
    )
    return out


def _routed(x: Any) -> bool:
    """Whether a pooling input gains from the channels-last kernel (and may take it)."""
    return (
        isinstance(x, Tensor)
        and x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype in _FLOATS
        and x.shape[1] >= MIN_CHANNELS
        and x.is_contiguous()
    )


class _Route(TorchFunctionMode):
    """Sends ``F.max_pool2d`` calls that gain from it to ``channels_last_max_pool2d``."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.max_pool2d:
            bound = dict(zip(_SIGNATURE, args, strict=False)) | kwargs
            if not bound.get("return_indices", False) and _routed(bound.get("input")):
                bound.pop("return_indices", None)
                x = bound.pop("input")
                return channels_last_max_pool2d(x, **bound)
        return func(*args, **kwargs)


class FastPooling(nn.Module):
    """``model``, run with its max-pooling through the channels-last CPU kernel.

    Only inside this module's forward, on the calling thread: the model itself is
    not changed. Logits and gradients are bitwise those of ``model``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.Flatten())
        >>> x = torch.rand(4, 1, 10, 10)
        >>> torch.equal(FastPooling(model)(x), model(x))
        True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        """The model's output for ``x``."""
        with _Route():
            return self.model(x)
