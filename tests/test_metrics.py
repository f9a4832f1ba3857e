"""Detection metrics against brute force, with tied and quantised scores; score choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import brittle.functional as BF
from brittle.calibrate.fit import choose_score


def _brute_fpr(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Smallest FPR over every threshold t (flag: score <= t) whose TPR reaches target."""
    best = math.inf
    for t in np.unique(score):
        flag = score <= t
        if flag[positive].mean() >= target:
            best = min(best, flag[~positive].mean())
    return best


def test_fpr_at_tpr_with_ties_matches_brute_force() -> None:
    score = np.array([0, -1, -1, 0, 1, 1, 1, 0], dtype=float)
    positive = np.array([0, 0, 1, 0, 0, 0, 1, 1], dtype=bool)
    assert BF.fpr_at_tpr(score, positive, 0.5) == pytest.approx(0.6)
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(5, 60))
        levels = int(rng.integers(2, 8))  # heavily quantised scores: many ties
        score = rng.integers(0, levels, size=n).astype(float)
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            continue
        target = float(rng.choice([0.5, 0.8, 0.9, 0.95]))
        got = BF.fpr_at_tpr(score, positive, target)
        assert got == pytest.approx(_brute_fpr(score, positive, target)), trial


def test_detection_metrics_with_ties_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    margins = rng.exponential(0.2, size=200)
    score = np.round(margins * 5 + rng.normal(0, 0.3, 200))  # quantised
    auroc, _, fpr = BF.detection_metrics(score, margins, eps=0.1, target_tpr=0.9)
    positive = margins <= 0.1
    pos, neg = score[positive], score[~positive]
    # AUROC: P(positive scores lower than negative) with ties counted half.
    pairs = (pos[:, None] < neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc == pytest.approx(pairs)
    assert fpr == pytest.approx(_brute_fpr(score, positive, 0.9))


def _m(tau: float) -> BF.ScoreMetrics:
    return BF.ScoreMetrics(tau, (tau, tau), 0.9, 0.5, 0.1, 100)


def test_score_choice_never_prefers_a_lower_or_nan_tau() -> None:
    assert choose_score({"logit": _m(0.6), "pseudo": _m(0.9)}, 0.5)[0] == "logit"
    assert choose_score({"logit": _m(0.3), "pseudo": _m(0.2)}, 0.5)[0] == "logit"
    assert choose_score({"logit": _m(0.3), "feature": _m(0.35)}, 0.5)[0] == "feature"
    assert choose_score({"logit": _m(0.3), "pseudo": _m(math.nan)}, 0.5)[0] == "logit"
    chosen, reason = choose_score({"logit": _m(math.nan), "feature": _m(0.1)}, 0.5)
    assert chosen == "feature" and "highest tau" in reason
    assert choose_score({"logit": _m(math.nan), "feature": _m(math.nan)}, 0.5)[0] == "logit"


def test_infinite_scores_rank_at_the_ends() -> None:
    """``inf`` is a margin (no boundary to reach): the figures are those of any larger value.

    Before, detection_metrics, score_metrics and fpr_at_tpr passed them to
    scikit-learn, which refused them ("Input contains infinity").
    """
    rng = np.random.default_rng(2)
    margins = rng.exponential(0.2, size=200)
    score = np.round(margins * 5 + rng.normal(0, 0.3, 200))
    score[:10], score[10:15] = np.inf, -np.inf
    positive = margins <= 0.1
    stand_in = np.where(np.isposinf(score), 1e6, np.where(np.isneginf(score), -1e6, score))
    got = BF.detection_metrics(score, margins, eps=0.1, target_tpr=0.9)
    assert got == pytest.approx(BF.detection_metrics(stand_in, margins, eps=0.1, target_tpr=0.9))
    assert got[2] == pytest.approx(_brute_fpr(score, positive, 0.9))
    assert BF.fpr_at_tpr(score, positive, 0.5) == pytest.approx(_brute_fpr(score, positive, 0.5))
    metrics = BF.score_metrics(score, margins, eps=0.1, n_resamples=50)
    assert math.isfinite(metrics.auroc) and math.isfinite(metrics.tau)


def test_tau_interval_of_a_sample_with_nan_is_nan_as_its_tau() -> None:
    # Before: (0.99999, 1.0), the interval of the resamples that missed the NaN.
    score, margin = [1.0, 2.0, math.nan, 4.0, 5.0], [1.0, 3.0, 2.0, 4.0, 5.0]
    assert math.isnan(BF.kendall_tau(score, margin))
    low, high = BF.kendall_tau_ci(score, margin, n_resamples=100)
    assert math.isnan(low) and math.isnan(high)
    low, high = BF.kendall_tau_ci(margin, score, n_resamples=100)
    assert math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize("n_resamples", [0, -5, 2.5, True])
def test_tau_interval_refuses_a_bad_number_of_resamples(n_resamples: object) -> None:
    # Before: n_resamples=0 raised numpy's IndexError from the quantile of no draws.
    with pytest.raises(ValueError, match="n_resamples must be a positive integer"):
        BF.kendall_tau_ci([1, 2, 3, 4], [1, 3, 2, 4], n_resamples=n_resamples)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5, math.nan])
def test_fpr_at_tpr_refuses_a_target_outside_the_unit_interval(target: float) -> None:
    # Before: 1.5 raised IndexError (no point of the ROC curve reaches it).
    with pytest.raises(ValueError, match=r"target_tpr must be in \(0, 1\]"):
        BF.fpr_at_tpr([0.1, 0.2, 0.3, 0.4], [True, False, True, False], target)


def test_the_functions_take_the_tensors_a_model_gives() -> None:
    """The guide's functional API, on tensors as ``BF.logit_margin`` returns them.

    Before, numpy converted the arguments: a score computed with gradients on
    (``BF.logit_margin(model(x))`` outside ``torch.no_grad``) raised "Can't call
    numpy() on Tensor that requires grad", a bfloat16 one "unsupported ScalarType
    BFloat16", and a GPU one "can't convert cuda:0 device type tensor to numpy"
    (tests/test_cuda.py).
    """
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 4)
    scores = BF.logit_margin(head(torch.rand(80, 6, generator=generator)))
    margins = torch.rand(80, generator=generator)
    assert scores.requires_grad
    values = margins.double().numpy()
    positive = margins <= 0.3
    for score in (scores, scores.detach().bfloat16()):
        exact = score.detach().double().numpy()  # bfloat16 rounds the scores themselves
        assert BF.kendall_tau(score, margins) == BF.kendall_tau(exact, values)
        assert BF.kendall_tau_ci(score, margins, n_resamples=50) == BF.kendall_tau_ci(
            exact, values, n_resamples=50
        )
        assert BF.detection_metrics(score, margins, eps=0.3) == BF.detection_metrics(
            exact, values, eps=0.3
        )
        assert BF.fpr_at_tpr(score, positive, 0.9) == BF.fpr_at_tpr(exact, positive.numpy(), 0.9)
        assert BF.score_metrics(score, margins, 0.3, 0.9, n_resamples=50) == BF.score_metrics(
            exact, values, 0.3, 0.9, n_resamples=50
        )
        assert BF.rates(score, positive, 0.5) == BF.rates(exact, positive.numpy(), 0.5)
        assert BF.conformal_threshold(score[positive], 0.5) == BF.conformal_threshold(
            exact[positive.numpy()], 0.5
        )
    np.testing.assert_array_equal(
        BF.nonrobust(margins.bfloat16(), 0.3), margins.bfloat16().double().numpy() <= 0.3
    )
