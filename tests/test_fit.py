"""fit(): input margins, consistency figures against scipy and scikit-learn, thresholds."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchattacks
from scipy import stats
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import brittle
import brittle.data
import brittle.functional as BF
from brittle.attacks import attack
from brittle.digits import DigitsSplit
from tests.conftest import DIGITS_EPS

FIT = {"n_samples": 300, "steps": 30, "progress": False}


@pytest.fixture(scope="module")
def fitted(robust_model: nn.Module, holdout_loader: DataLoader) -> brittle.Monitor:
    return brittle.wrap(robust_model, eps=DIGITS_EPS).fit(holdout_loader, pseudo=False, **FIT)


def test_fit_returns_the_monitor_with_a_threshold(fitted: brittle.Monitor) -> None:
    report = fitted.report
    assert fitted.is_fitted and fitted.has_threshold
    assert report.n == 300 and report.input_margins.shape == (300,)
    assert report.chosen == fitted.score and report.threshold == pytest.approx(
        float(fitted.threshold)
    )
    assert report.accuracy is not None and report.accuracy > 0.95
    assert 0.0 < report.nonrobust_fraction < 1.0
    assert set(report.metrics) == {"logit", "feature"}
    assert report.tpr >= report.target_tpr


def test_reported_figures_match_scipy_and_sklearn(fitted: brittle.Monitor) -> None:
    report = fitted.report
    cal = report.calibration
    margins = report.input_margins[cal]
    positive = margins <= report.eps
    for name, m in report.metrics.items():
        score = report.score_values[name][cal]
        assert m.tau == pytest.approx(stats.kendalltau(score, margins).statistic, abs=1e-12)
        assert m.tau_ci[0] <= m.tau <= m.tau_ci[1]
        assert m.auroc == pytest.approx(skm.roc_auc_score(positive, -score))
        assert m.aupr == pytest.approx(skm.average_precision_score(positive, -score))
        fpr, tpr, _ = skm.roc_curve(positive, -score)
        assert m.fpr_at_tpr == pytest.approx(fpr[tpr >= report.target_tpr].min())


def test_flags_of_the_fitted_monitor_match_the_report(
    fitted: brittle.Monitor, digits: DigitsSplit
) -> None:
    out = fitted(digits.x_holdout[:300])
    values = fitted.report.score_values[fitted.report.chosen]
    np.testing.assert_allclose(out.margin.detach().numpy(), values, rtol=1e-5)
    assert torch.equal(out.flag, out.margin <= fitted.report.threshold)


def test_margins_are_real_adversarials(robust_model: nn.Module, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:40]
    pred = robust_model(x).argmax(1)
    margins = brittle.input_margins(robust_model, x, steps=30, engine="torchattacks")
    # torchattacks' own FAB through its public entry point, with a budget large
    # enough that perturb() drops nothing: the same minimum norms.
    fab = torchattacks.FAB(robust_model, norm="Linf", eps=1.0, steps=30, n_classes=10)
    adv = fab(x, pred)
    flipped = robust_model(adv).argmax(1) != pred
    reference = (adv - x).flatten(1).abs().amax(1)
    assert flipped.all() and torch.isfinite(margins).all()
    torch.testing.assert_close(margins, reference, rtol=1e-5, atol=1e-6)


def test_failed_attacks_are_censored_not_zero(robust_model: nn.Module, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:40]
    pred = robust_model(x).argmax(1)
    margins = brittle.input_margins(robust_model, x, steps=1, engine="torchattacks")
    # With one step FAB breaks few points; torchattacks returns x itself for the
    # others, which a naive norm would report as margin 0.
    assert torch.isinf(margins).any() and (margins > 0).all()
    assert torch.isinf(attack.verified_margins(robust_model, x, x.clone(), pred, "Linf")).all()


def test_restarts_never_make_a_margin_larger(robust_model: nn.Module, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:30]
    one = brittle.input_margins(robust_model, x, steps=10, restarts=1)
    three = brittle.input_margins(robust_model, x, steps=10, restarts=3)
    assert (three <= one).all()


def test_inputs_outside_unit_range_are_rejected(robust_model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"inputs in \[0, 1\]"):
        brittle.input_margins(robust_model, torch.rand(2, 1, 8, 8) * 3)
    # Pixels as stored (0-255) are told how to scale; a range no image has is not.
    with pytest.raises(ValueError, match="Divide by 255"):
        brittle.input_margins(robust_model, torch.full((2, 1, 8, 8), 255.0))
    with pytest.raises(ValueError) as negative:
        brittle.input_margins(robust_model, torch.full((2, 1, 8, 8), -2.0))
    assert "255" not in str(negative.value)


def test_inputs_a_rounding_outside_unit_range_are_told_so(robust_model: nn.Module) -> None:
    # A normalisation round trip leaves pixels a float32 step above 1: the message
    # must show that value (not "got values in [0, 1]") and not blame 0-255 pixels.
    x = torch.full((2, 1, 8, 8), 0.5)
    x[0, 0, 0, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError) as above:
        brittle.input_margins(robust_model, x, steps=2)
    message = str(above.value)
    assert "[0.5, 1]" not in message and "1.0000001" in message
    assert "255" not in message and "clamp" in message


def test_conformal_threshold_keeps_its_guarantee_by_simulation() -> None:
    rng = np.random.default_rng(0)
    target, n_pos, trials = 0.9, 30, 4000
    achieved = []
    for _ in range(trials):
        calibration = rng.gamma(2.0, size=n_pos)
        threshold = BF.conformal_threshold(calibration, target)
        fresh = rng.gamma(2.0, size=200)
        achieved.append((fresh <= threshold).mean())
    mean = float(np.mean(achieved))
    k = math.ceil((n_pos + 1) * target)
    assert mean >= target - 3 * np.std(achieved) / math.sqrt(trials)
    assert mean == pytest.approx(k / (n_pos + 1), abs=0.01)  # E[TPR] = k / (n + 1), tight


def test_conformal_threshold_refuses_too_few_positives() -> None:
    with pytest.raises(
        ValueError, match="needs at least 19 non-robust calibration samples. Got 10"
    ):
        BF.conformal_threshold(np.arange(10.0), 0.95)


def test_min_positives_matches_exact_arithmetic_and_is_quick_near_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fractions import Fraction

    import brittle.calibrate.threshold as threshold

    for target in (0.1, 0.5, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9999):
        exact = Fraction(str(target))
        n = 1
        while math.ceil((n + 1) * exact) > n:
            n += 1
        assert BF.min_positives(target) == n, target
    # fit() reports it for every target; counting up from 1 took about a day at 1 - 1e-12.
    calls = []
    rank = threshold._rank

    def counted(n: int, target_tpr: float) -> int:
        calls.append(n)
        assert len(calls) < 1000, "min_positives counted up"
        return rank(n, target_tpr)

    monkeypatch.setattr(threshold, "_rank", counted)
    assert BF.min_positives(1 - 1e-12) == pytest.approx(1e12, rel=1e-3)


class _ScaledLogits(nn.Module):
    """The robust CNN with its logits times a positive factor that depends on the input.

    Decisions and input margins do not change; the logit margin's ranking does.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.register_buffer(
            "direction", torch.randn(64, generator=torch.Generator().manual_seed(1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.flatten(1) - 0.3) @ self.direction / 8.0
        return self.base(x) * torch.exp(3.0 * torch.tanh(u))[:, None]


def test_pseudo_margin_lifts_tau_of_an_inconsistent_model(
    robust_model: nn.Module, holdout_loader: DataLoader
) -> None:
    model = _ScaledLogits(robust_model)
    monitor = brittle.wrap(model, eps=DIGITS_EPS, head="base.8", min_tau=0.9)
    with pytest.warns(UserWarning, match="trained on only 300 samples"):
        monitor.fit(
            holdout_loader, pseudo=True, n_samples=600, steps=20, progress=False, target_tpr=0.9
        )
    report = monitor.report
    metrics = report.metrics
    assert metrics["logit"].tau < 0.45
    assert metrics["pseudo"].tau > metrics["logit"].tau + 0.1
    assert report.chosen in ("feature", "pseudo") and report.chosen != "logit"
    assert "min_tau" in report.reason
    # Chosen on one part (30 %), trained on another (50 %), calibrated and measured on
    # the rest: three disjoint parts.
    assert report.choice is not None and report.n_choice == 180
    assert report.calibration.sum() == 120 and report.settings["pseudo"]["n_train"] < 300
    assert not (report.choice & report.calibration).any()
    assert metrics["pseudo"].n == 120


class _Overflowing(nn.Module):
    """The robust CNN, whose logits overflow to inf on the brightest inputs."""

    def __init__(self, base: nn.Module, brightest: float) -> None:
        super().__init__()
        self.base = base
        self.brightest = brightest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hot = x.flatten(1).mean(dim=1, keepdim=True) > self.brightest
        return self.base(x).masked_fill(hot, math.inf)


def test_boundary_rows_where_the_model_overflows_train_no_nan_network(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # Before: the holdout samples whose logits overflow were left out, but the boundary
    # copies where they did (NaN logits) trained the pseudo-margin: every weight NaN,
    # and fit failed on the NaN scores after every attack.
    x = digits.x_holdout[:300]
    brightest = float(x.flatten(1).mean(dim=1).quantile(0.9))
    model = _Overflowing(robust_model, brightest)
    monitor = brittle.wrap(model, eps=DIGITS_EPS, head="base.8", score="pseudo")
    with pytest.warns(UserWarning, match="trained on only"):
        monitor.fit(x, steps=5, progress=False, target_tpr=0.9)
    assert monitor.pseudo is not None and monitor.report.excluded > 0
    assert all(p.isfinite().all() for p in monitor.pseudo.state_dict().values())
    assert monitor.report.settings["pseudo"]["n_boundary"] > 0
    assert np.isfinite(monitor.report.score_values["pseudo"][monitor.report.calibration]).all()


def test_resume_from_cache_recomputes_nothing(
    standard_model: nn.Module, holdout_loader: DataLoader, tmp_path, monkeypatch
) -> None:
    fit = {"n_samples": 200, "steps": 10, "progress": False, "pseudo": False}
    first = brittle.wrap(standard_model, eps=DIGITS_EPS).fit(
        holdout_loader, cache_dir=tmp_path, **fit
    )
    assert len(list(tmp_path.glob("*.pt"))) == 2  # two batches of 100

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the cached margins should have been used")

    monkeypatch.setitem(attack.ENGINES, attack.DEFAULT_ENGINE, refuse)
    second = brittle.wrap(standard_model, eps=DIGITS_EPS).fit(
        holdout_loader, cache_dir=tmp_path, **fit
    )
    np.testing.assert_array_equal(first.report.input_margins, second.report.input_margins)
    # Different attack settings must not reuse those margins.
    with pytest.raises(AssertionError, match="cached margins"):
        brittle.wrap(standard_model, eps=DIGITS_EPS).fit(
            holdout_loader, cache_dir=tmp_path, **{**fit, "steps": 11}
        )


class _Dicts(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


@pytest.mark.parametrize("form", ["x", "xy", "dict", "tensor"])
def test_loader_forms(standard_model: nn.Module, digits: DigitsSplit, form: str) -> None:
    x, y = digits.x_holdout[:80], digits.y_holdout[:80]
    data = {
        "x": DataLoader(x, batch_size=40),
        "xy": DataLoader(TensorDataset(x, y), batch_size=40),
        "dict": DataLoader(_Dicts(x, y), batch_size=40),
        "tensor": x,
    }[form]
    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS)
    report = monitor.fit(data, steps=8, pseudo=False, progress=False, target_tpr=0.8).report
    assert report.n == 80
    assert (report.accuracy is None) == (form in ("x", "tensor"))


def test_a_loader_of_unstacked_samples_is_refused(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    # collate_fn=list yields lists of samples: the first sample was taken for the batch
    # and the second for its labels (a crash inside the model, or too few margins).
    loader = DataLoader(digits.x_holdout[:20], batch_size=10, collate_fn=list)
    with pytest.raises(ValueError, match="collate_fn=list"):
        brittle.input_margins(standard_model, loader, steps=2)
    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS)
    with pytest.raises(ValueError, match="collate_fn=list"):
        monitor.fit(loader, steps=2, progress=False)
    assert not monitor.is_fitted


def test_labels_of_the_inputs_shape_are_not_taken_for_unstacked_samples() -> None:
    # (x, y) with integer labels shaped like the float inputs (one-hot labels of as many
    # classes as features, a column of labels beside one feature) came from the default
    # collate_fn, but were refused as a collate_fn=list batch: input_margins, which reads
    # no labels, refused a loader it took before, and fit lost its hint on the labels.
    model = nn.Linear(3, 3)
    x = torch.rand(8, 3, generator=torch.Generator().manual_seed(0))
    one_hot = torch.nn.functional.one_hot(torch.arange(8) % 3, 3)
    loader = DataLoader(TensorDataset(x, one_hot), batch_size=4)
    assert brittle.input_margins(model, loader, steps=2).shape == (8,)
    column = DataLoader(TensorDataset(x[:, :1], (torch.arange(8) % 2)[:, None]), batch_size=4)
    monitor = brittle.wrap(nn.Linear(1, 2), eps=0.1)
    with pytest.raises(ValueError, match=r"a column\? pass y.squeeze\(1\)"):
        monitor.fit(column, steps=2, progress=False)


def test_fit_reads_no_batch_past_n_samples(standard_model: nn.Module, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:80]

    def stream() -> Iterator[torch.Tensor]:
        yield from (x[:40], x[40:])
        raise RuntimeError("a batch past n_samples was read")  # a stream that ends badly

    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS)
    report = monitor.fit(stream(), n_samples=80, steps=8, pseudo=False, progress=False).report
    assert report.n == 80
    assert [len(b) for b, _ in brittle.data.batches(stream(), limit=60)] == [40, 20]


def test_unjudgeable_holdout_samples_are_excluded(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    x = digits.x_holdout[:80].clone()
    x[5, 0, 0, 0] = math.nan
    report = (
        brittle.wrap(standard_model, eps=DIGITS_EPS)
        .fit(x, steps=8, pseudo=False, progress=False, target_tpr=0.8)
        .report
    )
    assert report.n == 79 and report.excluded == 1


def test_fit_explains_holdouts_it_cannot_calibrate(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    x = digits.x_holdout[:60]
    monitor = brittle.wrap(standard_model)
    small = {"steps": 5, "progress": False, "pseudo": False}
    with pytest.raises(
        ValueError, match="none of the 60 holdout samples is non-robust.*larger eps"
    ):
        monitor.fit(x, eps=1e-4, **small)
    with pytest.raises(ValueError, match="all 60 holdout samples are non-robust.*smaller eps"):
        monitor.fit(x, eps=5.0, **small)
    with pytest.raises(ValueError, match="needs at least 200 holdout samples"):
        monitor.fit(x, eps=DIGITS_EPS, steps=5, progress=False, pseudo=True)
    with pytest.raises(ValueError, match="target_tpr must be in"):
        monitor.fit(x, target_tpr=1.5)
    with pytest.raises(ValueError, match="engine must be one of"):
        monitor.fit(x, engine="cleverhans")
    assert not monitor.is_fitted


def test_report_serialises(fitted: brittle.Monitor, tmp_path) -> None:
    report = fitted.report
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    again = brittle.ConsistencyReport.from_dict(data)
    np.testing.assert_array_equal(again.input_margins, report.input_margins)
    assert again.metrics == report.metrics
    assert report.to_json(tmp_path / "r.json").is_file()
    text = str(report)
    assert "tau" in text and "AUROC" in text and f"chosen: {report.chosen}" in text


def test_a_report_with_infinities_and_nan_reads_back_exactly(tmp_path) -> None:
    """±inf and NaN come back as they were, from the JSON file and from a monitor's state.
    Infinite scores were written as null and read back as NaN; a NaN margin (a sample
    with NaN logits) came back as a censored one (inf); and a rate without samples to
    count (NaN TPR: no non-robust sample) made to_json raise ValueError."""
    from brittle.calibrate.calibration import Calibration
    from brittle.calibrate.metrics import ScoreMetrics

    inf, nan = math.inf, math.nan
    metrics = ScoreMetrics(tau=0.5, tau_ci=(0.1, 0.9), auroc=nan, aupr=nan, fpr_at_tpr=nan, n=5)
    report = brittle.ConsistencyReport(
        n=5,
        eps=0.1,
        norm="Linf",
        accuracy=None,
        nonrobust_fraction=0.0,
        censored=1,
        input_margins=np.array([0.5, inf, 0.2, nan, 0.3]),
        score_values={"logit": np.array([1.0, inf, -inf, nan, 0.5])},
        metrics={"logit": metrics},
        chosen="logit",
        reason="requested",
        threshold=0.4,
        target_tpr=0.9,
        tpr=nan,
        fpr=0.25,
        tpr_ci=(nan, nan),
        fpr_ci=(0.0, 0.8),
        timings={},
        predictions=np.zeros(5, dtype=np.int64),
        labels=None,
        calibration=np.ones(5, dtype=bool),
    )
    path = report.to_json(tmp_path / "report.json")
    again = brittle.ConsistencyReport.from_dict(json.loads(path.read_text()))
    monitor = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), eps=0.1)
    monitor.apply_calibration(
        Calibration(eps=0.1, min_tau=0.0, chosen="logit", threshold=0.4, pseudo=None, report=report)
    )
    restored = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), eps=0.1)
    restored.load_state_dict(monitor.state_dict())
    for back in (again, restored.report):
        np.testing.assert_array_equal(back.input_margins, report.input_margins)
        np.testing.assert_array_equal(back.score_values["logit"], report.score_values["logit"])
        assert math.isnan(back.tpr) and back.fpr == 0.25 and back.threshold == 0.4
        assert back.metrics["logit"].tau_ci == (0.1, 0.9) and math.isnan(
            back.metrics["logit"].auroc
        )


