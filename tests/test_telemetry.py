"""Telemetry of torch and ONNX monitors, and the reference flag rate that fit() stores."""

from __future__ import annotations

import copy
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.deploy.telemetry import Telemetry, margin_buckets
from brittle.digits import DigitsSplit
from brittle.io import checksum

DIGITS_EPS = 0.1
CALIBRATION = 200


@pytest.fixture(scope="module")
def fitted(robust_model: nn.Module, digits: DigitsSplit) -> brittle.Monitor:
    """A logit-margin monitor: every holdout sample calibrates (no pseudo-margin split)."""
    torch.manual_seed(0)
    holdout = DataLoader(TensorDataset(digits.x_holdout, digits.y_holdout), batch_size=100)
    monitor = brittle.wrap(robust_model, score="logit", eps=DIGITS_EPS)
    return monitor.fit(holdout, n_samples=CALIBRATION, steps=10, pseudo=False, progress=False)


@pytest.fixture(scope="module")
def served(
    fitted: brittle.Monitor, digits: DigitsSplit, tmp_path_factory: pytest.TempPathFactory
) -> brittle.OnnxMonitor:
    path = fitted.export_onnx(tmp_path_factory.mktemp("telemetry") / "m.onnx", digits.x_holdout[:2])
    return brittle.OnnxMonitor(path, ["CPUExecutionProvider"])


def test_fit_stores_the_holdout_flag_rate(fitted: brittle.Monitor, digits: DigitsSplit) -> None:
    with torch.no_grad():
        out = fitted(digits.x_holdout[:CALIBRATION])
    assert fitted.reference_counts == (int(out.flag.sum()), CALIBRATION)
    assert fitted.reference_flag_rate == pytest.approx(int(out.flag.sum()) / CALIBRATION, abs=1e-12)
    assert 0 < fitted.reference_flag_rate < 1
    buckets = fitted.margin_buckets
    assert buckets == margin_buckets(out.margin.numpy(), float(fitted.threshold))
    assert list(buckets) == sorted(set(buckets)) and len(buckets) >= 8
    assert float(fitted.threshold) in buckets  # exact: the bucket le=threshold counts the flags


def test_pseudo_monitor_rate_comes_from_its_calibration_part(
    pseudo_monitor: brittle.Monitor,
) -> None:
    rate, report = pseudo_monitor.reference_flag_rate, pseudo_monitor.report
    assert rate is not None and 0 < rate < 1
    counts = pseudo_monitor.reference_counts
    # The counts come from the calibration samples alone (not the choice or training ones).
    calibration = int(report.calibration.sum())
    assert counts is not None and counts[1] == calibration and rate == counts[0] / counts[1]
    # The flag's rate on the calibration part, from the report's own figures.
    positive = report.nonrobust_fraction
    assert rate == pytest.approx(report.tpr * positive + report.fpr * (1 - positive), abs=0.15)


def test_saved_and_exported_with_the_monitor(
    fitted: brittle.Monitor, served: brittle.OnnxMonitor, robust_model: nn.Module, tmp_path: Path
) -> None:
    loaded = brittle.load(fitted.save(tmp_path / "m.pt"), robust_model)
    assert loaded.reference_flag_rate == fitted.reference_flag_rate
    assert loaded.reference_counts == fitted.reference_counts is not None
    assert loaded.margin_buckets == fitted.margin_buckets
    assert served.reference_flag_rate == fitted.reference_flag_rate
    assert served.reference_counts == fitted.reference_counts
    assert served.margin_buckets == fitted.margin_buckets
    assert served.has_threshold


def test_file_without_reference_rate_loads_and_says_why_there_is_no_alarm(
    fitted: brittle.Monitor, robust_model: nn.Module, tmp_path: Path
) -> None:
    # A file saved by a brittle older than the alarm: same format, without the two keys.
    path = fitted.save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    for key in ("reference_flag_rate", "reference_counts", "margin_buckets"):
        del payload["state"]["_extra_state"][key]
    del payload["checksum"]  # older files carry none either
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="no checksum"):
        old = brittle.load(path, robust_model)
    assert old.reference_flag_rate is None and old.margin_buckets is None
    assert float(old.threshold) == float(fitted.threshold)
    with pytest.warns(UserWarning, match="alarm unavailable.*refit it with monitor.fit"):
        telemetry = Telemetry.from_monitor(old)
    assert telemetry.alarm is None and "refit" in (telemetry.alarm_unavailable or "")
    # Buckets then bracket the threshold, which is kept exact.
    assert float(old.threshold) in telemetry.bounds


