"""The boundary walk after FAB's runs, and the cutoff that stops the rows far behind."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from brittle.attacks.attack import PassCounter
from brittle.attacks.walk import boundary_walk


def _two_classes() -> nn.Linear:
    """Logits (x_0, x_1): the boundary x_0 == x_1 is (a - b) / 2 away from (a, b) in Linf."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    return model


def _walk(rows: list[int], **kwargs: object) -> tuple[Tensor, Tensor]:
    model = _two_classes()

    def logits_of(x: Tensor) -> Tensor:
        rows.append(len(x))
        return model(x)

    x0 = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.6, 0.5]])
    # Row 0 starts 0.25 away, row 1 0.6 away, both for sample 0; row 2 for sample 1.
    adv = torch.tensor([[0.45, 0.55], [0.1, 0.9], [0.3, 0.8]])
    return boundary_walk(logits_of, x0, adv, torch.zeros(3, dtype=torch.long), "Linf", 20, **kwargs)


def test_the_cutoff_stops_only_the_rows_far_behind_their_sample() -> None:
    full_rows: list[int] = []
    cut_rows: list[int] = []
    full = _walk(full_rows, group=torch.tensor([0, 0, 1]))  # no cutoff: every row walks
    cut = _walk(cut_rows, group=torch.tensor([0, 0, 1]), cutoff=(0.4, 1.2))
    assert full_rows == [3] * 20
    # After 8 steps row 1 is still more than 1.2x row 0's best: it stops there.
    assert cut_rows == [3] * 8 + [2] * 12
    # The rows that walk on get what they got without the cutoff; sample 0's boundary
    # is 0.2 away, and its nearest row's walk reaches it within 0.1 %.
    torch.testing.assert_close(cut[1][[0, 2]], full[1][[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(cut[1][0], torch.tensor(0.2), rtol=1e-3, atol=0)
    # The stopped row keeps its nearest point so far: farther than its full walk's.
    assert float(full[1][1]) <= float(cut[1][1]) < 0.6
    assert bool((_two_classes()(cut[0]).argmax(dim=1) == 1).all())


def test_without_a_group_the_cutoff_changes_nothing() -> None:
    plain_rows: list[int] = []
    cut_rows: list[int] = []
    plain = _walk(plain_rows)
    cut = _walk(cut_rows, cutoff=(0.4, 1.2))
    assert plain_rows == cut_rows == [3] * 20
    torch.testing.assert_close(cut, plain, rtol=0, atol=0)


def test_a_cutoff_that_would_stop_every_row_is_refused() -> None:
    with pytest.raises(ValueError, match="cutoff"):
        _walk([], group=torch.tensor([0, 0, 1]), cutoff=(0.4, 0.9))


def test_the_last_step_is_checked_without_a_backward_pass() -> None:
    # The step after the last point would never be tried: its gradient was wasted work,
    # a twentieth of the walk's backward passes.
    counter = PassCounter()
    model = counter.counted(_two_classes())
    x0, adv = torch.tensor([[0.7, 0.3]]), torch.tensor([[0.45, 0.55]])
    _, dist = boundary_walk(model, x0, adv, torch.zeros(1, dtype=torch.long), "Linf", 20)
    assert (counter.forward, counter.backward) == (20, 19)
    assert torch.allclose(dist, torch.tensor([0.2]), atol=1e-3)
