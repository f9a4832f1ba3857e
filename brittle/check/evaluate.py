"""Evaluating a saved monitor as saved: its score and threshold, measured on new data."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from brittle.attack_settings import AttackSettings
from brittle.cache import MarginCache
from brittle.check.cli import Settings
from brittle.check.errors import UsageError
from brittle.fit import collect_holdout, holdout_report
from brittle.functional import nonrobust, rates, score_metrics
from brittle.monitor import Monitor
from brittle.report import ConsistencyReport

__all__ = ["evaluate_saved"]


def evaluate_saved(
    monitor: Monitor, loader: DataLoader, settings: Settings, source: Path
) -> ConsistencyReport:
    """Report how a fitted monitor does on ``loader``, its score and threshold unchanged.

    Unlike ``fit()``, nothing is recalibrated: the report shows how the saved
    score and threshold do on this data (the question a CI job asks of a monitor
    already deployed). Input margins are measured with the CLI's attack settings.
    """
    if not monitor.has_threshold:
        raise UsageError(
            "--model", f"the monitor in {str(source)!r} has no threshold; fit it first"
        )
    attack = AttackSettings(norm=monitor.norm, steps=settings.steps, seed=settings.seed)
    cache = (
        MarginCache(settings.cache_dir, monitor.model, attack, settings.engine)
        if settings.cache_dir
        else None
    )
    start = time.perf_counter()
    holdout = collect_holdout(
        monitor, loader, attack, engine=settings.engine, progress=settings.progress, cache=cache
    )
    timings = {"attack": time.perf_counter() - start}
    margins, eps = holdout.margins, monitor.eps
    start = time.perf_counter()
    metrics = {
        k: score_metrics(v, margins, eps, settings.target_tpr, seed=settings.seed)
        for k, v in holdout.scores.items()
    }
    timings["metrics"] = time.perf_counter() - start
    chosen = monitor.score
    positive = nonrobust(margins, eps)
    threshold = float(monitor.threshold)
    tpr, fpr = rates(holdout.scores[chosen], positive, threshold)
    saved_target = monitor._report.target_tpr if monitor._report is not None else None
    return holdout_report(
        holdout,
        eps=eps,
        norm=monitor.norm,
        metrics=metrics,
        chosen=chosen,
        reason=f"saved in {source.name}; its score and threshold, evaluated on this data",
        threshold=threshold,
        target_tpr=saved_target if saved_target is not None else settings.target_tpr,
        tpr=tpr,
        fpr=fpr,
        timings=timings,
        calibration=np.ones(margins.size, dtype=bool),
        settings={
            "engine": settings.engine,
            "steps": settings.steps,
            "restarts": 1,
            "seed": settings.seed,
            "min_tau": monitor.min_tau,
            "evaluated_saved_monitor": str(source),
        },
    )
