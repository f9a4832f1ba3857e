"""ONNX export of fitted monitors: parity with PyTorch in onnxruntime, fail-closed, metadata."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import brittle
from brittle.deploy.onnx import OUTPUT_NAMES, export_onnx
from brittle.digits import DigitsSplit

KINDS = ("logit", "feature", "pseudo")
DIGITS_EPS = 0.1  # the budget of the digits fixtures (tests/conftest.py)
CPU = ["CPUExecutionProvider"]


def _median_threshold(monitor: brittle.Monitor, x: torch.Tensor) -> None:
    # A threshold in the middle of the scores, so that both flag values occur.
    with torch.no_grad():
        monitor.set_threshold(float(monitor(x).margin.median()))


@pytest.fixture(scope="module")
def exported(
    robust_model: nn.Module,
    digits: DigitsSplit,
    tmp_path_factory: pytest.TempPathFactory,
    pseudo_monitor: brittle.Monitor,
) -> dict[str, tuple[brittle.Monitor, brittle.OnnxMonitor]]:
    """One monitor per score kind, exported once for the whole module."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("onnx")
    x = digits.x_holdout
    monitors = {"pseudo": pseudo_monitor}
    for kind in ("logit", "feature"):
        monitors[kind] = brittle.wrap(robust_model, score=kind, eps=DIGITS_EPS)
        _median_threshold(monitors[kind], x[:300])
    out = {}
    for kind, monitor in monitors.items():
        # The logit monitor exports from a batch of one: the batch axis must stay dynamic.
        example = x[:1] if kind == "logit" else x[:5]
        path = export_onnx(monitor, folder / f"{kind}.onnx", example)
        out[kind] = (monitor, brittle.OnnxMonitor(path, providers=CPU))
    return out


def _assert_parity(
    torch_out: brittle.MonitorOutput, ort_out: brittle.MonitorOutput, thr: float
) -> None:
    logits, pred, margin, flag = (t.detach().numpy() for t in torch_out)
    np.testing.assert_allclose(ort_out.logits, logits, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ort_out.pred, pred)
    np.testing.assert_allclose(ort_out.margin, margin, rtol=1e-3, atol=1e-6)
    # NaN margins (fail-closed rows) count as away: both sides must flag them.
    away = ~(np.abs(margin - thr) <= 1e-3)
    np.testing.assert_array_equal(ort_out.flag[away], flag[away])
    assert ort_out.flag.dtype == np.bool_ and ort_out.pred.dtype == np.int64


@pytest.mark.parametrize("batch", [1, 7, 300])
@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_pytorch(exported: dict, digits: DigitsSplit, kind: str, batch: int) -> None:
    monitor, served = exported[kind]
    x = digits.x_holdout[-batch:]
    with torch.no_grad():
        expected = monitor(x)
    got = served(x.numpy())
    assert monitor.score == kind and served.score == kind
    assert got.logits.shape == (batch, 10) and got.margin.shape == (batch,)
    _assert_parity(expected, got, float(monitor.threshold))
    if batch == 300:
        assert 0 < got.flag.sum() < batch  # both decisions occur, so the flags were compared


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_rows_fail_closed(exported: dict, digits: DigitsSplit, kind: str) -> None:
    monitor, served = exported[kind]
    x = digits.x_holdout[:6].clone()
    x[1, 0, 3, 3] = math.nan
    x[4, 0, 0, 0] = math.inf
    got = served(x.numpy())
    bad = np.array([False, True, False, False, True, False])
    assert got.flag[bad].all()
    assert np.isnan(got.margin[bad]).all() and np.isnan(got.logits[bad]).all()
    assert (got.pred[bad] == -1).all()
    # The other rows are exactly what a clean batch gives.
    with torch.no_grad():
        clean = monitor(x[~torch.from_numpy(bad)])
    _assert_parity(clean, brittle.MonitorOutput(*(a[~bad] for a in got)), float(monitor.threshold))