def test_set_threshold_drops_the_reference(robust_model: nn.Module) -> None:
    monitor = brittle.wrap(robust_model, eps=DIGITS_EPS)
    monitor.reference_flag_rate, monitor.margin_buckets = 0.2, (0.1, 0.2)
    monitor.reference_counts = (40, 200)
    monitor.set_threshold(1.0)
    assert monitor.reference_flag_rate is None and monitor.margin_buckets is None
    assert monitor.reference_counts is None


def test_file_with_the_rate_but_no_counts_loads_with_a_warning(
    fitted: brittle.Monitor, digits: DigitsSplit, robust_model: nn.Module, tmp_path: Path
) -> None:
    """Saved or exported before the counts were stored: the alarm takes the rate as exact."""
    path = fitted.save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    del payload["state"]["_extra_state"]["reference_counts"]
    payload["checksum"] = checksum(payload["state"], payload["model"])  # an intact old file
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="stored the holdout's flag rate but not its counts"):
        old = brittle.load(path, robust_model)
    assert old.reference_counts is None and old.reference_flag_rate == fitted.reference_flag_rate
    alarm = Telemetry.from_monitor(old).alarm
    assert alarm is not None and alarm.design.rate == old.reference_flag_rate
    # The same for an ONNX file whose metadata lacks the counts.
    import onnx

    onnx_path = fitted.export_onnx(tmp_path / "old.onnx", digits.x_holdout[:2])
    graph = onnx.load(str(onnx_path))
    kept = [p for p in graph.metadata_props if p.key != "reference_counts"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(onnx_path))
    with pytest.warns(UserWarning, match="not its counts"):
        served = brittle.OnnxMonitor(onnx_path, ["CPUExecutionProvider"])
    assert served.reference_counts is None and served.reference_flag_rate is not None


def _check_histogram(telemetry: Telemetry, margins: np.ndarray) -> None:
    snap = telemetry.snapshot()
    finite = margins[np.isfinite(margins)]
    for le, count in snap.cumulative_buckets:
        assert count == int((finite <= le).sum()), le
    assert snap.margin_sum == pytest.approx(float(finite.sum()), rel=1e-6)


def test_counts_and_histogram_torch_and_onnx(
    fitted: brittle.Monitor, served: brittle.OnnxMonitor, digits: DigitsSplit
) -> None:
    x = digits.x_holdout[CALIBRATION:].clone()
    x[3, 0, 1, 1] = math.nan
    x[7, 0, 0, 0] = math.inf
    for monitor, run in ((fitted, lambda b: fitted(b)), (served, lambda b: served(b.numpy()))):
        telemetry = Telemetry.from_monitor(monitor)
        flags, margins = [], []
        with torch.no_grad():
            for batch in x.split(37):
                out = telemetry.observe(run(batch))
                flags.append(np.asarray(out.flag))
                margins.append(np.asarray(out.margin, dtype=np.float64))
        snap = telemetry.snapshot()
        assert snap.samples == len(x) and snap.rejected == 2
        assert snap.flagged == int(np.concatenate(flags).sum())
        _check_histogram(telemetry, np.concatenate(margins))
        # The two rejected samples (flagged, margin NaN) never reach the alarm.
        accepted = ~np.isnan(np.concatenate(margins))
        assert snap.alarm is not None and snap.alarm.samples == len(x) - 2
        assert snap.alarm.flagged == int(np.concatenate(flags)[accepted].sum())


