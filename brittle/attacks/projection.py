"""The step of FAB: the nearest point of a hyperplane inside the box ``[0, 1]``.

Each FAB step linearises a decision boundary as the hyperplane ``w . x = b`` and
moves to the point of that hyperplane, within the input box, nearest in the
attack's norm. The three projections follow Croce & Hein's reference code
(AutoAttack's ``fab_projections.py``): sort the coordinates by where they hit
the box, then find the piece of the piecewise-linear path on which the
hyperplane lies. The reference code bisects for it in a Python loop; the
breakpoints are monotone, so here one comparison over the sorted row and a
count find it, and on a CPU the sort runs in numpy, several times faster than
``torch.argsort`` on short rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from brittle.scores.norms import Norm

__all__ = ["project", "project_linf", "project_l2", "project_l1"]


def project(t: Tensor, w: Tensor, b: Tensor, norm: Norm) -> Tensor:
    """Smallest ``d`` with ``w . (t + d) = b`` and ``t + d`` in ``[0, 1]`` (per row).

    Args:
        t: ``(n, d)`` points in ``[0, 1]``.
        w: ``(n, d)`` normals of the hyperplanes.
        b: ``(n,)`` offsets of the hyperplanes.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``: the norm of ``d`` minimised.

    Returns:
        ``(n, d)`` steps. Where the box does not reach the hyperplane, the step to
        the box corner that comes nearest.

    Examples:
        >>> import torch
        >>> from brittle.attacks.projection import project
        >>> t = torch.tensor([[0.5, 0.5]])
        >>> w, b = torch.tensor([[1.0, 1.0]]), torch.tensor([1.5])
        >>> project(t, w, b, "Linf")  # both coordinates move by 0.25
        tensor([[0.2500, 0.2500]])
    """
    # The hyperplane, not its scale, decides the step: each row is rescaled so that its
    # largest weight is 1. The L2 and L1 projections drop weights below 1e-8 as zero,
    # so that, unscaled, the boundary of a model with small gradients (probabilities
    # near 0 or 1 as outputs) vanished and its margins came back censored.
    scale = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    w, b = w / scale, b / scale.squeeze(1)
    if norm == "Linf":
        return project_linf(t, w, b)
    if norm == "L2":
        return project_l2(t, w, b)
    return project_l1(t, w, b)


def project_linf(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``project`` in the Linf norm.

    Moving every coordinate by ``lam`` towards the box corner where ``w . x`` is
    smallest, each capped by the box, lowers ``w . x`` piecewise linearly in
    ``lam``, with a kink where a coordinate reaches the box. The breakpoints,
    sorted, give the piece the hyperplane lies on; on it ``lam`` is exact.
    """
    w, c = _oriented(t, w, b)
    need = -c  # the change of w . x the step must make
    moving, up = w != 0, w < 0  # up: the coordinate rises towards the corner
    room = torch.where(up, 1 - t, t)  # how far each coordinate can move
    d = torch.where(moving, torch.where(up, room, -t), 0.0)  # the corner, reached
    floor = (w * d).sum(1)  # the lowest change of w . x the box allows

    # Breakpoints from the largest room down: at the j-th, the j + 1 coordinates with
    # the most room still move by lam, the others sit at the corner.
    order = _argsort(room, descending=True)
    weights = w.gather(1, order)
    slope = torch.cumsum(weights.abs(), dim=1)
    rest = torch.cumsum(-weights * d.gather(1, order), dim=1) + floor[:, None]
    overshoot = need[:, None] > rest - slope * room.gather(1, order)
    # The change is monotone in lam: the breakpoints that overshoot come first.
    last = overshoot[:, -1]  # even the smallest room overshoots: every coordinate moves
    between = (need > floor) & ~last
    piece = torch.where(last, w.shape[1] - 1, _last_true(overshoot, w.shape[1] - 2))
    at = piece[:, None]
    lam = ((need[:, None] - rest.gather(1, at)) / -slope.gather(1, at)).clamp_min(0)
    capped = torch.where(up, torch.minimum(lam, d), torch.maximum(-lam, d))
    free = torch.where(up, lam, -lam)
    d = torch.where(last[:, None], free, torch.where(between[:, None], capped, d))
    return torch.where(moving, d, 0.0)


