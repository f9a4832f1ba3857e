"""Calibrating a monitor: input margins on a holdout, consistency, threshold, pseudo-margin.

``calibrate`` is a pure step: it reads the monitor (its model, norm and scores)
and returns a :class:`~brittle.calibrate.calibration.Calibration`, which
``Monitor.apply_calibration`` installs in one step. ``Monitor.fit`` is the two
together.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor

from brittle.arguments import positive_int
from brittle.attacks.attack import ENGINES
from brittle.attacks.distributed import shard
from brittle.attacks.settings import DEFAULT_ENGINE, AttackSettings
from brittle.attacks.verify import model_device, model_dtype
from brittle.calibrate.cache import MarginCache
from brittle.calibrate.calibration import Calibration, ScoreKind
from brittle.calibrate.holdout import BoundaryRows, Holdout, collect_holdout, holdout_report
from brittle.calibrate.metrics import (
    ScoreMetrics,
    kendall_tau,
    nonrobust,
    rate_intervals,
    score_metrics,
)
from brittle.calibrate.pseudo_train import MIN_TRAIN_SAMPLES, train_pseudo_margin
from brittle.calibrate.split import (
    CHOICE_SHARE,
    ChoiceOutcome,
    HoldoutSplit,
    choose_and_threshold,
    choose_by_tau,
    split_holdout,
)
from brittle.calibrate.threshold import check_target_tpr, min_positives, rates
from brittle.calibrate.timing import timed
from brittle.deploy.telemetry import margin_buckets
from brittle.errors import CalibrationError
from brittle.output import flagged, rejected
from brittle.scores.head import NO_HEAD_HINT
from brittle.scores.norms import check_eps

if TYPE_CHECKING:
    from brittle.protocol import MonitorProtocol

__all__ = [
    "calibrate",
    "choose_score",
    "pseudo_scores",
    "PSEUDO_TRAIN_SHARE",
    "SMALL_PSEUDO_TRAINING",
    "alarm_reference",
]

# Share of the holdout the pseudo-margin network trains on when no pseudo_data is given.
PSEUDO_TRAIN_SHARE = 0.5
# Below this many training samples the report warns that the pseudo-margin is
# under-trained (the paper trains it on 5,000 training-set samples).
SMALL_PSEUDO_TRAINING = 1000


def _check_both_classes(margins: np.ndarray, eps: float, what: str = "holdout") -> None:
    """Refuse ``margins`` with no non-robust or no robust sample; ``what`` names the samples."""
    positive = nonrobust(margins, eps)
    n = margins.size
    if not positive.any():
        finite = margins[np.isfinite(margins)]
        smallest = f"{finite.min():.4g}" if finite.size else "inf (no adversarial found)"
        raise CalibrationError(
            f"none of the {n} {what} samples is non-robust at eps={eps:.4g} (smallest input "
            f"margin {smallest}), so no threshold can be calibrated. Use a larger eps, more "
            "samples, or more attack steps.",
            blame="eps",
        )
    if positive.all():
        raise CalibrationError(
            f"all {n} {what} samples are non-robust at eps={eps:.4g} (largest input margin "
            f"{margins.max():.4g}), so robust and brittle decisions cannot be told apart. Use a "
            "smaller eps or more samples.",
            blame="eps",
        )


def choose_score(metrics: dict[str, ScoreMetrics], min_tau: float) -> tuple[ScoreKind, str]:
    """Logit margin if its tau reaches ``min_tau``; else the score with the highest tau.

    ``split.choose_by_tau`` on the metrics' taus: a score is only ever chosen over
    the logit margin when its tau is higher; a NaN tau never wins. ``fit`` makes
    this choice on choice samples apart from the calibration samples.

    Examples:
        >>> from brittle.functional import ScoreMetrics
        >>> m = lambda tau: ScoreMetrics(tau, (tau, tau), 0.9, 0.5, 0.1, 100)
        >>> choose_score({"logit": m(0.3), "feature": m(0.2), "pseudo": m(0.4)}, 0.5)[0]
        'pseudo'
        >>> choose_score({"logit": m(0.3), "pseudo": m(float("nan"))}, 0.5)[0]
        'logit'
    """
    chosen, reason = choose_by_tau({k: m.tau for k, m in metrics.items()}, min_tau)
    return cast(ScoreKind, chosen), reason


def _pseudo_required(monitor: MonitorProtocol, pseudo: object) -> bool:
    """Whether the pseudo-margin must train: asked for, or the monitor's fixed score."""
    return pseudo is True or monitor.requested_score == "pseudo"