def test_concurrent_observers(fitted: brittle.Monitor, digits: DigitsSplit) -> None:
    telemetry = Telemetry.from_monitor(fitted)
    x = digits.x_holdout
    totals = {"samples": 0, "flagged": 0}
    lock = threading.Lock()
    snapshots = []

    def serve(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            i = int(rng.integers(0, len(x) - 16))
            with torch.no_grad():
                out = telemetry.observe(fitted(x[i : i + int(rng.integers(1, 16))]))
            with lock:
                totals["samples"] += out.flag.numel()
                totals["flagged"] += int(out.flag.sum())
            snapshots.append(telemetry.snapshot())

    threads = [threading.Thread(target=serve, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    snap = telemetry.snapshot()
    assert snap.samples == totals["samples"] and snap.flagged == totals["flagged"]
    assert snap.alarm is not None and snap.alarm.samples == snap.samples
    assert snap.alarm.flagged == snap.flagged
    # Every snapshot taken while others observed is whole: no half-counted batch.
    for s in snapshots:
        assert sum(s.bucket_counts) + s.rejected == s.samples
        assert s.alarm is not None and s.alarm.samples == s.samples


def test_observe_needs_flags_and_buckets_are_checked() -> None:
    monitor = brittle.wrap(nn.Linear(4, 3), eps=0.1)
    with pytest.raises(ValueError, match="telemetry needs flags"):
        Telemetry([0.0, 1.0]).observe(monitor(torch.rand(2, 4)))
    with pytest.raises(ValueError, match="strictly increasing"):
        Telemetry([1.0, 0.5])
    with pytest.raises(ValueError, match="finite numbers"):
        Telemetry([])


@pytest.mark.parametrize("size", [3, 64])  # the small-request path and numpy's
def test_observe_refuses_an_output_that_is_not_one_per_sample(size: int) -> None:
    # Before: counted silently, and the alarm saw another number of samples than the counters.
    telemetry = Telemetry([0.5, 1.0], reference=(20, 200), run_length=1e4)
    margin = np.linspace(0.1, 2.0, size).astype(np.float32)
    flag = margin < 0.5
    pred = np.zeros(size, dtype=np.int64)
    logits = np.zeros((size, 3), np.float32)
    x = np.zeros((size, 4), np.float32)
    short = brittle.MonitorOutput(logits, pred, margin, flag[:-1])
    with pytest.raises(ValueError, match=f"{size} margins and {size - 1} flags"):
        telemetry.observe(short)
    with pytest.raises(ValueError, match=f"{size - 1} inputs.*Nothing was counted"):
        telemetry.observe(brittle.MonitorOutput(logits, pred, margin, flag), x[:-1])
    snap = telemetry.snapshot()
    assert snap.samples == 0 and snap.alarm is not None and snap.alarm.samples == 0
    telemetry.observe(brittle.MonitorOutput(logits, pred, margin, flag), x)
    assert telemetry.snapshot().samples == size


@pytest.mark.parametrize("size", [3, 64])  # the small-request path and numpy's
def test_a_batch_interrupted_in_the_alarm_is_counted_nowhere(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """An interrupt inside the alarm (a redesign takes up to 0.3 s) leaves the counts as they were.

    Before, the counters and the histogram took the batch before the alarm was fed, so
    a KeyboardInterrupt at a redesign left samples counted that the alarm never saw,
    and observing the batch again counted them twice.
    """
    from brittle.deploy import alarm as alarm_module

    # A third flagged against a holdout's half: the alarm stays off and learns.
    telemetry = Telemetry([0.5, 1.0], alarm=alarm_module.FlagRateAlarm((100, 200), lag=1))
    flag = np.arange(size) % 3 == 0
    margin = np.where(flag, 0.25, 0.75)
    out = brittle.MonitorOutput(np.zeros((size, 3)), np.zeros(size, dtype=np.int64), margin, flag)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(alarm_module, "_design_from_counts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(1000):  # up to the batch that reaches the first redesign
            before = telemetry.snapshot()
            telemetry.observe(out)
    assert telemetry.snapshot() == before
    monkeypatch.undo()
    telemetry.observe(out)
    snap = telemetry.snapshot()
    assert snap.alarm is not None and snap.alarm.samples == snap.samples == before.samples + size


def test_fitted_monitor_gets_an_alarm_without_warning(fitted: brittle.Monitor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        telemetry = brittle.Telemetry.from_monitor(fitted, run_length=1e5)
    alarm = telemetry.alarm
    assert alarm is not None and alarm.run_length == 1e5
    assert alarm.reference_counts == fitted.reference_counts
    assert alarm.reference_rate == fitted.reference_flag_rate < alarm.design.rate


@pytest.mark.parametrize("learn", [True, False])
def test_the_alarm_learns_accepted_samples_unless_told_not_to(
    fitted: brittle.Monitor, learn: bool
) -> None:
    # Clean traffic at the holdout's rate, every 97th row rejected; at a promise of
    # 10**6 a false alarm within these few thousand samples is negligible.
    telemetry = Telemetry.from_monitor(fitted, run_length=1e6, learn=learn)
    alarm = telemetry.alarm
    assert alarm is not None and alarm.learn is learn
    flagged = np.random.default_rng(0).random(alarm.lag + 500) < alarm.reference_rate
    rows = np.arange(flagged.size)
    margin = np.where(flagged, 0.0, 1.0) + np.where(rows % 97 == 0, np.nan, 0.0)
    out = brittle.MonitorOutput(
        logits=np.zeros((flagged.size, 3)),
        pred=np.zeros(flagged.size, dtype=np.int64),
        margin=margin,
        flag=flagged | np.isnan(margin),
    )
    telemetry.observe(out)
    snap = telemetry.snapshot()
    assert snap.alarm is not None and snap.alarm.episodes == 0
    accepted = int((~np.isnan(margin)).sum())  # rejected rows are never learned
    assert snap.alarm.learned == (accepted - alarm.lag if learn else 0)


def test_rejected_rows_do_not_move_the_alarm() -> None:
    """A burst of NaN rows is counted as rejected; the alarm's statistic stays where it was."""
    telemetry = Telemetry([0.5, 1.0], reference=(20, 200), run_length=1e4)
    nan_rows = brittle.MonitorOutput(
        logits=np.full((64, 3), np.nan),
        pred=np.full(64, -1),
        margin=np.full(64, np.nan),
        flag=np.ones(64, dtype=bool),
    )
    for size in (64, 5):  # numpy's path and the small-request path
        out = brittle.MonitorOutput(
            logits=nan_rows.logits[:size],
            pred=nan_rows.pred[:size],
            margin=nan_rows.margin[:size],
            flag=nan_rows.flag[:size],
        )
        telemetry.observe(out)
    snap = telemetry.snapshot()
    assert snap.rejected == snap.flagged == snap.samples == 69
    assert snap.alarm is not None and snap.alarm.samples == 0 and snap.alarm.statistic == 0
    assert not snap.alarm.firing


def test_too_high_a_reference_leaves_the_alarm_unavailable() -> None:
    class Flagging:
        has_threshold, threshold, margin_buckets = True, 1.0, (0.5, 1.0)
        reference_counts, reference_flag_rate = (398, 400), 0.995

    with pytest.warns(UserWarning, match="alarm unavailable.*no rise to detect"):
        telemetry = Telemetry.from_monitor(Flagging())
    assert telemetry.alarm is None and "no rise to detect" in (telemetry.alarm_unavailable or "")


def test_an_old_file_flagged_everywhere_serves_without_the_alarm(
    fitted: brittle.Monitor, digits: DigitsSplit, tmp_path: Path
) -> None:
    """An old file whose holdout was all flagged: the rate 1.0, no counts, loads and serves.

    Before, ``Telemetry.from_monitor`` raised the alarm's "a reference rate must be in
    [0, 1)" on the rate that ``OnnxMonitor`` (and ``load_state_dict``) take, so such a
    file stopped ``python -m brittle.serve`` from starting; a rate of 0.999 or the
    counts ``(n, n)`` got a server without the alarm and the reason.
    """
    import onnx

    onnx_path = fitted.export_onnx(tmp_path / "old.onnx", digits.x_holdout[:2])
    graph = onnx.load(str(onnx_path))
    kept = [p for p in graph.metadata_props if p.key != "reference_counts"]
    for prop in kept:
        if prop.key == "reference_flag_rate":
            prop.value = "1.0"
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(onnx_path))
    with pytest.warns(UserWarning, match="not its counts"):
        served = brittle.OnnxMonitor(onnx_path, ["CPUExecutionProvider"])
    assert served.reference_flag_rate == 1.0
    with pytest.warns(UserWarning, match="alarm unavailable.*no rise to detect"):
        telemetry = Telemetry.from_monitor(served)
    assert telemetry.alarm is None


def test_a_bfloat16_monitor_is_observed(fitted: brittle.Monitor, digits: DigitsSplit) -> None:
    """The documented half-precision deployment: numpy has no bfloat16 to take its tensors.

    Before, ``observe`` failed on ``.numpy()`` of the margins ("unsupported
    ScalarType BFloat16"), so such a server counted nothing.
    """
    half = copy.deepcopy(fitted).to(torch.bfloat16)
    x = digits.x_holdout[CALIBRATION : CALIBRATION + 40].to(torch.bfloat16)
    x[3, 0, 1, 1] = math.nan
    telemetry = Telemetry.from_monitor(half)
    for batch in (x[:30], x[30:]):  # numpy's path and the small-request path
        with torch.no_grad():
            out = telemetry.observe(half(batch), batch)
    assert out.margin.dtype == torch.bfloat16
    snap = telemetry.snapshot()
    assert snap.samples == 40 and snap.rejected == snap.rejected_by_reason["nan"] == 1
    assert snap.alarm is not None and snap.alarm.samples == 39
    assert sum(snap.bucket_counts) == 39
