"""brittle.wrap and Monitor: one forward pass, head discovery, flags, bad input."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import brittle
import brittle.functional as BF
import brittle.monitor
from brittle.digits import DigitsSplit
from brittle.scores.pseudo import PseudoMargin


def _calls(module: nn.Module) -> list[int]:
    counter = [0]

    def hook(*_: object) -> None:
        counter[0] += 1

    module.register_forward_hook(hook)
    return counter


def test_monitor_matches_model_and_runs_it_once(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    model = copy.deepcopy(standard_model)
    calls = _calls(model)
    monitor = brittle.wrap(model)
    x = digits.x_holdout[:32]
    out = monitor(x)
    assert calls[0] == 1
    logits = model(x)
    torch.testing.assert_close(out.logits, logits)
    assert torch.equal(out.pred, logits.argmax(1))
    torch.testing.assert_close(out.margin, BF.logit_margin(logits))
    assert out.flag is None
    monitor(x)
    assert calls[0] == 3  # one more call by the monitor, one by the test


def test_head_is_found_and_feature_margin_is_exact(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    monitor = brittle.wrap(standard_model, score="feature", norm="L2")
    x = digits.x_holdout[:16]
    out = monitor(x)
    assert monitor.head_name == "8"
    assert monitor.score == "feature"
    head = standard_model[8]
    torch.testing.assert_close(out.margin, BF.feature_margin(out.logits, head.weight, "L2"))
    assert monitor.pair_norms.shape == (10, 10)
    scores = monitor.scores(x)
    assert set(scores) == {"logit", "feature"}
    torch.testing.assert_close(scores["feature"], out.margin)


def test_the_feature_margin_follows_head_weights_changed_after_wrap(tmp_path: Path) -> None:
    # Wrapping before training, or before model.load_state_dict(checkpoint), must not
    # leave the pair-norm table of the first weights in the forward pass or an export.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    monitor = brittle.wrap(model, score="feature", norm="L2", example_input=torch.rand(2, 6))
    x = torch.rand(16, 6)
    with torch.no_grad():
        model[2].weight.mul_(10.0)  # in place, as an optimizer step
        torch.testing.assert_close(
            monitor(x).margin, BF.feature_margin(model(x), model[2].weight, "L2")
        )
        trained = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        model.load_state_dict(trained.state_dict())
        monitor.set_threshold(0.1)
        served = brittle.OnnxMonitor(
            monitor.export_onnx(tmp_path / "m.onnx", x[:2]), providers=["CPUExecutionProvider"]
        )
        want = BF.feature_margin(model(x), model[2].weight, "L2")
        torch.testing.assert_close(torch.from_numpy(served(x.numpy()).margin), want)
        model[2].weight = nn.Parameter(torch.randn(4, 8))  # a new weight tensor
        torch.testing.assert_close(
            monitor(x).margin, BF.feature_margin(model(x), model[2].weight, "L2")
        )


def test_the_feature_margin_follows_head_weights_given_new_data() -> None:
    # Assigning weight.data (nn.utils.vector_to_parameters, model.to(dtype)) changes the
    # values without bumping the version counter: the table of the first weights stayed
    # in the forward pass (a margin off by 0.77 for one sample) and a float64 copy kept
    # the float32 table's rounding.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    monitor = brittle.wrap(model, score="feature", norm="L2", example_input=torch.rand(2, 6))
    x = torch.rand(16, 6)
    with torch.no_grad():
        model[2].weight.data = torch.randn(4, 8)
        torch.testing.assert_close(
            monitor(x).margin, BF.feature_margin(model(x), model[2].weight, "L2")
        )
        vector = nn.utils.parameters_to_vector(model.parameters())
        nn.utils.vector_to_parameters(torch.randn_like(vector), model.parameters())
        torch.testing.assert_close(
            monitor(x).margin, BF.feature_margin(model(x), model[2].weight, "L2")
        )
        monitor.double()
        assert monitor.pair_norms.dtype == torch.float64
        want = BF.feature_margin(model(x.double()), model[2].weight, "L2")
        torch.testing.assert_close(monitor(x.double()).margin, want, rtol=1e-12, atol=0)


def test_a_parametrized_head_keeps_its_table_until_its_parameters_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A parametrized weight (weight_norm, spectral_norm, orthogonal) is a new tensor at
    # each access, so the table counted as stale at every call: K x K x d of work per
    # batch (174 ms against 0.6 at K = 1000, d = 256, B = 32). It now follows the
    # parametrization's own parameters.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
    nn.utils.parametrizations.weight_norm(model[2])
    monitor = brittle.wrap(model, score="feature", norm="L2", example_input=torch.rand(2, 6))
    built: list[int] = []
    table = brittle.monitor.pair_norm_table

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        built.append(1)
        return table(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(brittle.monitor, "pair_norm_table", counted)
    x = torch.rand(16, 6)

    def margins_right() -> None:
        with torch.no_grad():
            want = BF.feature_margin(model(x), model[2].weight, "L2")
        torch.testing.assert_close(monitor(x).margin, want)

    for _ in range(3):
        margins_right()
    assert built == []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    optimizer.step()  # the direction and the scale change in place
    margins_right()
    margins_right()
    assert len(built) == 1
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    margins_right()
    assert len(built) == 2


def test_torch_func_over_the_monitor_leaves_no_transformed_tensor_in_its_state() -> None:
    # Inside torch.func.vmap (or grad) of functional_call the head weight is a wrapped
    # tensor: its pair-norm table was stored in the monitor's buffer and outlived the
    # transform, so state_dict, save and copy.deepcopy raised until the next plain call.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    monitor = brittle.wrap(model, score="feature", norm="L2", example_input=torch.rand(2, 6))
    x = torch.rand(5, 6)
    weights = torch.randn(3, 4, 8)

    def margin(weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(monitor, {"model.2.weight": weight}, (x,)).margin

    margins = torch.func.vmap(margin)(weights)
    features = model[1](model[0](x))
    for weight, got in zip(weights, margins, strict=True):
        want = BF.feature_margin(features @ weight.T + model[2].bias, weight, "L2")
        torch.testing.assert_close(got, want)
    torch.func.grad(lambda weight: margin(weight).sum())(weights[0])
    assert monitor.state_dict()["pair_norms"].shape == (4, 4)
    copy.deepcopy(monitor)
    torch.testing.assert_close(
        monitor(x).margin, BF.feature_margin(model(x), model[2].weight, "L2")
    )


def test_the_feature_margin_follows_inference_tensor_weights_changed_in_place(
    tmp_path: Path,
) -> None:
    # A model built under torch.inference_mode() (serving code) has inference-tensor
    # weights, which keep no version counter: a checkpoint loaded in place under
    # inference mode left the first weights' pair-norm table in the forward pass
    # (0.1093 served against 0.1542 for one sample) and in an export.
    torch.manual_seed(0)
    x = torch.rand(8, 5)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        assert torch.is_inference(model[2].weight)
        monitor = brittle.wrap(model, score="feature", norm="L2")
        first = monitor(x).margin
        model.load_state_dict(
            nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict()
        )
        served = monitor(x).margin
        want = BF.feature_margin(model(x), model[2].weight, "L2")
        monitor.set_threshold(0.1)  # its buffers, made here too, change here alone
    assert not torch.allclose(first, want)
    torch.testing.assert_close(served, want)
    exported = brittle.OnnxMonitor(
        monitor.export_onnx(tmp_path / "m.onnx", x[:2]), providers=["CPUExecutionProvider"]
    )
    torch.testing.assert_close(torch.from_numpy(exported(x.numpy()).margin), want)


def test_the_head_is_found_on_a_first_batch_with_nan_logits() -> None:
    # Discovery compared each linear output with the logits by torch.equal, for which
    # NaN differs from NaN: one sample whose logits overflowed in the first batch hid
    # the head, and score="auto" then lost the feature and pseudo scores for good.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():  # inf - inf on the row of 10s: that row's logits are NaN
        model[0].weight[0, :2] = torch.tensor([1e38, -1e38])
    x = torch.rand(16, 6)
    x[3] = 10.0
    assert bool(model(x)[3].isnan().all()) and bool(model(x)[:3].isfinite().all())
    auto = brittle.wrap(model, norm="L2")
    out = auto(x)
    assert auto.head_name == "2" and auto.available_scores == ("logit", "feature")
    assert int(out.pred[3]) == -1 and bool(out.margin[3].isnan())
    feature = brittle.wrap(model, score="feature", norm="L2", example_input=x)
    keep = torch.arange(16) != 3
    want = BF.feature_margin(model(x)[keep], model[2].weight, "L2")
    torch.testing.assert_close(feature(x).margin[keep], want)


class _Tempered(nn.Module):
    """A classifier whose logits are its head's output divided by a temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.fc = nn.Linear(8, 4)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)) / self.temperature


