"""Reference minimum-norm attacks that brittle's margins are judged against.

AttackBench (Cinà et al., AAAI 2025) found FAB the weakest of the common
minimum-norm attacks, so brittle's margins are compared per sample with the best
of several strong attacks from three libraries: adv-lib (FMN, DDN, FAB),
torchattacks (FAB) and AutoAttack (FAB, the ``pyautoattack`` package). Each
runner returns *verified* margins (``brittle.attacks.verify.verified_margins``): the
norm of an adversarial that really changes the prediction and stays in
``[0, 1]``, ``inf`` where the attack failed.

adv-lib, torchattacks and pyautoattack are test and benchmark dependencies,
imported only when a runner is called. adv-lib imports ``visdom`` for its
logger; where visdom is missing, the runners register an empty stand-in module
(the attacks themselves never use it).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn

from brittle._modes import eval_mode, frozen, seeded
from brittle.attacks.verify import verified_margins
from brittle.scores.head import LogitsModel
from brittle.scores.norms import START_RADIUS, Norm

__all__ = ["REFERENCES", "reference_margins", "best_reference_margins", "stub_visdom"]

_P = {"Linf": math.inf, "L2": 2.0, "L1": 1.0}


def stub_visdom() -> None:
    """Let ``adv_lib.attacks`` import without visdom (only its logger uses it)."""
    if "visdom" in sys.modules or importlib.util.find_spec("visdom") is not None:
        return
    stub = types.ModuleType("visdom")

    class Visdom:  # noqa: D101 - stand-in that refuses to be used
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise ImportError("visdom is not installed; adv-lib's logger needs it.")

    stub.Visdom = Visdom  # type: ignore[attr-defined]
    sys.modules["visdom"] = stub


def _adv_lib_fmn(model: nn.Module, x: Tensor, pred: Tensor, norm: Norm, steps: int) -> Tensor:
    stub_visdom()
    from adv_lib.attacks import fmn

    return fmn(model, x, pred, norm=_P[norm], steps=steps)


def _adv_lib_ddn(model: nn.Module, x: Tensor, pred: Tensor, norm: Norm, steps: int) -> Tensor:
    stub_visdom()
    from adv_lib.attacks import ddn

    if norm != "L2":
        raise ValueError(f"DDN minimises the L2 norm only. Got {norm!r}.")
    return ddn(model, x, pred, steps=steps, levels=None)


def _adv_lib_fab(model: nn.Module, x: Tensor, pred: Tensor, norm: Norm, steps: int) -> Tensor:
    stub_visdom()
    from adv_lib.attacks import fab

    return fab(model, x, pred, norm=_P[norm], n_iter=steps, ε=START_RADIUS[norm], restarts=3)


def _autoattack_fab(model: nn.Module, x: Tensor, pred: Tensor, norm: Norm, steps: int) -> Tensor:
    from pyautoattack.fab_pt import FABAttack_PT

    # attack_single_run, not perturb(): perturb drops results above eps. One run
    # from x and two random restarts near the best adversarial so far.
    best, best_adv = torch.full((len(x),), math.inf, device=x.device), x.clone()
    fab = FABAttack_PT(model, norm=norm, n_iter=steps, device=x.device, seed=0)
    for restart in range(3):
        radius = torch.where(torch.isfinite(best), best, torch.full_like(best, START_RADIUS[norm]))
        fab.eps = radius  # per sample: its random start lies within half of it
        # Its random start multiplies eps by a tensor it makes on the default device:
        # both on x's device, or a GPU run stops there.
        with seeded(restart, x.device), torch.device(x.device):
            adv = fab.attack_single_run(x, pred, use_rand_start=restart > 0)
        margin = verified_margins(model, x, adv, pred, norm).to(best.dtype)
        better = margin < best
        best = torch.where(better, margin, best)
        best_adv[better] = adv[better]
    return best_adv


def _torchattacks_fab(model: nn.Module, x: Tensor, pred: Tensor, norm: Norm, steps: int) -> Tensor:
    import torchattacks

    with torch.no_grad():
        num_classes = int(model(x[:1]).shape[1])
    fab = torchattacks.FAB(model, norm=norm, steps=steps, n_classes=num_classes, seed=0)
    # attack_single_run, not forward(): forward() keeps only results below eps.
    return fab.attack_single_run(x, pred, use_rand_start=False)


REFERENCES: dict[str, tuple[Callable[..., Tensor], int, tuple[str, ...]]] = {
    # name: (runner, default steps, norms it supports)
    "torchattacks FAB": (_torchattacks_fab, 100, ("Linf", "L2", "L1")),
    "AutoAttack FAB x3": (_autoattack_fab, 100, ("Linf", "L2", "L1")),
    "adv-lib FAB x3": (_adv_lib_fab, 100, ("Linf", "L2", "L1")),
    "adv-lib FMN": (_adv_lib_fmn, 1000, ("Linf", "L2", "L1")),
    "adv-lib DDN": (_adv_lib_ddn, 1000, ("L2",)),
}
"""Reference attacks: runner, steps AttackBench-style budgets use, norms supported."""


def reference_margins(
    name: str,
    model: nn.Module,
    x: Tensor,
    pred: Tensor,
    norm: Norm,
    steps: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Verified margins of one reference attack (``inf`` where it failed).

    Seeded: the random starts and restarts are drawn from a seeded fork of the
    global generators, so the margins do not depend on the caller's random state.

    Args:
        name: A key of ``REFERENCES``.
        model: Classifier on inputs in ``[0, 1]``, in eval mode.
        x: ``(B, ...)`` inputs.
        pred: ``(B,)`` the class to move away from.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.
        steps: Iterations (default: the budget listed in ``REFERENCES``).
        seed: Seeds the attack's random starts.

    Returns:
        ``(B,)`` float64 margins.

    Examples:
        >>> import torch
        >>> from brittle.attacks.fab_references import reference_margins
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        ...     _ = model.bias.zero_()
        >>> x = torch.tensor([[0.7, 0.3]])
        >>> margin = reference_margins("adv-lib DDN", model, x, torch.tensor([0]), "L2", steps=100)
        >>> round(float(margin), 2)  # the boundary x0 == x1 is 0.4 / sqrt(2) away
        0.28
    """
    if name not in REFERENCES:
        raise ValueError(f"name must be one of {sorted(REFERENCES)}. Got {name!r}.")
    runner, default_steps, norms = REFERENCES[name]
    if norm not in norms:
        raise ValueError(f"{name} does not support {norm!r}; it supports {norms}.")
    steps = default_steps if steps is None else steps
    wrapped = LogitsModel(model, x.dtype)  # float32 in and out, as the libraries expect
    # Borrowed like every engine's model: no .grad written, modes handed back.
    with eval_mode(model), frozen(model), seeded(seed, x.device):
        adv = runner(wrapped, x.float(), pred, norm, steps).detach().to(x.dtype)
    return verified_margins(model, x, adv, pred, norm)


def best_reference_margins(
    model: nn.Module,
    x: Tensor,
    pred: Tensor,
    norm: Norm,
    names: tuple[str, ...] | None = None,
    steps: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Margins of every reference attack that supports ``norm``, and their per-sample best.

    Each attack is seeded with ``seed`` (see ``reference_margins``).

    Returns:
        ``{name: margins}`` for each attack run, plus ``"best"``: the per-sample minimum.
    """
    names = names or tuple(n for n, (_, _, norms) in REFERENCES.items() if norm in norms)
    steps = steps or {}
    out = {
        name: reference_margins(name, model, x, pred, norm, steps.get(name), seed=seed)
        for name in names
    }
    out["best"] = torch.stack(list(out.values())).amin(dim=0)
    return out
