"""torchattacks' PGD and FGSM at eps, built one way for every caller.

The report's PGD/FGSM flag rates (``brittle.calibrate.analyses``) and the plain-PGD
row of the attacks that know the monitor (``brittle.attacks.adaptive``) use the
same attack with the same step size.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from brittle.scores.norms import Norm

__all__ = ["pgd_step_size", "torchattacks_pgd", "torchattacks_fgsm"]


def pgd_step_size(eps: float, steps: int) -> float:
    """PGD's step: 2.5 eps over the steps (Madry et al.), at least eps / 10.

    Examples:
        >>> pgd_step_size(0.1, 10), pgd_step_size(0.1, 50)
        (0.025, 0.01)
    """
    return max(2.5 * eps / steps, eps / 10)


def torchattacks_pgd(model: nn.Module, norm: Norm, eps: float, steps: int) -> Any:
    """Torchattacks' ``PGD`` (Linf) or ``PGDL2`` at ``eps``, from a random start.

    Examples:
        >>> import torch
        >>> attack = torchattacks_pgd(torch.nn.Linear(4, 3), "L2", 0.5, steps=10)
        >>> type(attack).__name__, attack.alpha
        ('PGDL2', 0.125)
    """
    import torchattacks

    if norm not in ("Linf", "L2"):
        raise ValueError(f"torchattacks has PGD for norm 'Linf' and 'L2'. Got {norm!r}.")
    cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
    return cls(model, eps=eps, alpha=pgd_step_size(eps, steps), steps=steps, random_start=True)


def torchattacks_fgsm(model: nn.Module, norm: Norm, eps: float) -> Any:
    """FGSM at ``eps``: torchattacks' ``FGSM`` (Linf), or one full-size PGD-L2 step.

    torchattacks has no L2 FGSM; one full-size PGD-L2 step from the clean point is
    the L2 fast gradient method.
    """
    import torchattacks

    if norm == "Linf":
        return torchattacks.FGSM(model, eps=eps)
    if norm == "L2":
        return torchattacks.PGDL2(model, eps=eps, alpha=eps, steps=1, random_start=False)
    raise ValueError(f"torchattacks has FGSM for norm 'Linf' and 'L2'. Got {norm!r}.")
