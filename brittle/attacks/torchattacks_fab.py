"""torchattacks' FAB as an attack engine: the reference brittle's own FAB is tested against."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from brittle._modes import seeded
from brittle.attacks.settings import AttackSettings
from brittle.attacks.verify import check_differentiable, verified_margins
from brittle.scores.head import LogitsModel
from brittle.scores.norms import START_RADIUS

__all__ = ["torchattacks_engine"]


def torchattacks_engine(
    model: nn.Module, x: Tensor, pred: Tensor, settings: AttackSettings, index: Tensor
) -> Tensor:
    """Untargeted FAB from torchattacks, restart by restart, keeping the best per sample.

    ``perturb()`` is bypassed on purpose: it drops results above ``eps`` and never
    re-attacks a point already broken. Each ``attack_single_run`` is verified here.
    Its random restarts draw for the whole batch, so unlike the first run they
    depend on the batch's composition (``index`` is not used).
    """
    import torchattacks

    # torchattacks' FAB casts its inputs to float32; a float64 model gets its own dtype.
    logits = LogitsModel(model, x.dtype)
    with torch.enable_grad():  # every class of the model, not only the predicted ones
        probe = logits(x[:1].clone().requires_grad_(True))
    check_differentiable(probe)
    n_classes = int(probe.shape[1])
    fab = torchattacks.FAB(
        logits,
        norm=settings.norm,
        steps=settings.steps,
        n_restarts=1,
        n_classes=n_classes,
        seed=settings.seed,
    )
    # float64, as verified_margins returns them: a float64 model's margins keep their digits.
    best = torch.full((x.shape[0],), math.inf, device=x.device, dtype=torch.float64)
    default = START_RADIUS[settings.norm]
    for restart in range(settings.restarts):
        # attack_single_run's random start has radius min(eps, ...)/2; a per-sample
        # eps puts restarts near the best adversarial found so far (float32, as
        # torchattacks computes).
        fab.eps = torch.where(torch.isfinite(best), best, torch.full_like(best, default)).float()
        with seeded(settings.seed + restart, x.device):
            adv = fab.attack_single_run(x, pred, use_rand_start=restart > 0).to(x.dtype)
        best = torch.minimum(best, verified_margins(model, x, adv, pred, settings.norm))
    return best
