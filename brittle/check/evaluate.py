"""Evaluating a saved monitor as saved: its score and threshold, measured on new data."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from brittle.calibrate.report import ConsistencyReport
from brittle.check.cli import Settings
from brittle.check.errors import UsageError
from brittle.monitor import Monitor

__all__ = ["evaluate_saved"]


def evaluate_saved(
    monitor: Monitor, loader: DataLoader, settings: Settings, source: Path
) -> ConsistencyReport:
    """``monitor.evaluate`` with the command line's attack settings and its error style.

    Unlike ``fit()``, nothing is recalibrated: the report shows how the saved
    score and threshold do on this data (the question a CI job asks of a monitor
    already deployed). Its FPR figures are read at ``settings.target_tpr`` when
    given, else at the monitor's fitted target.
    """
    if not monitor.has_threshold:
        raise UsageError(
            "--model", f"the monitor in {str(source)!r} has no threshold; fit it first"
        )
    report = monitor.evaluate(
        loader,
        steps=settings.steps,
        engine=settings.engine,
        progress=settings.progress,
        cache_dir=settings.cache_dir,
        seed=settings.seed,
        target_tpr=settings.target_tpr,  # None: the fitted target, else 0.95
    )
    report.reason = f"saved in {source.name}; its score and threshold, evaluated on this data"
    report.settings["evaluated_saved_monitor"] = str(source)
    return report
