"""Pure functions on precomputed logits, weights, scores and margins.

The array API of brittle, for users who already have logits or features
(as in torchmetrics' and pytorch-ood's functional interfaces). The
``Monitor`` calls the same functions.

Examples:
    >>> import torch
    >>> import brittle.functional as BF
    >>> BF.logit_margin(torch.tensor([[1.0, 3.0, 2.5]]))
    tensor([0.5000])
"""

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
from brittle.calibrate.threshold import conformal_threshold, min_positives, rates
from brittle.scores.margins import feature_margin, logit_margin, pair_norm_rows, pair_norm_table

__all__ = [
    "logit_margin",
    "feature_margin",
    "pair_norm_table",
    "pair_norm_rows",
    "kendall_tau",
    "kendall_tau_ci",
    "nonrobust",
    "detection_metrics",
    "fpr_at_tpr",
    "score_metrics",
    "ScoreMetrics",
    "clopper_pearson",
    "wilson_interval",
    "conformal_threshold",
    "min_positives",
    "rates",
]
