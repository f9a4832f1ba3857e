"""brittle on a CUDA device gives the CPU's numbers (skipped where no GPU is present).

CI has no GPU, so these run only where one is: ``pytest tests/test_cuda.py``. Each
test compares the GPU against the CPU on the same model and samples, or against an
exact answer. TF32 is off throughout: its 10-bit matrix products would be compared,
not brittle.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import brittle
from brittle.attacks.fab import fab_attack
from brittle.digits import DigitsSplit
from brittle.scores.norms import per_sample_norm
from tests.conftest import DIGITS_EPS

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("one_thread"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_float32() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _on_cuda(model: nn.Module) -> nn.Module:
    """A copy on the GPU: the session's digits models stay on the CPU for other tests."""
    return copy.deepcopy(model).to(CUDA)


@pytest.mark.parametrize("score", ["logit", "feature"])
def test_the_forward_pass_matches_the_cpu(
    robust_model: nn.Module, digits: DigitsSplit, score: str
) -> None:
    x = digits.x_holdout[:64]
    monitors = [
        brittle.wrap(m, score=score, eps=DIGITS_EPS) for m in (robust_model, _on_cuda(robust_model))
    ]
    for monitor in monitors:
        monitor.set_threshold(2.0)
    cpu, gpu = monitors[0](x), monitors[1](x.to(CUDA))
    assert {t.device.type for t in gpu} == {"cuda"}
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.margin.cpu(), cpu.margin, rtol=1e-4, atol=1e-5)
    assert torch.equal(gpu.pred.cpu(), cpu.pred)
    away = (cpu.margin - 2.0).abs() > 1e-3
    assert torch.equal(gpu.flag.cpu()[away], cpu.flag[away])


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_a_linear_model_hits_the_exact_boundary(norm: str) -> None:
    # Two classes, logits x0 and x1: the boundary is x0 = x1, at Linf distance
    # |a - b| / 2 and L2 distance |a - b| / sqrt(2) from (a, b), inside the box.
    model = nn.Linear(2, 2, bias=False).to(CUDA)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.2, 0.7]], device=CUDA)
    gap = (x[:, 0] - x[:, 1]).abs()
    exact = gap / 2 if norm == "Linf" else gap / 2**0.5
    margin = fab_attack(model, x, norm=norm, steps=10).margin
    assert margin.device.type == "cuda"
    torch.testing.assert_close(margin, exact, rtol=2e-3, atol=0)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_margins_are_verified_and_match_the_cpu(
    robust_model: nn.Module, digits: DigitsSplit, norm: str
) -> None:
    x = digits.x_holdout[:48]
    model = _on_cuda(robust_model)
    with torch.no_grad():
        pred = model(x.to(CUDA)).argmax(dim=1)
    adv, margin = fab_attack(model, x.to(CUDA), pred, norm=norm)
    assert torch.isfinite(margin).all()
    with torch.no_grad():
        assert (model(adv).argmax(dim=1) != pred).all()
    assert adv.min() >= 0 and adv.max() <= 1
    torch.testing.assert_close(per_sample_norm(adv - x.to(CUDA), norm), margin)
    # The two devices round differently, so the attacks may take other paths. On an
    # H200 against a 2-core AMD EPYC, five sets of 48 digits per norm gave a median
    # ratio of 1.0000 and at most 0.04 % apart (one digit of 240 per norm).
    ratio = margin.cpu() / brittle.input_margins(robust_model, x, norm=norm)
    assert abs(float(ratio.median()) - 1) <= 0.002, ratio
    assert float((ratio - 1).abs().quantile(0.9)) <= 0.01, ratio