def test_metadata(exported: dict) -> None:
    monitor, served = exported["pseudo"]
    meta = served.metadata
    report = monitor.report
    assert meta["brittle_version"] == brittle.__version__
    assert meta["score"] == "pseudo" and meta["norm"] == "Linf" and meta["fitted"] == "true"
    assert float(meta["threshold"]) == pytest.approx(float(monitor.threshold))
    assert served.threshold == pytest.approx(float(monitor.threshold))
    assert float(meta["eps"]) == DIGITS_EPS
    assert float(meta["target_tpr"]) == report.target_tpr
    assert float(meta["tau"]) == pytest.approx(report.metrics["pseudo"].tau)
    assert float(meta["auroc"]) == pytest.approx(report.metrics["pseudo"].auroc)
    assert int(meta["n"]) == report.n
    for key in ("tau_ci", "aupr", "fpr_at_tpr", "calibration_tpr", "calibration_fpr", "metrics"):
        assert key in meta
    # A hand-set threshold exports without a report.
    meta = exported["feature"][1].metadata
    assert meta["fitted"] == "false" and meta["target_tpr"] == "none" and "tau" not in meta


def test_a_threshold_set_after_fit_exports_without_the_fits_rates(
    exported: dict, digits: DigitsSplit, tmp_path: Path
) -> None:
    monitor, served = exported["pseudo"]
    report = monitor.report
    assert float(served.metadata["calibration_tpr"]) == report.tpr
    assert float(served.metadata["calibration_fpr"]) == report.fpr
    moved = copy.deepcopy(monitor)
    moved.set_threshold(float(moved.threshold) / 2)
    meta = brittle.OnnxMonitor(
        export_onnx(moved, tmp_path / "moved.onnx", digits.x_holdout[:2]), providers=CPU
    ).metadata
    # Before, the file paired the new threshold with the fit's target and rates
    # (calibration TPR 1.0 at a threshold that flagged a fifth of the brittle samples).
    assert float(meta["threshold"]) == pytest.approx(float(moved.threshold))
    assert meta["calibration_tpr"] == meta["calibration_fpr"] == "none"
    assert float(meta["target_tpr"]) == report.target_tpr  # the FPR at TPR figures' target
    assert float(meta["tau"]) == pytest.approx(report.metrics["pseudo"].tau)  # no threshold in it


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # TypeError tracebacks at start-up, or later in the request path, before.
        ("input_domain", "5"),
        ("margin_buckets", "5"),
        ("reference_counts", "5"),
        # Served before: the domain counted rejects by the wrong bounds, the rate was nonsense.
        ("input_domain", "[1, 0]"),
        ("input_domain", "[NaN, 1]"),
        ("reference_flag_rate", "2"),
        ("reference_flag_rate", "nan"),
        ("threshold", "abc"),
        # An OverflowError traceback at start-up (python -m brittle.serve caught ValueError).
        ("reference_counts", "[1e400, 10]"),
        # Opened before: the counts failed later in Telemetry (or the alarm took (1, 10),
        # or (1, 2) from the string "12"), the buckets in Telemetry, the domain read "01".
        ("reference_counts", "[5, 3]"),
        ("reference_counts", "[0, 0]"),
        ("reference_counts", "[1.5, 10]"),
        ("reference_counts", "[true, 10]"),
        ("reference_counts", '"12"'),
        ("margin_buckets", "[0.2, 0.1]"),
        ("margin_buckets", "[0.1, 0.1]"),
        ("margin_buckets", "[0.1, 1e400]"),
        ("margin_buckets", '"123"'),
        # float() of a 400-digit integer: an OverflowError traceback at start-up.
        ("margin_buckets", "[0.1, 1" + "0" * 400 + "]"),
        ("input_domain", "[0, 1" + "0" * 400 + "]"),
        ("input_domain", '"01"'),
    ],
)
def test_malformed_metadata_is_refused_when_opened(
    exported: dict, tmp_path: Path, key: str, value: str
) -> None:
    model = onnx.load(exported["pseudo"][1].path)
    props = {p.key: p for p in model.metadata_props}
    assert key in props
    props[key].value = value
    path = tmp_path / "edited.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match=f"malformed metadata {key}="):
        brittle.OnnxMonitor(path, providers=CPU)


