"""Input-space margins from minimum-norm attacks (FAB), with verified adversarials."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from brittle._modes import eval_mode, frozen
from brittle.attacks.fab import brittle_engine, brittle_points
from brittle.attacks.heap import settle_heap
from brittle.attacks.pooling import FastPooling
from brittle.attacks.settings import DEFAULT_ENGINE, AttackSettings
from brittle.attacks.torchattacks_fab import torchattacks_engine
from brittle.attacks.verify import (
    check_unit_range,
    model_device,
    model_dtype,
    verified_margins,
)
from brittle.data import batches
from brittle.scores.head import LogitsModel, model_output
from brittle.scores.norms import Norm, check_norm

__all__ = [
    "AttackSettings",
    "PassCounter",
    "input_margins",
    "attack_batch",
    "attack_points",
    "ENGINES",
    "DEFAULT_ENGINE",
    "verified_margins",
]


Engine = Callable[[nn.Module, Tensor, Tensor, AttackSettings, Tensor], Tensor]
"""``engine(model, x, pred, settings, index) -> margins``: smallest verified norm per sample.

``index`` holds each sample's position in the whole holdout, so an engine can seed
a sample's random restarts from ``settings.seed`` and its index alone, making the
result independent of how the holdout is batched or sharded.
"""


ENGINES: dict[str, Engine] = {"brittle": brittle_engine, "torchattacks": torchattacks_engine}


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts the rows a gradient reaches the input for."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counter: PassCounter) -> Tensor:
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.counter.backward += grad.shape[0]
        return grad, None


class PassCounter:
    """Forward and backward passes an attack spends, counted per input row.

    ``counted(model)`` wraps a model: every row of every batch it is called on is
    one forward pass, every row a gradient flows back to is one backward pass
    (AttackBench's accounting of a minimum-norm attack's cost).

    Examples:
        >>> import torch
        >>> from brittle.attacks.attack import PassCounter
        >>> counter = PassCounter()
        >>> model = counter.counted(torch.nn.Linear(3, 2))
        >>> x = torch.rand(4, 3, requires_grad=True)
        >>> _ = torch.autograd.grad(model(x).sum(), x)
        >>> counter.forward, counter.backward
        (4, 4)
    """

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self.samples = 0

    def counted(self, model: nn.Module) -> nn.Module:
        """``model`` behind a counting wrapper (the model itself is not modified)."""
        return _Counted(model, self)

    def per_sample(self) -> dict[str, float]:
        """Forward and backward passes per attacked sample (0 before any attack)."""
        n = max(self.samples, 1)
        return {
            "forward_per_sample": self.forward / n,
            "backward_per_sample": self.backward / n,
            "attacked": float(self.samples),
        }


class _Counted(nn.Module):
    def __init__(self, model: nn.Module, counter: PassCounter) -> None:
        super().__init__()
        self.model = model
        self.counter = counter
        # The dtype a view (``LogitsModel``) feeds its model, seen through the counter.
        self.dtype = getattr(model, "dtype", None)

    def forward(self, x: Tensor) -> Tensor:
        self.counter.forward += x.shape[0]
        if x.requires_grad:
            x = _CountBackward.apply(x, self.counter)
        return model_output(self.model(x))


def attack_batch(
    model: nn.Module,
    x: Tensor,
    pred: Tensor,
    settings: AttackSettings,
    engine: str = DEFAULT_ENGINE,
    index: Tensor | None = None,
    *,
    counter: PassCounter | None = None,
) -> Tensor:
    """Margins of one batch, the model borrowed in eval mode with frozen parameters.

    A float16 or bfloat16 model is attacked through a float32 view of it
    (``LogitsModel``): the attack runs in float32, the model sees each point
    rounded to its own dtype, and the margin is the float32 distance to the point
    whose (rounded) prediction was checked. Rounding moves each coordinate by at
    most half a unit in the last place of that dtype, so the rounded point's
    distance differs by at most that in Linf, and by up to ``sqrt(d)`` (L2) or
    ``d`` (L1) times that over ``d`` coordinates. Only the
    ``"brittle"`` engine takes such models (a ``ValueError`` says so otherwise).

    A row of ``x`` holding NaN or Inf is not attacked: its margin is NaN. The
    margins never carry a gradient, even when ``x`` requires one.

    Args:
        model: Classifier on inputs in ``[0, 1]``.
        x: The batch, on the model's device.
        pred: Predicted class of each sample (the attack's untargeted label).
        settings: Norm, steps, restarts and seed.
        engine: Key of ``ENGINES``.
        index: Position of each sample in the whole holdout (default ``0..B-1``).
        counter: Adds the forward and backward passes the engine spends.

    Returns:
        ``(B,)`` float64 margins: ``inf`` where censored, ``nan`` for non-finite rows.

    Examples:
        >>> import torch
        >>> from brittle.attacks.attack import AttackSettings, attack_batch
        >>> model = torch.nn.Linear(2, 2, bias=False).half()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> x = torch.tensor([[0.75, 0.25], [float("nan"), 0.5]], dtype=torch.float16)
        >>> margin = attack_batch(model, x, torch.tensor([0, 0]), AttackSettings(steps=10))
        >>> round(float(margin[0]), 2), bool(margin[1].isnan())  # Linf: (0.75 - 0.25) / 2
        (0.25, True)
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}. Got {engine!r}.")
    return _attack(model, x, pred, settings, engine, index, counter, points=False)[0]


