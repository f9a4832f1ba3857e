"""The automatic score choice keeps the threshold's guarantee: a simulation with known tau."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from brittle.calibrate.metrics import clopper_pearson, nonrobust, wilson_interval
from brittle.calibrate.report import ConsistencyReport
from brittle.calibrate.split import CHOICE_SHARE, choose_and_threshold, split_holdout

# Three equally good scores: a standard normal Z sets the input margin exp(Z), and
# each score is RHO * Z + sqrt(1 - RHO^2) * noise. Kendall tau of a bivariate normal
# with correlation RHO is 2 / pi * asin(RHO) (a monotone map of Z keeps it).
RHO = 0.7
TRUE_TAU = 2 / math.pi * math.asin(RHO)
EPS = math.exp(stats.norm.ppf(0.3))  # 30 % of the samples are non-robust
NAMES = ("logit", "feature", "pseudo")


def _draw(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    z = rng.standard_normal(n)
    noise = math.sqrt(1 - RHO**2)
    return {k: RHO * z + noise * rng.standard_normal(n) for k in NAMES}, np.exp(z)


def test_the_chosen_score_is_reported_and_thresholded_out_of_sample() -> None:
    rng = np.random.default_rng(0)
    scores, margins = _draw(rng, 400_000)
    # Every score has the same law: one sorted sample of fresh non-robust scores
    # gives the TPR of any threshold on new data.
    fresh = np.sort(scores["logit"][margins <= EPS])
    n, target, runs = 250, 0.9, 1000
    bias, tpr, share = np.empty(runs), np.empty(runs), np.empty(runs)
    for run in range(runs):
        scores, margins = _draw(rng, n)
        parts = split_holdout(n, choice_share=CHOICE_SHARE, train_share=0.0, seed=run)
        out = choose_and_threshold(
            scores,
            margins,
            eps=EPS,
            target_tpr=target,
            min_tau=0.9,  # no score reaches it: the best tau wins, the selection at stake
            choice=parts.choice,
            calibration=parts.calibration,
        )
        bias[run] = out.tau - TRUE_TAU
        tpr[run] = np.searchsorted(fresh, out.threshold, side="right") / fresh.size
        # Given k = ceil((m + 1) * target) of m positives, the TPR is Beta(k, m + 1 - k):
        # the conformal share is its chance to reach the target.
        m = int(nonrobust(margins[parts.calibration], EPS).sum())
        k = math.ceil((m + 1) * target - 1e-9)
        share[run] = stats.beta.sf(target, k, m + 1 - k)
    # Over seeds 0-4 at n = 250 and 500: mean bias -0.001 to +0.0015 (choosing on the
    # calibration samples: +0.016 to +0.024); mean TPR 0.903-0.909 (same samples:
    # 0.892-0.895); share reaching the target 0.032 below the conformal share at worst
    # (same samples: 0.15 below).
    assert abs(bias.mean()) <= 0.005
    assert tpr.mean() >= target - 0.003
    assert (tpr >= target).mean() >= share.mean() - 0.05


def test_choose_and_threshold_refuses_overlapping_or_missing_choice_samples() -> None:
    scores, margins = _draw(np.random.default_rng(1), 100)
    everything = np.ones(100, dtype=bool)
    with pytest.raises(ValueError, match="disjoint"):
        choose_and_threshold(
            scores,
            margins,
            eps=EPS,
            target_tpr=0.9,
            min_tau=0.5,
            choice=everything,
            calibration=everything,
        )
    with pytest.raises(ValueError, match="choice samples"):
        choose_and_threshold(
            scores,
            margins,
            eps=EPS,
            target_tpr=0.9,
            min_tau=0.5,
            choice=None,
            calibration=everything,
        )


def test_split_holdout_parts_are_disjoint_and_cover_the_holdout() -> None:
    parts = split_holdout(1000, choice_share=0.3, train_share=0.5, seed=3)
    total = parts.choice.astype(int) + parts.train.astype(int) + parts.calibration.astype(int)
    assert (total == 1).all()
    assert (parts.choice.sum(), parts.train.sum()) == (300, 500)
    # The choice samples do not move when the pseudo-margin's training part is added.
    alone = split_holdout(1000, choice_share=0.3, train_share=0.0, seed=3)
    assert (alone.choice == parts.choice).all()


@pytest.mark.parametrize("n", [1, 19, 50, 1000])
def test_clopper_pearson_matches_scipy_binomtest(n: int) -> None:
    for k in sorted({0, 1, n // 3, n - 1, n} - {-1}):
        expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        low, high = clopper_pearson(k, n)
        assert low == pytest.approx(expected.low, abs=1e-12), (k, n)
        assert high == pytest.approx(expected.high, abs=1e-12), (k, n)
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))


@pytest.mark.parametrize("n", [1, 19, 50, 1000])
def test_wilson_interval_matches_scipy_binomtest(n: int) -> None:
    for k in sorted({0, 1, n // 3, n - 1, n} - {-1}):
        expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(expected.low, abs=1e-12), (k, n)
        assert high == pytest.approx(expected.high, abs=1e-12), (k, n)


def _old_report_dict() -> dict[str, object]:
    """A report as saved before the choice samples and the exact intervals."""
    metrics = {"tau": 0.5, "tau_ci": [0.4, 0.6], "auroc": 0.9, "aupr": 0.8, "fpr_at_tpr": 0.2}
    return {
        "n": 4,
        "eps": 0.1,
        "norm": "Linf",
        "accuracy": None,
        "nonrobust_fraction": 0.5,
        "censored": 0,
        "input_margins": [0.05, 0.08, 0.3, None],
        "score_values": {"logit": [0.1, 0.2, 0.9, 1.2]},
        "metrics": {"logit": {**metrics, "n": 4}},
        "chosen": "logit",
        "reason": "requested with score='logit'",
        "threshold": 0.2,
        "target_tpr": 0.5,
        "tpr": 1.0,
        "fpr": 0.0,
        "timings": {},
        "predictions": [0, 1, 0, 1],
        "labels": None,
        "calibration": [True, True, True, True],
    }


def test_an_old_report_loads_with_a_warning_and_a_new_one_round_trips() -> None:
    with pytest.warns(UserWarning, match="before brittle reported exact TPR/FPR intervals"):
        old = ConsistencyReport.from_dict(_old_report_dict())
    assert math.isnan(old.tpr_ci[0]) and old.n_choice == 0 and old.n_calibration == 4
    new = _old_report_dict()
    new.update(
        tpr_ci=list(clopper_pearson(2, 2)),
        fpr_ci=list(clopper_pearson(0, 2)),
        choice=[False, False, False, False],
    )
    report = ConsistencyReport.from_dict(new)
    again = report.to_dict()
    assert again["tpr_ci"] == list(clopper_pearson(2, 2))
    assert again["fpr_ci"] == list(clopper_pearson(0, 2))
    assert (again["n_calibration"], again["n_choice"]) == (4, 0)
    assert "guarantee: expected TPR on new exchangeable samples >= 50%" in str(report)


@pytest.mark.parametrize(("target", "shown"), [(0.5, "50%"), (0.975, "97.5%"), (0.995, "99.5%")])
def test_the_report_states_the_guarantee_it_has(target: float, shown: str) -> None:
    # Before: rounded to whole percent, 0.995 read ">= 100%" and 0.975 ">= 98%".
    data = _old_report_dict()
    data.update(target_tpr=target, tpr_ci=[0.5, 1.0], fpr_ci=[0.0, 0.5])
    text = str(ConsistencyReport.from_dict(data))
    assert f"guarantee: expected TPR on new exchangeable samples >= {shown}\n" in text
    assert f"FPR@{shown}" in text
