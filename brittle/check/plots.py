"""PNG plots of a check, drawn from the ``report.json`` payload alone (matplotlib optional).

matplotlib is the ``plot`` extra: without it ``write_plots`` returns an
empty list and the command says how to get plots. Figures are drawn with
``matplotlib.figure.Figure`` directly, never through ``pyplot``, so the global
backend and figure registry of the calling process are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from brittle.calibrate.jsonfloat import load_floats
from brittle.calibrate.report import report_margins

__all__ = ["write_plots", "plots_available", "PLOT_HINT", "PLOT_FILES"]

PLOT_HINT = "plots skipped: matplotlib is not installed (pip install brittle[plot])"
PLOT_FILES = {
    "scores_vs_margin": "score against input margin, with Kendall tau",
    "roc_pr": "ROC and precision-recall curves for detecting non-robust decisions",
    "per_class": "non-robust share per class, by input margin and by the flag",
    "input_margins": "distribution of input margins, eps marked",
}
_NAMES = {"logit": "logit margin", "feature": "feature margin", "pseudo": "pseudo-margin"}


def plots_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the four PNGs of one model into ``out_dir``; ``[]`` without matplotlib.

    Args:
        payload: A ``report.json`` dictionary (the consistency report and analyses).
        out_dir: Existing directory for the files.

    Returns:
        The files written, in the order of ``PLOT_FILES``.

    """
    if not plots_available():
        return []
    from matplotlib.figure import Figure

    margins = report_margins(payload)
    mask = np.asarray(payload["calibration"], dtype=bool)
    eps = float(payload["eps"])
    positive = margins <= eps
    written = []
    for stem, draw in (
        ("scores_vs_margin", _scatter),
        ("roc_pr", _curves),
        ("per_class", _per_class),
        ("input_margins", _histogram),
    ):
        fig = Figure(figsize=(11, 4), layout="constrained")
        draw(fig, payload, margins, mask, positive, eps)
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def _scatter(
    fig: Any,
    payload: dict[str, Any],
    margins: np.ndarray,
    mask: np.ndarray,
    positive: np.ndarray,
    eps: float,
) -> None:
    scores = list(payload["score_values"])
    axes = np.atleast_1d(fig.subplots(1, len(scores)))
    finite = margins[np.isfinite(margins)]
    cap = float(finite.max()) * 1.1 if finite.size else 1.0
    shown = np.where(np.isfinite(margins), margins, cap)
    for ax, name in zip(axes, scores, strict=True):
        values = load_floats(payload["score_values"][name])
        tau = payload["metrics"][name]["tau"]
        for sel, colour, label in (
            (positive & mask, "tab:red", "non-robust"),
            (~positive & mask, "tab:blue", "robust"),
        ):
            ax.scatter(shown[sel], values[sel], s=6, alpha=0.5, c=colour, label=label)
        censored = ~np.isfinite(margins) & mask
        if censored.any():
            ax.scatter(
                shown[censored],
                values[censored],
                s=14,
                marker=">",
                c="grey",
                label="no adversarial found",
            )
        ax.axvline(eps, color="black", linestyle="--", linewidth=1)
        chosen = " (chosen)" if name == payload["chosen"] else ""
        tau_text = "-" if tau is None else f"{tau:.3f}"
        ax.set_title(f"{_NAMES.get(name, name)}{chosen}: tau {tau_text}")
        ax.set_xlabel(f"input margin ({payload['norm']}), eps dashed")
        ax.set_ylabel(_NAMES.get(name, name))
    axes[0].legend(fontsize=8, loc="upper left")


def _curves(
    fig: Any,
    payload: dict[str, Any],
    margins: np.ndarray,
    mask: np.ndarray,
    positive: np.ndarray,
    eps: float,
) -> None:
    from scipy.stats import rankdata
    from sklearn.metrics import precision_recall_curve, roc_curve

    roc_ax, pr_ax = fig.subplots(1, 2)
    y = positive[mask]
    series = {k: (_NAMES.get(k, k), v) for k, v in payload["score_values"].items()}
    series.update({k: (f"{k} (baseline)", v["values"]) for k, v in payload["baselines"].items()})
    if y.any() and not y.all():
        for key, (label, raw) in series.items():
            values = load_floats(raw)[mask]
            ok = ~np.isnan(values)
            # Low scores mean brittle, so -rank ranks the positive (non-robust) class first.
            # Ranks, not scores: scikit-learn refuses an infinite score (a report reads
            # them back as inf), and both curves depend on the order alone.
            ranks = -rankdata(values[ok])
            fpr, tpr, _ = roc_curve(y[ok], ranks)
            precision, recall, _ = precision_recall_curve(y[ok], ranks)
            style = "-" if key in payload["score_values"] else ":"
            metrics = payload["metrics"].get(key) or payload["baselines"].get(key, {})
            auroc = metrics.get("auroc")
            roc_ax.plot(fpr, tpr, style, label=f"{label}, AUROC {auroc:.3f}" if auroc else label)
            pr_ax.plot(recall, precision, style, label=label)
        pr_ax.axhline(float(y.mean()), color="grey", linewidth=0.8)
    roc_ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    roc_ax.axhline(payload["target_tpr"], color="black", linestyle="--", linewidth=0.8)
    roc_ax.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title=f"ROC: detecting non-robust decisions at eps={eps:.4g}",
    )
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall (grey: prevalence)")
    roc_ax.legend(fontsize=7, loc="lower right")


def _per_class(
    fig: Any,
    payload: dict[str, Any],
    margins: np.ndarray,
    mask: np.ndarray,
    positive: np.ndarray,
    eps: float,
) -> None:
    ax = fig.subplots(1, 1)
    rows = payload["per_class"]["classes"]
    index = np.arange(len(rows))
    ax.bar(
        index - 0.2,
        [r["nonrobust_by_margin"] for r in rows],
        width=0.4,
        label="non-robust by input margin (attack)",
    )
    ax.bar(
        index + 0.2,
        [r["nonrobust_by_flag"] for r in rows],
        width=0.4,
        label="flagged by the monitor",
    )
    ax.set_xticks(index, [str(r["class"]) for r in rows])
    ax.set(
        xlabel=f"class (by {payload['per_class']['by']})",
        ylabel="share of the class",
        title=f"per-class robustness at eps={eps:.4g}",
    )
    ax.legend(fontsize=8)


def _histogram(
    fig: Any,
    payload: dict[str, Any],
    margins: np.ndarray,
    mask: np.ndarray,
    positive: np.ndarray,
    eps: float,
) -> None:
    ax = fig.subplots(1, 1)
    finite = margins[np.isfinite(margins)]
    if finite.size:
        ax.hist(finite, bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(eps, color="tab:red", linestyle="--", label=f"eps = {eps:.4g}")
    censored = int((~np.isfinite(margins)).sum())
    ax.set(
        xlabel=f"input margin ({payload['norm']})",
        ylabel="samples",
        title=f"input margins of {margins.size} samples: {positive.mean():.1%} non-robust, "
        f"{censored} with no adversarial found",
    )
    ax.legend()
