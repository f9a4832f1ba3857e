"""The forms models return their logits in, the models people use, and what misuse warns."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import brittle
import brittle.functional as BF
from brittle.digits import DigitsSplit
from brittle.scores.pseudo import PseudoMargin
from tests.conftest import DIGITS_EPS


class _Dict(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.model(x), "aux": x.mean()}


class _Tuple(_Dict):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.model(x), x.mean()


@dataclass
class _Out:
    logits: torch.Tensor


class _Attr(_Dict):
    def forward(self, x: torch.Tensor) -> _Out:  # type: ignore[override]
        return _Out(self.model(x))


@pytest.mark.parametrize("form", [_Dict, _Tuple, _Attr])
def test_dict_tuple_and_attribute_outputs(
    standard_model: nn.Module, digits: DigitsSplit, form: type[nn.Module], tmp_path
) -> None:
    model = form(standard_model).eval()
    x = digits.x_holdout[:60]
    monitor = brittle.wrap(model, score="feature", norm="L2", eps=0.5)
    out = monitor(x)
    assert monitor.head_name == "model.8"
    logits = standard_model(x)
    torch.testing.assert_close(out.logits, logits)
    head = standard_model[8]
    torch.testing.assert_close(out.margin, BF.feature_margin(logits, head.weight, "L2"))
    margins = brittle.input_margins(model, x[:8], norm="L2", steps=10)
    reference = brittle.input_margins(standard_model, x[:8], norm="L2", steps=10)
    torch.testing.assert_close(margins, reference)
    monitor.fit(
        x, steps=5, progress=False, target_tpr=0.5, pseudo=False, eps=float(margins.median())
    )
    path = monitor.export_onnx(tmp_path / "m.onnx", x[:2])
    served = brittle.OnnxMonitor(path)(x[:5].numpy())
    torch.testing.assert_close(
        torch.from_numpy(served.margin), monitor(x[:5]).margin, rtol=1e-4, atol=1e-6
    )


def test_a_transformers_image_classifier_built_from_a_config(digits: DigitsSplit) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    x = digits.x_holdout[:16]
    monitor = brittle.wrap(model, score="feature", norm="Linf")
    out = monitor(x)
    assert monitor.head_name == "classifier"
    logits = model(pixel_values=x).logits
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(
        out.margin, BF.feature_margin(logits, model.classifier.weight, "Linf")
    )
    margins = brittle.input_margins(model, x[:4], steps=10)
    assert torch.isfinite(margins).all() and (margins > 0).all()


def test_float64_models_fit_with_both_engines(robust_model: nn.Module, digits: DigitsSplit) -> None:
    model = copy.deepcopy(robust_model).double()
    x = digits.x_holdout[:80]  # float32 data: fit casts batches to the model's dtype
    for engine in ("torchattacks", "brittle"):
        monitor = brittle.wrap(model, eps=DIGITS_EPS)
        monitor.fit(x, steps=10, progress=False, target_tpr=0.8, pseudo=False, engine=engine)
        assert monitor.is_fitted and monitor(x.double()).margin.dtype == torch.float64
        margins = monitor.report.input_margins
        reference = brittle.input_margins(robust_model, x, steps=10, engine=engine).numpy()
        assert (
            abs(float(torch.tensor(margins).median()) - float(torch.tensor(reference).median()))
            < 1e-3
        )


def test_a_softmax_output_warns(standard_model: nn.Module) -> None:
    model = nn.Sequential(copy.deepcopy(standard_model), nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="look like probabilities"):
        brittle.wrap(model)(torch.rand(4, 1, 8, 8))


def test_a_model_in_train_mode_warns(standard_model: nn.Module) -> None:
    model = nn.Sequential(copy.deepcopy(standard_model), nn.Dropout(0.1))
    monitor = brittle.wrap(model, example_input=torch.rand(2, 1, 8, 8))
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        monitor(torch.rand(4, 1, 8, 8))


def test_the_first_call_of_a_model_in_train_mode_warns(standard_model: nn.Module) -> None:
    # Before, the first call (which discovers the head) returned before the check: a
    # freshly built model, in train mode by default, was served without a word.
    model = nn.Sequential(copy.deepcopy(standard_model), nn.Dropout(0.1)).train()
    with pytest.warns(UserWarning, match="train mode"):
        brittle.wrap(model)(torch.rand(4, 1, 8, 8))
    assert model.training


@pytest.mark.parametrize(
    "layer",
    [
        nn.InstanceNorm1d(1, track_running_stats=True),
        nn.RReLU(),
    ],
    ids=["instance-norm-with-running-stats", "rrelu"],
)
def test_other_layers_that_change_in_train_mode_warn(
    standard_model: nn.Module, layer: nn.Module
) -> None:
    # Only batch norm and dropout were looked for: these layers' outputs depend on the
    # mode too (running statistics against the batch's own; random slopes), and a
    # model holding them was served in train mode without a word.
    model = nn.Sequential(copy.deepcopy(standard_model), nn.Unflatten(1, (1, 10)), layer)
    model.append(nn.Flatten())
    monitor = brittle.wrap(model, example_input=torch.rand(2, 1, 8, 8))
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        monitor(torch.rand(4, 1, 8, 8))


class _Attention(nn.Module):
    """Self-attention over a sequence of 8-vectors, then a linear head."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attention(x, x, x)
        return self.head(y.mean(dim=1))


