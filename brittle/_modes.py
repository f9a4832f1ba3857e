"""Context managers that borrow a user's model and hand it back unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from torch import nn

__all__ = ["eval_mode", "frozen", "changes_in_train_mode"]


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
)


def changes_in_train_mode(model: nn.Module) -> bool:
    """Whether some batch-norm or dropout layer of ``model`` is in train mode.

    Examples:
        >>> from torch import nn
        >>> from brittle._modes import changes_in_train_mode
        >>> changes_in_train_mode(nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train())
        True
        >>> changes_in_train_mode(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).train())
        False
    """
    return any(m.training and isinstance(m, _MODE_DEPENDENT) for m in model.modules())


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