def _pseudo_possible(monitor: MonitorProtocol, pseudo: object) -> bool:
    """Whether this fit may train the pseudo-margin: required, or ``"auto"`` choosing the score."""
    auto = pseudo == "auto" and monitor.requested_score == "auto"
    return auto or _pseudo_required(monitor, pseudo)


def _validate(
    monitor: MonitorProtocol,
    *,
    target_tpr: float,
    engine: str,
    pseudo: object,
    min_tau: float,
) -> None:
    check_target_tpr(target_tpr)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}. Got {engine!r}.")
    if pseudo not in (True, False, "auto"):
        raise ValueError(f"pseudo must be True, False or 'auto'. Got {pseudo!r}.")
    if not -1.0 <= min_tau <= 1.0:
        raise ValueError(f"min_tau must be in [-1, 1]. Got {min_tau}.")
    dtype = model_dtype(monitor.model)  # the buffers' of a model without parameters
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"fit() needs a float32 or float64 model; this one is {dtype}, whose "
            "precision is too coarse for minimum-norm attacks. Fit a float32 copy "
            "(copy.deepcopy(model).float()), save the monitor, and load it onto this model "
            "with brittle.load: the same model in another dtype is accepted."
        )
    if _autocast(model_device(monitor.model)):
        # The model's own ops would run in float16 or bfloat16, as in a half model.
        raise ValueError(
            "fit() inside torch.autocast runs the model in reduced precision, too coarse "
            "for minimum-norm attacks: call fit outside the autocast block."
        )
    if _pseudo_required(monitor, pseudo) and monitor.head_name is None and monitor.discovered:
        raise ValueError(f"the pseudo-margin needs the model's last linear layer. {NO_HEAD_HINT}")


