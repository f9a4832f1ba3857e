"""Input-space margins from minimum-norm attacks (FAB), with verified adversarials."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from brittle._modes import eval_mode, frozen
from brittle.data import batches
from brittle.norms import START_RADIUS, Norm, check_norm, per_sample_norm

__all__ = [
    "AttackSettings",
    "input_margins",
    "attack_batch",
    "ENGINES",
    "DEFAULT_ENGINE",
    "verified_margins",
]


@dataclass(frozen=True)
class AttackSettings:
    """What an engine needs besides the model and the batch."""

    norm: Norm = "Linf"
    steps: int = 100
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_norm(self.norm)
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(
                f"steps and restarts must be positive. Got steps={self.steps}, "
                f"restarts={self.restarts}."
            )


Engine = Callable[[nn.Module, Tensor, Tensor, AttackSettings, Tensor], Tensor]
"""``engine(model, x, pred, settings, index) -> margins``: smallest verified norm per sample.

``index`` holds each sample's position in the whole holdout, so an engine can seed
a sample's random restarts from ``settings.seed`` and its index alone, making the
result independent of how the holdout is batched or sharded.
"""


def verified_margins(model: nn.Module, x: Tensor, adv: Tensor, pred: Tensor, norm: Norm) -> Tensor:
    """Norm of ``adv - x`` where ``adv`` really changes the prediction and stays in [0, 1].

    Everything else (the attack failed, or returned ``x`` itself) is censored: ``inf``.
    """
    with torch.no_grad():
        flipped = model(adv).argmax(dim=1) != pred
    inside = ((adv >= 0) & (adv <= 1)).flatten(1).all(dim=1)
    dist = per_sample_norm(adv - x, norm).to(torch.float32)
    return torch.where(flipped & inside, dist, torch.full_like(dist, math.inf))


def _torchattacks_fab(
    model: nn.Module, x: Tensor, pred: Tensor, settings: AttackSettings, index: Tensor
) -> Tensor:
    """Untargeted FAB from torchattacks, restart by restart, keeping the best per sample.

    ``perturb()`` is bypassed on purpose: it drops results above ``eps`` and never
    re-attacks a point already broken. Each ``attack_single_run`` is verified here.
    Its random restarts draw for the whole batch, so unlike the first run they
    depend on the batch's composition (``index`` is not used).
    """
    import torchattacks

    fab = torchattacks.FAB(
        model,
        norm=settings.norm,
        steps=settings.steps,
        n_restarts=1,
        n_classes=pred.max().item() + 1,
        seed=settings.seed,
    )
    best = torch.full((x.shape[0],), math.inf, device=x.device)
    default = START_RADIUS[settings.norm]
    for restart in range(settings.restarts):
        # attack_single_run's random start has radius min(eps, ...)/2; a per-sample
        # eps puts restarts near the best adversarial found so far.
        fab.eps = torch.where(torch.isfinite(best), best, torch.full_like(best, default))
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(settings.seed + restart)
            adv = fab.attack_single_run(x, pred, use_rand_start=restart > 0)
        best = torch.minimum(best, verified_margins(model, x, adv, pred, settings.norm))
    return best


ENGINES: dict[str, Engine] = {"torchattacks": _torchattacks_fab}
# fit()'s engine: brittle's own FAB (brittle.fab), measured at least as tight as
# torchattacks' and several times faster (benchmarks/README.md).
DEFAULT_ENGINE = "brittle"


def _check_range(x: Tensor) -> None:
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(
            f"input margins are measured for inputs in [0, 1]; got values in "
            f"[{float(x.min()):.4g}, {float(x.max()):.4g}]. Put normalisation inside the model."
        )


def attack_batch(
    model: nn.Module,
    x: Tensor,
    pred: Tensor,
    settings: AttackSettings,
    engine: str = "torchattacks",
    index: Tensor | None = None,
) -> Tensor:
    """Margins of one batch, the model borrowed in eval mode with frozen parameters.

    Args:
        model: Classifier on inputs in ``[0, 1]``.
        x: The batch, on the model's device.
        pred: Predicted class of each sample (the attack's untargeted label).
        settings: Norm, steps, restarts and seed.
        engine: Key of ``ENGINES``.
        index: Position of each sample in the whole holdout (default ``0..B-1``).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}. Got {engine!r}.")
    _check_range(x)
    if index is None:
        index = torch.arange(x.shape[0], device=x.device)
    with eval_mode(model), frozen(model):
        return ENGINES[engine](model, x, pred, settings, index.to(x.device))


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def input_margins(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    *,
    norm: Norm = "Linf",
    steps: int = 100,
    restarts: int = 1,
    batch_size: int = 128,
    engine: str = "torchattacks",
    progress: bool = False,
    seed: int = 0,
    distributed: bool | None = None,
) -> Tensor:
    """Per-sample input-space margin estimated with the FAB minimum-norm attack.

    The attack is untargeted against the model's *predicted* class, so every
    sample (misclassified ones too) gets a margin. The result is an upper bound
    on the true margin: the norm of a verified adversarial example.

    Args:
        model: Classifier on inputs in ``[0, 1]`` (normalisation inside the model).
        data: A tensor of inputs, or a loader yielding ``x``, ``(x, y)`` or dicts.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.
        steps: FAB iterations per restart.
        restarts: Attack runs per sample; the smallest verified norm is kept.
        batch_size: Batch size when ``data`` is a tensor.
        engine: ``"torchattacks"`` (the reference FAB) or another registered engine.
        progress: Show a progress bar.
        seed: Seed of the random restarts (the global RNG is left untouched).
        distributed: Shard the attacks across the ranks of the initialised
            torch.distributed process group (``None``: whenever one is initialised).
            Every rank must pass the same data; every rank gets all margins.

    Returns:
        ``(N,)`` float32 tensor on the CPU; ``inf`` where no adversarial was found.

    Examples:
        >>> import torch, brittle
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        ...     _ = model[1].bias.zero_()
        >>> x = torch.tensor([[0.6, 0.2, 0.5, 0.5]])
        >>> margin = brittle.input_margins(model, x, norm="Linf", steps=20)
        >>> round(float(margin), 2)  # the boundary x0 == x1 is 0.2 away in Linf
        0.2
    """
    from brittle.distributed import shard

    settings = AttackSettings(norm=check_norm(norm), steps=steps, restarts=restarts, seed=seed)
    device = _device(model)
    part = shard(distributed)
    total = len(data) if isinstance(data, Tensor) else None
    indices: list[Tensor] = []
    margins: list[Tensor] = []
    seen = 0
    show = progress and part.is_main
    with tqdm(total=total, unit="sample", disable=not show, desc="input margins") as bar:
        for x, _ in batches(data, batch_size):
            index = torch.arange(seen, seen + x.shape[0])
            seen += x.shape[0]
            mine = part.owns(index)
            if mine.any():
                x = x[mine].to(device)
                with torch.no_grad(), eval_mode(model):
                    pred = model(x).argmax(dim=1)
                margins.append(attack_batch(model, x, pred, settings, engine, index[mine]).cpu())
                indices.append(index[mine])
            bar.update(int(mine.numel()))
    part.check_same_length(seen)
    if not indices:
        indices, margins = [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    return part.assemble(seen, torch.cat(indices), torch.cat(margins)).to(torch.float32)


# Registered last: brittle.fab imports this module lazily, so neither import order breaks.
from brittle.fab import brittle_engine  # noqa: E402

ENGINES["brittle"] = brittle_engine
