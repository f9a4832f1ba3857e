"""The pseudo-margin network: penultimate features and sorted logits -> a margin score."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PseudoMargin", "QUANTILES", "HIDDEN"]

# Width of the hidden layers unless given (the paper's).
HIDDEN = 512
# Points of the piecewise-linear map from the network's rank estimate back to
# input-margin units (a quantile function of the training margins).
QUANTILES = 64


class PseudoMargin(nn.Module):
    """Five dense layers of ``hidden`` units (4 hidden ReLU layers) with a sigmoid output.

    The input is the penultimate feature vector beside the logits sorted in
    descending order, each standardised with fitted buffers. The network is
    trained for ranking (``brittle.calibrate.pseudo_train``): its sigmoid output
    estimates the *rank* of the sample's input margin, in ``[0, 1]``. A fitted,
    strictly increasing piecewise-linear map (the training margins' quantile
    function) turns that rank back into input-margin units, so the score reads
    as an estimate of the input margin while its ranking, and so Kendall tau,
    is the network's own. Lower means more brittle.

    Everything fitted is a parameter or a buffer: the module saves and loads
    with ``torch.load(weights_only=True)`` and exports to ONNX (sorting, gather
    and floor only).

    Args:
        in_features: Size of the penultimate feature vector.
        num_classes: Number of logits.
        hidden: Width of the four hidden layers.

    Examples:
        >>> import torch
        >>> from brittle.scores.pseudo import PseudoMargin
        >>> net = PseudoMargin(16, num_classes=10)
        >>> net(torch.randn(3, 16), torch.randn(3, 10)).shape
        torch.Size([3])
    """

    feature_mean: Tensor
    feature_std: Tensor
    logit_mean: Tensor
    logit_std: Tensor
    quantiles: Tensor

    def __init__(self, in_features: int, num_classes: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2 or hidden < 1:
            raise ValueError(
                "in_features and hidden must be positive and num_classes at least 2. "
                f"Got in_features={in_features}, num_classes={num_classes}, hidden={hidden}."
            )
        layers: list[nn.Module] = []
        width = in_features + num_classes
        for _ in range(4):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers += [nn.Linear(hidden, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.register_buffer("logit_mean", torch.zeros(num_classes))
        self.register_buffer("logit_std", torch.ones(num_classes))
        # Identity map until fitted: the score is the rank estimate itself.
        self.register_buffer("quantiles", torch.linspace(0.0, 1.0, QUANTILES + 1))

    @property
    def in_features(self) -> int:
        """Size of the feature vector the network expects."""
        return self.feature_mean.numel()

    @property
    def num_classes(self) -> int:
        """Number of logits the network expects."""
        return self.logit_mean.numel()

    def inputs(self, features: Tensor, logits: Tensor) -> Tensor:
        """Standardised features beside the standardised, descending-sorted logits.

        Both are cast to the network's dtype: a monitor fitted (or loaded) on a
        float64 or half-precision model hands it the model's own dtype.
        """
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape (batch, {self.in_features}). "
                f"Got {tuple(features.shape)}."
            )
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (batch, {self.num_classes}). Got {tuple(logits.shape)}."
            )
        dtype = self.feature_mean.dtype
        features = features.to(dtype)
        ordered = logits.to(dtype).sort(dim=1, descending=True).values
        return torch.cat(
            [
                (features - self.feature_mean) / self.feature_std,
                (ordered - self.logit_mean) / self.logit_std,
            ],
            dim=1,
        )

    def rank(self, features: Tensor, logits: Tensor) -> Tensor:
        """The network's estimate of the margin's rank in ``[0, 1]``, shape ``(B,)``."""
        return self.net(self.inputs(features, logits)).squeeze(1)

    def forward(self, features: Tensor, logits: Tensor) -> Tensor:
        """Pseudo-margin per sample in input-margin units, shape ``(B,)``; lower is more brittle.

        Args:
            features: ``(B, in_features)`` inputs of the model's last linear layer.
            logits: ``(B, num_classes)`` outputs of the model.
        """
        return rank_to_margin(self.rank(features, logits), self.quantiles)


def rank_to_margin(rank: Tensor, quantiles: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``quantiles`` (evenly spaced knots on ``[0, 1]``).

    Written with ``floor`` and indexing (no ``searchsorted``) so that it exports to ONNX.
    A NaN rank (from logits the model made non-finite) gives a NaN margin: it reads
    knot 0 and its NaN fraction carries through, where casting NaN to an index
    would read far outside the knots.

    Examples:
        >>> import torch
        >>> from brittle.scores.pseudo import rank_to_margin
        >>> rank_to_margin(torch.tensor([0.25, float("nan")]), torch.tensor([0.0, 1.0, 3.0]))
        tensor([0.5000,    nan])
    """
    segments = quantiles.numel() - 1
    position = rank.clamp(0.0, 1.0) * segments
    low = position.floor().nan_to_num(0.0).clamp(max=segments - 1)
    frac = position - low
    index = low.long()
    start, end = quantiles[index], quantiles[index + 1]
    return start + frac * (end - start)
