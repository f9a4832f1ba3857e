"""A short FMN-style walk along the decision boundary, started from FAB's adversarial.

FAB stops on a boundary it linearised; its adversarial is rarely the nearest
point of that boundary. FMN (Pintor et al., "Fast Minimum-norm Adversarial
Attacks through Adaptive Norm Constraints", NeurIPS 2021) keeps a norm budget
``eps``: it shrinks ``eps`` while the point is adversarial, grows it while it is
not, and takes a gradient step on the logit difference inside the ``eps``-ball.
Started from FAB's best adversarial (``eps`` = its norm), a few dozen such steps
slide the point along the boundary towards ``x0``. Each step costs one forward
and one backward pass per sample whatever the number of classes (the gradient of
the top-1 minus the top-2 logit only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from brittle.attacks.ball import project_ball, steepest
from brittle.attacks.verify import check_differentiable, decision_changes
from brittle.scores.norms import Norm, norm_order

__all__ = ["boundary_walk"]


def boundary_walk(
    logits_of: Callable[[Tensor], Tensor],
    x0: Tensor,
    adv: Tensor,
    pred: Tensor,
    norm: Norm,
    steps: int,
    *,
    gamma: tuple[float, float] = (0.05, 0.001),
    alpha: tuple[float, float] = (1.0, 0.01),
    group: Tensor | None = None,
    cutoff: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Walk from the adversarials ``adv`` towards ``x0`` along the decision boundary.

    Args:
        logits_of: Logits of flattened inputs ``(n, d)``.
        x0: ``(n, d)`` flattened clean inputs in ``[0, 1]``.
        adv: ``(n, d)`` adversarials of ``x0`` (their prediction differs from ``pred``).
        pred: ``(n,)`` the class to move away from.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.
        steps: Iterations: one forward and one backward pass each, but the last, whose
            point is only checked (one forward pass).
        gamma: First and last relative change of the norm budget (cosine schedule).
        alpha: First and last step length, relative to the budget (cosine schedule).
        group: ``(n,)`` the sample each row walks for, when several rows start from
            adversarials of one sample (the ends of several attack runs).
        cutoff: ``(share, ratio)``: after ``share`` of the steps, a row of ``group``
            whose nearest adversarial so far is more than ``ratio`` times its sample's
            nearest stops walking. The rows ahead keep walking; what a row computes
            depends on its sample's rows alone.

    Returns:
        ``(adv, dist)``: the nearest adversarial seen per sample (``adv`` itself
        when none was nearer) and its norm. Every returned point was checked by a
        forward pass.

    Examples:
        >>> import torch
        >>> from brittle.attacks.walk import boundary_walk
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        ...     _ = model.bias.zero_()
        >>> x0 = torch.tensor([[0.7, 0.3]])
        >>> far = torch.tensor([[0.45, 0.55]])  # adversarial, but 0.25 away in Linf
        >>> adv, dist = boundary_walk(model, x0, far, torch.tensor([0]), "Linf", steps=20)
        >>> round(float(dist), 2)  # the boundary x0 == x1 is 0.2 away
        0.2
    """
    if cutoff is not None and not (0 <= cutoff[0] <= 1 and cutoff[1] >= 1):
        raise ValueError(f"cutoff must be (share in [0, 1], ratio >= 1). Got {cutoff}.")
    order = norm_order(norm)
    best_adv = adv.clone()
    best = torch.linalg.vector_norm(adv - x0, ord=order, dim=1)
    if steps == 0 or x0.shape[0] == 0:
        return best_adv, best
    eps = best.clone()
    delta = adv - x0
    # Every row walks until the cutoff; then only ``live`` does, and the rows it left
    # keep their results in ``stopped``.
    live, stopped = None, None
    stop, ratio = (-1, math.inf) if cutoff is None else (round(cutoff[0] * steps), cutoff[1])
    for i in range(steps):
        if i == stop and group is not None:
            nearest = best.new_full((int(group.max()) + 1,), math.inf)
            nearest = nearest.scatter_reduce(0, group, best, "amin")[group]
            live = (best <= ratio * nearest).nonzero().squeeze(1)
            stopped = best, best_adv
            x0, pred, eps, delta = x0[live], pred[live], eps[live], delta[live]
            best, best_adv = best[live], best_adv[live]
        rows = torch.arange(x0.shape[0], device=x0.device)
        cosine = (1 + math.cos(math.pi * i / steps)) / 2
        g_rate = gamma[1] + (gamma[0] - gamma[1]) * cosine
        a_rate = alpha[1] + (alpha[0] - alpha[1]) * cosine
        # The last step's point is only checked: the step it would take is never tried.
        last = i == steps - 1
        point = (x0 + delta).requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            z = logits_of(point)
        is_adv = decision_changes(z.detach(), pred)
        dist = torch.linalg.vector_norm(delta, ord=order, dim=1)
        better = is_adv & (dist < best)
        best = torch.where(better, dist, best)
        best_adv = torch.where(better[:, None], point.detach(), best_adv)
        if last:
            break
        with torch.enable_grad():
            check_differentiable(z)
            # Classes tied exactly with ``pred`` are passed over: a duplicated output
            # unit ties everywhere, and its zero gradient would stall the walk.
            zd = z.detach()
            ties = zd == zd.gather(1, pred[:, None])
            other = zd.masked_fill(ties, -math.inf).argmax(dim=1)
            diff = z[rows, pred] - z[rows, other]
            (grad,) = torch.autograd.grad(diff.sum(), point)
        # FMN's budget: shrink while adversarial (never above the best), grow while not.
        eps = torch.where(is_adv, torch.minimum(eps * (1 - g_rate), best), eps * (1 + g_rate))
        delta = delta - (a_rate * eps)[:, None] * steepest(grad, norm)
        delta = project_ball(delta, eps, norm)
        delta = (x0 + delta).clamp(0, 1) - x0
    if live is not None and stopped is not None:
        all_best, all_adv = stopped
        all_best[live], all_adv[live] = best, best_adv
        best, best_adv = all_best, all_adv
    return best_adv, best