def attack_points(
    model: nn.Module,
    x: Tensor,
    pred: Tensor,
    settings: AttackSettings,
    index: Tensor | None = None,
    *,
    counter: PassCounter | None = None,
) -> tuple[Tensor, Tensor]:
    """``attack_batch`` with brittle's engine, and the adversarial point behind each margin.

    The point is the verified adversarial whose distance is the margin: on the
    decision boundary, up to the final bisection's tolerance. Where the margin
    is censored (``inf``) or the row is not finite (``nan``) the point is the
    row of ``x`` itself. The pseudo-margin network trains on these points
    (``brittle.calibrate.boundary``).

    Returns:
        ``(B,)`` float64 margins and the ``(B, ...)`` points, in ``x``'s dtype.

    Examples:
        >>> import torch
        >>> from brittle.attacks.attack import AttackSettings, attack_points
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> margin, point = attack_points(
        ...     model, torch.tensor([[0.75, 0.25]]), torch.tensor([0]), AttackSettings(steps=10)
        ... )
        >>> round(float(margin[0]), 3), [round(v, 3) for v in point[0].tolist()]
        (0.25, [0.5, 0.5])
    """
    return _attack(model, x, pred, settings, "brittle", index, counter, points=True)


def _attack(
    model: nn.Module,
    x: Tensor,
    pred: Tensor,
    settings: AttackSettings,
    engine: str,
    index: Tensor | None,
    counter: PassCounter | None,
    *,
    points: bool,
) -> tuple[Tensor, Tensor]:
    """Margins (and, with ``points``, the adversarials; else ``x``) of one batch."""
    x = x.detach()
    check_unit_range(x)
    if index is None:
        index = torch.arange(x.shape[0], device=x.device)
    target: nn.Module = model
    if engine == "brittle" and x.device.type == "cpu" and not hasattr(model, "_orig_mod"):
        # The same logits and gradients, with max-pooling several times faster on a CPU.
        # A compiled model (torch.compile keeps the original as _orig_mod) pools with
        # its compiler's kernels, and tracing through the routing only costs compile time.
        target = FastPooling(model)
    dtype = _half_dtype(model)
    view = x
    if dtype is not None:
        if engine != "brittle":
            raise ValueError(
                f"the {engine!r} engine cannot attack a {dtype} model: its steps are lost "
                "to the model's rounding and small margins come back censored. Use "
                "engine='brittle', which attacks half-precision models through a float32 view."
            )
        # Outermost, so that the engine reads the dtype the view names (the precision
        # of its steps); inside the pooling wrapper it was hidden, and a tie's steps
        # were float32-sized, rounded away by the model.
        target, view = LogitsModel(target, dtype), x.float()
    if x.device.type == "cpu":
        # The passes' freed memory stays in the heap instead of being faulted in again.
        settle_heap()
    if counter is not None:
        target = counter.counted(target)
        counter.samples += x.shape[0]
    margins = torch.full((x.shape[0],), math.nan, device=x.device, dtype=torch.float64)
    adv = x.clone() if points else x
    finite = torch.isfinite(view.flatten(1)).all(dim=1)
    if bool(finite.any()):
        args = (target, view[finite], pred[finite], settings, index.to(x.device)[finite])
        with eval_mode(model), frozen(model):
            if points:
                found, where = brittle_points(*args)
                adv[finite] = where.detach().to(x.dtype)
            else:
                found = ENGINES[engine](*args)
        margins[finite] = found.detach().to(torch.float64)
    return margins, adv


