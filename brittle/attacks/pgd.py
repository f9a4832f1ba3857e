"""torchattacks' PGD and FGSM at eps, built one way for every caller.

The report's PGD/FGSM flag rates (``brittle.calibrate.analyses``) and the plain-PGD
row of the attacks that know the monitor (``brittle.attacks.adaptive``) use the
same attack with the same step size.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from brittle.scores.norms import Norm

__all__ = ["pgd_step_size", "torchattacks_pgd", "torchattacks_fgsm"]


def pgd_step_size(eps: float, steps: int) -> float:
    """PGD's step: 2.5 eps over the steps (Madry et al.), at least eps / 10.

    Examples:
        >>> pgd_step_size(0.1, 10), pgd_step_size(0.1, 50)
        (0.025, 0.01)
    """
    return max(2.5 * eps / steps, eps / 10)


class _AsImages(nn.Module):
    """``model`` fed ``(N, D, 1, 1)`` inputs, reshaped back to the shape it reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.shape: tuple[int, ...] = ()
        # torchattacks puts the model back in train mode after an attack if it found
        # it so; the flag of this wrapper alone is cleared, the model's are its own.
        self.training = False

    def forward(self, x: Tensor) -> Any:
        return self.model(x.view(x.shape[0], *self.shape))


class _AnyShapePGDL2:
    """Torchattacks' ``PGDL2`` on inputs of any shape.

    ``PGDL2`` scales each sample by its norm viewed as ``(N, 1, 1, 1)``, which
    broadcasts against image batches only: on ``(N, d)`` rows it raised a shape
    error. Inputs that are not ``(N, C, H, W)`` go through it as ``(N, D, 1, 1)``
    and reach the model in their own shape. Its attributes are ``PGDL2``'s.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        import torchattacks

        self.view = _AsImages(model)
        self.attack = torchattacks.PGDL2(self.view, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["attack"], name)

    def __call__(self, x: Tensor, labels: Tensor) -> Tensor:
        """Adversarial examples of ``x``, in its shape."""
        self.view.shape = tuple(x.shape[1:])
        if x.dim() == 4:  # images: the model's view of them is a no-op
            adv: Tensor = self.attack(x, labels)
            return adv
        flat: Tensor = self.attack(x.reshape(x.shape[0], -1, 1, 1), labels)
        return flat.view(x.shape)


def torchattacks_pgd(model: nn.Module, norm: Norm, eps: float, steps: int) -> Any:
    """Torchattacks' ``PGD`` (Linf) or ``PGDL2`` at ``eps``, from a random start.

    ``PGDL2`` takes inputs of any shape, not only images (``(N, d)`` rows too).

    Examples:
        >>> import torch
        >>> attack = torchattacks_pgd(torch.nn.Linear(4, 3), "L2", 0.5, steps=10)
        >>> attack.alpha, attack(torch.rand(2, 4), torch.tensor([0, 1])).shape
        (0.125, torch.Size([2, 4]))
    """
    import torchattacks

    if norm not in ("Linf", "L2"):
        raise ValueError(f"torchattacks has PGD for norm 'Linf' and 'L2'. Got {norm!r}.")
    kwargs = {"eps": eps, "alpha": pgd_step_size(eps, steps), "steps": steps, "random_start": True}
    if norm == "L2":
        return _AnyShapePGDL2(model, **kwargs)
    return torchattacks.PGD(model, **kwargs)


def torchattacks_fgsm(model: nn.Module, norm: Norm, eps: float) -> Any:
    """FGSM at ``eps``: torchattacks' ``FGSM`` (Linf), or one full-size PGD-L2 step.

    torchattacks has no L2 FGSM; one full-size PGD-L2 step from the clean point is
    the L2 fast gradient method.
    """
    import torchattacks

    if norm == "Linf":
        return torchattacks.FGSM(model, eps=eps)
    if norm == "L2":
        return _AnyShapePGDL2(model, eps=eps, alpha=eps, steps=1, random_start=False)
    raise ValueError(f"torchattacks has FGSM for norm 'Linf' and 'L2'. Got {norm!r}.")