@pytest.mark.parametrize("score", ["logit", "pseudo"])
def test_fit_on_the_gpu_matches_the_cpu(
    robust_model: nn.Module, holdout_loader: DataLoader, score: str, tmp_path: Path
) -> None:
    def fit(model: nn.Module) -> brittle.Monitor:
        monitor = brittle.wrap(model, score=score, eps=DIGITS_EPS)
        # Few training samples for time: fit() rightly warns that the ranking is unreliable.
        with pytest.warns(UserWarning) if score == "pseudo" else nullcontext():
            return monitor.fit(
                holdout_loader, n_samples=240, steps=20, progress=False, target_tpr=0.9
            )

    cpu = fit(robust_model)
    cuda_rng = torch.cuda.get_rng_state()
    gpu = fit(_on_cuda(robust_model))
    # fit seeds forks of the generators it uses: the caller's GPU generator stays as it
    # was (the CPU's is not checked: iterating a DataLoader draws a seed from it).
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert gpu.threshold.device.type == "cuda"
    tau, expected = (m.report.metrics[m.report.chosen].tau for m in (gpu, cpu))
    assert abs(tau - expected) <= 0.05, (tau, expected)
    assert float(gpu.threshold) == pytest.approx(float(cpu.threshold), rel=0.1)

    # Saved on the GPU, loaded onto the CPU model: the same outputs there.
    loaded = brittle.load(gpu.save(tmp_path / "monitor.pt"), robust_model)
    x = next(iter(holdout_loader))[0][:32]
    torch.testing.assert_close(loaded(x).margin, gpu(x.to(CUDA)).margin.cpu(), rtol=1e-4, atol=1e-5)


def test_the_onnx_graph_of_a_gpu_monitor_gives_its_outputs(
    robust_model: nn.Module, digits: DigitsSplit, tmp_path: Path
) -> None:
    monitor = brittle.wrap(_on_cuda(robust_model), score="feature", eps=DIGITS_EPS)
    x = digits.x_holdout[:16].to(CUDA)
    monitor.set_threshold(0.1)
    path = monitor.export_onnx(tmp_path / "monitor.onnx", x[:2])
    served = brittle.OnnxMonitor(path, providers=["CPUExecutionProvider"])(x.cpu().numpy())
    expected = monitor(x)
    assert (served.pred == expected.pred.cpu().numpy()).all()
    torch.testing.assert_close(
        torch.from_numpy(served.margin), expected.margin.cpu(), rtol=1e-4, atol=1e-5
    )


def test_evaluate_and_the_adaptive_attacks_run_on_the_gpu(
    robust_model: nn.Module, digits: DigitsSplit
) -> None:
    from brittle.attacks.adaptive import adaptive_attacks
    from brittle.calibrate.evaluate import evaluate

    x = digits.x_holdout[:64]
    monitors = [brittle.wrap(m, eps=DIGITS_EPS) for m in (robust_model, _on_cuda(robust_model))]
    for monitor in monitors:
        monitor.set_threshold(2.0)
    reports = [evaluate(m, x, steps=20, progress=False) for m in monitors]
    cpu, gpu = (r.metrics[r.chosen] for r in reports)
    assert abs(gpu.tau - cpu.tau) <= 0.02, (gpu.tau, cpu.tau)
    assert reports[1].tpr == pytest.approx(reports[0].tpr, abs=0.05)

    result = adaptive_attacks(monitors[1], x[:16].to(CUDA), steps=10, cw_steps=20)
    assert result.n == 16 and set(result.attacks) and 0 <= result.clean_flagged <= 1


def test_the_functional_metrics_take_gpu_tensors() -> None:
    # The guide's functional API on the scores of a GPU model: numpy refused a CUDA
    # tensor ("can't convert cuda:0 device type tensor to numpy").
    import brittle.functional as BF

    generator = torch.Generator().manual_seed(0)
    logits, margins = torch.randn(80, 4, generator=generator), torch.rand(80, generator=generator)
    scores = BF.logit_margin(logits)
    on_gpu = BF.logit_margin(logits.to(CUDA))
    positive = margins <= 0.3
    tau = BF.kendall_tau(on_gpu, margins.to(CUDA))
    assert tau == pytest.approx(BF.kendall_tau(scores, margins))
    assert BF.detection_metrics(on_gpu, margins.to(CUDA), eps=0.3) == pytest.approx(
        BF.detection_metrics(scores, margins, eps=0.3)
    )
    assert BF.rates(on_gpu, positive.to(CUDA), 0.5) == BF.rates(scores, positive, 0.5)
    assert BF.conformal_threshold(on_gpu[positive.to(CUDA)], 0.5) == pytest.approx(
        BF.conformal_threshold(scores[positive], 0.5)
    )


def test_the_alarm_takes_gpu_flags() -> None:
    # A GPU Monitor's out.flag was refused as "flags must be booleans".
    from brittle.deploy.alarm import FlagRateAlarm

    flags = torch.tensor([True, False, False, True])
    alarm, reference = FlagRateAlarm((20, 200), lag=1), FlagRateAlarm((20, 200), lag=1)
    assert alarm.update(flags.to(CUDA)) == reference.update(flags)
