"""Attacks that know the monitor: what share of adversarial examples it still flags.

Every adversarial example inside the eps-ball is itself non-robust (its clean
point lies within eps of another class, and so does the example), so a monitor
with a perfect score would flag every one. An attacker who knows the monitor
does better than plain PGD: it crosses the boundary and then moves the example
to where the monitor's score is high, or pushes past the boundary with a
confidence margin. This module measures, per attack, the share of successful
adversarial examples (prediction changed, inside the eps-ball and ``[0, 1]``)
that the monitor flags:

- ``"pgd"``: plain PGD at eps (torchattacks' ``PGD`` / ``PGDL2``), for reference;
- ``"adaptive_pgd"``: PGD that first changes the prediction and then, keeping
  it changed, maximises the monitor's active score (differentiating through
  the monitor, so it works the same for logit, feature and pseudo margins);
- ``"cw"``: Carlini-Wagner L2 with a confidence margin ``kappa``
  (torchattacks' ``CW``), counted successful when within eps in the monitor's norm.

Only the monitor's public behaviour is used. Gradients come from
``torch.autograd.grad`` with the monitor's parameters frozen, so no ``.grad``
is written anywhere; modes are restored and the global RNG is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from brittle._modes import eval_mode, frozen, seeded
from brittle.attacks.ball import project_ball, steepest
from brittle.attacks.outcome import AttackOutcome
from brittle.attacks.pgd import pgd_step_size, torchattacks_pgd
from brittle.attacks.verify import check_autograd, model_device, model_dtype
from brittle.scores.head import LogitsModel
from brittle.scores.norms import Norm, check_norm, per_sample_norm

if TYPE_CHECKING:
    from brittle.monitor import Monitor

__all__ = ["AttackOutcome", "AdaptiveResult", "adaptive_attacks", "adaptive_pgd", "ATTACKS"]

ATTACKS: tuple[str, ...] = ("pgd", "adaptive_pgd", "cw")
# Ascent objectives of adaptive PGD once the prediction has changed, one run each:
# the monitor's score alone; the score plus the cross-entropy that keeps pushing
# away from the clean class; the cross-entropy alone (plain PGD that keeps the
# adversarial point with the highest score it visits). A learned score can have a
# landscape where the first gets stuck; the last makes adaptive PGD at least as
# strong as plain PGD from the same start.
_OBJECTIVES: tuple[str, ...] = ("score", "mixed", "cross_entropy")
# Slack on the eps-ball when checking an example: float32 rounding of x + delta.
_TOLERANCE = 1e-5


@dataclass(frozen=True)
class AdaptiveResult:
    """Outcome of ``adaptive_attacks`` against one monitor.

    Attributes:
        eps: Radius of the ball the attacks stayed in.
        norm: Norm of the ball.
        score: The monitor's active score kind.
        threshold: The monitor's flag threshold.
        n: Samples attacked.
        clean_flagged: Share of the clean samples the monitor flags.
        attacks: ``AttackOutcome`` per attack name (see ``ATTACKS``).
    """

    eps: float
    norm: str
    score: str
    threshold: float
    n: int
    clean_flagged: float
    attacks: dict[str, AttackOutcome] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready values (NaN as ``None``)."""
        return {
            "eps": self.eps,
            "norm": self.norm,
            "score": self.score,
            "threshold": self.threshold,
            "n": self.n,
            "clean_flagged": None if math.isnan(self.clean_flagged) else self.clean_flagged,
            "attacks": {name: outcome.to_dict() for name, outcome in self.attacks.items()},
        }


@contextmanager
def _borrowed(monitor: nn.Module, seed: int) -> Iterator[None]:
    """Monitor in eval mode with frozen parameters and a forked, seeded RNG."""
    with eval_mode(monitor), frozen(monitor), seeded(seed, model_device(monitor)):
        yield


def _settings(monitor: Monitor, eps: float | None, norm: str | None) -> tuple[float, Norm]:
    eps = float(monitor.eps if eps is None else eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite, strictly positive number. Got {eps}.")
    norm = check_norm(monitor.norm if norm is None else norm)
    if norm not in ("Linf", "L2"):
        raise ValueError(f"the adaptive attacks support norm 'Linf' and 'L2'. Got {norm!r}.")
    return eps, norm


def _check_precision(monitor: Monitor) -> None:
    """Raise ``ValueError`` for a float16 or bfloat16 model, with the way out.

    The attacks step in the model's dtype, torchattacks' in float32 (which such a
    model does not take), and an example rounded to half precision can land outside
    the eps-ball by more than the check's slack.
    """
    dtype = model_dtype(monitor.model)  # fit's rule: a parameterless model's buffers
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the adaptive attacks need a float32 or float64 model; this one is {dtype}. "
            "Load the saved monitor onto a float32 copy (copy.deepcopy(model).float()) "
            "with brittle.load and attack that."
        )