def test_fit_leaves_the_model_as_it_was(robust_model: nn.Module, digits: DigitsSplit) -> None:
    model = copy.deepcopy(robust_model).train()
    before = copy.deepcopy(model.state_dict())
    brittle.wrap(model, eps=DIGITS_EPS).fit(
        digits.x_holdout[:80], steps=5, pseudo=False, progress=False, target_tpr=0.8
    )
    assert model.training
    for name, param in model.named_parameters():
        assert param.grad is None and param.requires_grad
        assert torch.equal(param, before[name])


def test_calibration_errors_name_the_argument_to_change(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    x = digits.x_holdout[:60]
    monitor = brittle.wrap(standard_model)
    small = {"steps": 5, "progress": False}
    for eps, pseudo, blame in [(1e-4, False, "eps"), (5.0, False, "eps"), (0.1, True, "n_samples")]:
        with pytest.raises(brittle.CalibrationError) as caught:
            monitor.fit(x, eps=eps, pseudo=pseudo, **small)
        assert caught.value.blame == blame
    with pytest.raises(brittle.CalibrationError) as caught:
        brittle.functional.conformal_threshold([0.1, 0.2], 0.95)
    assert caught.value.blame == "eps"
    assert not monitor.is_fitted


def test_rates_come_with_exact_intervals_from_the_calibration_samples(
    fitted: brittle.Monitor,
) -> None:
    report = fitted.report
    # score="auto" with two scores: chosen on 30 % of the samples, calibrated on the rest.
    assert report.choice is not None and report.n_choice == 90
    assert not (report.choice & report.calibration).any()
    assert report.n_calibration == 210
    cal = report.calibration
    positive = report.input_margins[cal] <= report.eps
    flag = report.score_values[report.chosen][cal] <= report.threshold
    for interval, mask in ((report.tpr_ci, positive), (report.fpr_ci, ~positive)):
        exact = stats.binomtest(int(flag[mask].sum()), int(mask.sum())).proportion_ci(
            method="exact"
        )
        assert interval == pytest.approx((exact.low, exact.high), abs=1e-12)
    assert report.to_dict()["tpr_ci"] == pytest.approx(list(report.tpr_ci))


def test_the_threshold_of_a_float64_model_is_the_one_the_monitor_flags_with() -> None:
    """The float32 threshold buffer keeps the fitted threshold exactly or rounds it up.

    Before, a float64 model's threshold (the k-th smallest float64 score) was
    rounded to the nearest float32: about one fit in two rounded it down, so the
    monitor no longer flagged the k-th non-robust calibration sample, its TPR fell
    below the report's, and the guarantee lost a rank.
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.rand(600, 8, dtype=torch.float64)
    monitor = brittle.wrap(model, score="logit", norm="L2", eps=0.1)
    monitor.fit(x, target_tpr=0.9, steps=20, progress=False, pseudo=False)
    report = monitor.report
    assert float(monitor.threshold) == report.threshold
    assert report.threshold >= BF.conformal_threshold(
        report.score_values["logit"][report.calibration & (report.input_margins <= 0.1)], 0.9
    )
    with torch.no_grad():
        flag = monitor(x).flag.numpy()
    positive = report.calibration & (report.input_margins <= report.eps)
    assert flag[positive].mean() == report.tpr >= 0.9


def test_pseudo_auto_splits_the_holdout_only_to_train_what_is_used(
    robust_model: nn.Module, holdout_loader: DataLoader
) -> None:
    fit = {"steps": 5, "progress": False, "target_tpr": 0.9, "pseudo": "auto"}
    # A fixed score never uses the pseudo-margin: nothing trains, all samples calibrate.
    fixed = brittle.wrap(robust_model, eps=DIGITS_EPS, score="logit", min_tau=0.99)
    report = fixed.fit(holdout_loader, n_samples=240, **fit).report
    assert report.calibration.all() and report.n_choice == 0
    assert "pseudo" not in report.metrics and report.settings["pseudo"] is None
    # Chosen automatically, no score at the bar, too few samples to train it: the report
    # says the pseudo-margin would have been tried, and the holdout is not split for it.
    auto = brittle.wrap(robust_model, eps=DIGITS_EPS, min_tau=0.99)
    report = auto.fit(holdout_loader, n_samples=150, **fit).report
    assert report.settings["pseudo"]["trained"] is False
    assert "would have been tried" in report.settings["pseudo"]["note"]
    assert report.n_choice == 45 and report.n_calibration == 105


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("steps", 2.5, r"steps must be a positive integer\. Got 2\.5\."),
        ("steps", "10", r"steps must be a positive integer\. Got '10'\."),
        ("restarts", 1.0, r"restarts must be a positive integer\. Got 1\.0\."),
        ("seed", -1, r"seed must be a non-negative integer\. Got -1\."),
        ("seed", 1.5, r"seed must be a non-negative integer\. Got 1\.5\."),
        # torch's generators take seeds below 2**64: a larger one passed, and fit
        # failed in the pseudo-margin's generator once every attack was paid for.
        ("seed", 2**64, r"seed must be below 2\*\*64.* Got 18446744073709551616\."),
    ],
)
def test_attack_settings_are_checked_before_any_attack(
    standard_model: nn.Module,
    digits: DigitsSplit,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: object,
    message: str,
) -> None:
    # Before, these failed inside or after the attacks with the libraries' words
    # (TypeError from range(), numpy's "expected non-negative integer" once every
    # margin was paid for, torch.manual_seed's RuntimeError).
    calls: list[int] = []
    real = attack.attack_batch
    monkeypatch.setattr(attack, "attack_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = digits.x_holdout[:40]
    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS, example_input=x[:2])
    args = {"steps": 5, name: value}
    with pytest.raises(ValueError, match=message):
        monitor.fit(x, progress=False, **args)
    assert not monitor.is_fitted
    monitor.set_threshold(1.0)
    with pytest.raises(ValueError, match=message):
        monitor.evaluate(x, progress=False, **args)
    with pytest.raises(ValueError, match=message):
        brittle.input_margins(standard_model, x, **args)
    assert calls == []


def test_numpy_integer_settings_reach_the_margin_cache(
    standard_model: nn.Module, digits: DigitsSplit, tmp_path
) -> None:
    # Before, a numpy integer for steps passed the check and then broke the cache key
    # (TypeError: Object of type int64 is not JSON serializable).
    x = digits.x_holdout[:80]
    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS)
    monitor.fit(
        x,
        steps=np.int64(8),
        seed=np.int64(1),
        cache_dir=tmp_path,
        pseudo=False,
        progress=False,
        target_tpr=0.8,
    )
    assert monitor.report.settings["steps"] == 8
    with pytest.raises(ValueError, match=r"n_samples must be a positive integer\. Got -1\."):
        monitor.evaluate(x, n_samples=-1, steps=8, progress=False)


@pytest.mark.parametrize("target_tpr", [0.0, 1.0, 1.5, math.nan])
def test_evaluate_checks_target_tpr_before_any_attack(
    standard_model: nn.Module,
    digits: DigitsSplit,
    monkeypatch: pytest.MonkeyPatch,
    target_tpr: float,
) -> None:
    # Before, 1.5 failed after the attacks with an IndexError from the FPR figure, and
    # 0 gave a report whose FPR column was read at a TPR of 0.
    calls: list[int] = []
    real = attack.attack_batch
    monkeypatch.setattr(attack, "attack_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS, example_input=digits.x_holdout[:2])
    monitor.set_threshold(1.0)
    with pytest.raises(ValueError, match=r"target_tpr must be in \(0, 1\)"):
        monitor.evaluate(digits.x_holdout[:40], steps=5, progress=False, target_tpr=target_tpr)
    assert calls == []


def test_input_margins_take_inputs_in_another_dtype_as_fit_does(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # Before, float64 (or integer) inputs to a float32 model failed inside its first
    # convolution ("Input type (double) and bias type (float) should be the same"),
    # while fit() cast them to the model's dtype.
    x = digits.x_holdout[:6]
    reference = brittle.input_margins(robust_model, x, steps=5)
    torch.testing.assert_close(brittle.input_margins(robust_model, x.double(), steps=5), reference)
    binary = (x > 0.5).long()
    torch.testing.assert_close(
        brittle.input_margins(robust_model, binary, steps=5),
        brittle.input_margins(robust_model, binary.float(), steps=5),
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brittle.input_margins(robust_model, (x * 16).to(torch.uint8), steps=5)


class _BufferLinear(nn.Module):
    """A float64 linear classifier whose weights are buffers: a model without parameters."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_fit_feeds_a_model_without_parameters_its_buffers_dtype(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    # Before, fit() cast the holdout to float32 when the model had no parameter, so
    # a float64 model holding its weights in buffers failed on its first batch
    # ("expected m1 and m2 to have the same dtype"), even on float64 data, while
    # input_margins read the buffers' dtype and measured it.
    model = _BufferLinear(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)))
    x = digits.x_holdout[:80]
    for data in (x, x.double()):
        monitor = brittle.wrap(model, eps=0.02, score="logit")
        report = monitor.fit(data, steps=8, pseudo=False, progress=False, target_tpr=0.8).report
        assert report.n == 80
    np.testing.assert_array_equal(
        report.input_margins.astype(np.float32), brittle.input_margins(model, x, steps=8).numpy()
    )