def _autocast(device: torch.device) -> bool:
    """Whether ``torch.autocast`` is on for ``device``'s type (never for one it has not)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know, as "meta"
        return False


def _pseudo_plan(
    monitor: MonitorProtocol,
    pseudo: object,
    *,
    choice_taus: dict[str, float],
    min_tau: float,
    n: int,
    has_data: bool,
) -> tuple[bool, str | None]:
    """Whether to train the pseudo-margin network, and a note when ``"auto"`` wanted it but can't.

    ``pseudo="auto"`` trains it only when the score is chosen automatically (a
    fixed score never uses it) and no score reaches ``min_tau`` on the choice
    samples. Only then is the holdout split for it.
    """
    needed = math.ceil(MIN_TRAIN_SAMPLES / PSEUDO_TRAIN_SHARE)
    if _pseudo_required(monitor, pseudo):
        if monitor.head_name is None:
            raise ValueError(
                f"the pseudo-margin needs the model's last linear layer. {NO_HEAD_HINT}"
            )
        if not has_data and n < needed:
            raise CalibrationError(
                f"the pseudo-margin network needs at least {needed} holdout samples "
                f"({MIN_TRAIN_SAMPLES} to train, the rest to choose and calibrate). Got {n}: "
                "pass more samples, pseudo_data= (samples to train it on), or pseudo=False.",
                blame="n_samples",
            )
        return True, None
    if not _pseudo_possible(monitor, pseudo) or not choice_taus:
        return False, None
    best = max((t for t in choice_taus.values() if not math.isnan(t)), default=math.nan)
    if best >= min_tau:
        return False, None
    why = f"no score reaches min_tau {min_tau:.3f} on the choice samples (best {best:.3f})"
    if monitor.head_name is None:
        return False, f"the pseudo-margin would have been tried ({why}) but needs a linear head"
    if not has_data and n < needed:
        return False, (
            f"the pseudo-margin would have been tried ({why}) but needs {needed} holdout "
            f"samples, got {n}: pass pseudo_data= or more samples"
        )
    return True, None


def _train_pseudo(
    features: Tensor | None,
    logits: Tensor,
    margins: np.ndarray,
    device: torch.device,
    seed: int,
    boundary: BoundaryRows | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    if features is None:
        raise RuntimeError("the head's input features were not captured during the holdout pass.")
    n = features.shape[0]
    if n < MIN_TRAIN_SAMPLES:
        raise CalibrationError(
            f"the pseudo-margin network needs at least {MIN_TRAIN_SAMPLES} training samples. "
            f"Got {n}: pass more pseudo_data or pseudo=False.",
            blame="n_samples",
        )
    rows = None if boundary is None else (boundary.features, boundary.logits, boundary.margins)
    net, info = train_pseudo_margin(
        features.to(device), logits.to(device), torch.from_numpy(margins), seed=seed, boundary=rows
    )
    summary: dict[str, Any] = asdict(info)
    if not math.isfinite(info.val_tau):  # no epoch had a tau; the report's JSON has no NaN
        summary["val_tau"] = None
    if boundary is None:
        summary["boundary_note"] = (
            "trained on natural samples only (pseudo_boundary=False, or an engine other "
            "than brittle's, which gives no boundary points)"
        )
    if n < SMALL_PSEUDO_TRAINING:
        summary["warning"] = (
            f"the pseudo-margin network trained on only {n} samples; its ranking is "
            f"unreliable below about {SMALL_PSEUDO_TRAINING}. Pass pseudo_data= (the paper "
            "uses 5,000 training-set samples)."
        )
        warnings.warn(summary["warning"], stacklevel=4)
    return net, summary


def pseudo_scores(
    net: torch.nn.Module, features: Tensor, logits: Tensor, device: torch.device
) -> np.ndarray:
    """The pseudo-margin network's scores of stored features and logits, in chunks."""
    with torch.no_grad():
        values = [
            net(f.to(device), z.to(device)).cpu()
            for f, z in zip(features.split(4096), logits.split(4096), strict=True)
        ]
    return torch.cat(values).double().numpy()


def _split_hint(message: str, choice: np.ndarray, train: np.ndarray) -> str:
    """``message`` plus where the holdout's other samples went, when some did."""
    uses = []
    if choice.any():
        uses.append(f"{int(choice.sum())} chose the score (score='auto'; fix score= to skip)")
    if train.any():
        uses.append(f"{int(train.sum())} trained the pseudo-margin (pass pseudo_data= to skip)")
    return message if not uses else f"{message} Of the holdout, " + " and ".join(uses) + "."


class _Plan(NamedTuple):
    """How ``calibrate`` divides the holdout, decided before anything is trained."""

    choosing: bool  # the score is chosen automatically among several
    choice_share: float
    parts: HoldoutSplit
    wants_pseudo: bool
    pseudo_note: str | None  # why "auto" wanted the pseudo-margin but cannot train it


def _plan(
    monitor: MonitorProtocol,
    holdout: Holdout,
    pseudo: object,
    has_pseudo_data: bool,
    min_tau: float,
    seed: int,
) -> _Plan:
    """Choice, training and calibration samples, and whether the pseudo-margin trains."""
    scores, margins = holdout.scores, holdout.margins
    n = margins.size
    # Several candidate scores: the automatic choice is made on samples of its own,
    # so that the threshold keeps its split-conformal guarantee for the chosen score.
    choosing = monitor.requested_score == "auto" and (
        len(scores) > 1 or (pseudo is not False and monitor.head_name is not None)
    )
    choice_share = CHOICE_SHARE if choosing else 0.0
    choice = split_holdout(n, choice_share=choice_share, train_share=0.0, seed=seed).choice
    choice_taus = {k: kendall_tau(v[choice], margins[choice]) for k, v in scores.items()}
    wants_pseudo, pseudo_note = _pseudo_plan(
        monitor,
        pseudo,
        choice_taus=choice_taus if choosing else {},
        min_tau=min_tau,
        n=n,
        has_data=has_pseudo_data,
    )
    from_holdout = wants_pseudo and not has_pseudo_data
    parts = split_holdout(
        n,
        choice_share=choice_share,
        train_share=PSEUDO_TRAIN_SHARE if from_holdout else 0.0,
        seed=seed,
    )
    return _Plan(choosing, choice_share, parts, wants_pseudo, pseudo_note)


