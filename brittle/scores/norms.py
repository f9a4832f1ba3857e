"""Threat-model norms and their duals."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "Norm",
    "NORMS",
    "START_RADIUS",
    "check_norm",
    "check_eps",
    "dual_order",
    "norm_order",
    "per_sample_norm",
]

Norm = Literal["Linf", "L2", "L1"]
NORMS: tuple[str, ...] = get_args(Norm)

_ORDER = {"Linf": math.inf, "L2": 2.0, "L1": 1.0}
# Radius of random attack restarts for samples with no adversarial yet
# (torchattacks' defaults); samples with one restart within half their best norm.
START_RADIUS = {"Linf": 0.3, "L2": 1.0, "L1": 5.0}
# The distance to a hyperplane w.x + b = 0 measured in the p-norm is |w.x + b| / ||w||_q
# with q the dual exponent of p (1/p + 1/q = 1).
_DUAL = {"Linf": 1.0, "L2": 2.0, "L1": math.inf}


def check_norm(norm: str) -> Norm:
    """Return ``norm`` if it names a supported threat model, else raise ``ValueError``."""
    if norm not in _ORDER:
        raise ValueError(f"norm must be one of {NORMS}. Got {norm!r}.")
    return norm  # type: ignore[return-value]


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float if it is a finite positive budget, else raise ``ValueError``."""
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite positive number. Got {eps}.")
    return eps


def norm_order(norm: Norm) -> float:
    """Exponent p of the threat-model norm (``inf`` for ``"Linf"``)."""
    return _ORDER[check_norm(norm)]


def dual_order(norm: Norm) -> float:
    """Exponent q of the dual norm: Linf -> 1, L2 -> 2, L1 -> inf."""
    return _DUAL[check_norm(norm)]


def per_sample_norm(delta: Tensor, norm: Norm) -> Tensor:
    """The ``norm`` of each sample of a batch of perturbations, shape ``(B,)``."""
    return torch.linalg.vector_norm(delta.flatten(1), ord=norm_order(norm), dim=1)
