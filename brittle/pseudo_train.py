"""Training the pseudo-margin network on holdout features and input margins."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from brittle.pseudo import PseudoMargin

__all__ = ["PseudoTraining", "train_pseudo_margin", "MIN_TRAIN_SAMPLES"]

# Fewest samples the network trains on (80 % fit, 20 % early-stopping validation).
MIN_TRAIN_SAMPLES = 100


@dataclass(frozen=True)
class PseudoTraining:
    """How the pseudo-margin network was trained."""

    n_train: int
    n_val: int
    epochs: int
    best_epoch: int
    val_mse: float
    scale: float


def normalised_target(margins: Tensor, scale: float) -> Tensor:
    """Input margins divided by ``scale`` and clipped to ``[0, 1]``; censored -> 1."""
    return (margins / scale).nan_to_num(posinf=1.0).clamp(0.0, 1.0)


def train_pseudo_margin(
    features: Tensor,
    margins: Tensor,
    *,
    hidden: int = 512,
    lr: float = 1e-3,
    batch_size: int = 128,
    max_epochs: int = 300,
    patience: int = 20,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[PseudoMargin, PseudoTraining]:
    """Fit ``PseudoMargin`` to regress normalised input margins (MSE, Adam).

    Args:
        features: ``(n, d)`` penultimate features, on the device to train on.
        margins: ``(n,)`` input margins, ``inf`` where censored.
        hidden: Width of the hidden layers.
        lr: Adam learning rate.
        batch_size: Mini-batch size.
        max_epochs: Upper bound on epochs.
        patience: Epochs without a better validation MSE before stopping.
        val_fraction: Share of samples held out for early stopping.
        seed: Seeds the initialisation, the split and the shuffling.

    Returns:
        The network (weights of the best validation epoch, eval mode) and a summary.
    """
    n = features.shape[0]
    if n < MIN_TRAIN_SAMPLES:
        raise ValueError(
            f"the pseudo-margin network needs at least {MIN_TRAIN_SAMPLES} training samples. "
            f"Got {n}."
        )
    margins = margins.to(features.device, torch.float32)
    finite = margins[torch.isfinite(margins)]
    scale = float(finite.max()) if finite.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    target = normalised_target(margins, scale)

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(features.device)
    n_val = max(1, int(round(n * val_fraction)))
    val, train = order[:n_val], order[n_val:]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = PseudoMargin(features.shape[1], hidden).to(features.device)
    net.mean.copy_(features[train].mean(dim=0))
    net.std.copy_(features[train].std(dim=0).clamp_min(1e-6).nan_to_num(1.0))
    net.scale.fill_(scale)
    optimiser = torch.optim.Adam(net.net.parameters(), lr=lr)

    best_state, best_mse, best_epoch, epoch = copy.deepcopy(net.state_dict()), math.inf, 0, 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        for idx in train[torch.randperm(train.numel(), generator=generator).to(train.device)].split(
            batch_size
        ):
            optimiser.zero_grad()
            loss = torch.nn.functional.mse_loss(net.normalised(features[idx]), target[idx])
            loss.backward()
            optimiser.step()
        net.eval()
        with torch.no_grad():
            mse = float(torch.nn.functional.mse_loss(net.normalised(features[val]), target[val]))
        if mse < best_mse - 1e-7:
            best_state, best_mse, best_epoch = copy.deepcopy(net.state_dict()), mse, epoch
        elif epoch - best_epoch >= patience:
            break
    net.load_state_dict(best_state)
    net.eval()
    info = PseudoTraining(
        n_train=int(train.numel()),
        n_val=int(n_val),
        epochs=epoch,
        best_epoch=best_epoch,
        val_mse=float(np.float64(best_mse)),
        scale=scale,
    )
    return net, info