def _choose_and_threshold(
    monitor: MonitorProtocol,
    scores: dict[str, np.ndarray],
    margins: np.ndarray,
    plan: _Plan,
    eps: float,
    target_tpr: float,
    min_tau: float,
) -> ChoiceOutcome:
    """The score (chosen on the choice samples, or the requested one) and its threshold."""
    requested = monitor.requested_score
    candidates: dict[str, np.ndarray] = (
        scores if requested == "auto" else {requested: scores[requested]}
    )
    try:
        return choose_and_threshold(
            candidates,
            margins,
            eps=eps,
            target_tpr=target_tpr,
            min_tau=min_tau,
            choice=plan.parts.choice if plan.choosing else None,
            calibration=plan.parts.calibration,
        )
    except CalibrationError as err:
        hint = _split_hint(str(err), plan.parts.choice, plan.parts.train)
        raise CalibrationError(hint, blame=err.blame) from None
    except ValueError as err:
        raise ValueError(_split_hint(str(err), plan.parts.choice, plan.parts.train)) from None


def _stored_threshold(value: float, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` (the monitor's threshold buffer) at or above ``value``.

    A float64 model's scores are float64 while the buffer is float32: rounded to
    the nearest float32, the threshold could fall below the k-th score and leave
    that non-robust sample unflagged. Rounded up, every sample the fitted
    threshold flags is still flagged, and the report shows the threshold in use.
    """
    stored = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(stored) < value:
        stored = torch.nextafter(stored, torch.tensor(math.inf, dtype=dtype))
    return float(stored)


def alarm_reference(scores: np.ndarray, threshold: float) -> tuple[int, int] | None:
    """The flag-rate alarm's reference: ``(flagged, judged)`` of the calibration samples.

    A NaN score is the monitor's fail-closed mark (rejected, not judged): the alarm
    never sees such samples in production, so they are not counted. ``None`` when
    no sample was judged (``Telemetry`` then says the alarm is unavailable).

    Examples:
        >>> import numpy as np
        >>> alarm_reference(np.array([0.1, 0.5, np.nan, 0.2]), 0.2)
        (2, 3)
    """
    accepted = ~rejected(scores)
    judged = int(accepted.sum())
    n_flagged = int(np.count_nonzero(flagged(scores, threshold) & accepted))
    return (n_flagged, judged) if judged else None


def calibrate(
    monitor: MonitorProtocol,
    loader: Iterable[Any] | Tensor,
    *,
    target_tpr: float = 0.95,
    eps: float | None = None,
    n_samples: int | None = None,
    steps: int = 100,
    restarts: int = 1,
    pseudo: bool | Literal["auto"] = "auto",
    pseudo_data: Iterable[Any] | Tensor | None = None,
    min_tau: float | None = None,
    engine: str = DEFAULT_ENGINE,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    pseudo_boundary: bool = True,
) -> Calibration:
    """Calibrate ``monitor`` on a holdout and return the calibration; the monitor is unchanged.

    1. Check every argument, then stream the holdout once: scores, features,
       predictions, labels (each batch checked before it is attacked), and
       input margins against the predicted class (cached in ``cache_dir``).
    2. With ``score="auto"`` and several candidate scores, set apart a seeded
       ``CHOICE_SHARE`` of the holdout: the *choice* samples. The score is chosen
       on them alone (and ``pseudo="auto"`` decides there whether the
       pseudo-margin is worth training), so the threshold below keeps its
       guarantee for the chosen score. A fixed score needs no choice samples.
    3. Train the pseudo-margin network when asked (``pseudo=True``) or needed
       (``"auto"``, the score chosen automatically, and no score reaching
       ``min_tau`` on the choice samples): on ``pseudo_data`` when given (its
       margins computed the same way), else on a part of the holdout
       (``PSEUDO_TRAIN_SHARE``) that neither the choice nor the threshold uses.
       Only then is the holdout split for it; when ``"auto"`` wanted it but
       cannot train it (no head, too few samples), the report says so.
    4. On the remaining *calibration* samples: the split-conformal threshold at
       ``target_tpr``, Kendall tau with a bootstrap interval and detection metrics
       of every score, and the achieved TPR and FPR with exact (Clopper-Pearson)
       95 % intervals. The threshold's guarantee: the expected TPR on new
       non-robust samples exchangeable with the calibration ones is at least
       ``target_tpr``.

    Args:
        monitor: The monitor to calibrate. Its calibration is not modified; a
            monitor that has not yet seen an input discovers its head and input
            shape on the first holdout batch, as its first forward pass would.
        loader: Holdout: a tensor or a loader yielding ``x``, ``(x, y)`` or dicts,
            inputs in ``[0, 1]``.
        target_tpr: Share of non-robust decisions the flag must catch.
        eps: Budget defining non-robust (defaults to the monitor's ``eps``).
        n_samples: Use at most this many holdout samples.
        steps: Attack iterations per restart.
        restarts: Attack restarts per sample (the smallest verified norm is kept).
        pseudo: ``True``, ``False`` or ``"auto"``.
        pseudo_data: Samples to train the pseudo-margin network on (for example
            5,000 training-set samples), never used for calibration. Without it
            the network trains on half of the holdout (``PSEUDO_TRAIN_SHARE``).
        min_tau: Consistency bar (defaults to the monitor's ``min_tau``).
        engine: Attack engine: ``"brittle"`` (brittle's FAB, the default) or
            ``"torchattacks"`` (the reference FAB).
        progress: Show a progress bar.
        cache_dir: Directory for resumable margin caching.
        seed: Seeds attacks, splits and training.
        distributed: Shard the attacks across the ranks of the initialised
            torch.distributed process group (``None``: whenever one is initialised).
            Every rank must iterate the same holdout in the same order (checked);
            every rank ends with the same calibration.
        pseudo_boundary: Train the pseudo-margin network on the training samples'
            boundary points and their copies too (``brittle.calibrate.boundary``),
            so that an attacker who crosses the boundary meets small scores. It
            costs natural ranking (on the certified digits CNN, tau 0.62 against
            0.78, ``docs/security.md``); ``False`` trains on natural samples only,
            for inputs that no attacker chooses.

    Raises:
        ValueError: for a bad argument or batch (before any attack), or a model in
            half precision.
        CalibrationError: (a ``ValueError``) for a holdout with no non-robust or no
            robust samples at ``eps``, or too few for the threshold or the
            pseudo-margin network; ``blame`` names the argument to change.
    """
    min_tau = monitor.min_tau if min_tau is None else float(min_tau)
    n_samples = None if n_samples is None else positive_int("n_samples", n_samples)
    _validate(
        monitor,
        target_tpr=target_tpr,
        engine=engine,
        pseudo=pseudo,
        min_tau=min_tau,
    )
    if not isinstance(pseudo_boundary, bool):
        raise ValueError(f"pseudo_boundary must be True or False. Got {pseudo_boundary!r}.")
    eps = monitor.eps if eps is None else check_eps(eps)
    settings = AttackSettings(norm=monitor.norm, steps=steps, restarts=restarts, seed=seed)
    part = shard(distributed)
    cache = MarginCache(cache_dir, monitor.model, settings, engine) if cache_dir else None
    device = monitor.threshold.device

    def stream(
        data: Iterable[Any] | Tensor, limit: int | None, desc: str, boundary: bool
    ) -> Holdout:
        return collect_holdout(
            monitor,
            data,
            settings,
            engine=engine,
            n_samples=limit,
            progress=progress,
            cache=cache,
            part=part,
            desc=desc,
            boundary=eps if boundary and pseudo_boundary and engine == "brittle" else None,
        )

    timings: dict[str, float] = {}
    with timed(timings, "attack"):
        # The pseudo-margin network trains on boundary points too: the attack's own
        # points, kept from the pass that may feed it (brittle.calibrate.boundary).
        may_train = _pseudo_possible(monitor, pseudo) and pseudo_data is None
        holdout = stream(loader, n_samples, "fit: input margins", may_train)
    margins = holdout.margins
    _check_both_classes(margins, eps)

    with timed(timings, "metrics"):
        plan = _plan(monitor, holdout, pseudo, pseudo_data is not None, min_tau, seed)
    scores = dict(holdout.scores)
    net, pseudo_info = (
        None,
        None if plan.pseudo_note is None else {"trained": False, "note": plan.pseudo_note},
    )
    if plan.wants_pseudo:
        with timed(timings, "pseudo"):
            if pseudo_data is not None:
                with timed(timings, "pseudo_attack"):
                    training = stream(pseudo_data, None, "fit: pseudo-margin data", True)
                net, pseudo_info = _train_pseudo(
                    training.features,
                    training.logits,
                    training.margins,
                    device,
                    seed,
                    training.boundary,
                )
                pseudo_info["source"] = "pseudo_data"
            else:
                train = torch.from_numpy(np.flatnonzero(plan.parts.train))
                features = None if holdout.features is None else holdout.features[train]
                rows = holdout.boundary
                if rows is not None:
                    kept = (rows.features[train], rows.logits[train], rows.margins[train])
                    rows = BoundaryRows(*kept)
                net, pseudo_info = _train_pseudo(
                    features, holdout.logits[train], margins[plan.parts.train], device, seed, rows
                )
                pseudo_info["source"] = "holdout split"
            # val_tau picked the epoch, so it is an in-sample (optimistic) figure; the
            # report's metrics["pseudo"] come from calibration samples the network never saw.
            pseudo_info["val_tau_is"] = "best epoch on its own validation split (optimistic)"
            part.broadcast_module(net)  # identical networks on every rank, whatever the device
            if holdout.features is None:
                raise RuntimeError("the head's input features were not captured during the pass.")
            scores["pseudo"] = pseudo_scores(net, holdout.features, holdout.logits, device)
    holdout.scores = scores
    calibration = plan.parts.calibration
    try:
        # The holdout as a whole has both kinds; say when only the split left one out.
        _check_both_classes(margins[calibration], eps, "calibration")
    except CalibrationError as err:
        hint = _split_hint(str(err), plan.parts.choice, plan.parts.train)
        raise CalibrationError(hint, blame=err.blame) from None

    with timed(timings, "metrics"):
        outcome = _choose_and_threshold(monitor, scores, margins, plan, eps, target_tpr, min_tau)
        chosen = cast(ScoreKind, outcome.chosen)
        threshold = _stored_threshold(outcome.threshold, monitor.threshold.dtype)
        metrics = {
            k: score_metrics(v[calibration], margins[calibration], eps, target_tpr, seed=seed)
            for k, v in scores.items()
        }
    positive = nonrobust(margins[calibration], eps)
    cal_scores = scores[chosen][calibration]
    tpr, fpr = rates(cal_scores, positive, threshold)
    tpr_ci, fpr_ci = rate_intervals(cal_scores, positive, threshold)
    reference_counts = alarm_reference(cal_scores, threshold)
    reference_flag_rate = (
        None if reference_counts is None else reference_counts[0] / reference_counts[1]
    )
    report = holdout_report(
        holdout,
        eps=eps,
        norm=monitor.norm,
        metrics=metrics,
        chosen=chosen,
        reason=outcome.reason,
        threshold=threshold,
        target_tpr=target_tpr,
        tpr=tpr,
        fpr=fpr,
        tpr_ci=tpr_ci,
        fpr_ci=fpr_ci,
        timings=timings,
        calibration=calibration,
        choice=plan.parts.choice,
        settings={
            "engine": engine,
            "steps": steps,
            "restarts": restarts,
            "seed": seed,
            "min_tau": min_tau,
            "min_positives": min_positives(target_tpr),
            "choice_share": plan.choice_share,
            "pseudo": pseudo_info,
            "passes": holdout.passes,
        },
    )
    return Calibration(
        eps=eps,
        min_tau=min_tau,
        chosen=chosen,
        threshold=threshold,
        pseudo=net,
        report=report,
        reference_flag_rate=reference_flag_rate,
        reference_counts=reference_counts,
        margin_buckets=margin_buckets(cal_scores, threshold),
        input_range=holdout.input_range,
    )