def test_a_threshold_edited_in_the_metadata_is_refused(exported: dict, tmp_path: Path) -> None:
    # Before, the file opened and its server reported the edited threshold, while the
    # graph went on flagging at the exported one.
    model = onnx.load(exported["pseudo"][1].path)
    props = {p.key: p for p in model.metadata_props}
    graph = float(props["threshold"].value)
    props["threshold"].value = repr(graph / 2)
    path = tmp_path / "edited.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match=r"flags at threshold .* in its graph, but its metadata"):
        brittle.OnnxMonitor(path, providers=CPU)
    props["threshold"].value = repr(graph)
    onnx.save(model, path)
    assert brittle.OnnxMonitor(path, providers=CPU).threshold == graph


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_an_input_domain_edited_in_the_metadata_is_refused(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    # Before, the file opened: its server reported the edited domain (/healthz) and its
    # telemetry counted the graph's rejects outside the exported domain by the edited
    # one, while the graph went on rejecting at the exported bounds.
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    monitor = brittle.wrap(model.eval(), eps=0.1, example_input=torch.rand(2, 1, 4, 4).to(dtype))
    state = monitor.state_dict()
    state["domain"] = torch.tensor([-0.13, 1.17])  # not exact in float16
    monitor.load_state_dict(state)
    monitor.set_threshold(0.1)
    path = monitor.export_onnx(tmp_path / "m.onnx", torch.rand(2, 1, 4, 4).to(dtype))
    assert brittle.OnnxMonitor(path, providers=CPU).input_domain == monitor.input_domain
    model_proto = onnx.load(path)
    props = {p.key: p for p in model_proto.metadata_props}
    for edited in ("[-10.0, 10.0]", "[-0.13, 1.5]"):
        props["input_domain"].value = edited
        onnx.save(model_proto, tmp_path / "edited.onnx")
        with pytest.raises(ValueError, match=r"rejects inputs outside .* in its graph, but its"):
            brittle.OnnxMonitor(tmp_path / "edited.onnx", providers=CPU)


def test_graph_passes_checker(exported: dict) -> None:
    for _, served in exported.values():
        model = onnx.load(served.path)
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert [i.name for i in model.graph.input] == ["input"]
        assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.HasField("dim_value")


def test_bad_inputs_rejected(exported: dict, digits: DigitsSplit) -> None:
    _, served = exported["logit"]
    x = digits.x_holdout[:3].numpy()
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\)\. Got \(3, 8, 8\)"):
        served(x[:, 0])
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\)\. Got \(3, 1, 8, 9\)"):
        served(np.zeros((3, 1, 8, 9), np.float32))
    with pytest.raises(ValueError, match="dtype float32. Got float64"):
        served(x.astype(np.float64))
    with pytest.raises(ValueError, match="numpy array of shape .* Got Tensor"):
        served(torch.from_numpy(x))
    empty = served(x[:0])
    assert empty.logits.shape == (0, 10) and empty.flag.shape == (0,)


def test_unfitted_and_bad_arguments(tmp_path: Path) -> None:
    monitor = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), eps=0.1)
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(brittle.NotFittedError, match="fit"):
        export_onnx(monitor, tmp_path / "m.onnx", x)
    monitor.set_threshold(0.1)
    with pytest.raises(ValueError, match="opset must be an integer >= 17. Got 13"):
        monitor.export_onnx(tmp_path / "m.onnx", x, opset=13)
    with pytest.raises(ValueError, match="at least one sample"):
        monitor.export_onnx(tmp_path / "m.onnx", x[:0])
    with pytest.raises(FileNotFoundError):
        brittle.OnnxMonitor(tmp_path / "missing.onnx")


def test_a_file_has_the_opset_asked_for_or_none_is_written(
    exported: dict, digits: DigitsSplit, tmp_path: Path
) -> None:
    # torch's exporter writes opset 18 and converts the graph to the opset asked for; a
    # conversion that fails leaves opset 18 behind a logged traceback. Before, a fitted
    # monitor exported with opset=17 (onnx's converter fails on its reduction nodes,
    # which share one axes constant), and any monitor with opset=99, was written at
    # opset 18 without an error.
    small = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), eps=0.1)
    small.set_threshold(0.1)
    x = torch.rand(4, 1, 4, 4)
    path = small.export_onnx(tmp_path / "small.onnx", x, opset=17)
    assert [o.version for o in onnx.load(path).opset_import if o.domain == ""] == [17]
    fitted = exported["pseudo"][0]
    for opset, monitor, example in ((17, fitted, digits.x_holdout[:5]), (99, small, x)):
        path = tmp_path / f"at-{opset}.onnx"
        with pytest.raises(ValueError, match=f"cannot write this monitor's graph at opset {opset}"):
            monitor.export_onnx(path, example, opset=opset)
        assert not path.exists()


