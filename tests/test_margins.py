"""The functional margins against brute-force loops over class pairs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import brittle
import brittle.functional as BF

NORMS = {"Linf": 1, "L2": 2, "L1": math.inf}  # threat model -> dual order of the weights


def brute_feature_margin(logits: torch.Tensor, weight: torch.Tensor, norm: str) -> np.ndarray:
    z, w = logits.double().numpy(), weight.double().numpy()
    out = []
    for row in z:
        c = int(row.argmax())
        out.append(
            min(
                (row[c] - row[j]) / np.linalg.norm(w[c] - w[j], ord=NORMS[norm])
                for j in range(len(row))
                if j != c
            )
        )
    return np.array(out)


def test_logit_margin_is_top1_minus_top2() -> None:
    logits = torch.randn(50, 7)
    expected = [sorted(row.tolist())[-1] - sorted(row.tolist())[-2] for row in logits]
    torch.testing.assert_close(BF.logit_margin(logits), torch.tensor(expected))


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
@pytest.mark.parametrize("table", [True, False])
def test_feature_margin_matches_pairwise_loop(norm: str, table: bool) -> None:
    weight, logits = torch.randn(12, 20), torch.randn(40, 12)
    pair = BF.pair_norm_table(weight, norm) if table else None  # type: ignore[arg-type]
    got = BF.feature_margin(logits, weight, norm, pair)  # type: ignore[arg-type]
    np.testing.assert_allclose(got.numpy(), brute_feature_margin(logits, weight, norm), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_feature_margin_without_a_table(dtype: torch.dtype) -> None:
    # The path of heads too large for a table (a half-precision 21k-class model):
    # torch.cdist has no half kernel, so the rows must be measured wider.
    torch.manual_seed(0)
    weight, logits = torch.randn(12, 20).to(dtype), torch.randn(40, 12).to(dtype)
    got = BF.feature_margin(logits, weight, "L2")
    assert got.dtype == dtype
    with_table = BF.feature_margin(logits, weight, "L2", BF.pair_norm_table(weight, "L2"))
    torch.testing.assert_close(got, with_table)
    # Half precision rounds each gap and norm once: 1 % covers bfloat16's 8 bits.
    want = brute_feature_margin(logits, weight, "L2")
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-2)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_pair_norm_table_matches_numpy(norm: str) -> None:
    weight = torch.randn(6, 9)
    table = BF.pair_norm_table(weight, norm).double().numpy()  # type: ignore[arg-type]
    w = weight.double().numpy()
    for i, j in itertools.product(range(6), repeat=2):
        assert table[i, j] == pytest.approx(np.linalg.norm(w[i] - w[j], ord=NORMS[norm]), rel=1e-6)


def test_feature_margin_is_the_input_margin_of_a_linear_model() -> None:
    # For logits = W x + b, the exact feature margin is the distance from x to the
    # nearest decision boundary in input space; check it against the definition.
    weight, bias = torch.randn(4, 3), torch.randn(4)
    x = torch.randn(1, 3)
    z = x @ weight.T + bias
    margin = float(BF.feature_margin(z, weight, "L2"))
    c = int(z.argmax())
    nearest = min(
        (float(z[0, c] - z[0, k]) / float((weight[c] - weight[k]).norm()), k)
        for k in range(4)
        if k != c
    )
    dist, k = nearest
    direction = (weight[k] - weight[c]) / (weight[k] - weight[c]).norm()
    step = x + (dist + 1e-4) * direction
    assert margin == pytest.approx(dist, rel=1e-6)
    assert int((step @ weight.T + bias).argmax()) != c
    assert int(((x + (dist - 1e-4) * direction) @ weight.T + bias).argmax()) == c


def test_identical_weight_rows_never_give_nan() -> None:
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[3.0, 1.0, 0.0]])  # classes 0 and 1 never meet in feature space
    assert float(BF.feature_margin(logits, weight, "L2")) == pytest.approx(3 / math.sqrt(2))
    tie = torch.tensor([[3.0, 3.0, 0.0]])
    assert float(BF.feature_margin(tie, weight, "L2")) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("table", [True, False])
def test_a_class_of_an_identical_weight_row_is_never_the_nearest(
    dtype: torch.dtype, table: bool
) -> None:
    # The pair norm 0 was clamped to finfo(dtype).tiny: float16's is 6.1e-5, so a
    # logit gap of 1e-3 to the class of the same row (a bias apart) gave a "margin"
    # of 16, reported instead of the 21 to the class that can be reached, and a
    # two-class head of identical rows gave 16 or 8e34 where the docstring says inf.
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    below = 1.0 - torch.finfo(dtype).eps  # the logit next below 1, a bias apart
    logits = torch.tensor([[1.0, below, -29.0]], dtype=dtype)  # classes 0 and 1 never meet
    pair = BF.pair_norm_table(weight, "L2") if table else None
    want = float(logits[0, 0].double() - logits[0, 2].double()) / math.sqrt(2)
    # rel=1e-2 is above one unit in the last place of bfloat16 at 21 (0.125, 0.6 %); the
    # error is 1.7e-3 in bfloat16, 2.6e-4 in float16, with and without the table, under
    # ATEN_CPU_CAPABILITY=default, avx2 and avx512 alike (the inputs are fixed).
    assert float(BF.feature_margin(logits, weight, "L2", pair)) == pytest.approx(want, rel=1e-2)
    two = weight[:2]
    pair = BF.pair_norm_table(two, "L2") if table else None
    assert float(BF.feature_margin(logits[:, :2], two, "L2", pair)) == math.inf
    tie = torch.tensor([[3.0, 3.0]], dtype=dtype)
    assert float(BF.feature_margin(tie, two, "L2", pair)) == 0.0


def test_the_monitor_skips_the_identical_row_step_only_for_distinct_rows() -> None:
    # The monitor tells feature_margin when its table has no two equal rows, which
    # skips three operations per call; a head with equal rows must still get inf.
    torch.manual_seed(0)
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.0, -1e-3]))  # class 1 never wins
    x = torch.rand(4, 2)
    monitor = brittle.wrap(head, score="feature", norm="L2", example_input=x)
    assert torch.equal(monitor(x).margin, torch.full((4,), math.inf))
    with torch.no_grad():  # rows made distinct: the table is rebuilt and the step skipped
        head.weight[1, 1] = 0.5
    want = BF.feature_margin(head(x).detach(), head.weight, "L2")
    assert torch.equal(monitor(x).margin, want)
    assert torch.equal(
        BF.feature_margin(head(x).detach(), head.weight, "L2", distinct_rows=True), want
    )


def test_nan_logits_give_nan_margins() -> None:
    logits = torch.tensor([[float("nan"), 1.0], [2.0, 1.0]])
    weight = torch.eye(2)
    assert torch.isnan(BF.feature_margin(logits, weight, "L2")[0])
    assert not torch.isnan(BF.feature_margin(logits, weight, "L2")[1])


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        BF.logit_margin(torch.randn(3, 1))
    with pytest.raises(ValueError, match=r"shape \(batch, classes\)"):
        BF.logit_margin(torch.randn(3))
    with pytest.raises(ValueError, match=r"weight must have shape \(4, features\)"):
        BF.feature_margin(torch.randn(2, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="norm must be one of"):
        BF.pair_norm_table(torch.randn(3, 3), "L3")  # type: ignore[arg-type]
