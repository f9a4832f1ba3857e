"""brittle's margins against the per-sample best of strong minimum-norm attacks.

The references (``brittle.attacks.fab_references``): adv-lib's FMN, DDN and FAB,
torchattacks' FAB and AutoAttack's FAB, on the digits CNNs, with budgets cut
down to keep this file to well under a minute; and the exact distance on linear
models, where the nearest boundary is known in closed form.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brittle.attacks.attack import ENGINES, AttackSettings, attack_batch
from brittle.attacks.fab import fab_attack
from brittle.attacks.fab_references import REFERENCES, best_reference_margins, reference_margins
from brittle.digits import DigitsSplit
from brittle.functional import feature_margin

# Shortened reference budgets (the benchmark, benchmarks/bench_margins.py, runs them in full).
STEPS = {
    "torchattacks FAB": 50,
    "AutoAttack FAB x3": 30,
    "adv-lib FAB x3": 30,
    "adv-lib FMN": 300,
    "adv-lib DDN": 300,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("kind", "norm", "within", "p90"),
    [
        # Share within 1 % / 90th percentile of the ratio, 48 samples, the shipped
        # models, seeds 0-2 of both brittle's attack and the references (one sample is
        # 0.021 of the share); each bound sits two samples below the lowest share:
        # robust Linf 0.896 / 1.0095 at every seed; robust L2 0.833-0.875 /
        # 1.015-1.021; standard L1 0.833-0.854 / 1.013-1.023.
        ("robust", "Linf", 0.85, 1.02),
        ("robust", "L2", 0.79, 1.03),
        ("standard", "L1", 0.79, 1.04),
    ],
)
def test_as_tight_as_the_best_reference(
    request: pytest.FixtureRequest,
    digits: DigitsSplit,
    kind: str,
    norm: str,
    within: float,
    p90: float,
) -> None:
    model = request.getfixturevalue(f"{kind}_model")
    x = digits.x_holdout[:48]
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    ours = attack_batch(model, x, pred, AttackSettings(norm=norm), engine="brittle")
    refs = best_reference_margins(model, x, pred, norm, steps=STEPS)  # type: ignore[arg-type]
    best = refs.pop("best")

    for name, margins in refs.items():  # no reference finds an adversarial brittle misses
        assert int(torch.isfinite(ours).sum()) >= int(torch.isfinite(margins).sum()), name
    ratio = ours / torch.minimum(best, ours)
    assert float((ratio <= 1.01).double().mean()) >= within
    assert float(ratio.quantile(0.9)) <= p90
    # And tighter than the reference brittle replaced, sample for sample on the median.
    assert float((ours / refs["torchattacks FAB"]).median()) <= 1.0


def _linear_model(num_classes: int, dim: int, seed: int) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(dim, num_classes)
    with torch.no_grad():
        model.weight.copy_(torch.randn(num_classes, dim, generator=generator))
        model.bias.copy_(0.3 * torch.randn(num_classes, generator=generator))
    return model.eval()


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_exact_distance_on_linear_models(norm: str) -> None:
    # For logits W x + b the distance to the nearest boundary is the exact feature
    # margin with identity features; samples whose nearest boundary point could
    # leave the box [0, 1] are dropped (0.25 from every face is enough).
    model = _linear_model(num_classes=6, dim=12, seed=1)
    x = 0.25 + 0.5 * torch.rand(400, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
    exact = feature_margin(logits, model.weight, norm).double()  # type: ignore[arg-type]
    keep = exact < 0.2
    x, exact = x[keep][:64], exact[keep][:64]
    assert len(x) >= 32
    result = fab_attack(model, x, norm=norm)  # type: ignore[arg-type]
    margin = result.margin.double()
    assert torch.isfinite(margin).all()
    assert (margin >= exact * (1 - 1e-5)).all()  # never below the truth: verified adversarials
    torch.testing.assert_close(margin, exact, rtol=1e-3, atol=0)


def test_reference_runner_is_verified_and_censors_failures() -> None:
    # A constant model has no adversarial: every reference reports inf, never 0.
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    x = torch.rand(5, 4)
    pred = torch.zeros(5, dtype=torch.long)
    for name in ("adv-lib FMN", "torchattacks FAB"):
        margins = reference_margins(name, model, x, pred, "L2", steps=5)
        assert torch.isinf(margins).all(), name


def test_reference_names_and_norms() -> None:
    assert set(STEPS) == set(REFERENCES)
    assert "brittle" in ENGINES
    with pytest.raises(ValueError, match="name must be one of"):
        reference_margins("nope", nn.Linear(2, 2), torch.rand(1, 2), torch.tensor([0]), "L2")
    with pytest.raises(ValueError, match="supports"):
        reference_margins("adv-lib DDN", nn.Linear(2, 2), torch.rand(1, 2), torch.tensor([0]), "L1")


def test_reference_attacks_leave_the_model_untouched(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    x = digits.x_holdout[:4]
    with torch.no_grad():
        pred = standard_model(x).argmax(1)
    for name, (_, _, norms) in REFERENCES.items():
        reference_margins(name, standard_model, x, pred, norms[0], steps=3)
        # No .grad left on the parameters (a later attack or training step would see it).
        assert all(p.grad is None and p.requires_grad for p in standard_model.parameters()), name
        assert not standard_model.training, name
