"""The pseudo-margin network: features of the penultimate layer -> estimated input margin."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PseudoMargin"]


class PseudoMargin(nn.Module):
    """Five dense layers of ``hidden`` units with ReLU and a sigmoid output.

    Features are standardised with fitted buffers, and the sigmoid output in
    ``[0, 1]`` is scaled back to input-margin units, so the score reads as an
    estimate of the input margin.

    Args:
        in_features: Size of the penultimate feature vector.
        hidden: Width of the four hidden layers.

    Examples:
        >>> import torch
        >>> from brittle.pseudo import PseudoMargin
        >>> PseudoMargin(16)(torch.randn(3, 16)).shape
        torch.Size([3])
    """

    mean: Tensor
    std: Tensor
    scale: Tensor

    def __init__(self, in_features: int, hidden: int = 512) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1:
            raise ValueError(
                f"in_features and hidden must be positive. Got {in_features} and {hidden}."
            )
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
            nn.Sigmoid(),
        )
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.register_buffer("scale", torch.ones(()))

    def normalised(self, features: Tensor) -> Tensor:
        """The network's output in ``[0, 1]`` (the training target's units)."""
        return self.net((features - self.mean) / self.std).squeeze(1)

    def forward(self, features: Tensor) -> Tensor:
        """Estimated input margin per sample, shape ``(B,)``."""
        return self.normalised(features) * self.scale
