"""The input domain: fit records the holdout's range, and samples far outside it fail closed.

Pixels of 1e30 are no digit: their logit margin is huge (1e29), so without a domain
the monitor called them robust. Now the torch ``Monitor``, the ONNX graph and the
telemetry reject them (margin NaN, flag True, counted under ``out_of_domain``),
while every clean holdout digit is still judged.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.calibrate.evaluate import evaluate
from brittle.digits import DigitsSplit
from brittle.scores.finite import (
    DOMAIN_TOLERANCE,
    domain_bounds,
    finite_rows,
    judged_rows,
    rejected_rows,
)

DIGITS_EPS = 0.1
CALIBRATION = 240


@pytest.fixture(scope="module")
def fitted(robust_model: nn.Module, digits: DigitsSplit) -> brittle.Monitor:
    torch.manual_seed(0)
    holdout = DataLoader(TensorDataset(digits.x_holdout, digits.y_holdout), batch_size=100)
    monitor = brittle.wrap(robust_model, score="logit", eps=DIGITS_EPS)
    return monitor.fit(holdout, n_samples=CALIBRATION, steps=10, pseudo=False, progress=False)


def _absurd(digits: DigitsSplit) -> torch.Tensor:
    """Three clean digits, then one pixel of 1e30, one of -1e30, one of 1.5 (outside)."""
    x = digits.x_holdout[CALIBRATION : CALIBRATION + 6].clone()
    x[3, 0, 4, 4], x[4, 0, 1, 1], x[5, 0, 2, 2] = 1e30, -1e30, 1.5
    return x


def test_fit_records_the_holdout_range(fitted: brittle.Monitor, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:CALIBRATION]
    # The range is exactly the calibration samples' smallest and largest value, widened.
    expected = domain_bounds(float(x.min()), float(x.max()))
    assert fitted.input_domain == pytest.approx(expected, rel=1e-6)
    width = float(x.max() - x.min())
    assert expected[1] == pytest.approx(float(x.max()) + DOMAIN_TOLERANCE * width)


def test_torch_and_onnx_reject_values_outside_the_domain(
    fitted: brittle.Monitor, digits: DigitsSplit, tmp_path: Path
) -> None:
    x = _absurd(digits)
    with torch.no_grad():
        out = fitted(x)
    # Without a domain the 1e30 sample's margin is enormous and it is not flagged.
    with torch.no_grad():
        assert float(fitted.model(x[3:4]).topk(2).values.diff().abs()) > 1e20
    assert not torch.isnan(out.margin[:3]).any()
    assert torch.isnan(out.margin[3:]).all() and out.flag[3:].all()
    assert out.pred[3:].tolist() == [-1, -1, -1]
    # Every clean sample the monitor never saw is still judged.
    with torch.no_grad():
        clean = fitted(digits.x_holdout[CALIBRATION:])
    assert not torch.isnan(clean.margin).any()

    path = fitted.export_onnx(tmp_path / "m.onnx", x[:2])
    served = brittle.OnnxMonitor(path, ["CPUExecutionProvider"])
    assert served.input_domain == pytest.approx(fitted.input_domain)
    got = served(x.numpy())
    assert got.flag.tolist() == out.flag.tolist() and got.pred.tolist() == out.pred.tolist()
    np.testing.assert_allclose(got.margin, out.margin.numpy(), rtol=1e-4, equal_nan=True)


def test_evaluate_counts_the_samples_the_monitor_rejects(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # Digits squeezed into [0.25, 0.75]: the fitted domain is [0.2, 0.8], and plain
    # digits (0 and 1 in most images) lie outside it while inside [0, 1]. Before,
    # evaluate attacked and scored them as if the monitor judged them, so its flag
    # figures described samples the served monitor rejects.
    squeezed = digits.x_holdout * 0.5 + 0.25
    monitor = brittle.wrap(robust_model, score="logit", eps=DIGITS_EPS / 2)
    monitor.fit(squeezed, n_samples=160, steps=5, pseudo=False, progress=False)
    assert monitor.input_domain == pytest.approx((0.2, 0.8))
    x = torch.cat([squeezed[CALIBRATION : CALIBRATION + 40], digits.x_holdout[:4]])
    assert rejected_rows(x, monitor.domain).sum() == 4
    report = evaluate(monitor, x, steps=5, progress=False)
    assert (report.n, report.excluded) == (40, 4)
    with pytest.raises(ValueError, match="outside the monitor's input domain"):
        evaluate(monitor, digits.x_holdout[:4], steps=5, progress=False)


def test_telemetry_counts_the_reasons(fitted: brittle.Monitor, digits: DigitsSplit) -> None:
    x = _absurd(digits)
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    telemetry = brittle.Telemetry.from_monitor(fitted, warn=False)
    with torch.no_grad():
        telemetry.observe(fitted(x), x)
    snap = telemetry.snapshot()
    assert snap.rejected == 5
    assert snap.rejected_by_reason == {"nan": 1, "inf": 1, "out_of_domain": 3, "other": 0}
    assert snap.margin_sum < 100  # the 1e30 sample is not in the histogram


def test_state_without_domain_loads_with_a_warning(
    fitted: brittle.Monitor, robust_model: nn.Module, digits: DigitsSplit, tmp_path: Path
) -> None:
    state = {k: v for k, v in fitted.state_dict().items() if not k.startswith("model.")}
    del state["domain"]  # as saved before the domain existed
    with pytest.warns(UserWarning, match="without an input domain.*Refit"):
        old = brittle.Monitor.from_state(robust_model, state)
    assert old.input_domain is None and float(old.threshold) == float(fitted.threshold)
    with torch.no_grad():
        assert not torch.isnan(old(_absurd(digits)).margin[3]).any()  # judged, as before

    import onnx

    path = fitted.export_onnx(tmp_path / "m.onnx", digits.x_holdout[:2])
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != "input_domain"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.warns(UserWarning, match="without an input domain"):
        served = brittle.OnnxMonitor(tmp_path / "old.onnx", ["CPUExecutionProvider"])
    assert served.input_domain is None


def test_unfitted_monitor_has_no_domain_and_no_warning(robust_model: nn.Module) -> None:
    monitor = brittle.wrap(robust_model, eps=DIGITS_EPS, example_input=torch.rand(2, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = brittle.Monitor.from_state(
            robust_model,
            {k: v for k, v in monitor.state_dict().items() if not k.startswith("model.")},
        )
    assert fresh.input_domain is None
    out = fresh(torch.full((1, 1, 8, 8), 1e30))
    assert not bool(out.margin.isnan().any())  # no domain: judged, never rejected


class _Judged(nn.Module):
    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return judged_rows(x, domain)


def _judged_by_loop(x: torch.Tensor, low: float, high: float) -> list[bool]:
    """The definition, value by value: every value finite and within [low, high]."""
    return [
        all(math.isfinite(v) and low <= v <= high for v in row)
        for row in x.reshape(len(x), -1).double().tolist()
    ]


def test_the_bounds_themselves_are_inside_and_the_next_float_outside(
    fitted: brittle.Monitor, digits: DigitsSplit, tmp_path: Path
) -> None:
    """Torch, the exported graph and a loop agree on rows at and just past the bounds."""
    low, high = (np.float32(v) for v in fitted.domain.tolist())
    specials = [
        low,
        high,
        np.nextafter(low, np.float32(-np.inf)),
        np.nextafter(high, np.float32(np.inf)),
        np.float32(np.inf),
        np.float32(-np.inf),
        np.float32(np.nan),
    ]
    x = digits.x_holdout[CALIBRATION : CALIBRATION + len(specials) + 1].clone()
    for row, value in enumerate(specials):
        x[row, 0, row % 8, 3] = float(value)
    x[-1, 0, 0, 0], x[-1, 0, 7, 7] = float(low), float(high)  # both bounds in one row
    expected = _judged_by_loop(x, float(low), float(high))
    assert expected == [True, True, False, False, False, False, False, True]
    with torch.no_grad():
        out = fitted(x)
    assert (~torch.isnan(out.margin)).tolist() == expected
    assert judged_rows(x, fitted.domain).tolist() == expected
    assert (~rejected_rows(x, fitted.domain)).tolist() == expected
    served = brittle.OnnxMonitor(fitted.export_onnx(tmp_path / "m.onnx", x[:2]))
    assert (~np.isnan(served(x.numpy()).margin)).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_judged_rows_equals_a_loop(dtype: torch.dtype) -> None:
    """Random rows with NaN, infinities, bounds and values just outside, in every dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 3, 5, generator=gen).to(dtype)
    domain = torch.tensor([0.25, 0.75], dtype=dtype)
    spots = torch.randint(0, 15, (400,), generator=gen)
    kinds = torch.randint(0, 6, (400,), generator=gen)
    nudge = torch.finfo(dtype).eps
    values = [math.nan, math.inf, -math.inf, 0.25, 0.75, 0.75 * (1 + nudge)]
    # Most values outside the domain are moved in, so that many rows are judged.
    x[((x < 0.25) | (x > 0.75)) & (torch.rand(x.shape, generator=gen) < 0.9)] = 0.5
    flat = x.view(400, -1)
    for row in range(0, 400, 2):  # every other row keeps its random values
        flat[row, spots[row]] = values[int(kinds[row])]
    expected = _judged_by_loop(x, 0.25, 0.75)
    assert 50 <= sum(expected) <= 350  # both answers are asked often
    assert judged_rows(x, domain).tolist() == expected
    assert (~rejected_rows(x, domain)).tolist() == expected
    # Traced, judged_rows takes its other form (the clip), which the ONNX graph holds.
    traced = torch.export.export(_Judged(), (x, domain)).module()
    assert traced(x, domain).tolist() == expected
    finite = [all(math.isfinite(v) for v in row) for row in flat.double().tolist()]
    assert judged_rows(x).tolist() == finite == finite_rows(x).tolist()


