"""Context managers that borrow a user's model or torch's random state and hand it back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["eval_mode", "frozen", "changes_in_train_mode", "seeded"]


class _HasModules(Protocol):
    """An ``nn.Module``, or a protocol of one (``brittle.protocol.MonitorProtocol``)."""

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> Any: ...


# Layers whose output depends on train mode: batch statistics or random masks.
_MODE_DEPENDENT = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)


# Layers whose output depends on train mode only with some settings: instance norm
# with running statistics, attention with dropout.
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _depends_on_mode(module: nn.Module) -> bool:
    if isinstance(module, _MODE_DEPENDENT):
        return True
    if isinstance(module, _INSTANCE_NORMS):
        return bool(module.track_running_stats)
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return False


def changes_in_train_mode(model: nn.Module) -> bool:
    """Whether some layer of ``model`` whose output depends on train mode is in it.

    Those are batch norm, instance norm with running statistics, dropout, RReLU
    (random slopes) and multi-head attention with dropout.

    Examples:
        >>> from torch import nn
        >>> from brittle._modes import changes_in_train_mode
        >>> changes_in_train_mode(nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train())
        True
        >>> changes_in_train_mode(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).train())
        False
        >>> changes_in_train_mode(nn.MultiheadAttention(4, 2, dropout=0.1).train())
        True
    """
    return any(m.training and _depends_on_mode(m) for m in model.modules())


@contextmanager
def eval_mode(model: _HasModules) -> Iterator[_HasModules]:
    """Put every submodule in eval mode, then restore each one's own flag.

    Restoring per submodule (not ``model.train(previous)``) keeps mixed states
    intact, such as a batch-norm layer frozen in eval inside a training model.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on the model's parameters for the block.

    Attacks then differentiate with respect to the input alone: no ``.grad`` is
    written into the user's parameters and no parameter gradient is computed.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@contextmanager
def seeded(seed: int, *devices: torch.device | str) -> Iterator[None]:
    """Seed torch's generators of the CPU and ``devices`` for a block, then restore them.

    ``torch.manual_seed`` reseeds the generator of every CUDA device, while
    ``torch.random.fork_rng`` restores only the devices it forked: together they
    would leave the other devices' random state changed. Here exactly the forked
    generators are seeded, so the caller's random state is the same after the block
    on any host. Only CUDA devices in ``devices`` are forked; others use the CPU's.

    Args:
        seed: The seed of every generator the block draws from.
        devices: Devices whose generators the block uses besides the CPU's.

    Examples:
        >>> import torch
        >>> state = torch.get_rng_state()
        >>> with seeded(0):
        ...     a = torch.rand(2)
        >>> with seeded(0, "cpu"):
        ...     b = torch.rand(2)
        >>> bool(torch.equal(a, b)), bool(torch.equal(torch.get_rng_state(), state))
        (True, True)
    """
    cuda = sorted(
        {
            torch.device(d).index
            if torch.device(d).index is not None
            else torch.cuda.current_device()
            for d in devices
            if torch.device(d).type == "cuda"
        }
    )
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
