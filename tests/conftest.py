"""Seeded, session-scoped fixtures: scikit-learn's digits and two trained CNNs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from brittle.digits import DigitsSplit, digits_model, load_digits_split

# Budget for the digits models: about one and a half grey levels (see brittle.digits).
DIGITS_EPS = 0.1


@pytest.fixture(scope="session")
def digits() -> DigitsSplit:
    return load_digits_split()


@pytest.fixture(scope="session")
def model_cache(request: pytest.FixtureRequest) -> Path:
    # pytest's cache directory keeps the trained weights between runs; a fresh
    # clone trains them once per session (about 45 s on 2 cores).
    return Path(request.config.cache.mkdir("brittle-digits-models"))


@pytest.fixture(scope="session")
def standard_model(model_cache: Path) -> nn.Module:
    return digits_model("standard", cache_dir=model_cache)


@pytest.fixture(scope="session")
def robust_model(model_cache: Path) -> nn.Module:
    return digits_model("robust", cache_dir=model_cache)


@pytest.fixture(scope="session")
def holdout_loader(digits: DigitsSplit) -> DataLoader:
    return DataLoader(TensorDataset(digits.x_holdout, digits.y_holdout), batch_size=100)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