def _half_dtype(model: nn.Module) -> torch.dtype | None:
    """float16 or bfloat16 when the model's first floating parameter is, else ``None``."""
    dtype = model_dtype(model)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _input_dtype(model: nn.Module, x: Tensor) -> torch.dtype:
    """The model's floating dtype (``model_dtype``); else ``x``'s, if floating."""
    dtype = model_dtype(model)
    if dtype is not None:
        return dtype
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def input_margins(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    *,
    norm: Norm = "Linf",
    steps: int = 100,
    restarts: int = 1,
    batch_size: int = 128,
    engine: str = DEFAULT_ENGINE,
    progress: bool = False,
    seed: int = 0,
    distributed: bool | None = None,
) -> Tensor:
    """Per-sample input-space margin estimated with the FAB minimum-norm attack.

    The attack is untargeted against the model's *predicted* class, so every
    sample (misclassified ones too) gets a margin. The result is an upper bound
    on the true margin: the norm of a verified adversarial example, a point in
    ``[0, 1]`` where the model decides another class, or nothing (its logits
    are NaN or infinite there, and a served monitor rejects the input).

    Args:
        model: Classifier on inputs in ``[0, 1]`` (normalisation inside the model).
        data: A tensor of inputs, or a loader yielding ``x``, ``(x, y)`` or dicts;
            cast to the model's dtype, as ``fit`` does.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.
        steps: FAB iterations per restart.
        restarts: Attack runs per sample; the smallest verified norm is kept.
        batch_size: Batch size when ``data`` is a tensor.
        engine: ``"brittle"`` (brittle's FAB, the default everywhere) or
            ``"torchattacks"`` (the reference FAB).
        progress: Show a progress bar.
        seed: Seed of the random restarts (the global RNG is left untouched).
        distributed: Shard the attacks across the ranks of the initialised
            torch.distributed process group (``None``: whenever one is initialised).
            Every rank must pass the same model and the same data in the same order
            (checked before each batch is attacked, as in ``fit``); every rank gets
            all margins.

    Returns:
        ``(N,)`` float32 tensor on the CPU; ``inf`` where no adversarial was found,
        ``nan`` for a sample holding NaN or Inf or whose logits are not finite (no
        prediction to attack). Half-precision models are attacked through a
        float32 view (see ``attack_batch``).

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
    from brittle.attacks.distributed import sample_fingerprints, shard

    settings = AttackSettings(norm=check_norm(norm), steps=steps, restarts=restarts, seed=seed)
    device = model_device(model)
    part = shard(distributed)
    total = len(data) if isinstance(data, Tensor) else None
    indices: list[Tensor] = []
    margins: list[Tensor] = []
    seen = 0
    show = progress and part.is_main
    part.check_same_model(model)  # each rank attacks with its own: they must be one model
    with tqdm(total=total, unit="sample", disable=not show, desc="input margins") as bar:
        for x, _ in batches(data, batch_size):
            index = torch.arange(seen, seen + x.shape[0])
            seen += x.shape[0]
            if part.active:
                # A rank that reads other samples (a DistributedSampler) stops every rank
                # here, as in fit; its margins were assembled with the others' before.
                part.check_same_samples(index, sample_fingerprints(x))
            mine = part.owns(index)
            if mine.any():
                # The model's own dtype, as fit() feeds it: float64 or integer inputs
                # to a float32 model failed inside its first layer. A half-precision
                # model reads its own dtype too: the margin is measured from the input
                # as the model sees it.
                x = x[mine].to(device, dtype=_input_dtype(model, x))
                with torch.no_grad(), eval_mode(model):
                    logits = model_output(model(x))
                # A sample whose logits are not finite has no prediction to attack.
                judged = torch.isfinite(logits).all(dim=1)
                margin = torch.full((x.shape[0],), math.nan, dtype=torch.float64)
                if bool(judged.any()):
                    pred, rows = logits[judged].argmax(dim=1), index[mine][judged.cpu()]
                    found = attack_batch(model, x[judged], pred, settings, engine, rows)
                    margin[judged.cpu()] = found.cpu()
                margins.append(margin)
                indices.append(index[mine])
            bar.update(int(mine.numel()))
    part.check_same_length(seen)
    if not indices:
        indices, margins = [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    return part.assemble(seen, torch.cat(indices), torch.cat(margins)).to(torch.float32)