def test_a_model_without_parameters_is_called_saved_and_loaded_in_its_buffers_dtype(
    digits: DigitsSplit, tmp_path: Path
) -> None:
    # Before, the monitor read the dtype from parameters only: a float32 batch reached
    # the float64 model and failed inside it, and save() probed it with float32 inputs.
    model = _BufferLinear(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)))
    x = digits.x_holdout[:80].double()
    monitor = brittle.wrap(model, eps=0.02, score="logit")
    monitor.fit(x, steps=8, pseudo=False, progress=False, target_tpr=0.8)
    with pytest.raises(ValueError, match="torch.float64 tensor on cpu like the model"):
        monitor(x.float())
    loaded = brittle.load(monitor.save(tmp_path / "m.pt"), model)
    torch.testing.assert_close(loaded(x).margin, monitor(x).margin)


def test_an_evaluation_claims_no_guarantee_of_its_own(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # Before, the report of evaluate() (and the command line's flag line for a saved
    # monitor) called its samples "calibration samples" and printed "guarantee: expected
    # TPR ... >= 95%" under a hand-set threshold that caught 75 % of them.
    from brittle.check.console import flag_text

    monitor = brittle.wrap(robust_model, eps=DIGITS_EPS, example_input=digits.x_holdout[:2])
    monitor.set_threshold(5.0)
    report = monitor.evaluate(digits.x_holdout[:60], steps=5, progress=False)
    text = str(report)
    assert "guarantee" not in text and "calibration" not in text
    assert "threshold 5 on the 60 evaluated samples: TPR" in text
    line = flag_text(report.to_dict())
    assert "guarantee" not in line and line.endswith(
        "on the 60 evaluated samples (exact 95% intervals); nothing recalibrated"
    )
    fitted = brittle.ConsistencyReport.from_dict({**report.to_dict(), "settings": {}})
    assert "guarantee: expected TPR on new exchangeable samples >= 95%" in str(fitted)
    assert "guarantee" in flag_text(fitted.to_dict())


def test_a_holdout_that_requires_grad_is_read_as_data(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # Before, every batch warned "Converting a tensor with requires_grad=True to a
    # scalar" (the input range), and the holdout's graph reached the attacks.
    x = digits.x_holdout[:120].clone().requires_grad_(True)
    monitor = brittle.wrap(robust_model, eps=DIGITS_EPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.fit(x, steps=8, pseudo=False, progress=False, target_tpr=0.8)
    assert monitor.has_threshold and x.grad is None


def test_fit_inside_autocast_is_refused_as_a_half_model_is(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # Before: fit under torch.autocast("cpu", bfloat16) attacked the model in bfloat16
    # without a word; its FAB margins were up to 3.9 % off the float32 ones on 40
    # robust digits, while fit refuses a bfloat16 model for that very precision.
    monitor = brittle.wrap(robust_model, eps=DIGITS_EPS)
    refused = pytest.raises(ValueError, match=r"inside torch\.autocast .* reduced precision")
    with torch.autocast("cpu", dtype=torch.bfloat16), refused:
        monitor.fit(digits.x_holdout[:40], steps=2, pseudo=False, progress=False)
    assert not monitor.has_threshold


def test_fit_inside_inference_mode_says_so(robust_model: nn.Module, digits: DigitsSplit) -> None:
    # Inference mode turns autograd off: the attacks found no input gradient, and the
    # error blamed the model ("an argmax or a rounding to integers inside forward").
    x = digits.x_holdout[:40]
    monitor = brittle.wrap(robust_model, eps=DIGITS_EPS)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"torch\.inference_mode\(\) turns autograd off"):
            monitor.fit(x, steps=2, pseudo=False, progress=False, target_tpr=0.8)
        with pytest.raises(ValueError, match=r"torch\.inference_mode\(\) turns autograd off"):
            brittle.input_margins(robust_model, x[:4], steps=2, progress=False)
    assert not monitor.has_threshold
