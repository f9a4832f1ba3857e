"""brittle's FAB engine against torchattacks' FAB (the oracle) on the digits CNNs."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import brittle
from brittle.attacks import fab
from brittle.attacks.attack import ENGINES, AttackSettings, attack_batch
from brittle.attacks.fab import fab_attack
from brittle.digits import DigitsSplit
from brittle.scores.norms import per_sample_norm

log = logging.getLogger(__name__)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pred(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


@pytest.mark.parametrize(
    ("kind", "norm", "n", "steps"),
    [("robust", "Linf", 128, 40), ("robust", "L2", 96, 30), ("standard", "L1", 96, 30)],
)
def test_margins_as_small_as_torchattacks(
    request: pytest.FixtureRequest, digits: DigitsSplit, kind: str, norm: str, n: int, steps: int
) -> None:
    model = request.getfixturevalue(f"{kind}_model")
    x = digits.x_holdout[:n]
    pred = _pred(model, x)
    settings = AttackSettings(norm=norm, steps=steps)
    ours = attack_batch(model, x, pred, settings, engine="brittle")
    reference = attack_batch(model, x, pred, settings, engine="torchattacks")

    broke, broke_ref = torch.isfinite(ours), torch.isfinite(reference)
    assert broke.sum() >= broke_ref.sum()
    both = broke & broke_ref
    ratio = ours[both] / reference[both]
    assert float(ratio.median()) <= 1.01
    # FAB picks one boundary per step; where two are almost equally near, the two
    # engines can settle on different local boundaries, either way round. Such
    # samples must stay rare, and each one is logged.
    worse = (ratio > 1.05).nonzero().squeeze(1)
    for i in worse.tolist():
        log.warning(
            "%s %s sample %d: brittle %.4f vs torchattacks %.4f (different local boundary)",
            kind,
            norm,
            i,
            float(ours[both][i]),
            float(reference[both][i]),
        )
    assert len(worse) <= max(1, round(0.03 * int(both.sum()))), ratio[worse]


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_every_margin_is_a_verified_adversarial(
    robust_model: nn.Module, digits: DigitsSplit, norm: str
) -> None:
    x = digits.x_holdout[:24]
    pred = _pred(robust_model, x)
    adv, margin = fab_attack(robust_model, x, pred, norm=norm, steps=20, restarts=2)
    found = torch.isfinite(margin)
    assert found.all()
    assert (_pred(robust_model, adv) != pred).all()
    assert adv.min() >= 0 and adv.max() <= 1
    torch.testing.assert_close(per_sample_norm(adv - x, norm), margin)


def test_deterministic_for_a_fixed_seed(robust_model: nn.Module, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:32]
    run = lambda seed: brittle.input_margins(  # noqa: E731
        robust_model, x, norm="L2", steps=10, restarts=3, engine="brittle", seed=seed
    )
    first = run(0)
    torch.testing.assert_close(run(0), first, rtol=0, atol=0)
    assert not torch.equal(run(1), first)  # the seed does reach the restarts
    # Every bit of it: only the low 32 bits were used, so seed 2**32 drew seed 0's restarts.
    assert not torch.equal(run(2**32), first)


@pytest.mark.parametrize("norm", ["Linf", "L1"])
def test_independent_of_batch_size(robust_model: nn.Module, digits: DigitsSplit, norm: str) -> None:
    # Restarts included: their random starts must depend on the sample, not the batch.
    x = digits.x_holdout[:16]
    margins = [
        brittle.input_margins(
            robust_model, x, norm=norm, steps=10, restarts=2, engine="brittle", batch_size=size
        )
        for size in (1, 7, 128)
    ]
    assert torch.isfinite(margins[0]).all()
    for other in margins[1:]:
        torch.testing.assert_close(other, margins[0], rtol=1e-4, atol=0)


def test_runs_that_follow_each_other_per_sample_do_not_depend_on_the_batch(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # Each sample starts its targeted runs as soon as its own run ends, while others
    # are still running or already done. Few steps, so that some runs end on the step
    # limit while others still step, and a restart, which ranks its candidate classes
    # by what each sample learned. Sample by sample, the result must be the whole batch's.
    x = digits.x_holdout[40:64]
    pred = _pred(robust_model, x)
    settings = {"norm": "Linf", "steps": 8, "targeted": 3, "restarts": 2, "patience": 2}
    whole = fab_attack(robust_model, x, pred, **settings).margin
    alone = torch.cat(
        [
            fab_attack(
                robust_model, x[i : i + 1], pred[i : i + 1], index=torch.tensor([i]), **settings
            ).margin
            for i in range(len(x))
        ]
    )
    assert torch.isfinite(whole).all()
    # A batch of one rounds the model's sums otherwise: at most 1.2e-6 apart on this
    # machine (7 of 24 bitwise equal); 1e-4 leaves room for other CPUs' kernels.
    torch.testing.assert_close(alone, whole, rtol=1e-4, atol=0)


def test_a_step_too_large_for_one_pass_runs_in_parts_with_the_same_result(
    robust_model: nn.Module, digits: DigitsSplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A FAB step's pass takes at most _MAX_COPIES model rows; with a cap of 24, the
    # first step (one row per sample, nine backward passes) of 64 samples runs in
    # three parts.
    x = digits.x_holdout[:64]
    pred = _pred(robust_model, x)
    whole = fab_attack(robust_model, x, pred, steps=8).margin
    monkeypatch.setattr(fab, "_MAX_COPIES", 24)
    rows: list[int] = []
    hook = robust_model.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
    try:
        parts = fab_attack(robust_model, x, pred, steps=8).margin
    finally:
        hook.remove()
    assert rows[1:4] == [24, 24, 16]  # x0's logits, then the first step in three parts
    assert torch.isfinite(whole).all()
    # Bitwise equal on this machine; 1e-4 as for batches of other sizes above.
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=0)


def test_linear_model_hits_the_exact_boundary() -> None:
    # Two classes, logits x0 and x1: the Linf margin of (a, b) is (a - b) / 2.
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.2, 0.7]])
    margin = fab_attack(model, x, norm="Linf", steps=10).margin
    torch.testing.assert_close(margin, torch.tensor([0.4, 0.05, 0.25]), rtol=2e-3, atol=0)


def test_leaves_the_model_untouched(standard_model: nn.Module, digits: DigitsSplit) -> None:
    standard_model.train()
    try:
        fab_attack(standard_model, digits.x_holdout[:4], steps=3)
        assert standard_model.training
        assert all(p.grad is None and p.requires_grad for p in standard_model.parameters())
    finally:
        standard_model.eval()


def test_registered_engine() -> None:
    assert "brittle" in ENGINES


def test_bad_arguments() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="steps, restarts and candidates must be positive"):
        fab_attack(model, torch.rand(2, 4), steps=0)
    with pytest.raises(ValueError, match=r"inputs in \[0, 1\]"):
        fab_attack(model, torch.rand(2, 4) + 1)
    with pytest.raises(ValueError, match="norm must be one of"):
        fab_attack(model, torch.rand(2, 4), norm="L3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 classes"):
        fab_attack(nn.Linear(4, 1), torch.rand(2, 4))


def test_fit_reports_passes_per_sample(pseudo_monitor: brittle.Monitor) -> None:
    # pseudo_monitor was fitted with steps=10: at most 11 label checks per run (the
    # first linearising up to 9 classes), two runs, a 10-step walk of each run's
    # adversarial, 10 bisection steps and a few single checks.
    passes = pseudo_monitor.report.settings["passes_per_sample"]
    assert set(passes) == {"forward", "backward"}
    assert 0 < passes["backward"] < passes["forward"] < 150


@pytest.mark.parametrize("engine", ["brittle", "torchattacks"])
def test_a_class_no_sample_predicts_can_hold_the_nearest_boundary(engine: str) -> None:
    # z0 = x0, z1 = x1, z2 = 0.55: class 2 wins nowhere in this batch, yet its
    # boundary is the nearest for both samples (L2: 0.05 and 0.15; class 0/1: 0.14, 0.28).
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.bias.copy_(torch.tensor([0.0, 0.0, 0.55]))
    x = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    margins = brittle.input_margins(model, x, norm="L2", steps=30, engine=engine)
    torch.testing.assert_close(margins, torch.tensor([0.05, 0.15]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("engine", ["brittle", "torchattacks"])
def test_a_float64_model_gets_its_margins_in_float64(engine: str) -> None:
    # Before: the torchattacks engine kept its best margins in float32, so a float64
    # model's verified distances were rounded to float32 (one in 1.7e7 relative): a
    # margin just below eps could come back as eps itself.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.rand(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pred = model(x).argmax(dim=1)
    margins = attack_batch(model, x, pred, AttackSettings(norm="L2", steps=10), engine)
    assert torch.isfinite(margins).all()
    assert (margins != margins.float().double()).all()
