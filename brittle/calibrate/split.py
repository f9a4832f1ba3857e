"""How ``fit()`` divides a holdout: choice samples, pseudo-margin training, calibration.

A split-conformal threshold keeps its guarantee only for a score fixed before
its calibration samples were seen. When ``score="auto"`` picks among several
scores, the pick is therefore made on *choice* samples, and the threshold and
every reported figure come from the other, *calibration* samples. A user who
fixes the score needs no choice samples. The pseudo-margin network, when it is
trained on the holdout, trains on a third part that neither choice nor
threshold uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from brittle.calibrate.metrics import kendall_tau, nonrobust
from brittle.calibrate.threshold import conformal_threshold

__all__ = [
    "CHOICE_SHARE",
    "HoldoutSplit",
    "split_holdout",
    "choose_by_tau",
    "choose_and_threshold",
    "ChoiceOutcome",
]

# Share of the holdout the automatic score choice is made on. The choice compares
# taus that differ by tenths when it matters, so it needs fewer samples than the
# threshold, whose rank statistic needs min_positives non-robust samples.
CHOICE_SHARE = 0.3


@dataclass(frozen=True)
class HoldoutSplit:
    """Disjoint masks over the holdout's samples.

    Attributes:
        choice: Samples the score choice is made on (none when the score is fixed).
        train: Samples the pseudo-margin network trains on (none unless it does).
        calibration: The rest: the threshold and every reported figure.
    """

    choice: np.ndarray
    train: np.ndarray
    calibration: np.ndarray


def split_holdout(n: int, *, choice_share: float, train_share: float, seed: int) -> HoldoutSplit:
    """One seeded permutation cut into choice, training and calibration samples.

    The choice samples are the first ``int(n * choice_share)`` of the permutation
    whatever ``train_share`` is, so that deciding to train the pseudo-margin
    (on the choice samples) does not move them.

    Examples:
        >>> from brittle.calibrate.split import split_holdout
        >>> parts = split_holdout(10, choice_share=0.3, train_share=0.5, seed=0)
        >>> int(parts.choice.sum()), int(parts.train.sum()), int(parts.calibration.sum())
        (3, 5, 2)
    """
    if not (0.0 <= choice_share < 1.0 and 0.0 <= train_share < 1.0):
        raise ValueError(
            f"shares must be in [0, 1). Got choice {choice_share}, train {train_share}."
        )
    order = np.random.default_rng(seed).permutation(n)
    n_choice, n_train = int(n * choice_share), int(n * train_share)
    if n_choice + n_train >= n:
        raise ValueError(
            f"{n} samples leave none to calibrate on after {n_choice} for the choice and "
            f"{n_train} to train the pseudo-margin."
        )
    masks = [np.zeros(n, dtype=bool) for _ in range(3)]
    masks[0][order[:n_choice]] = True
    masks[1][order[n_choice : n_choice + n_train]] = True
    masks[2][order[n_choice + n_train :]] = True
    return HoldoutSplit(*masks)


def _tau(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def choose_by_tau(taus: dict[str, float], min_tau: float) -> tuple[str, str]:
    """Logit margin if its tau reaches ``min_tau``; else the score with the highest tau.

    A score is only ever chosen over the logit margin when its tau is higher; a
    NaN tau (a constant score, too few samples) never wins.

    Examples:
        >>> from brittle.calibrate.split import choose_by_tau
        >>> choose_by_tau({"logit": 0.3, "feature": 0.2, "pseudo": 0.4}, 0.5)[0]
        'pseudo'
        >>> choose_by_tau({"logit": 0.3, "pseudo": float("nan")}, 0.5)[0]
        'logit'
    """
    logit_tau = taus["logit"]
    if logit_tau >= min_tau:
        return "logit", f"logit margin tau {logit_tau:.3f} >= min_tau {min_tau:.3f}"
    best = max(taus, key=lambda k: _tau(taus[k]))
    if best == "logit" or not _tau(taus[best]) > _tau(logit_tau):
        return "logit", (
            f"logit margin tau {logit_tau:.3f} < min_tau {min_tau:.3f}, and no other score "
            "ranks better"
        )
    return best, (
        f"logit margin tau {logit_tau:.3f} < min_tau {min_tau:.3f}; {best} margin has the "
        f"highest tau ({taus[best]:.3f})"
    )


@dataclass(frozen=True)
class ChoiceOutcome:
    """The score ``choose_and_threshold`` picked and its threshold.

    Attributes:
        chosen: The score's name.
        reason: Why, with the taus of the choice samples.
        threshold: Split-conformal threshold on the calibration samples.
        tau: Kendall tau of the chosen score on the calibration samples.
    """

    chosen: str
    reason: str
    threshold: float
    tau: float


def choose_and_threshold(
    scores: dict[str, np.ndarray],
    margins: ArrayLike,
    *,
    eps: float,
    target_tpr: float,
    min_tau: float,
    choice: np.ndarray | None,
    calibration: np.ndarray,
    tau: Callable[[np.ndarray, np.ndarray], float] = kendall_tau,
) -> ChoiceOutcome:
    """Choose a score on the ``choice`` samples, threshold and measure it on ``calibration``.

    With ``choice=None`` the score must be the only one in ``scores`` (a score
    the user fixed). The threshold is the split-conformal one of
    ``conformal_threshold``: the chosen score was fixed before the calibration
    samples were looked at, so a new non-robust sample exchangeable with them
    is flagged with probability at least ``target_tpr`` in expectation over
    calibration sets.

    Raises:
        ValueError: for overlapping masks, or ``choice=None`` with several scores.

    Examples:
        >>> import numpy as np
        >>> from brittle.calibrate.split import choose_and_threshold, split_holdout
        >>> rng = np.random.default_rng(0)
        >>> margins = rng.exponential(1.0, 600)
        >>> scores = {"logit": margins + rng.normal(0, 3, 600), "feature": margins}
        >>> parts = split_holdout(600, choice_share=0.3, train_share=0.0, seed=0)
        >>> out = choose_and_threshold(scores, margins, eps=0.5, target_tpr=0.9,
        ...     min_tau=0.5, choice=parts.choice, calibration=parts.calibration)
        >>> out.chosen, out.tau
        ('feature', 1.0)
    """
    m = np.asarray(margins, dtype=np.float64)
    if choice is None:
        if len(scores) != 1:
            raise ValueError(
                f"several scores ({sorted(scores)}) need choice samples apart from the "
                "calibration samples."
            )
        chosen = next(iter(scores))
        reason = f"requested with score={chosen!r}"
    else:
        if (choice & calibration).any():
            raise ValueError("the choice and calibration samples must be disjoint.")
        taus = {k: tau(v[choice], m[choice]) for k, v in scores.items()}
        chosen, reason = choose_by_tau(taus, min_tau)
        reason += f" on {int(choice.sum())} choice samples"
    cal = scores[chosen][calibration]
    threshold = conformal_threshold(cal[nonrobust(m[calibration], eps)], target_tpr)
    return ChoiceOutcome(chosen, reason, threshold, tau(cal, m[calibration]))
