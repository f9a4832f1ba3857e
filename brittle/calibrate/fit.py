"""Calibrating a monitor: input margins on a holdout, consistency, threshold, pseudo-margin.

``calibrate`` is a pure step: it reads the monitor (its model, norm and scores)
and returns a :class:`~brittle.calibrate.calibration.Calibration`, which
``Monitor.apply_calibration`` installs in one step. ``Monitor.fit`` is the two
together.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from brittle.attacks.attack import ENGINES
from brittle.attacks.distributed import shard
from brittle.attacks.settings import DEFAULT_ENGINE, AttackSettings
from brittle.calibrate.cache import MarginCache
from brittle.calibrate.calibration import Calibration, ScoreKind
from brittle.calibrate.holdout import Holdout, collect_holdout, holdout_report
from brittle.calibrate.metrics import ScoreMetrics, nonrobust, score_metrics
from brittle.calibrate.pseudo_train import MIN_TRAIN_SAMPLES, train_pseudo_margin
from brittle.calibrate.threshold import conformal_threshold, min_positives, rates
from brittle.deploy.telemetry import margin_buckets
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
]

# Share of the holdout the pseudo-margin network trains on when no pseudo_data is given.
PSEUDO_TRAIN_SHARE = 0.5
# Below this many training samples the report warns that the pseudo-margin is
# under-trained (the paper trains it on 5,000 training-set samples).
SMALL_PSEUDO_TRAINING = 1000


def _check_both_classes(margins: np.ndarray, eps: float) -> None:
    positive = nonrobust(margins, eps)
    n = margins.size
    if not positive.any():
        finite = margins[np.isfinite(margins)]
        smallest = f"{finite.min():.4g}" if finite.size else "inf (no adversarial found)"
        raise ValueError(
            f"none of the {n} holdout samples is non-robust at eps={eps:.4g} (smallest input "
            f"margin {smallest}), so no threshold can be calibrated. Use a larger eps, more "
            "samples, or more attack steps."
        )
    if positive.all():
        raise ValueError(
            f"all {n} holdout samples are non-robust at eps={eps:.4g} (largest input margin "
            f"{margins.max():.4g}), so robust and brittle decisions cannot be told apart. Use a "
            "smaller eps or more samples."
        )


def _tau(metrics: ScoreMetrics) -> float:
    return -math.inf if math.isnan(metrics.tau) else metrics.tau


def choose_score(metrics: dict[str, ScoreMetrics], min_tau: float) -> tuple[ScoreKind, str]:
    """Logit margin if its tau reaches ``min_tau``; else the score with the highest tau.

    A score is only ever chosen over the logit margin when its held-out tau is
    higher; a NaN tau (a constant score, too few samples) never wins.

    Examples:
        >>> from brittle.functional import ScoreMetrics
        >>> m = lambda tau: ScoreMetrics(tau, (tau, tau), 0.9, 0.5, 0.1, 100)
        >>> choose_score({"logit": m(0.3), "feature": m(0.2), "pseudo": m(0.4)}, 0.5)[0]
        'pseudo'
        >>> choose_score({"logit": m(0.3), "pseudo": m(float("nan"))}, 0.5)[0]
        'logit'
    """
    logit_tau = metrics["logit"].tau
    if logit_tau >= min_tau:
        return "logit", f"logit margin tau {logit_tau:.3f} >= min_tau {min_tau:.3f}"
    best = max(metrics, key=lambda k: _tau(metrics[k]))
    if best != "logit" and not _tau(metrics[best]) > _tau(metrics["logit"]):
        best = "logit"
    if best == "logit":
        return "logit", (
            f"logit margin tau {logit_tau:.3f} < min_tau {min_tau:.3f}, and no other score "
            "ranks better on the calibration samples"
        )
    return best, (  # type: ignore[return-value]
        f"logit margin tau {logit_tau:.3f} < min_tau {min_tau:.3f}; {best} margin has the "
        f"highest tau ({metrics[best].tau:.3f})"
    )


def _validate(
    monitor: MonitorProtocol,
    *,
    target_tpr: float,
    n_samples: int | None,
    engine: str,
    pseudo: object,
    min_tau: float,
) -> None:
    if not 0.0 < target_tpr < 1.0:
        raise ValueError(f"target_tpr must be in (0, 1). Got {target_tpr}.")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be positive. Got {n_samples}.")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}. Got {engine!r}.")
    if pseudo not in (True, False, "auto"):
        raise ValueError(f"pseudo must be True, False or 'auto'. Got {pseudo!r}.")
    if not -1.0 <= min_tau <= 1.0:
        raise ValueError(f"min_tau must be in [-1, 1]. Got {min_tau}.")
    param = next(monitor.model.parameters(), None)
    if param is not None and param.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"fit() needs a float32 or float64 model; this one is {param.dtype}, whose "
            "precision is too coarse for minimum-norm attacks. Fit a float32 copy "
            "(copy.deepcopy(model).float()), save the monitor, and load it onto this model "
            "with brittle.load: the same model in another dtype is accepted."
        )
    wants_head = pseudo is True or monitor.requested_score == "pseudo"
    if wants_head and monitor.head_name is None and monitor.discovered:
        raise ValueError(f"the pseudo-margin needs the model's last linear layer. {NO_HEAD_HINT}")


def _pseudo_split(n: int, seed: int) -> np.ndarray:
    """Calibration mask of a holdout that also trains the pseudo-margin network."""
    needed = math.ceil(MIN_TRAIN_SAMPLES / PSEUDO_TRAIN_SHARE)
    if n < needed:
        raise ValueError(
            f"the pseudo-margin network needs at least {needed} holdout samples "
            f"({MIN_TRAIN_SAMPLES} to train, the rest to calibrate). Got {n}: pass more "
            "samples, pseudo_data= (samples to train it on), or pseudo=False."
        )
    order = np.random.default_rng(seed).permutation(n)
    calibration = np.ones(n, dtype=bool)
    calibration[order[: int(n * PSEUDO_TRAIN_SHARE)]] = False
    return calibration


def _train_pseudo(
    features: Tensor | None,
    logits: Tensor,
    margins: np.ndarray,
    device: torch.device,
    seed: int,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    if features is None:
        raise RuntimeError("the head's input features were not captured during the holdout pass.")
    n = features.shape[0]
    if n < MIN_TRAIN_SAMPLES:
        raise ValueError(
            f"the pseudo-margin network needs at least {MIN_TRAIN_SAMPLES} training samples. "
            f"Got {n}: pass more pseudo_data or pseudo=False."
        )
    net, info = train_pseudo_margin(
        features.to(device), logits.to(device), torch.from_numpy(margins), seed=seed
    )
    summary: dict[str, Any] = asdict(info)
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
) -> Calibration:
    """Calibrate ``monitor`` on a holdout and return the calibration; the monitor is unchanged.

    1. Check every argument, then stream the holdout once: scores, features,
       predictions, labels (each batch checked before it is attacked), and
       input margins against the predicted class (cached in ``cache_dir``).
    2. Kendall tau with a bootstrap interval and detection metrics for each score.
    3. Train the pseudo-margin network when asked (``pseudo=True``) or needed
       (``"auto"`` and no score reaches ``min_tau``): on ``pseudo_data`` when
       given (its margins computed the same way), else on a part of the holdout
       disjoint from the calibration part.
    4. Choose the score (``score="auto"``) and the split-conformal threshold at
       ``target_tpr`` on the calibration part.

    Args:
        monitor: The monitor to calibrate (read, not modified).
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
            the network trains on half of the holdout.
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

    Raises:
        ValueError: for a bad argument or batch (before any attack), a model in
            half precision, or a holdout with no non-robust or no robust samples
            at ``eps``, too few for the threshold or the pseudo-margin network.
    """
    min_tau = monitor.min_tau if min_tau is None else float(min_tau)
    _validate(
        monitor,
        target_tpr=target_tpr,
        n_samples=n_samples,
        engine=engine,
        pseudo=pseudo,
        min_tau=min_tau,
    )
    eps = monitor.eps if eps is None else check_eps(eps)
    settings = AttackSettings(norm=monitor.norm, steps=steps, restarts=restarts, seed=seed)
    part = shard(distributed)
    cache = MarginCache(cache_dir, monitor.model, settings, engine) if cache_dir else None
    device = monitor.threshold.device

    def stream(data: Iterable[Any] | Tensor, limit: int | None, desc: str) -> Holdout:
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
        )

    timings: dict[str, float] = {}
    start = time.perf_counter()
    holdout = stream(loader, n_samples, "fit: input margins")
    timings["attack"] = time.perf_counter() - start
    margins, n = holdout.margins, holdout.margins.size
    _check_both_classes(margins, eps)

    start = time.perf_counter()
    scores = dict(holdout.scores)
    metrics = {k: score_metrics(v, margins, eps, target_tpr, seed=seed) for k, v in scores.items()}
    best_tau = max(_tau(m) for m in metrics.values())
    wants_pseudo = pseudo is True or monitor.requested_score == "pseudo"
    wants_pseudo |= pseudo == "auto" and not best_tau >= min_tau
    if wants_pseudo and monitor.head_name is None:
        if pseudo is True or monitor.requested_score == "pseudo":
            raise ValueError(
                f"the pseudo-margin needs the model's last linear layer. {NO_HEAD_HINT}"
            )
        wants_pseudo = False
    timings["metrics"] = time.perf_counter() - start

    calibration = np.ones(n, dtype=bool)
    net, pseudo_info = None, None
    if wants_pseudo:
        start = time.perf_counter()
        if pseudo_data is not None:
            training = stream(pseudo_data, None, "fit: pseudo-margin data")
            timings["pseudo_attack"] = time.perf_counter() - start
            net, pseudo_info = _train_pseudo(
                training.features, training.logits, training.margins, device, seed
            )
            pseudo_info["source"] = "pseudo_data"
        else:
            calibration = _pseudo_split(n, seed)
            train = torch.from_numpy(np.flatnonzero(~calibration))
            features = None if holdout.features is None else holdout.features[train]
            net, pseudo_info = _train_pseudo(
                features, holdout.logits[train], margins[~calibration], device, seed
            )
            pseudo_info["source"] = "holdout split"
        part.broadcast_module(net)  # identical networks on every rank, whatever the device
        if holdout.features is None:
            raise RuntimeError("the head's input features were not captured during the pass.")
        scores["pseudo"] = pseudo_scores(net, holdout.features, holdout.logits, device)
        timings["pseudo"] = time.perf_counter() - start
        _check_both_classes(margins[calibration], eps)
        metrics = {
            k: score_metrics(v[calibration], margins[calibration], eps, target_tpr, seed=seed)
            for k, v in scores.items()
        }
    holdout.scores = scores

    if monitor.requested_score == "auto":
        chosen, reason = choose_score(metrics, min_tau)
    else:
        chosen = cast(ScoreKind, monitor.requested_score)  # not "auto" here
        reason = f"requested with score={chosen!r}"
    positive = nonrobust(margins, eps)
    cal_scores = scores[chosen][calibration]
    threshold = conformal_threshold(cal_scores[positive[calibration]], target_tpr)
    tpr, fpr = rates(cal_scores, positive[calibration], threshold)
    # The flag-rate alarm's reference: what the served flag does on these samples.
    # A NaN score is the monitor's fail-closed mark (rejected, not judged): the
    # alarm never sees such samples in production, so they are not counted here.
    accepted = ~np.isnan(cal_scores)
    judged = int(accepted.sum())
    flagged = int(np.count_nonzero(cal_scores[accepted] <= threshold))
    # Nothing judged: no reference, and Telemetry then says the alarm is unavailable.
    reference_counts = (flagged, judged) if judged else None
    reference_flag_rate = flagged / judged if judged else None
    report = holdout_report(
        holdout,
        eps=eps,
        norm=monitor.norm,
        metrics=metrics,
        chosen=chosen,
        reason=reason,
        threshold=threshold,
        target_tpr=target_tpr,
        tpr=tpr,
        fpr=fpr,
        timings=timings,
        calibration=calibration,
        settings={
            "engine": engine,
            "steps": steps,
            "restarts": restarts,
            "seed": seed,
            "min_tau": min_tau,
            "min_positives": min_positives(target_tpr),
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
    )