class _TemperedInPlace(nn.Module):
    """A head whose output the model divides by a temperature in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.temperature = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x)
        logits /= self.temperature
        return logits


def test_a_head_no_longer_exact_is_refused_where_its_output_is_seen(tmp_path: Path) -> None:
    # The head was found exact on the first call (temperature 1) and never checked
    # again: a temperature set later divided every "exact" feature margin by it, and
    # fit calibrated, and export_onnx traced, those margins without a word.
    torch.manual_seed(0)
    model = _Tempered().eval()
    x = torch.rand(16, 6)
    monitor = brittle.wrap(model, score="feature", norm="L2", example_input=x)
    with torch.no_grad():  # inf - inf on the row of 10s: NaN logits, which must not
        model.body[0].weight[0, :2] = torch.tensor([1e38, -1e38])  # read as a changed head
    x[3] = 10.0
    assert monitor.head_exact and bool(model(x)[3].isnan().any())
    torch.testing.assert_close(
        monitor.inspect(x).scores["feature"], monitor(x).margin, equal_nan=True
    )
    model.temperature = 4.0
    monitor.set_threshold(0.1)
    with torch.no_grad():
        for use in (
            lambda: monitor.inspect(x),
            lambda: monitor.fit(x[:8], steps=2, progress=False),
            lambda: monitor.export_onnx(tmp_path / "m.onnx", x[:2]),
        ):
            with pytest.raises(RuntimeError, match="head 'fc' no longer produces the model's"):
                use()
        assert monitor.head_exact and not monitor.is_fitted  # the failed fit changed nothing
        # What the message says to do: the margin from the head's own output, both ways.
        named = brittle.wrap(model, score="feature", norm="L2", head="fc", example_input=x)
        want = BF.feature_margin(model.fc(model.body(x)), model.fc.weight, "L2")
        for got in (named(x).margin, named.inspect(x).scores["feature"]):
            torch.testing.assert_close(got[~want.isnan()], want[~want.isnan()])


def test_example_input_discovers_now_and_restores_mode(standard_model: nn.Module) -> None:
    model = copy.deepcopy(standard_model).train()
    model[0].eval()  # a mixed state must survive too
    monitor = brittle.wrap(model, example_input=torch.rand(2, 1, 8, 8))
    assert monitor.head_name == "8" and monitor.input_shape == (1, 8, 8)
    assert model.training and not model[0].training and model[8].training


def test_head_override_and_errors(standard_model: nn.Module) -> None:
    assert brittle.wrap(standard_model, head="8").head_name == "8"
    with pytest.raises(ValueError, match="no module named 'fc'"):
        brittle.wrap(standard_model, head="fc")
    with pytest.raises(ValueError, match="must be an nn.Linear"):
        brittle.wrap(standard_model, head="0")
    with pytest.raises(ValueError, match="has 64 outputs but the model returns 10"):
        brittle.wrap(standard_model, head="6", example_input=torch.rand(2, 1, 8, 8))


def _no_linear_head() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_model_without_linear_head() -> None:
    x = torch.rand(4, 1, 8, 8)
    monitor = brittle.wrap(_no_linear_head())
    out = monitor(x)
    assert monitor.head_name is None and monitor.available_scores == ("logit",)
    torch.testing.assert_close(out.margin, BF.logit_margin(out.logits))
    # Before, the message's only example was head='fc', for a model with no nn.Linear.
    with pytest.raises(ValueError, match="no nn.Linear with 10 outputs.*head='<module name>'"):
        brittle.wrap(_no_linear_head(), score="feature")(x)
    tempered = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh())
    with pytest.raises(ValueError, match=r"nn.Linear modules with 10 outputs, \['1'\]"):
        brittle.wrap(tempered, score="pseudo")(x)


def test_linear_followed_by_a_transform_is_not_the_head() -> None:
    class Tempered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) / 2.0

    model = Tempered()
    assert brittle.wrap(model, example_input=torch.rand(2, 5)).head_name is None
    # The user can still name it: the feature margin then uses the head's own output.
    monitor = brittle.wrap(model, head="fc", score="feature")
    x = torch.rand(3, 5)
    torch.testing.assert_close(monitor(x).margin, BF.feature_margin(model.fc(x), model.fc.weight))


class _CosineHead(nn.Linear):
    """A cosine classifier: an nn.Linear whose output uses its normalized rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, nn.functional.normalize(self.weight, dim=1), self.bias)


