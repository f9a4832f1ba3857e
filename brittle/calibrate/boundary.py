"""Points on and near the decision boundary, with the margins the pseudo-margin learns for them.

The attack that measures a sample's input margin ends on the decision
boundary: a point ``p`` at distance ``margin`` from ``x`` whose class differs.
A pseudo-margin network trained on natural samples alone lets an attacker who
moves an input across the boundary land on features it never saw, where it
may predict a large margin (``docs/security.md``: 29 % of adaptive PGD's
examples caught). Training on the boundary too teaches it the opposite: ``p``
itself has margin 0, and any point ``q`` has margin at most ``||q - p||``
(``p`` is a point of another class, or of the boundary, within that distance).
Each sample with a finite margin gives ``COPIES`` rows:

- the boundary point ``p``, target 0;
- a copy pushed *past* the boundary, ``p + t * u`` with ``u`` the unit step
  (in the monitor's norm) along ``p - x``: where an attacker's example lands;
- a copy *around* it, ``p + t * v`` with ``v`` a random unit step,

with ``t`` uniform in ``(0, radius]``; the copies are clipped to ``[0, 1]`` and
their target is their distance to ``p`` after clipping (an upper bound on
their margin, so the network learns them as at most that robust). A sample's
steps and direction depend on the seed and its position in the holdout only,
as its attack's restarts do: not on the batch it came in, nor on the rank that
attacked it under ``torch.distributed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from brittle.attacks.ball import steepest
from brittle.scores.norms import Norm, per_sample_norm

__all__ = ["COPIES", "boundary_copies"]

# Rows per sample: the boundary point, a copy past it, a copy around it.
COPIES = 3
# Odd 64-bit constant (the golden ratio's) that spreads seeds apart before a sample's
# index is added, so that (seed, index) and (seed + 1, index - 1) draw differently.
_SEED_STRIDE = 0x9E3779B97F4A7C15


def _sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one sample's copies: a function of ``(seed, index)`` alone."""
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + index) % 2**64)


def boundary_copies(
    x: Tensor,
    points: Tensor,
    margins: Tensor,
    radius: float,
    norm: Norm,
    *,
    seed: int = 0,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each sample's boundary point and two perturbed copies, with their target margins.

    Args:
        x: ``(B, ...)`` the samples.
        points: ``(B, ...)`` the adversarial point the attack found for each.
        margins: ``(B,)`` their distances; rows that are not finite (censored
            or non-finite samples) get NaN targets, to be dropped.
        radius: Largest step of a copy from its boundary point (the monitor's eps).
        norm: The norm of the margins.
        seed: Seeds the copies' steps and directions.
        index: ``(B,)`` each sample's position in the whole holdout (default
            ``0..B-1``); a sample's copies depend on ``(seed, index)`` only.

    Returns:
        ``(B, COPIES, ...)`` inputs and ``(B, COPIES)`` float32 target margins.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[0.2, 0.5]])
        >>> p = torch.tensor([[0.5, 0.5]])  # the boundary x0 = 0.5, at distance 0.3
        >>> rows, targets = boundary_copies(x, p, torch.tensor([0.3]), 0.1, "Linf")
        >>> rows.shape, targets[0, 0].item()
        (torch.Size([1, 3, 2]), 0.0)
        >>> bool(rows[0, 1, 0] > 0.5), bool((targets[0, 1:] <= 0.1 + 1e-6).all())  # past it
        (True, True)
    """
    if not radius > 0:
        raise ValueError(f"radius must be positive. Got {radius}.")
    b = x.shape[0]
    positions = range(b) if index is None else index.tolist()
    if len(positions) != b:
        raise ValueError(f"index must hold one position per sample ({b}). Got {len(positions)}.")
    steps = torch.empty(b, 2)
    random = torch.empty(x.shape)
    for row, position in enumerate(positions):
        generator = _sample_generator(seed, int(position))
        steps[row] = radius * (1.0 - torch.rand(2, generator=generator))  # in (0, radius]
        random[row] = torch.randn(x.shape[1:], generator=generator)
    random = random.to(x.device, x.dtype)
    past = steepest(points - x, norm)
    around = steepest(random, norm)
    shape = (b,) + (1,) * (x.dim() - 1)
    copies = [
        points,
        (points + steps[:, 0].to(x).view(shape) * past).clamp(0, 1),
        (points + steps[:, 1].to(x).view(shape) * around).clamp(0, 1),
    ]
    rows = torch.stack(copies, dim=1)
    targets = torch.stack([per_sample_norm(c - points, norm).float() for c in copies], dim=1)
    valid = torch.isfinite(margins.to(targets.device))
    targets = torch.where(valid[:, None], targets, torch.full_like(targets, float("nan")))
    return rows, targets