def _oriented(t: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` signed per row so that ``c = w . t - b >= 0``, and ``c``: the step lowers ``w . x``."""
    c = (w * t).sum(1) - b
    sign = torch.where(c >= 0, 1.0, -1.0).to(t.dtype)
    return w * sign[:, None], c * sign


def _argsort(values: Tensor, *, descending: bool = False) -> Tensor:
    """Per row, the indices that sort ``values`` (ties in any order).

    On a CPU through numpy, whose vectorised sort is several times faster than
    ``torch.argsort`` on short rows (0.04 against 0.21 ms for 182 x 64 floats).
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        array = values.detach().numpy()
        return torch.from_numpy(np.argsort(-array if descending else array, axis=1))
    return torch.argsort(values, dim=1, descending=descending)


def _last_true(flags: Tensor, high: int) -> Tensor:
    """Per row, the position of the last ``True`` of a run of them at the start, in ``[0, high]``.

    The projections' breakpoints are monotone, so their conditions hold for a
    prefix: counting them replaces the reference code's bisection loop.
    """
    return (flags.sum(dim=1) - 1).clamp(0, max(high, 0))


def project_l2(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``project`` in the L2 norm."""
    w, c = _oriented(t, w, b)
    keep = w.abs() > 1e-8

    # Moving along -w, each coordinate reaches the box at r; coordinates with no
    # weight never do (1e12).
    r = torch.maximum(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r = torch.where((w.abs() < 1e-8) | (r == -1e12), 1e12, r)
    indr = _argsort(r)
    rs = r.gather(1, indr)
    rs2 = nn.functional.pad(rs[:, 1:], (0, 1))
    rs = torch.where(rs == 1e12, 0.0, rs)
    rs2 = torch.where(rs2 == 1e12, 0.0, rs2)

    w3s = (w**2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = torch.where(keep, -(r * w), 0.0)
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)

    c4 = s[:, 0] + c < 0  # no coordinate reaches the box: the plain projection
    c3 = (d * w).sum(dim=1) + c > 0  # the box does not reach the hyperplane
    c2 = ~(c4 | c3)
    dim = w.shape[1]
    at = _last_true(s[:, :dim] + c[:, None] > 0, dim - 2)[:, None]
    free = -(c[:, None] / w5) * w
    remaining = ws.gather(1, at)
    alpha = (s.gather(1, at) + c[:, None]) / remaining + rs.gather(1, at)
    alpha = torch.where(remaining == 0, 0.0, alpha)
    capped = torch.where(alpha > r, d, -alpha * w)
    d = torch.where(c4[:, None], free, torch.where(c2[:, None], capped, d))
    return torch.where(keep, d, 0.0)


def project_l1(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``project`` in the L1 norm.

    The cheapest coordinates (largest ``|w|``) move to the box first; the one
    at which the hyperplane is reached moves part of the way.
    """
    w, c = _oriented(t, w, b)

    indr = _argsort((1 / w).abs().clamp_max(1e12))
    d = torch.where(w != 0, torch.where(w < 0, 1 - t, -t), 0.0)  # to the corner
    ds = torch.minimum(-w * t, w * (1 - t)).gather(1, indr)
    s = torch.cumsum(torch.cat((c[:, None], ds), 1), dim=1)  # w . x left to lower

    reach = s[:, -1] < 0
    at = _last_true(s > 0, w.shape[1] - 1)[:, None]
    part = indr.gather(1, at)  # the coordinate that moves part of the way
    alpha = -s.gather(1, at) / w.gather(1, part)
    position = torch.empty_like(indr).scatter_(
        1, indr, torch.arange(w.shape[1], device=w.device).expand_as(indr)
    )
    moved = torch.where(position < at, d, 0.0).scatter(1, part, alpha)
    d = torch.where(reach[:, None], moved, d)
    return torch.where(w.abs() > 1e-8, d, 0.0)