def test_attention_with_dropout_in_train_mode_warns() -> None:
    x = torch.rand(4, 5, 8)
    model = _Attention(dropout=0.1)
    monitor = brittle.wrap(model, example_input=x)
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        monitor(x)
    quiet = _Attention(dropout=0.0)
    monitor = brittle.wrap(quiet, example_input=x)
    quiet.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor(x)


def test_train_mode_without_batch_norm_or_dropout_is_quiet(standard_model: nn.Module) -> None:
    model = copy.deepcopy(standard_model)
    monitor = brittle.wrap(model, example_input=torch.rand(2, 1, 8, 8))
    model.train()  # no layer of the digits CNN changes with the mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor(torch.rand(4, 1, 8, 8))


class _SharedHead(nn.Module):
    """A classifier whose head is applied again, to other features, after the logits."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.fc = nn.Linear(16, 10)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        logits = self.fc(h)
        self.fc(h.flip(0) * 2)  # an auxiliary output the model does not return
        return logits if self.scale == 1 else logits / self.scale


def test_a_head_called_twice_gives_the_features_of_the_call_that_made_the_logits(
    digits: DigitsSplit, tmp_path
) -> None:
    # Before, the hook kept the head's latest call: from the second forward pass on
    # (the first discovers the head), the features were the auxiliary call's, and the
    # pseudo-margin was trained, served and exported on other samples' features.
    model = _SharedHead().eval()
    x = digits.x_holdout[:6]
    monitor = brittle.wrap(model, norm="L2")
    with torch.no_grad():
        features = model.body(x)
        for _ in range(3):
            seen = monitor.inspect(x, features=True)
            assert monitor.head_name == "fc"
            torch.testing.assert_close(seen.features, features, rtol=0, atol=0)
        torch.manual_seed(0)
        monitor.pseudo = PseudoMargin(16, 10)
        monitor.requested_score = "pseudo"
        monitor.set_threshold(0.5)
        expected = monitor.pseudo(features, model(x))
        torch.testing.assert_close(monitor(x).margin, expected)
    served = brittle.OnnxMonitor(monitor.export_onnx(tmp_path / "m.onnx", x[:2]))(x.numpy())
    torch.testing.assert_close(torch.from_numpy(served.margin), expected, rtol=1e-4, atol=1e-6)


def test_a_named_head_called_twice_that_is_not_the_logits_is_refused(digits: DigitsSplit) -> None:
    model = _SharedHead(scale=2.0).eval()  # a temperature: no call's output is the logits
    monitor = brittle.wrap(model, head="fc", score="feature", norm="L2")
    with pytest.raises(RuntimeError, match="called 2 times in one forward pass"):
        monitor(digits.x_holdout[:6])


def test_a_lazy_head_named_before_its_first_call_is_refused_clearly() -> None:
    # Before, wrap(model, head=...) read the uninitialised weight and torch raised
    # "Attempted to use an uninitialized parameter in <method 'element_size' ...>".
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3)).eval()
    with pytest.raises(ValueError, match="head '1' is a lazy module.*leave head= out"):
        brittle.wrap(model, head="1")
    x = torch.rand(2, 1, 8, 8)
    monitor = brittle.wrap(model, score="feature", example_input=x)  # found once created
    assert monitor.head_name == "1"
    torch.testing.assert_close(
        monitor(x).margin, BF.feature_margin(model(x), model[1].weight, "Linf")
    )
    assert brittle.wrap(model, head="1").head_name == "1"  # and named once created