def test_a_failed_export_leaves_no_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the graph was written to the path itself, parent folders first: a failed
    # check left a file that failed onnx.checker in place of the last good export, and
    # a model that cannot be traced left the folders it had created.
    monitor = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), eps=0.1)
    x = torch.rand(4, 1, 4, 4)
    monitor(x)
    monitor.set_threshold(0.1)
    good = monitor.export_onnx(tmp_path / "m.onnx", x)
    before = good.read_bytes()

    def refuse(*args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("refused for the test")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    monitor.set_threshold(0.2)
    with pytest.raises(onnx.checker.ValidationError, match="refused for the test"):
        monitor.export_onnx(good, x)
    assert good.read_bytes() == before and sorted(tmp_path.iterdir()) == [good]
    with pytest.raises(onnx.checker.ValidationError):
        monitor.export_onnx(tmp_path / "new" / "deeper" / "m.onnx", x)
    assert not (tmp_path / "new").exists()  # the folders it created are gone
    with pytest.raises(IsADirectoryError, match="is a directory; give the ONNX file's path"):
        monitor.export_onnx(tmp_path, x)
    with pytest.raises(ValueError, match="at least one sample"):
        monitor.export_onnx(tmp_path / "other" / "m.onnx", x[:0])
    assert not (tmp_path / "other").exists()


def test_static_batch(tmp_path: Path) -> None:
    monitor = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), score="feature", eps=0.1)
    x = torch.rand(4, 1, 4, 4)
    monitor(x)
    monitor.set_threshold(0.1)
    served = brittle.OnnxMonitor(monitor.export_onnx(tmp_path / "m.onnx", x, dynamic_batch=False))
    assert served(x.numpy()).margin.shape == (4,)
    with pytest.raises(ValueError, match=r"shape \(4, 1, 4, 4\)\. Got \(2, 1, 4, 4\)"):
        served(x[:2].numpy())


