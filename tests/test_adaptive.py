"""Attacks that know the monitor: verified examples, an untouched model, seeded figures."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import brittle
from brittle.attacks.adaptive import ATTACKS, AttackOutcome, adaptive_attacks, adaptive_pgd
from brittle.attacks.pgd import torchattacks_fgsm, torchattacks_pgd
from brittle.digits import DigitsSplit
from brittle.scores.margins import logit_margin
from brittle.scores.norms import per_sample_norm

EPS = {"Linf": 0.1, "L2": 0.5}
N = 32


def _monitor(model: nn.Module, x: torch.Tensor, norm: str = "Linf") -> brittle.Monitor:
    monitor = brittle.wrap(model, eps=EPS[norm], norm=norm, score="logit")
    with torch.no_grad():
        # Flags the clean samples whose logit margin is in the lowest quarter.
        monitor.set_threshold(float(logit_margin(model(x)).quantile(0.25)))
    return monitor


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_adaptive_examples_change_the_prediction_inside_the_ball(
    standard_model: nn.Module, digits: DigitsSplit, norm: str
) -> None:
    x = digits.x_holdout[:N]
    monitor = _monitor(standard_model, x, norm)
    x_adv, success = adaptive_pgd(monitor, x, steps=10)
    assert success.any()
    with torch.no_grad():
        clean, pred = standard_model(x).argmax(1), standard_model(x_adv).argmax(1)
    assert (pred[success] != clean[success]).all()
    assert (per_sample_norm(x_adv - x, norm)[success] <= EPS[norm] + 1e-5).all()  # type: ignore[arg-type]
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.testing.assert_close(x_adv[~success], x[~success])


def test_adaptive_pgd_raises_the_score_above_plain_pgd(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    import torchattacks

    x = digits.x_holdout[:N]
    monitor = _monitor(standard_model, x)
    x_adv, success = adaptive_pgd(monitor, x, steps=10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pgd = torchattacks.PGD(standard_model, eps=0.1, alpha=0.025, steps=10)
        x_pgd = pgd(x, standard_model(x).argmax(1))
    with torch.no_grad():
        out_pgd, clean = monitor(x_pgd), monitor(x).pred
    both = success & (out_pgd.pred != clean)
    assert both.sum() >= 5
    with torch.no_grad():
        adaptive_score = monitor(x_adv).margin[both]
    assert adaptive_score.mean() > out_pgd.margin[both].mean()


def test_the_model_is_left_as_it_was(robust_model: nn.Module, digits: DigitsSplit) -> None:
    model = copy.deepcopy(robust_model).train()
    model[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    monitor = _monitor(model, digits.x_holdout[:N])
    rng = torch.random.get_rng_state()
    adaptive_attacks(monitor, digits.x_holdout[:16], steps=3, cw_steps=3)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_attacks_run_under_no_grad_as_outside_it(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    # Under torch.no_grad() (an evaluation script's usual context) they raised
    # "element 0 of tensors does not require grad", where fit and input_margins work.
    x = digits.x_holdout[:16]
    monitor = _monitor(standard_model, x)
    expected = adaptive_attacks(monitor, x, steps=3, cw_steps=3)
    with torch.no_grad():
        got = adaptive_attacks(monitor, x, steps=3, cw_steps=3)
        assert not torch.is_grad_enabled()
    assert got == expected  # seeded: the same figures
    assert expected.attacks["pgd"].n_successful > 0


def test_the_attacks_inside_inference_mode_say_so(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    # Inference mode, which the attacks cannot switch off, raised "element 0 of
    # tensors does not require grad".
    x = digits.x_holdout[:8]
    monitor = _monitor(standard_model, x)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"torch\.inference_mode\(\) turns autograd off"):
            adaptive_attacks(monitor, x, steps=2, cw_steps=2)
        with pytest.raises(ValueError, match=r"torch\.inference_mode\(\) turns autograd off"):
            adaptive_pgd(monitor, x, steps=2)


def test_the_check_analyses_attack_under_no_grad_as_outside_it(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    # The command line's PGD/FGSM flag share and input-gradient baseline raised under
    # torch.no_grad() for the same reason.
    from brittle.calibrate.analyses import adversarial_flags, baseline_scores

    x = digits.x_holdout[:16]
    monitor = _monitor(standard_model, x)
    probs = torch.softmax(standard_model(x), dim=1).detach().numpy()

    def both() -> tuple[object, object]:
        flags = adversarial_flags(
            monitor, x, norm="Linf", eps=0.1, batch_size=8, device="cpu", steps=3
        )
        scores = baseline_scores(
            standard_model,
            x,
            probs=probs,
            features=None,
            preds_all=probs.argmax(1),
            norm="Linf",
            batch_size=8,
            device="cpu",
        )
        return flags.attacks, scores["gradnorm"].tolist()

    expected = both()
    with torch.no_grad():
        got = both()
    assert got == expected


def test_flagged_share_is_measured_on_the_successful_examples(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    x = digits.x_holdout[:N]
    result = adaptive_attacks(_monitor(robust_model, x), x, steps=10, cw_steps=20)
    assert set(result.attacks) == set(ATTACKS)
    assert result.n == N and result.eps == 0.1 and result.norm == "Linf"
    for outcome in result.attacks.values():
        assert 0 <= outcome.n_flagged <= outcome.n_successful <= outcome.n_changed <= N
        assert outcome.success_rate == outcome.n_successful / N
        if outcome.n_successful:
            assert 0.0 <= outcome.flagged_of_successful <= 1.0
        else:
            assert math.isnan(outcome.flagged_of_successful)
    assert result.attacks["pgd"].n_successful > 0
    data = json.loads(json.dumps(result.to_dict()))
    assert data["attacks"]["adaptive_pgd"]["n_successful"] == (
        result.attacks["adaptive_pgd"].n_successful
    )


def test_figures_are_seeded(standard_model: nn.Module, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:24]
    monitor = _monitor(standard_model, x)
    first = adaptive_attacks(monitor, x, steps=5, cw_steps=5, seed=1, batch_size=10)
    second = adaptive_attacks(monitor, x, steps=5, cw_steps=5, seed=1, batch_size=10)
    assert first.to_dict() == second.to_dict()


def test_outcome_without_successes_reports_none() -> None:
    outcome = AttackOutcome("cw", n=4, n_changed=3, n_successful=0, n_flagged=0)
    assert outcome.to_dict()["flagged_of_successful"] is None
    assert outcome.success_rate == 0.0


def test_bad_arguments_are_named(standard_model: nn.Module, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:4]
    unthresholded = brittle.wrap(standard_model, eps=0.1)
    with pytest.raises(ValueError, match="needs a monitor with a threshold"):
        adaptive_attacks(unthresholded, x)
    monitor = _monitor(standard_model, x)
    with pytest.raises(ValueError, match="support norm 'Linf' and 'L2'"):
        adaptive_attacks(monitor, x, norm="L1")
    with pytest.raises(ValueError, match="eps must be"):
        adaptive_pgd(monitor, x, eps=-1.0)
    with pytest.raises(ValueError, match="steps must be"):
        adaptive_pgd(monitor, x, steps=0)


@pytest.mark.parametrize("shape", [(12,), (3, 4)])
def test_l2_attacks_take_inputs_that_are_not_images(shape: tuple[int, ...]) -> None:
    # Before: torchattacks' PGDL2 scaled by norms viewed as (N, 1, 1, 1) and raised
    # "output with shape [16, 12] doesn't match the broadcast shape [16, 1, 16, 12]"
    # on tabular rows, in adaptive_attacks and in the check's PGD and FGSM rows.
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 12, generator=torch.Generator().manual_seed(0)))
        model[1].bias.zero_()
    x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(1))
    monitor = brittle.wrap(model, eps=0.5, norm="L2", score="logit")
    monitor.set_threshold(0.5)
    result = adaptive_attacks(monitor, x, steps=10, cw_steps=5)
    # Every L2 margin is below 0.45 (brittle's FAB): PGD changed all 16, measured.
    assert result.attacks["pgd"].n_successful >= 12
    labels = model(x).argmax(dim=1)
    for attack in (torchattacks_pgd(model, "L2", 0.5, 10), torchattacks_fgsm(model, "L2", 0.5)):
        adv = attack(x, labels)
        assert adv.shape == x.shape
        assert bool((per_sample_norm(adv - x, "L2") <= 0.5 + 1e-5).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_with_the_way_out(
    standard_model: nn.Module, digits: DigitsSplit, dtype: torch.dtype
) -> None:
    # Before: "Index put requires the source and destination dtypes match" from deep
    # inside adaptive PGD, for a monitor loaded onto a half-precision model.
    x = digits.x_holdout[:4].to(dtype)
    monitor = brittle.wrap(copy.deepcopy(standard_model).to(dtype), eps=0.1, score="logit")
    monitor.set_threshold(0.5)
    with pytest.raises(ValueError, match=r"float32 copy .*brittle.load"):
        adaptive_attacks(monitor, x, steps=2, cw_steps=2)
    with pytest.raises(ValueError, match=r"float32 copy .*brittle.load"):
        adaptive_pgd(monitor, x, steps=2)
