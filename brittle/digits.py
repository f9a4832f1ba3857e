"""Scikit-learn's digits as a real, download-free benchmark: data and small CNNs.

The 1,797 8x8 digit images ship inside scikit-learn. A standard CNN and a
PGD-trained one (torchattacks' PGD) train in seconds on a CPU; the tests, the
examples and ``python -m brittle.check --demo`` use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DigitsSplit", "load_digits_split", "digits_cnn", "train_digits_cnn", "digits_model"]

Kind = Literal["standard", "robust"]
# PGD budget of the robust model: digits have 17 grey levels (steps of 1/16), so
# 8/255 is below one level; 0.1 is about one and a half.
ROBUST_EPS = 0.1


class DigitsSplit(NamedTuple):
    """Train and holdout tensors; images ``(N, 1, 8, 8)`` in ``[0, 1]``."""

    x_train: Tensor
    y_train: Tensor
    x_holdout: Tensor
    y_holdout: Tensor


def load_digits_split(holdout: float = 0.4, seed: int = 0) -> DigitsSplit:
    """Scikit-learn's digits, scaled to ``[0, 1]`` and split with a seeded permutation.

    Examples:
        >>> from brittle.digits import load_digits_split
        >>> split = load_digits_split()
        >>> split.x_train.shape, split.x_holdout.shape
        (torch.Size([1078, 1, 8, 8]), torch.Size([719, 1, 8, 8]))
    """
    from sklearn.datasets import load_digits

    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1). Got {holdout}.")
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    cut = int(round(len(y) * (1.0 - holdout)))
    train, rest = order[:cut], order[cut:]
    return DigitsSplit(x[train], y[train], x[rest], y[rest])


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A small CNN for 8x8 digits; its last layer is an ``nn.Linear`` on 64 features."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def train_digits_cnn(
    kind: Kind = "standard",
    *,
    epochs: int = 30,
    eps: float = ROBUST_EPS,
    seed: int = 0,
    split: DigitsSplit | None = None,
) -> nn.Sequential:
    """Train ``digits_cnn`` normally or with PGD adversarial training (Linf, ``eps``).

    Seeded and CPU-friendly (seconds for the standard model, about half a minute
    for the robust one on 2 cores). Returns the model in eval mode.
    """
    import torchattacks

    if kind not in ("standard", "robust"):
        raise ValueError(f"kind must be 'standard' or 'robust'. Got {kind!r}.")
    split = split or load_digits_split()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = digits_cnn()
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        pgd = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=7, random_start=True)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(split.y_train), generator=generator).split(64):
                x, y = split.x_train[idx], split.y_train[idx]
                if kind == "robust":
                    x = pgd(x, y)
                model.train()
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimiser.step()
        # A freshly trained model looks like a loaded one: no .grad left behind.
        optimiser.zero_grad(set_to_none=True)
    return model.eval()


def _cache_dir() -> Path:
    root = os.environ.get("BRITTLE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "brittle" if root else Path.home() / ".cache" / "brittle"


def digits_model(kind: Kind = "standard", cache_dir: str | Path | None = None) -> nn.Sequential:
    """A trained digits CNN, loaded from ``cache_dir`` or trained and cached there.

    The cache holds a plain ``state_dict`` (loaded with ``weights_only=True``).
    """
    path = Path(cache_dir) if cache_dir is not None else _cache_dir()
    path = path / f"digits-{kind}-v1.pt"
    model = digits_cnn()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train_digits_cnn(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a unique name then renamed, so processes training at once
    # (the ranks of a distributed run) never read a half-written file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model
