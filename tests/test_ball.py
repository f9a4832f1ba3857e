"""The norm-ball projection and steepest step shared by the boundary walk and adaptive PGD."""

from __future__ import annotations

import pytest
import torch

from brittle.attacks.ball import project_ball, steepest
from brittle.scores.norms import per_sample_norm


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_projection_is_the_nearest_point_of_the_ball(norm: str) -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 2, 3, generator=generator, dtype=torch.float64)
    eps = torch.rand(8, generator=generator, dtype=torch.float64) + 0.1
    projected = project_ball(delta, eps, norm)
    assert (per_sample_norm(projected, norm) <= eps + 1e-12).all()
    # Brute force: no point of the ball (random directions at random radii) is nearer.
    candidates = torch.randn(2000, 8, 6, generator=generator, dtype=torch.float64)
    radius = eps[None, :, None] * torch.rand(2000, 8, 1, generator=generator, dtype=torch.float64)
    size = per_sample_norm(candidates.reshape(-1, 6), norm).reshape(2000, 8, 1)
    points = candidates / size * radius
    nearest = (points - delta.flatten(1)).norm(dim=2).min(dim=0).values
    assert ((projected - delta).flatten(1).norm(dim=1) <= nearest + 1e-12).all()
    inside = per_sample_norm(delta, norm) <= eps
    assert torch.equal(projected[inside], delta[inside])


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_steepest_step_has_unit_size_and_the_expected_linear_gain(norm: str) -> None:
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64)
    step = steepest(grad, norm)
    assert torch.allclose(per_sample_norm(step, norm), torch.ones(5, dtype=torch.float64))
    gain = (step * grad).flatten(1).sum(dim=1)
    if norm == "L1":  # grad scaled to unit L1 size: gains ||grad||_2^2 / ||grad||_1
        expected = per_sample_norm(grad, "L2") ** 2 / per_sample_norm(grad, "L1")
    else:  # steepest ascent: no unit vector gains more than the dual norm of grad
        expected = per_sample_norm(grad, {"Linf": "L1", "L2": "L2"}[norm])
    assert torch.allclose(gain, expected)
