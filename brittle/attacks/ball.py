"""The norm ball of a perturbation: the steepest unit step and the projection onto it.

Shared by the boundary walk (per-sample radii on flat rows) and the adaptive
attacks (one radius on image batches): rows are flattened here, any shape works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from brittle.scores.norms import Norm

__all__ = ["steepest", "project_ball"]


def _rows(value: Tensor | float, like: Tensor) -> Tensor:
    """A per-sample radius as a column that broadcasts against flat rows of ``like``."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1, 1)


def steepest(grad: Tensor, norm: Norm) -> Tensor:
    """A step of unit size in ``norm`` per sample, along ``grad``.

    For Linf and L2 it is the steepest-ascent step (the one of unit size that gains
    most along ``grad``). For L1 it is ``grad`` scaled to unit L1 size, which moves
    every coordinate, rather than the steepest L1 step, which moves one.

    Examples:
        >>> import torch
        >>> steepest(torch.tensor([[3.0, -4.0]]), "L2")
        tensor([[ 0.6000, -0.8000]])
        >>> steepest(torch.tensor([[3.0, -4.0]]), "Linf")
        tensor([[ 1., -1.]])
    """
    if norm == "Linf":
        return grad.sign()
    flat = grad.flatten(1)
    if norm == "L2":
        size = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    else:
        size = flat.abs().sum(dim=1, keepdim=True)
    return (flat / size.clamp_min(1e-12)).view_as(grad)


def project_ball(delta: Tensor, eps: Tensor | float, norm: Norm) -> Tensor:
    """Euclidean projection of each sample of ``delta`` onto the ``norm`` ball of radius ``eps``.

    Args:
        delta: Perturbations, one sample per row of the first dimension.
        eps: One radius for all samples, or one per sample.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.

    Examples:
        >>> import torch
        >>> project_ball(torch.tensor([[3.0, 4.0]]), 1.0, "L2")
        tensor([[0.6000, 0.8000]])
        >>> project_ball(torch.tensor([[3.0, 0.5]]), torch.tensor([1.0]), "Linf")
        tensor([[1.0000, 0.5000]])
        >>> project_ball(torch.tensor([[3.0, 1.0]]), 1.0, "L1")
        tensor([[1., 0.]])
    """
    flat = delta.flatten(1)
    radius = _rows(eps, flat)
    if norm == "Linf":
        out = torch.maximum(torch.minimum(flat, radius), -radius)
    elif norm == "L2":
        length = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
        out = flat * (radius / length.clamp_min(1e-12)).clamp(max=1)
    else:
        out = _project_l1_ball(flat, radius)
    return out.view_as(delta)


def _project_l1_ball(delta: Tensor, eps: Tensor) -> Tensor:
    """Duchi et al.'s sort-based projection onto the L1 ball (rows already inside are kept)."""
    mag = delta.abs()
    inside = mag.sum(dim=1, keepdim=True) <= eps
    sorted_mag = mag.sort(dim=1, descending=True).values
    cums = sorted_mag.cumsum(dim=1) - eps
    ks = torch.arange(1, delta.shape[1] + 1, device=delta.device, dtype=delta.dtype)
    cond = sorted_mag - cums / ks > 0
    count = cond.sum(dim=1, keepdim=True).clamp_min(1)
    theta = cums.gather(1, count - 1) / count.to(delta.dtype)
    shrunk = delta.sign() * (mag - theta).clamp_min(0)
    return torch.where(inside, delta, shrunk)
