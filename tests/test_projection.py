"""FAB's step, the nearest point of a hyperplane in the box, against scipy's exact solvers.

Linf and L1: the projection is a linear programme, solved by scipy's HiGHS
(``linprog``). L2: the nearest point is ``clip(t + mu * w, 0, 1)`` for the ``mu``
that puts it on the hyperplane (the KKT conditions), found by ``brentq``. The
step itself need not be unique (coordinates with a zero weight, ties), so the
tests compare its norm with the optimum and check that it lands on the
hyperplane, inside the box.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, linprog

from brittle.attacks.projection import project

_ORDER = {"Linf": float("inf"), "L2": 2.0, "L1": 1.0}


def _problems(
    seed: int, n: int = 40, dim: int = 64, *, far: bool = False
) -> tuple[torch.Tensor, ...]:
    """Points on the box's faces and inside it, sparse normals, reachable offsets.

    With ``far``, each hyperplane passes near the box corner farthest along ``-w``,
    so that nearly every coordinate must move to reach it.
    """
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, dim, generator=gen, dtype=torch.float64)
    # Like the digits: many pixels exactly 0 or 1, many zero gradients.
    t = torch.where(torch.rand(n, dim, generator=gen) < 0.3, 0.0, t)
    t = torch.where(torch.rand(n, dim, generator=gen) < 0.1, 1.0, t)
    w = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    w = torch.where(torch.rand(n, dim, generator=gen) < 0.25, 0.0, w)
    # A target point in the box at a random distance: the hyperplane through it.
    y = (t + torch.rand(n, 1, generator=gen) * (torch.rand(n, dim, generator=gen) - t)).clamp(0, 1)
    if far:
        corner = (w <= 0).to(t.dtype)
        y = corner + 0.02 * (t - corner)
    return t, w, (w * y).sum(dim=1)


def _optimum(t: np.ndarray, w: np.ndarray, b: float, norm: str) -> float:
    """The smallest norm of a step onto the hyperplane inside the box (exact)."""
    dim = len(t)
    if norm == "L2":

        def gap(mu: float) -> float:
            return float(w @ np.clip(t + mu * w, 0, 1) - b)

        mu = brentq(gap, -1e6, 1e6, xtol=1e-15, rtol=1e-15)
        return float(np.linalg.norm(np.clip(t + mu * w, 0, 1) - t))
    box = [(-ti, 1 - ti) for ti in t]
    if norm == "Linf":  # variables (d, s): min s, -s <= d_i <= s
        eye = np.eye(dim)
        ub = np.block([[eye, -np.ones((dim, 1))], [-eye, -np.ones((dim, 1))]])
        res = linprog(
            np.r_[np.zeros(dim), 1.0],
            A_ub=ub,
            b_ub=np.zeros(2 * dim),
            A_eq=np.r_[w, 0.0][None],
            b_eq=[b - w @ t],
            bounds=[*box, (0, None)],
            method="highs",
        )
    else:  # L1, variables (d, u): min sum u, -u <= d <= u
        eye = np.eye(dim)
        ub = np.block([[eye, -eye], [-eye, -eye]])
        res = linprog(
            np.r_[np.zeros(dim), np.ones(dim)],
            A_ub=ub,
            b_ub=np.zeros(2 * dim),
            A_eq=np.r_[w, np.zeros(dim)][None],
            b_eq=[b - w @ t],
            bounds=[*box, *[(0, None)] * dim],
            method="highs",
        )
    assert res.status == 0, res.message
    return float(res.fun)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
@pytest.mark.parametrize(
    ("seed", "dim", "far"),
    [(0, 64, False), (1, 64, False), (2, 64, True), (3, 1, False), (4, 3, True)],
)
def test_the_step_is_the_shortest_onto_the_hyperplane_inside_the_box(
    norm: str, seed: int, dim: int, far: bool
) -> None:
    t, w, b = _problems(seed, dim=dim, far=far)
    d = project(t, w, b, norm)
    moved = t + d
    # Inside the box (up to rounding) and on the hyperplane.
    assert bool(((moved >= -1e-12) & (moved <= 1 + 1e-12)).all())
    # On the hyperplane: 4.6e-14 off at most, measured over these problems.
    torch.testing.assert_close((w * moved).sum(dim=1), b, rtol=0, atol=1e-9)
    lengths = torch.linalg.vector_norm(d, ord=_ORDER[norm], dim=1)
    best = torch.tensor(
        [_optimum(t[i].numpy(), w[i].numpy(), float(b[i]), norm) for i in range(len(t))],
        dtype=torch.float64,
    )
    # No longer than the optimum, nor shorter: a shorter step would have to miss the
    # hyperplane or leave the box. Measured: 1.1e-13 relative at most; the bound is
    # HiGHS's own tolerance (about 1e-9).
    torch.testing.assert_close(lengths, best, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_a_hyperplane_beyond_the_box_gets_the_step_to_the_nearest_corner(norm: str) -> None:
    t, w, _ = _problems(5, n=8)
    # Beyond every corner: w . x > b for every x in the box, by a margin.
    b = -w.abs().sum(dim=1) - 1.0
    d = project(t, w, b, norm)
    corner = (w <= 0).to(t.dtype)  # the corner where w . x is smallest
    moving = w != 0
    torch.testing.assert_close(torch.where(moving, t + d, corner), corner, rtol=0, atol=1e-12)
    # Coordinates with no weight do not move.
    assert bool((d[~moving] == 0).all())


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_bfloat16_steps_are_computed_too(norm: str) -> None:
    # numpy has no bfloat16: such rows are sorted by torch instead.
    t, w, b = _problems(7, n=4, dim=16)
    d = project(t.bfloat16(), w.bfloat16(), b.bfloat16(), norm)
    assert d.dtype == torch.bfloat16 and bool(torch.isfinite(d).all())
    # bfloat16 keeps 8 bits: 0.004 apart at most, measured.
    torch.testing.assert_close(d.double(), project(t, w, b, norm), rtol=0, atol=0.02)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_float32_steps_match_the_float64_ones(norm: str) -> None:
    t, w, b = _problems(6)
    d64 = project(t, w, b, norm)
    d32 = project(t.float(), w.float(), b.float(), norm)
    assert d32.dtype == torch.float32
    # 3.4e-7 apart at most, measured.
    torch.testing.assert_close(d32.double(), d64, rtol=0, atol=2e-5)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
@pytest.mark.parametrize("scale", [1e-12, 1e-9, 1e9])
def test_the_step_does_not_depend_on_the_scale_of_the_hyperplane(norm: str, scale: float) -> None:
    # w . x = b and (s w) . x = s b are one hyperplane. Before: the L2 and L1 steps
    # dropped weights below 1e-8 as zero, so that at s = 1e-9 they were all zero and
    # a model with small gradients (probabilities as outputs) kept every margin censored.
    t, w, b = _problems(8)
    d = project(t, w * scale, b * scale, norm)
    # 8.9e-16 apart at most, measured (the rows are rescaled to a largest weight of 1).
    torch.testing.assert_close(d, project(t, w, b, norm), rtol=0, atol=1e-12)
