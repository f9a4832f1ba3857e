"""Saving and loading monitors: weights_only files, fitted state kept, wrong models refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.digits import DigitsSplit, digits_cnn


@pytest.fixture(scope="module")
def fitted_pseudo(pseudo_monitor: brittle.Monitor) -> brittle.Monitor:
    return pseudo_monitor


def test_round_trip_keeps_everything(
    fitted_pseudo: brittle.Monitor, robust_model: nn.Module, digits: DigitsSplit, tmp_path
) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    raw = torch.load(path, weights_only=True)  # no pickled code in the file
    assert not any(k.startswith("model.") for k in raw["state"])
    loaded = brittle.load(path, robust_model)
    x = digits.x_holdout[:50]
    a, b = fitted_pseudo(x), loaded(x)
    torch.testing.assert_close(a.margin, b.margin)
    assert torch.equal(a.flag, b.flag)
    assert loaded.score == "pseudo" and loaded.is_fitted and loaded.has_threshold
    assert loaded.threshold == fitted_pseudo.threshold
    np.testing.assert_array_equal(loaded.report.input_margins, fitted_pseudo.report.input_margins)
    assert loaded.report.metrics == fitted_pseudo.report.metrics
    assert torch.equal(loaded.pair_norms, fitted_pseudo.pair_norms)


def test_unfitted_monitor_round_trips(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, norm="L1", eps=0.5)
    loaded = brittle.load(monitor.save(tmp_path / "m.pt"), standard_model)
    assert loaded.norm == "L1" and loaded.eps == 0.5 and not loaded.has_threshold
    with pytest.raises(brittle.NotFittedError):
        _ = loaded.report


def test_loading_onto_another_head_shape_fails(fitted_pseudo: brittle.Monitor, tmp_path) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    with pytest.raises(ValueError, match=r"head '8' of shape \(10, 64\).*\(100, 64\)"):
        brittle.load(path, digits_cnn(num_classes=100))
    with pytest.raises(ValueError, match="head named '8'"):
        brittle.load(path, nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


def test_loading_onto_other_weights_fails(fitted_pseudo: brittle.Monitor, tmp_path) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    other = copy.deepcopy(fitted_pseudo.model)
    with torch.no_grad():
        other[8].weight.mul_(1.5)
    with pytest.raises(ValueError, match="other weights"):
        brittle.load(path, other)


def test_loading_a_file_that_is_not_a_monitor(standard_model: nn.Module, tmp_path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a monitor saved by brittle"):
        brittle.load(tmp_path / "other.pt", standard_model)
    with pytest.raises(FileNotFoundError, match="no monitor file"):
        brittle.load(tmp_path / "missing.pt", standard_model)


def test_load_recognises_the_whole_model(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, score="feature", example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    other_backbone = copy.deepcopy(standard_model)
    with torch.no_grad():
        other_backbone[0].weight.mul_(1.5)  # same head weights, another model
    with pytest.raises(ValueError, match="other weights"):
        brittle.load(path, other_backbone)
    wider = nn.Sequential(*copy.deepcopy(standard_model), nn.Linear(10, 10))
    with pytest.raises(ValueError, match="another structure"):
        brittle.load(path, wider)
    # The same model in another dtype is the same model: its outputs still match.
    for dtype in (torch.float64, torch.bfloat16):
        moved = copy.deepcopy(standard_model).to(dtype)
        loaded = brittle.load(path, moved)
        x = torch.rand(3, 1, 8, 8, dtype=dtype)
        torch.testing.assert_close(
            loaded(x).margin.float(), monitor(x.float()).margin, rtol=0.05, atol=0.05
        )


def test_truncated_and_foreign_files_say_damaged(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a monitor")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(ValueError, match="damaged or not a brittle monitor file"):
            brittle.load(tmp_path / name, standard_model)