class _CountingHead(nn.Linear):
    """An nn.Linear subclass with its own forward that computes the same map."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_a_linear_layer_whose_weight_does_not_describe_its_output_is_no_head() -> None:
    # A cosine classifier (or a quantization-aware layer's fake-quantized weight) is an
    # nn.Linear whose output equals the logits: it was found as an exact head, and its
    # raw weight rows gave feature margins of another model without a word.
    torch.manual_seed(0)
    x = torch.rand(6, 5)
    cosine = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), _CosineHead(8, 4))
    monitor = brittle.wrap(cosine, example_input=x)
    assert monitor.head_name is None and monitor.available_scores == ("logit",)
    with pytest.raises(ValueError, match=r"nn.Linear modules with 4 outputs, \['2'\]"):
        brittle.wrap(cosine, score="feature")(x)
    with pytest.raises(ValueError, match=r"head '2' \(_CosineHead\) does not compute"):
        brittle.wrap(cosine, head="2", score="feature")(x)
    # Its input still serves the pseudo-margin network, which reads no weight.
    assert brittle.wrap(cosine, head="2", score="pseudo", example_input=x).head_name == "2"
    # A subclass computing the same map stays an exact head.
    counting = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), _CountingHead(8, 4))
    exact = brittle.wrap(counting, score="feature", example_input=x)
    assert exact.head_name == "2" and exact.head_exact
    head = counting[2]
    want = BF.feature_margin(counting(x), head.weight)  # type: ignore[arg-type]
    torch.testing.assert_close(exact(x).margin, want)


def test_a_head_whose_output_is_changed_in_place_is_not_taken_as_exact() -> None:
    # The probe compared the head's output tensor with the logits after the forward
    # pass: a model scaling that very tensor in place (logits /= temperature) made the
    # two equal, the head counted as exact, and every feature margin was off by the
    # temperature, where the same model written out of place has no head found.
    torch.manual_seed(0)
    model, x = _TemperedInPlace(), torch.rand(4, 5)
    assert brittle.wrap(model, example_input=x).head_name is None
    with pytest.raises(ValueError, match=r"nn.Linear modules with 3 outputs, \['fc'\]"):
        brittle.wrap(model, score="feature")(x)


def test_a_named_head_whose_output_is_changed_in_place_gives_its_own_margin() -> None:
    # The hook kept the head's output tensor, which the model then scaled in place:
    # the named head's feature margin, promised from the head's own output, came out
    # multiplied by 1 / temperature, and a temperature set in place after wrap passed
    # the check that the head is still exact.
    torch.manual_seed(0)
    model, x = _TemperedInPlace(), torch.rand(4, 5)
    monitor = brittle.wrap(model, head="fc", score="feature", norm="L2")
    want = BF.feature_margin(model.fc(x), model.fc.weight, "L2")
    for got in (monitor(x).margin, monitor.inspect(x).scores["feature"]):
        torch.testing.assert_close(got, want)
    model.temperature = 1.0
    exact = brittle.wrap(model, score="feature", norm="L2", example_input=x)
    assert exact.head_exact
    model.temperature = 4.0
    with pytest.raises(RuntimeError, match="head 'fc' no longer produces the model's"):
        exact.inspect(x)


def test_flags_follow_the_threshold(robust_model: nn.Module, digits: DigitsSplit) -> None:
    monitor = brittle.wrap(robust_model)
    x = digits.x_holdout[:64]
    margin = monitor(x).margin.detach()
    threshold = float(margin.median())
    monitor.set_threshold(threshold)
    out = monitor(x)
    assert out.flag is not None and out.flag.dtype == torch.bool
    assert torch.equal(out.flag, margin <= threshold)
    with pytest.raises(ValueError, match="finite number"):
        monitor.set_threshold(math.nan)
    # Before, a value past float32's range got torch's "value cannot be converted to
    # type float without overflow".
    for value in (1e39, -1e39):
        with pytest.raises(ValueError, match=r"finite number within the monitor's torch.float32"):
            monitor.set_threshold(value)
    assert float(monitor.threshold) == pytest.approx(threshold)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_samples_fail_closed(
    robust_model: nn.Module, digits: DigitsSplit, bad: float
) -> None:
    monitor = brittle.wrap(robust_model, score="feature")
    monitor.set_threshold(-1.0)  # nothing finite is flagged
    x = digits.x_holdout[:6].clone()
    clean = monitor(x)
    x[2, 0, 3, 3] = bad
    out = monitor(x)
    keep = torch.tensor([True, True, False, True, True, True])
    assert torch.isnan(out.margin[2]) and bool(out.flag[2]) and int(out.pred[2]) == -1
    assert torch.isnan(out.logits[2]).all()
    torch.testing.assert_close(out.margin[keep], clean.margin[keep])
    assert not out.flag[keep].any()
    assert torch.isnan(monitor.scores(x)["logit"][2])


@pytest.mark.parametrize("kind", ["logit", "feature", "pseudo"])
def test_logits_that_overflow_fail_closed_in_torch_and_onnx(kind: str, tmp_path: Path) -> None:
    # A finite input whose logits the model makes non-finite (float overflow here) is
    # rejected like a NaN input. The pseudo-margin cast the NaN rank to an index and
    # failed the whole batch with an IndexError (onnxruntime: a Gather out of bounds).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(2.0)  # 4 inputs of 5e37 (sum 2e38) overflow float32's 3.4e38
    monitor = brittle.wrap(model, score=kind, example_input=torch.rand(2, 4))  # type: ignore[arg-type]
    monitor.pseudo = PseudoMargin(8, 3, hidden=8)  # an untrained network is enough here
    monitor.set_threshold(0.05)
    x = torch.rand(4, 4)
    x[1] = 5e37
    with torch.no_grad():
        assert not torch.isfinite(model(x)[1]).all()
        out = monitor(x)
    assert out.flag is not None and out.flag[1] and int(out.pred[1]) == -1
    assert torch.isnan(out.margin[1]) and not torch.isnan(out.margin[[0, 2, 3]]).any()
    served = brittle.OnnxMonitor(
        monitor.export_onnx(tmp_path / "m.onnx", x[:2]), providers=["CPUExecutionProvider"]
    )(x.numpy())
    np.testing.assert_array_equal(served.flag, out.flag.numpy())
    np.testing.assert_array_equal(served.pred, out.pred.numpy())
    np.testing.assert_allclose(served.margin, out.margin.numpy(), rtol=1e-5)


def test_wrong_shapes_and_dtypes_raise(standard_model: nn.Module) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected \(batch, 1, 8, 8\)|shape \(batch, 1, 8, 8\)"):
        monitor(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\)"):
        monitor(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="could not process an input of shape"):
        monitor(torch.rand(2, 1, 5, 5))
    with pytest.raises(ValueError, match="floating-point"):
        monitor(torch.ones(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.float32"):
        monitor(torch.rand(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        monitor([[1.0]])  # type: ignore[arg-type]


def test_a_model_with_one_logit_is_refused_when_its_output_is_first_seen() -> None:
    # It was adopted (head, 1 x 1 table, input shape) and failed only when scored.
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="returns 1 logit per sample.*at least 2 classes"):
        brittle.wrap(model, example_input=torch.rand(2, 4))
    monitor = brittle.wrap(model, score="feature")
    with pytest.raises(ValueError, match="torch.zeros_like"):
        monitor(torch.rand(2, 4))
    assert not monitor.discovered and monitor.head_name is None


def test_empty_batch_gives_empty_outputs(standard_model: nn.Module) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(1, 1, 8, 8))
    monitor.set_threshold(1.0)
    out = monitor(torch.empty(0, 1, 8, 8))
    assert out.logits.shape == (0, 10) and out.pred.shape == (0,)
    assert out.margin.shape == (0,) and out.flag is not None and out.flag.shape == (0,)
    assert monitor.scores(torch.empty(0, 1, 8, 8))["feature"].shape == (0,)


def test_bad_arguments_raise(standard_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        brittle.wrap(standard_model, norm="L3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps must be a finite positive number. Got -1.0"):
        brittle.wrap(standard_model, eps=-1)
    with pytest.raises(ValueError, match="score must be one of"):
        brittle.wrap(standard_model, score="margin")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        brittle.wrap(lambda x: x)  # type: ignore[arg-type]
    monitor = brittle.wrap(standard_model, eps=0.1)
    for n in (0, 50.5, True):  # 50.5 raised slicing's TypeError from inside the holdout loop
        with pytest.raises(ValueError, match="n_samples must be a positive integer"):
            monitor.fit(torch.rand(4, 1, 8, 8), n_samples=n, progress=False)  # type: ignore[arg-type]


def test_wrapping_a_monitor_is_refused_and_names_its_model() -> None:
    """``wrap(monitor)`` was accepted silently, and its first forward pass waited forever
    on the discovery lock (the inner monitor discovers its head under the same lock)."""
    monitor = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    with pytest.raises(TypeError, match=r"model is already a brittle.Monitor.*wrap\(model\.model"):
        brittle.wrap(monitor)
    with pytest.raises(TypeError, match=r"model\.1 is already a brittle.Monitor"):
        brittle.wrap(nn.Sequential(nn.Identity(), monitor))


def test_unfitted_monitor_says_to_fit(standard_model: nn.Module) -> None:
    monitor = brittle.wrap(standard_model, score="pseudo")
    with pytest.raises(brittle.NotFittedError, match="fit"):
        _ = monitor.report
    with pytest.raises(brittle.NotFittedError, match=r"monitor.fit\(loader\)"):
        monitor(torch.rand(2, 1, 8, 8))
    assert not monitor.is_fitted


def test_model_is_never_changed(standard_model: nn.Module, digits: DigitsSplit) -> None:
    model = copy.deepcopy(standard_model)
    before = copy.deepcopy(model.state_dict())
    monitor = brittle.wrap(model, score="feature")
    out = monitor(digits.x_holdout[:8].requires_grad_())
    out.margin.sum().backward()  # gradients flow to the input, as through the model
    del monitor
    monitor = brittle.wrap(model)  # re-wrap
    monitor(digits.x_holdout[:8])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_state_lives_in_the_state_dict(standard_model: nn.Module) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(1, 1, 8, 8))
    monitor.set_threshold(0.5)
    state = monitor.state_dict()
    assert {"threshold", "fitted", "pair_norms", "_extra_state"} <= set(state)
    assert state["_extra_state"]["head"] == "8"
    double = copy.deepcopy(monitor).double()
    assert double.pair_norms.dtype == torch.float64 and double.threshold.dtype == torch.float64


def test_the_monitor_state_starts_on_the_model_device() -> None:
    # A model on a GPU gets a monitor on that GPU (tests/test_cuda.py fits one); the
    # meta device stands in for it here. Before, the buffers stayed on the CPU, and
    # fit placed the pseudo-margin network there, away from the features it scores.
    monitor = brittle.wrap(nn.Linear(4, 3, device="meta"))
    assert {buffer.device.type for buffer in monitor.buffers()} == {"meta"}
    assert {buffer.device.type for buffer in brittle.wrap(nn.Linear(4, 3)).buffers()} == {"cpu"}


def test_a_model_moved_without_its_monitor_is_refused_with_a_clear_error() -> None:
    # wrap(model), then model.to(device): the monitor's table and pseudo-margin network
    # stayed behind, and a GPU forward failed inside index_select or the network (the
    # meta device stands in for the GPU; it let the call through).
    model = nn.Linear(4, 3)
    monitor = brittle.wrap(model, example_input=torch.rand(2, 4))
    model.to("meta")
    with pytest.raises(ValueError, match=r"move the monitor \(monitor.to\(device\)"):
        monitor(torch.rand(2, 4, device="meta"))
    monitor.to("meta")
    assert monitor(torch.rand(2, 4, device="meta")).margin.device.type == "meta"


def test_a_monitor_built_under_inference_mode_takes_a_threshold_and_a_fit_outside() -> None:
    # Its buffers were inference tensors, which PyTorch writes and then refuses to
    # write in place outside inference mode: set_threshold left the new value in the
    # buffer without flags, and fit raised at its very end with eps, score and report
    # already changed and no threshold.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(200, 5)
    with torch.inference_mode():
        monitor = brittle.wrap(model, norm="L2", score="logit")
    monitor.set_threshold(0.1)
    assert monitor.has_threshold and float(monitor.threshold) == pytest.approx(0.1)
    assert bool(monitor(x[:4]).flag.any()) == bool((monitor(x[:4]).margin <= 0.1).any())
    with torch.inference_mode():
        fresh = brittle.wrap(model, norm="L2", score="logit")
    fresh.fit(x, n_samples=200, steps=5, progress=False, pseudo=False, eps=0.3)
    assert fresh.is_fitted and fresh.has_threshold and fresh.eps == 0.3
    assert math.isfinite(float(fresh.threshold)) and fresh.reference_counts is not None
