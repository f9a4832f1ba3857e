"""Seeded, session-scoped fixtures: scikit-learn's digits and three trained CNNs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.attacks.fab_references import stub_visdom
from brittle.digits import DigitsSplit, digits_model, load_digits_split

# adv-lib (a reference attack library of tests/test_references.py) imports visdom
# for its logger only; visdom's sdist no longer builds, so it is installed without
# it and an empty stand-in module is registered here (brittle.attacks.fab_references's
# stub_visdom: using the stand-in raises).
stub_visdom()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One PyTorch thread for a module of attacks (``pytest.mark.usefixtures``).

    FAB is thousands of small tensor ops; on a shared 2-core machine two OpenMP
    threads spin-waiting for each other made such a module over 10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Budget for the digits models: about one and a half grey levels (see brittle.digits).
DIGITS_EPS = 0.1


@pytest.fixture(scope="session")
def digits() -> DigitsSplit:
    return load_digits_split()


@pytest.fixture(scope="session")
def model_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A scratch directory for tests that want one; the digits models themselves ship
    # with brittle (digits_model ignores cache_dir and trains nothing).
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("brittle-digits-models")
    return Path(cache.mkdir("brittle-digits-models"))


@pytest.fixture(scope="session")
def standard_model(model_cache: Path) -> nn.Module:
    return digits_model("standard", cache_dir=model_cache)


@pytest.fixture(scope="session")
def robust_model(model_cache: Path) -> nn.Module:
    return digits_model("robust", cache_dir=model_cache)


@pytest.fixture(scope="session")
def certified_model(model_cache: Path) -> nn.Module:
    """The IBP-trained CNN: weakly margin-consistent (see brittle.digits.CERTIFIED_EPS)."""
    return digits_model("certified", cache_dir=model_cache)


@pytest.fixture(scope="session")
def holdout_loader(digits: DigitsSplit) -> DataLoader:
    return DataLoader(TensorDataset(digits.x_holdout, digits.y_holdout), batch_size=100)


@pytest.fixture(scope="session")
def pseudo_monitor(robust_model: nn.Module, holdout_loader: DataLoader) -> brittle.Monitor:
    """The robust CNN's monitor with a fitted pseudo-margin network (small attack budget)."""
    monitor = brittle.wrap(robust_model, eps=DIGITS_EPS, score="pseudo")
    # Few training samples for time: fit() rightly warns that the ranking is unreliable.
    with pytest.warns(UserWarning, match="trained on only 120 samples"):
        return monitor.fit(holdout_loader, n_samples=240, steps=10, progress=False, target_tpr=0.9)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
