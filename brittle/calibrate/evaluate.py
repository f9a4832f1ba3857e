"""``Monitor.evaluate``: a fitted monitor measured on new data, nothing recalibrated."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from brittle.arguments import positive_int
from brittle.attacks.attack import ENGINES
from brittle.attacks.distributed import shard
from brittle.attacks.settings import DEFAULT_ENGINE, AttackSettings
from brittle.calibrate.cache import MarginCache
from brittle.calibrate.fit import pseudo_scores
from brittle.calibrate.holdout import collect_holdout, holdout_report
from brittle.calibrate.metrics import nonrobust, rate_intervals, score_metrics
from brittle.calibrate.report import ConsistencyReport
from brittle.calibrate.threshold import check_target_tpr, rates
from brittle.errors import NotFittedError

if TYPE_CHECKING:
    from brittle.protocol import MonitorProtocol

__all__ = ["evaluate"]


def evaluate(
    monitor: MonitorProtocol,
    loader: Iterable[Any] | Tensor,
    *,
    n_samples: int | None = None,
    steps: int = 100,
    restarts: int = 1,
    engine: str = DEFAULT_ENGINE,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    target_tpr: float | None = None,
) -> ConsistencyReport:
    """Report how a monitor with a threshold does on ``loader``, score and threshold unchanged.

    The question a CI job asks of a monitor already deployed: input margins are
    measured on the new data with the monitor's norm, and the report gives every
    score's tau and detection figures there and the TPR/FPR of the monitor's own
    flag. The monitor's calibration is not modified (a monitor that has not yet
    seen an input discovers its head on the first batch, as any forward pass does).
    Samples the monitor rejects as it serves (NaN, Inf, values outside its fitted
    input domain: flagged, margin NaN) are not judged here either; the report
    counts them in ``excluded``.

    Args:
        monitor: A monitor with a threshold (fitted, loaded, or ``set_threshold``).
        loader: The data: a tensor or a loader yielding ``x``, ``(x, y)`` or dicts.
        n_samples: Use at most this many samples.
        steps: Attack iterations per restart.
        restarts: Attack restarts per sample.
        engine: Attack engine (``"brittle"`` by default).
        progress: Show a progress bar.
        cache_dir: Directory for resumable margin caching.
        seed: Seeds the attacks and the bootstrap.
        distributed: As in ``fit``.
        target_tpr: TPR at which the report's FPR figures are read (default: the
            fitted monitor's target, else 0.95).

    Raises:
        NotFittedError: if the monitor has no threshold.
        ValueError: for a bad argument (before any attack).
    """
    if not monitor.has_threshold:
        raise NotFittedError(
            "evaluate() needs a monitor with a threshold: call monitor.fit(holdout_loader) "
            "(or monitor.set_threshold(value)) first."
        )
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}. Got {engine!r}.")
    n_samples = None if n_samples is None else positive_int("n_samples", n_samples)
    if target_tpr is None:
        target_tpr = monitor.report.target_tpr if monitor.has_report else 0.95
    else:  # checked before the attacks, as fit() checks it
        check_target_tpr(target_tpr)
    settings = AttackSettings(norm=monitor.norm, steps=steps, restarts=restarts, seed=seed)
    cache = MarginCache(cache_dir, monitor.model, settings, engine) if cache_dir else None
    start = time.perf_counter()
    holdout = collect_holdout(
        monitor,
        loader,
        settings,
        engine=engine,
        n_samples=n_samples,
        progress=progress,
        cache=cache,
        part=shard(distributed),
        desc="evaluate: input margins",
        domain=True,  # the samples the served monitor rejects are not judged here either
    )
    timings = {"attack": time.perf_counter() - start}
    margins, eps = holdout.margins, monitor.eps
    start = time.perf_counter()
    # The holdout pass keeps the model's own scores; the pseudo-margin is the monitor's.
    scores = dict(holdout.scores)
    if monitor.pseudo is not None and holdout.features is not None:
        device = monitor.threshold.device
        scores["pseudo"] = pseudo_scores(monitor.pseudo, holdout.features, holdout.logits, device)
    holdout.scores = scores
    metrics = {k: score_metrics(v, margins, eps, target_tpr, seed=seed) for k, v in scores.items()}
    timings["metrics"] = time.perf_counter() - start
    chosen = monitor.score
    threshold = float(monitor.threshold)
    tpr, fpr = rates(scores[chosen], nonrobust(margins, eps), threshold)
    tpr_ci, fpr_ci = rate_intervals(scores[chosen], nonrobust(margins, eps), threshold)
    return holdout_report(
        holdout,
        eps=eps,
        norm=monitor.norm,
        metrics=metrics,
        chosen=chosen,
        reason="the monitor's own score and threshold, evaluated on this data",
        threshold=threshold,
        target_tpr=target_tpr,
        tpr=tpr,
        fpr=fpr,
        tpr_ci=tpr_ci,
        fpr_ci=fpr_ci,
        timings=timings,
        calibration=np.ones(margins.size, dtype=bool),
        settings={
            "engine": engine,
            "steps": steps,
            "restarts": restarts,
            "seed": seed,
            "min_tau": monitor.min_tau,
            "evaluated": True,
            "passes": holdout.passes,
        },
    )
