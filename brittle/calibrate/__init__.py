"""Offline calibration: fit, consistency statistics, thresholds, reports and analyses.

``calibrate`` computes a ``Calibration`` from a holdout without touching the
monitor; ``Monitor.fit`` installs it. Above ``brittle.attacks`` in the layering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brittle.lazy import lazy_exports

if TYPE_CHECKING:
    from brittle.calibrate.analyses import (
        adversarial_flags,
        baseline_metrics,
        per_class_bias,
        robust_accuracy_estimate,
    )
    from brittle.calibrate.cache import MarginCache
    from brittle.calibrate.calibration import Calibration, ScoreKind
    from brittle.calibrate.evaluate import evaluate
    from brittle.calibrate.fit import calibrate, choose_score
    from brittle.calibrate.holdout import Holdout, collect_holdout
    from brittle.calibrate.metrics import (
        ScoreMetrics,
        clopper_pearson,
        detection_metrics,
        fpr_at_tpr,
        kendall_tau,
        kendall_tau_ci,
        nonrobust,
        score_metrics,
        wilson_interval,
    )
    from brittle.calibrate.pseudo_train import PseudoTraining, train_pseudo_margin
    from brittle.calibrate.report import ConsistencyReport
    from brittle.calibrate.threshold import conformal_threshold, min_positives, rates

_WHERE = {
    "calibrate": "brittle.calibrate.fit",
    "choose_score": "brittle.calibrate.fit",
    "Calibration": "brittle.calibrate.calibration",
    "ScoreKind": "brittle.calibrate.calibration",
    "evaluate": "brittle.calibrate.evaluate",
    "Holdout": "brittle.calibrate.holdout",
    "collect_holdout": "brittle.calibrate.holdout",
    "ScoreMetrics": "brittle.calibrate.metrics",
    "kendall_tau": "brittle.calibrate.metrics",
    "kendall_tau_ci": "brittle.calibrate.metrics",
    "nonrobust": "brittle.calibrate.metrics",
    "detection_metrics": "brittle.calibrate.metrics",
    "fpr_at_tpr": "brittle.calibrate.metrics",
    "score_metrics": "brittle.calibrate.metrics",
    "clopper_pearson": "brittle.calibrate.metrics",
    "wilson_interval": "brittle.calibrate.metrics",
    "conformal_threshold": "brittle.calibrate.threshold",
    "min_positives": "brittle.calibrate.threshold",
    "rates": "brittle.calibrate.threshold",
    "ConsistencyReport": "brittle.calibrate.report",
    "robust_accuracy_estimate": "brittle.calibrate.analyses",
    "per_class_bias": "brittle.calibrate.analyses",
    "baseline_metrics": "brittle.calibrate.analyses",
    "adversarial_flags": "brittle.calibrate.analyses",
    "train_pseudo_margin": "brittle.calibrate.pseudo_train",
    "PseudoTraining": "brittle.calibrate.pseudo_train",
    "MarginCache": "brittle.calibrate.cache",
}
__all__ = [
    "calibrate",
    "choose_score",
    "Calibration",
    "ScoreKind",
    "evaluate",
    "Holdout",
    "collect_holdout",
    "ScoreMetrics",
    "kendall_tau",
    "kendall_tau_ci",
    "nonrobust",
    "detection_metrics",
    "fpr_at_tpr",
    "score_metrics",
    "clopper_pearson",
    "wilson_interval",
    "conformal_threshold",
    "min_positives",
    "rates",
    "ConsistencyReport",
    "robust_accuracy_estimate",
    "per_class_bias",
    "baseline_metrics",
    "adversarial_flags",
    "train_pseudo_margin",
    "PseudoTraining",
    "MarginCache",
]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
