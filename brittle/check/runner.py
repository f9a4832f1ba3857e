"""One check of one model on one data set: fit (or load), analyse, write the outputs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.attacks.adaptive import adaptive_attacks
from brittle.calibrate import analyses
from brittle.calibrate.report import ConsistencyReport
from brittle.calibrate.timing import timed
from brittle.check.cli import DEFAULT_TARGET_TPR, Settings
from brittle.check.errors import UsageError
from brittle.check.evaluate import evaluate_saved
from brittle.check.sources import DataSource, ModelSource, check_compatible
from brittle.errors import Blame, CalibrationError
from brittle.functional import conformal_threshold, nonrobust
from brittle.monitor import Monitor

__all__ = ["CheckResult", "run_check", "with_suffix_tag"]


@dataclass
class CheckResult:
    """Everything one check produced.

    Attributes:
        name: Short name of the model in the outputs (``"standard"``, ``"model"``).
        title: One-line description for headings.
        report: The consistency report (fitted, or of the saved monitor).
        payload: What ``report.json`` holds: the report plus the analyses.
        out_dir: Directory holding this model's ``report.json`` and plots.
        plots: The PNG files written (empty without matplotlib).
        gate_passed: ``None`` without ``--min-tau``, else whether tau cleared it.

    """

    name: str
    title: str
    report: ConsistencyReport
    payload: dict[str, Any]
    out_dir: Path
    plots: list[Path] = field(default_factory=list)
    gate_passed: bool | None = None

    @property
    def chosen_tau(self) -> float:
        """Kendall tau of the chosen score (NaN when undefined)."""
        return float(self.report.metrics[self.report.chosen].tau)


def with_suffix_tag(path: Path, tag: str) -> Path:
    """``monitor.pt`` -> ``monitor-robust.pt``: one file per model of the demo.

    Examples:
        >>> from pathlib import Path
        >>> from brittle.check.runner import with_suffix_tag
        >>> with_suffix_tag(Path("out/monitor.pt"), "robust").as_posix()
        'out/monitor-robust.pt'

    """
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def _fit(monitor: Monitor, loader: DataLoader, settings: Settings, n: int) -> None:
    try:
        monitor.fit(
            loader,
            pseudo="auto",  # trained only when needed and the holdout is large enough
            target_tpr=DEFAULT_TARGET_TPR if settings.target_tpr is None else settings.target_tpr,
            eps=settings.eps,
            steps=settings.steps,
            engine=settings.engine,
            progress=settings.progress,
            cache_dir=settings.cache_dir,
            seed=settings.seed,
        )
    except CalibrationError as err:
        # fit() explains what to change and names the argument; point at its option.
        raise UsageError(_OPTION_OF[err.blame], str(err)) from None
    except ValueError as err:
        raise UsageError("--data", str(err)) from None


# The command line's option for each argument of fit() that a CalibrationError blames.
_OPTION_OF: dict[Blame, str] = {"eps": "--eps", "n_samples": "--n"}


def _score_thresholds(report: ConsistencyReport) -> dict[str, float]:
    """Compute the threshold each score would get at the target TPR (the chosen one's is fitted)."""
    mask = report.calibration
    positive = nonrobust(report.input_margins[mask], report.eps)
    out = {}
    for name, values in report.score_values.items():
        if name == report.chosen:
            out[name] = report.threshold
            continue
        try:
            out[name] = conformal_threshold(values[mask][positive], report.target_tpr)
        except ValueError:
            out[name] = math.nan
    return out


def run_check(
    source: ModelSource,
    data: DataSource,
    settings: Settings,
    out_dir: Path,
    *,
    name: str,
    title: str,
    save_monitor: Path | None = None,
    export_onnx: Path | None = None,
    timings: dict[str, float] | None = None,
) -> CheckResult:
    """Fit a monitor for ``source.model`` on ``data`` (or evaluate a saved one) and analyse it.

    Writes ``out_dir/report.json`` and the plots; ``report.html`` is written by
    the caller, which may put several models on one page.

    Raises:
        UsageError: when the data does not suit the model or the fit cannot
            calibrate at these settings (no non-robust sample at eps, ...).

    """
    timings = dict(timings or {})
    model = source.model.to(settings.device).eval()
    n = min(settings.n, len(data))
    with timed(timings, "fit"):
        check_compatible(model, data, settings.device)
        monitor, report = _monitor_and_report(source, model, data, settings, n)
    if source.monitor_path is not None:  # the settings it ran at are the saved monitor's
        settings = replace(
            settings, eps=report.eps, norm=monitor.norm, target_tpr=report.target_tpr
        )
    if report.excluded:
        raise UsageError(
            "--data",
            f"{report.excluded} holdout samples could not be judged (NaN, Inf, or outside a "
            "saved monitor's fitted input domain)",
        )
    with timed(timings, "analyses"):
        found = _analyses(monitor, model, data, report, settings, n)
    subset = analyses.subset_indices(n, settings.attack_subset, settings.seed, _trained(report))
    # The report records the subset that ran: at most the n samples, less those excluded.
    settings = replace(settings, attack_subset=int(subset.size))
    attacked = data.x[:n][torch.from_numpy(subset)]
    with timed(timings, "adversarial"):
        adversarial = analyses.adversarial_flags(
            monitor,
            attacked,
            norm=monitor.norm,
            eps=report.eps,
            batch_size=settings.batch_size,
            device=settings.device,
            seed=settings.seed,
        )
    with timed(timings, "adaptive"):
        adaptive = _adaptive(monitor, attacked.to(settings.device), settings)
    written = _write_monitor(monitor, save_monitor, export_onnx, data.x[:1].to(settings.device))
    gate = _gate(report, settings)
    payload: dict[str, Any] = {
        **report.to_dict(),
        "name": name,
        "title": title,
        "model": source.spec,
        "data": data.spec,
        "n_data": len(data),
        "score_thresholds": _score_thresholds(report),
        **found,
        "adversarial": adversarial.to_dict(),
        "adaptive": adaptive,
        "gate": gate,
        "written": written,
        "check_settings": settings.to_dict(),
        "brittle_version": brittle.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with timed(timings, "plots"):
        from brittle.check.plots import write_plots

        plots = write_plots(payload, out_dir)
    payload["plots"] = [p.name for p in plots]
    payload["check_timings"] = timings
    payload = analyses.jsonable(payload)
    (out_dir / "report.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
    return CheckResult(
        name=name,
        title=title,
        report=report,
        payload=payload,
        out_dir=out_dir,
        plots=plots,
        gate_passed=None if gate is None else gate["passed"],
    )


def _monitor_and_report(
    source: ModelSource, model: torch.nn.Module, data: DataSource, settings: Settings, n: int
) -> tuple[Monitor, ConsistencyReport]:
    """A monitor fitted on the first ``n`` samples, or the saved one evaluated on them."""
    tensors = (data.x[:n],) if data.y is None else (data.x[:n], data.y[:n])
    loader = DataLoader(TensorDataset(*tensors), batch_size=settings.batch_size)
    if source.monitor_path is not None:
        try:
            monitor = brittle.load(source.monitor_path, model)
        except (ValueError, FileNotFoundError) as err:
            raise UsageError("--model", str(err)) from None
        return monitor, evaluate_saved(monitor, loader, settings, source.monitor_path)
    monitor = brittle.wrap(model, norm=settings.norm, eps=settings.eps)
    _fit(monitor, loader, settings, n)
    return monitor, monitor.report


def _trained(report: ConsistencyReport) -> np.ndarray:
    """The holdout samples the pseudo-margin network trained on (none unless it did).

    Its scores there are in sample, so neither the attacked subset nor the samples
    the robust-accuracy estimate is judged on come from them. They are what the
    split left beside the choice and calibration samples.
    """
    choice = np.zeros_like(report.calibration) if report.choice is None else report.choice
    return ~report.calibration & ~choice


def _analyses(
    monitor: Monitor,
    model: torch.nn.Module,
    data: DataSource,
    report: ConsistencyReport,
    settings: Settings,
    n: int,
) -> dict[str, Any]:
    """The paper's analyses: robust accuracy from a subset, per-class bias, baseline scores."""
    fp = analyses.forward_pass(monitor, data.x, settings.batch_size, settings.device)
    robust_accuracy = analyses.robust_accuracy_estimate(
        score_all=fp.score,
        pred_all=fp.pred,
        labels_all=None if data.y is None else data.y.numpy(),
        margins=report.input_margins,
        eps=report.eps,
        subset_size=settings.attack_subset,
        score_name=report.chosen,
        seed=settings.seed,
        exclude=_trained(report),
    )
    mask = report.calibration
    per_class = analyses.per_class_bias(
        margins=report.input_margins[mask],
        score=report.score_values[report.chosen][mask],
        threshold=report.threshold,
        preds=report.predictions[mask],
        labels=None if report.labels is None else report.labels[mask],
        eps=report.eps,
    )
    baseline_values = analyses.baseline_scores(
        model,
        data.x[:n],
        probs=fp.probs,
        features=fp.features,
        preds_all=fp.pred,
        norm=monitor.norm,
        batch_size=settings.batch_size,
        device=settings.device,
        seed=settings.seed,
    )
    baselines = analyses.baseline_metrics(
        baseline_values,
        report.input_margins,
        mask,
        report.eps,
        report.target_tpr,
        seed=settings.seed,
    )
    return {
        "robust_accuracy_estimate": robust_accuracy.to_dict(),
        "per_class": per_class.to_dict(),
        "baselines": {name: b.to_dict() for name, b in baselines.items()},
    }


def _write_monitor(
    monitor: Monitor, save_monitor: Path | None, export_onnx: Path | None, example: torch.Tensor
) -> dict[str, str]:
    """Save and export the monitor where asked; the paths written."""
    written: dict[str, str] = {}
    if save_monitor is not None:
        written["monitor"] = str(monitor.save(save_monitor))
    if export_onnx is not None:
        written["onnx"] = str(_export_onnx(monitor, export_onnx, example))
    return written


def _gate(report: ConsistencyReport, settings: Settings) -> dict[str, Any] | None:
    """``--min-tau``: whether the chosen score's tau clears it (``None`` without the option)."""
    if settings.min_tau is None:
        return None
    tau = float(report.metrics[report.chosen].tau)
    return {
        "min_tau": settings.min_tau,
        "score": report.chosen,
        "tau": tau,
        "passed": bool(not math.isnan(tau) and tau >= settings.min_tau),
    }


def _adaptive(monitor: Monitor, x: torch.Tensor, settings: Settings) -> dict[str, Any]:
    """What an attacker who knows the monitor achieves (``brittle.attacks.adaptive``), as JSON."""
    if monitor.norm not in ("Linf", "L2"):
        return {"skipped": f"the adaptive attacks support Linf and L2, not {monitor.norm}"}
    result = adaptive_attacks(monitor, x, batch_size=settings.batch_size, seed=settings.seed)
    return result.to_dict()


def _export_onnx(monitor: Monitor, path: Path, example: torch.Tensor) -> Path:
    try:
        import brittle.deploy.onnx  # noqa: F401
    except ImportError as err:
        raise UsageError("--export-onnx", f"ONNX export is unavailable: {err}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(monitor.export_onnx(path, example))
