"""The serving maths: margins, the classifier head, the pseudo-margin network, norms.

Everything here runs in the monitor's forward pass and imports no other
subpackage of brittle (the layering contract in ``pyproject.toml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brittle.lazy import lazy_exports

if TYPE_CHECKING:
    from brittle.scores.finite import finite_rows, zero_rows
    from brittle.scores.head import (
        NO_HEAD_HINT,
        HeadCapture,
        LogitsModel,
        capture_head,
        discover_head,
        model_output,
        resolve_head,
    )
    from brittle.scores.margins import feature_margin, logit_margin, pair_norm_rows, pair_norm_table
    from brittle.scores.norms import NORMS, Norm, check_eps, check_norm, dual_order, per_sample_norm
    from brittle.scores.pseudo import PseudoMargin

_WHERE = {
    "logit_margin": "brittle.scores.margins",
    "feature_margin": "brittle.scores.margins",
    "pair_norm_table": "brittle.scores.margins",
    "pair_norm_rows": "brittle.scores.margins",
    "HeadCapture": "brittle.scores.head",
    "capture_head": "brittle.scores.head",
    "discover_head": "brittle.scores.head",
    "resolve_head": "brittle.scores.head",
    "model_output": "brittle.scores.head",
    "LogitsModel": "brittle.scores.head",
    "NO_HEAD_HINT": "brittle.scores.head",
    "PseudoMargin": "brittle.scores.pseudo",
    "Norm": "brittle.scores.norms",
    "NORMS": "brittle.scores.norms",
    "check_norm": "brittle.scores.norms",
    "check_eps": "brittle.scores.norms",
    "dual_order": "brittle.scores.norms",
    "per_sample_norm": "brittle.scores.norms",
    "finite_rows": "brittle.scores.finite",
    "zero_rows": "brittle.scores.finite",
}
__all__ = [
    "logit_margin",
    "feature_margin",
    "pair_norm_table",
    "pair_norm_rows",
    "HeadCapture",
    "capture_head",
    "discover_head",
    "resolve_head",
    "model_output",
    "LogitsModel",
    "NO_HEAD_HINT",
    "PseudoMargin",
    "Norm",
    "NORMS",
    "check_norm",
    "check_eps",
    "dual_order",
    "per_sample_norm",
    "finite_rows",
    "zero_rows",
]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