def test_the_checks_read_a_channels_last_batch_where_it_lies(
    fitted: brittle.Monitor, digits: DigitsSplit, tmp_path: Path
) -> None:
    # Flattening a channels-last batch to (B, -1) copied it: a 64-image ImageNet batch
    # took 28-33 ms on one CPU thread, against 1.6-1.9 ms for the sum itself.
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 4], x[2, 0, 0, 0] = math.nan, 5.0
    domain = torch.tensor([0.0, 1.0])
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, record_shapes=True) as prof:
        finite, rejected = finite_rows(x), rejected_rows(x, domain)
    copies = [e.input_shapes for e in prof.events() if e.name in ("aten::copy_", "aten::clone")]
    assert not [shapes for shapes in copies if list(x.shape) in shapes], copies
    assert finite.tolist() == [True, False, True, True]
    assert rejected.tolist() == [False, True, True, False]
    # The exported graph's first node reads the input itself: no reshape before the check.
    path = fitted.export_onnx(tmp_path / "m.onnx", digits.x_holdout[:2])
    first = onnx.load(str(path)).graph.node[0]
    assert first.op_type != "Reshape" and list(first.input)[0] == "input"


def test_the_faq_says_what_the_domain_does(fitted: brittle.Monitor, digits: DigitsSplit) -> None:
    # Before, the FAQ said the forward pass does not check the range, so that a monitor
    # fitted on [0, 1] inputs "will score whatever you pass it".
    faq = " ".join((Path(__file__).resolve().parents[1] / "docs" / "faq.md").read_text().split())
    section = faq[faq.index("## My inputs are not in [0, 1]") : faq.index("## Many classes")]
    assert "does not check the range" not in section
    assert f"{DOMAIN_TOLERANCE * 100:.0f} % of that width" in section and "input_domain" in section
    # Its example: digits passed as 0-255 values are all flagged, none judged.
    with torch.inference_mode():
        out = fitted(digits.x_holdout[CALIBRATION : CALIBRATION + 20] * 255)
    assert bool(out.flag.all()) and bool(out.margin.isnan().all())