def test_torchvision_resnet18(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x = torch.rand(7, 3, 32, 32)
    monitor = brittle.wrap(model, score="feature", eps=8 / 255, example_input=x[:2])
    assert monitor.head_name == "fc"
    _median_threshold(monitor, x)
    model.train()  # export traces in eval mode and hands the model back as it was
    served = brittle.OnnxMonitor(monitor.export_onnx(tmp_path / "resnet18.onnx", x[:2]))
    assert model.training and model.layer1[0].bn1.training
    assert not any(m._forward_hooks for m in model.modules())
    model.eval()
    x[3, 1, 5, 5] = math.nan
    with torch.no_grad():
        expected = monitor(x)
    got = served(x.numpy())
    assert got.flag[3] and np.isnan(got.margin[3])
    _assert_parity(expected, got, float(monitor.threshold))


def test_robustbench_wide_resnet(tmp_path: Path) -> None:
    from brittle.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    # RobustBench's own WideResNet class, made small (depth 10, width 1) for CPU time.
    model = WideResNet(depth=10, widen_factor=1, num_classes=10).eval()
    x = torch.rand(7, 3, 32, 32)
    monitor = brittle.wrap(model, score="feature", eps=8 / 255, example_input=x[:2])
    assert monitor.head_name == "fc"
    _median_threshold(monitor, x)
    served = brittle.OnnxMonitor(monitor.export_onnx(tmp_path / "wrn.onnx", x[:2]))
    with torch.no_grad():
        expected = monitor(x)
    _assert_parity(expected, served(x.numpy()), float(monitor.threshold))


def test_a_graph_onnxruntime_cannot_run_is_not_called_damaged(tmp_path: Path) -> None:
    # A float64 convolution passes onnx.checker, but onnxruntime's CPU provider has no
    # kernel for it. Before, the file was called "empty, truncated or damaged".
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    monitor = brittle.wrap(model, eps=0.1)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    monitor(x)
    monitor.set_threshold(0.1)
    path = monitor.export_onnx(tmp_path / "m.onnx", x)
    with pytest.raises(ValueError, match="onnxruntime cannot run .* NOT_IMPLEMENTED") as err:
        brittle.OnnxMonitor(path, providers=CPU)
    assert "damaged" not in str(err.value)


def test_a_bfloat16_model_is_refused_with_what_to_export_instead(tmp_path: Path) -> None:
    # Before, the trace went through and onnx.checker refused the graph with a raw
    # shape-inference error (ConstantOfShape has no bfloat16 output type).
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    monitor = brittle.wrap(model.to(torch.bfloat16).eval(), score="feature", norm="L2")
    monitor.set_threshold(0.1)
    x = torch.rand(2, 1, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 model cannot be exported to ONNX.*float16"):
        monitor.export_onnx(tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []


class _HeadTwice(nn.Module):
    """Logits averaged over two calls of one head: no call's output is the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return (self.fc(h) + self.fc(h.flip(1))) / 2


def test_a_logit_monitor_exports_whatever_its_named_head_gives(tmp_path: Path) -> None:
    # export_onnx ran inspect, which computes every available score: a logit-score
    # monitor with a head named that gives no features (called twice per pass) served
    # its margins but its export raised the feature score's RuntimeError.
    torch.manual_seed(0)
    model = _HeadTwice().eval()
    x = torch.rand(4, 6)
    monitor = brittle.wrap(model, head="fc", score="logit")
    monitor.set_threshold(0.1)
    path = monitor.export_onnx(tmp_path / "m.onnx", x)
    served = brittle.OnnxMonitor(path)(x.numpy())
    np.testing.assert_allclose(served.margin, monitor(x).margin.detach().numpy(), rtol=1e-5)
    # The feature score cannot be computed there, and says so, as it did.
    feature = brittle.wrap(model, head="fc", score="feature")
    feature.set_threshold(0.1)
    with pytest.raises(RuntimeError, match="called 2 times"):
        feature.export_onnx(tmp_path / "f.onnx", x)


def _identical_rows_served(
    tmp_path: Path, dtype: torch.dtype, bias: list[float]
) -> tuple[brittle.Monitor, brittle.OnnxMonitor, torch.Tensor]:
    """A feature-margin monitor of a linear head whose rows 0 and 1 are equal, exported.

    The head has one class per bias; the monitor flags at 0.5. Returns the monitor,
    its ONNX file served by onnxruntime, and four inputs.
    """
    head = nn.Linear(8, len(bias)).to(dtype)
    with torch.no_grad():
        head.weight[1] = head.weight[0]
        head.bias.copy_(torch.tensor(bias))
    monitor = brittle.wrap(head, score="feature", norm="L2")
    monitor.set_threshold(0.5)
    x = torch.randn(4, 8).to(dtype)
    served = brittle.OnnxMonitor(monitor.export_onnx(tmp_path / "m.onnx", x[:2]), providers=CPU)
    return monitor, served, x


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_a_class_of_an_identical_row_is_unreachable_in_every_dtype(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    # Class 1's row equals class 0's and its bias is lower: it can never win, so the
    # margin of this two-class head is inf. The step that says so compares the gap
    # with norm * finfo(dtype).max; a float64 export held that Python scalar as a
    # float32 constant, inf, and 0 * inf = NaN skipped the step.
    monitor, served, x = _identical_rows_served(tmp_path, dtype, [1.0, 0.0])
    with torch.no_grad():
        assert torch.isinf(monitor(x).margin).all()
    got = served(x.numpy())
    np.testing.assert_array_equal(got.margin, np.full(4, np.inf, dtype=got.margin.dtype))
    assert not got.flag.any() and (got.pred == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_an_exact_tie_of_identical_head_rows_has_margin_zero_in_every_dtype(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    # Classes 0 and 1 have identical weight rows and biases, so their logits tie exactly:
    # the sample is on the decision boundary (margin 0, flagged). The feature margin
    # divides by the pair norm clamped to finfo(dtype).tiny; a float64 export held that
    # constant as a float32 scalar, 0, so 0/0 gave NaN, which onnxruntime's ReduceMin
    # skips: the graph reported the margin to class 2 (about 140) and no flag.
    monitor, served, x = _identical_rows_served(tmp_path, dtype, [100.0, 100.0, 0.0])
    with torch.no_grad():
        expected = monitor(x)
    got = served(x.numpy())
    assert (expected.margin == 0).all()
    np.testing.assert_array_equal(got.margin, np.zeros(4, dtype=got.margin.dtype))
    assert got.flag.all() and (got.pred == 0).all()
