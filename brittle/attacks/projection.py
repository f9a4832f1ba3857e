"""The step of FAB: the nearest point of a hyperplane inside the box ``[0, 1]``.

Each FAB step linearises a decision boundary as the hyperplane ``w . x = b`` and
moves to the point of that hyperplane, within the input box, nearest in the
attack's norm. The three projections follow Croce & Hein's reference code
(AutoAttack's ``fab_projections.py``): sort the coordinates by where they hit
the box, then bisect for the optimal multiplier.
"""

from __future__ import annotations

import math

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
    dot = (w * t).sum(1)
    # Orient each hyperplane so that the step lowers w . x: w . t >= b.
    sign = torch.where(dot - b >= 0, 1.0, -1.0).to(t.dtype)
    w, need = w * sign[:, None], (b - dot) * sign  # need <= 0: the change of w . x
    moving, up = w != 0, w < 0  # up: the coordinate rises towards the corner
    room = torch.where(up, 1 - t, t)  # how far each coordinate can move
    d = torch.where(moving, torch.where(up, room, -t), 0.0)  # the corner, reached
    floor = (w * d).sum(1)  # the lowest change of w . x the box allows

    # Breakpoints from the largest room down: at the j-th, the j + 1 coordinates with
    # the most room still move by lam, the others sit at the corner.
    order = _descending(room)
    weights = w.gather(1, order)
    slope = torch.cumsum(weights.abs(), dim=1)
    rest = torch.cumsum(-weights * d.gather(1, order), dim=1) + floor[:, None]
    overshoot = need[:, None] > rest - slope * room.gather(1, order)
    # The change is monotone in lam: the breakpoints that overshoot come first.
    last = overshoot[:, -1]  # even the smallest room overshoots: every coordinate moves
    between = (need > floor) & ~last
    piece = torch.where(last, w.shape[1] - 1, (overshoot.sum(1) - 1).clamp(0, w.shape[1] - 2))
    at = piece[:, None]
    lam = ((need[:, None] - rest.gather(1, at)) / -slope.gather(1, at)).clamp_min(0)
    capped = torch.where(up, torch.minimum(lam, d), torch.maximum(-lam, d))
    free = torch.where(up, lam, -lam)
    d = torch.where(last[:, None], free, torch.where(between[:, None], capped, d))
    return torch.where(moving, d, 0.0)


def _descending(values: Tensor) -> Tensor:
    """Per row, the indices that sort ``values`` from largest to smallest (ties in any order).

    On a CPU through numpy, whose vectorised sort is several times faster than
    ``torch.argsort`` on short rows (0.04 against 0.21 ms for 182 x 64 floats).
    """
    if values.device.type == "cpu":
        return torch.from_numpy(np.argsort(-values.detach().numpy(), axis=1))
    return torch.argsort(values, dim=1, descending=True)


def project_l2(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``project`` in the L2 norm."""
    w = w.clone()
    c = (w * t).sum(1) - b
    sign = 2 * (c >= 0) - 1
    w.mul_(sign[:, None])
    c = c * sign

    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r[r == -1e12] *= -1
    rs, indr = torch.sort(r, dim=1)
    rs2 = nn.functional.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs2.masked_fill_(rs2 == 1e12, 0)

    w3s = (w**2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w)
    d.mul_((w.abs() > 1e-8).float())
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)

    c4 = s[:, 0] + c < 0
    c3 = (d * w).sum(dim=1) + c > 0
    c2 = ~(c4 | c3)
    lb = torch.zeros(int(c2.sum()), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    s_, c_ = s[c2], c[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        ok = s_.gather(1, mid.long()[:, None]).squeeze(1) + c_ > 0
        lb = torch.where(ok, mid, lb)
        ub = torch.where(ok, ub, mid)
    lb = lb.long()

    if c4.any():
        alpha = c[c4] / w5[c4].squeeze(-1)
        d[c4] = -alpha[:, None] * w[c4]
    if c2.any():
        alpha = (s[c2, lb] + c[c2]) / ws[c2, lb] + rs[c2, lb]
        alpha[ws[c2, lb] == 0] = 0
        c5 = (alpha[:, None] > r[c2]).float()
        d[c2] = d[c2] * c5 - alpha[:, None] * w[c2] * (1 - c5)
    return d * (w.abs() > 1e-8).float()


def project_l1(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``project`` in the L1 norm."""
    w = w.clone()
    c = (w * t).sum(1) - b
    sign = 2 * (c >= 0) - 1
    w.mul_(sign[:, None])
    c = c * sign

    r = (1 / w).abs().clamp_max(1e12)
    indr = torch.argsort(r, dim=1)
    indr_rev = torch.argsort(indr)
    c6 = (w < 0).float()
    d = (-t + c6) * (w != 0).float()
    ds = torch.min(-w * t, w * (1 - t)).gather(1, indr)
    s = torch.cumsum(torch.cat((c[:, None], ds), 1), dim=1)

    c2 = s[:, -1] < 0
    lb = torch.zeros(int(c2.sum()), device=t.device)
    ub = torch.full_like(lb, s.shape[1])
    s_ = s[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        ok = s_.gather(1, mid.long()[:, None]).squeeze(1) > 0
        lb = torch.where(ok, mid, lb)
        ub = torch.where(ok, ub, mid)
    lb2 = lb.long()

    if c2.any():
        indr = indr[c2].gather(1, lb2[:, None]).squeeze(1)
        u = torch.arange(0, w.shape[0], device=t.device)[:, None]
        u2 = torch.arange(0, w.shape[1], device=t.device, dtype=torch.float)[None, :]
        alpha = -s[c2, lb2] / w[c2, indr]
        c5 = u2 < lb[:, None]
        u3 = c5[u[: c5.shape[0]], indr_rev[c2]]
        d[c2] = d[c2] * u3.float()
        d[c2, indr] = alpha
    return d * (w.abs() > 1e-8).float()