def _project(x: Tensor, x_adv: Tensor, eps: float, norm: Norm) -> Tensor:
    """Nearest point to ``x_adv`` in the eps-ball around ``x``, then clipped to ``[0, 1]``."""
    return (x + project_ball(x_adv - x, eps, norm)).clamp(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: Norm) -> Tensor:
    noise = torch.rand_like(x) * 2 - 1
    if norm == "L2":
        noise = noise / per_sample_norm(noise, norm).clamp_min(1e-12).view(
            -1, *([1] * (x.dim() - 1))
        )
        noise = noise * torch.rand(x.shape[0], device=x.device).view(-1, *([1] * (x.dim() - 1)))
    return _project(x, x + eps * noise, eps, norm)


def _valid(x: Tensor, x_adv: Tensor, pred: Tensor, clean: Tensor, eps: float, norm: Norm) -> Tensor:
    """Prediction changed, inside the eps-ball (with float slack) and inside ``[0, 1]``."""
    inside = per_sample_norm(x_adv - x, norm) <= eps + _TOLERANCE
    unit = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
    return (pred != clean) & (pred >= 0) & inside & unit


def adaptive_pgd(
    monitor: Monitor,
    x: Tensor,
    *,
    eps: float | None = None,
    norm: str | None = None,
    steps: int = 50,
    alpha: float | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """PGD that changes the prediction, then maximises the monitor's score while it stays changed.

    Per step and per sample, the ascent direction is the gradient of the
    cross-entropy against the clean prediction while the prediction has not
    changed, and the gradient of the monitor's margin once it has. Three runs
    from their own random starts differ in that second objective: the margin
    alone, the margin plus the cross-entropy, the cross-entropy alone. The
    point kept per sample is the adversarial one (prediction changed, inside
    the eps-ball and ``[0, 1]``) with the highest score seen in any run.

    Args:
        monitor: A ``brittle.Monitor``; only ``monitor(x)`` is used.
        x: ``(B, ...)`` clean inputs in ``[0, 1]``.
        eps: Ball radius (default ``monitor.eps``).
        norm: ``"Linf"`` or ``"L2"`` (default ``monitor.norm``).
        steps: Gradient steps per run.
        alpha: Step size (default ``2.5 * eps / steps``, at least ``eps / 10``).
        seed: Seeds the random start (the global RNG is left untouched).

    Returns:
        ``(x_adv, success)``: the kept points (``x`` itself where no adversarial
        was found) and a boolean mask of the samples with a verified adversarial.

    Raises:
        ValueError: For a float16 or bfloat16 model (attack a float32 copy), or
            inside ``torch.inference_mode()``.

    Examples:
        >>> import torch, brittle
        >>> from brittle.attacks.adaptive import adaptive_pgd
        >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), eps=0.3)
        >>> x_adv, success = adaptive_pgd(monitor, torch.rand(5, 4), steps=10)
        >>> x_adv.shape, success.dtype
        (torch.Size([5, 4]), torch.bool)
    """
    eps, norm_ = _settings(monitor, eps, norm)
    check_autograd("adaptive PGD's examples are")
    _check_precision(monitor)
    if steps < 1:
        raise ValueError(f"steps must be a positive integer. Got {steps}.")
    alpha = float(alpha) if alpha is not None else pgd_step_size(eps, steps)
    x = x.detach()
    # Gradients are needed even when the caller runs under torch.no_grad().
    with _borrowed(monitor, seed), torch.enable_grad():
        with torch.no_grad():
            clean = monitor(x).pred
        best = x.clone()
        best_score = torch.full((x.shape[0],), -math.inf, device=x.device)
        success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for objective_kind in _OBJECTIVES:
            x_adv = _random_start(x, eps, norm_)
            for step in range(steps + 1):
                x_adv = x_adv.detach().requires_grad_(True)
                out = monitor(x_adv)
                with torch.no_grad():
                    valid = _valid(x, x_adv, out.pred, clean, eps, norm_)
                    score = out.margin.detach().nan_to_num(nan=-math.inf)
                    better = valid & (score > best_score)
                    best[better] = x_adv.detach()[better]
                    best_score[better] = score[better]
                    success |= valid
                if step == steps:
                    break
                wrong = nn.functional.cross_entropy(
                    out.logits.nan_to_num(), clean.clamp_min(0), reduction="none"
                )
                margin = out.margin.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
                crossed = out.pred != clean
                if objective_kind == "score":
                    objective = torch.where(crossed, margin, wrong)
                elif objective_kind == "mixed":
                    objective = torch.where(crossed, margin + wrong, wrong)
                else:
                    objective = wrong
                (grad,) = torch.autograd.grad(objective.sum(), x_adv)
                with torch.no_grad():
                    x_adv = _project(x, x_adv + alpha * steepest(grad, norm_), eps, norm_)
    return best.detach(), success


def _torchattacks(
    name: str, model: nn.Module, eps: float, norm: Norm, steps: int, cw: tuple[float, float, float]
) -> Any:
    import torchattacks

    wrapped = LogitsModel(model)
    if name == "pgd":
        return torchattacks_pgd(wrapped, norm, eps, steps)
    c, kappa, lr = cw
    return torchattacks.CW(wrapped, c=c, kappa=kappa, steps=steps, lr=lr)


def adaptive_attacks(
    monitor: Monitor,
    x: Tensor,
    *,
    eps: float | None = None,
    norm: str | None = None,
    steps: int = 50,
    cw_steps: int = 100,
    cw_c: float = 1.0,
    cw_kappa: float = 5.0,
    cw_lr: float = 0.01,
    seed: int = 0,
    batch_size: int = 128,
) -> AdaptiveResult:
    """Share of successful adversarial examples the monitor flags, per attack.

    Runs plain PGD, adaptive PGD (``adaptive_pgd``) and Carlini-Wagner L2 with
    confidence ``cw_kappa`` against the predicted class of each sample, and
    checks every example itself: it counts as successful when its prediction
    differs from the clean one and it lies inside the eps-ball (in ``norm``)
    and inside ``[0, 1]``.

    Args:
        monitor: A ``brittle.Monitor`` with a threshold (fitted or set).
        x: ``(N, ...)`` clean inputs in ``[0, 1]``, on the model's device.
        eps: Ball radius (default ``monitor.eps``).
        norm: ``"Linf"`` or ``"L2"`` (default ``monitor.norm``).
        steps: Steps of plain and adaptive PGD.
        cw_steps: Optimisation steps of Carlini-Wagner.
        cw_c: Weight of Carlini-Wagner's classification term.
        cw_kappa: Carlini-Wagner's confidence margin (logit units).
        cw_lr: Carlini-Wagner's Adam learning rate.
        seed: Seeds every attack's randomness (the global RNG is left untouched).
        batch_size: Samples attacked at once.

    Returns:
        ``AdaptiveResult`` with an ``AttackOutcome`` for ``"pgd"``,
        ``"adaptive_pgd"`` and ``"cw"``.

    Raises:
        ValueError: If the monitor has no threshold, on an unsupported norm, for a
            float16 or bfloat16 model, or when called inside ``torch.inference_mode()``
            (``torch.no_grad()`` is fine).

    Examples:
        >>> import torch, brittle
        >>> from brittle.attacks.adaptive import adaptive_attacks
        >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), eps=0.3)
        >>> monitor.set_threshold(0.5)
        >>> result = adaptive_attacks(monitor, torch.rand(8, 4), steps=5, cw_steps=5)
        >>> sorted(result.attacks), result.n
        (['adaptive_pgd', 'cw', 'pgd'], 8)
    """
    eps, norm_ = _settings(monitor, eps, norm)
    check_autograd("adversarial examples are")
    _check_precision(monitor)
    threshold = float(monitor.threshold)
    if not math.isfinite(threshold):
        raise ValueError(
            "adaptive_attacks needs a monitor with a threshold: call monitor.fit(loader) "
            "or monitor.set_threshold(value) first."
        )
    if steps < 1 or cw_steps < 1 or batch_size < 1:
        raise ValueError(
            "steps, cw_steps and batch_size must be positive integers. "
            f"Got {steps}, {cw_steps} and {batch_size}."
        )
    # Per attack: changed, successful, successful and flagged, changed and flagged.
    counts = {name: [0, 0, 0, 0] for name in ATTACKS}
    clean_flags = 0
    cw = (cw_c, cw_kappa, cw_lr)
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size].detach()
        batch_seed = seed + start
        with _borrowed(monitor, batch_seed), torch.no_grad():
            clean_out = monitor(batch)
        if clean_out.flag is None:  # pragma: no cover - a threshold is checked above
            raise ValueError("adaptive_attacks needs a monitor with a threshold.")
        clean_flags += int(clean_out.flag.sum())
        clean = clean_out.pred
        for name in ATTACKS:
            if name == "adaptive_pgd":
                x_adv, _ = adaptive_pgd(
                    monitor, batch, eps=eps, norm=norm_, steps=steps, seed=batch_seed
                )
            else:
                with _borrowed(monitor, batch_seed), torch.enable_grad():
                    attack = _torchattacks(
                        name, monitor.model, eps, norm_, steps if name == "pgd" else cw_steps, cw
                    )
                    x_adv = attack(batch, clean.clamp_min(0)).detach()
            with _borrowed(monitor, batch_seed), torch.no_grad():
                out = monitor(x_adv)
            changed = (out.pred != clean) & (out.pred >= 0)
            ok = _valid(batch, x_adv, out.pred, clean, eps, norm_)
            flag = out.flag if out.flag is not None else torch.ones_like(ok)
            counts[name][0] += int(changed.sum())
            counts[name][1] += int(ok.sum())
            counts[name][2] += int((ok & flag).sum())
            counts[name][3] += int((changed & flag).sum())
    n = int(x.shape[0])
    return AdaptiveResult(
        eps=eps,
        norm=norm_,
        score=str(monitor.score),
        threshold=threshold,
        n=n,
        clean_flagged=clean_flags / n if n else math.nan,
        attacks={name: AttackOutcome(name, n, *values) for name, values in counts.items()},
    )
