"""What every attack engine shares: inputs in [0, 1], verified adversarials, the device."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from brittle.scores.head import model_output
from brittle.scores.norms import Norm, per_sample_norm

__all__ = [
    "PUSH_SCALES",
    "verified_margins",
    "verified_points",
    "decision_changes",
    "check_unit_range",
    "check_differentiable",
    "check_autograd",
    "model_device",
    "model_dtype",
    "first_floating",
]


# Scales, tried in turn, of a point that fails the check along its ray from x. A point
# an attack found on the boundary, adversarial in the forward pass that found it, can
# fail the check in a pass whose batch rounds otherwise (oneDNN chooses convolution
# kernels by batch size): the logits of a 1,000-class ResNet-18 moved by 2e-7 between
# batches of 1 and 8 images, and a near tie (top two logits 4e-5 apart) whose point lay
# 3.9e-6 away got margin inf. Its point 1.01 times as far passes.
PUSH_SCALES = (1.001, 1.01, 1.1, 2.0)

# Values at most this far outside [0, 1] are rounding errors of values inside it
# (check_unit_range then suggests clamping rather than rescaling).
_ROUNDING = 1e-3


def check_unit_range(x: Tensor, what: str = "input margins are measured") -> None:
    """Raise ``ValueError`` unless every finite value of ``x`` lies in ``[0, 1]``.

    NaN and Inf are the callers' to handle: the engines give a row holding one a
    NaN margin. (``x.min()`` is NaN wherever one NaN is: the range of the other
    rows went unchecked, and a row holding Inf raised instead of getting NaN.)

    Examples:
        >>> import torch
        >>> from brittle.attacks.verify import check_unit_range
        >>> check_unit_range(torch.tensor([0.0, 255.0]))
        Traceback (most recent call last):
        ...
        ValueError: input margins are measured for inputs in [0, 1]; got values in [0, 255]. ...
    """
    values = x[torch.isfinite(x)] if x.is_floating_point() else x
    if values.numel() and (float(values.min()) < 0.0 or float(values.max()) > 1.0):
        low, high = float(values.min()), float(values.max())
        if low >= -_ROUNDING and high <= 1.0 + _ROUNDING:
            # A normalisation round trip leaves values a rounding error outside.
            hint = " Values this close to [0, 1] are rounding errors: pass x.clamp(0, 1)."
        elif low >= 0.0 and high <= 255.0:
            # Pixel values as stored (0-255) are the common case: say how to scale them.
            hint = " Images in 0-255? Divide by 255 (and eps too)."
        else:
            hint = ""
        raise ValueError(
            f"{what} for inputs in [0, 1]; got values in [{_shown(low)}, {_shown(high)}]. "
            f"Put normalisation inside the model.{hint}"
        )


def _shown(value: float) -> str:
    """``value`` in 4 significant digits, or in full where those would round it into [0, 1]."""
    text = f"{value:.4g}"
    return text if (0.0 <= value <= 1.0) == (0.0 <= float(text) <= 1.0) else repr(value)


def check_differentiable(logits: Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` (of an input requiring a gradient) carry one.

    The minimum-norm attacks step along the logits' gradient with respect to the
    input; a model that cuts it (an argmax or a rounding to integers inside
    ``forward``, ``.detach()``, ``torch.no_grad()``) has none to give.

    Examples:
        >>> import torch
        >>> from brittle.attacks.verify import check_differentiable
        >>> x = torch.rand(2, 3, requires_grad=True)
        >>> check_differentiable(torch.nn.functional.one_hot(x.argmax(dim=1), 3).float())
        Traceback (most recent call last):
        ...
        ValueError: the model's logits carry no gradient with respect to its input ...
    """
    if not logits.requires_grad:
        check_autograd()
        raise ValueError(
            "the model's logits carry no gradient with respect to its input (an argmax or "
            "a rounding to integers inside forward, .detach(), torch.no_grad()): input "
            "margins are measured by gradient-based attacks. Return differentiable logits."
        )


def check_autograd(what: str = "input margins are") -> None:
    """Raise ``ValueError`` inside ``torch.inference_mode()``, where no gradient can be taken.

    The attacks differentiate the model with respect to its input. ``torch.no_grad()``
    they switch off for themselves; inference mode they cannot, and without this
    check the model looked like one that cuts its gradient (an argmax inside).

    Examples:
        >>> import torch
        >>> from brittle.attacks.verify import check_autograd
        >>> with torch.inference_mode():
        ...     check_autograd()
        Traceback (most recent call last):
        ...
        ValueError: input margins are measured by gradient-based attacks, ...
    """
    if torch.is_inference_mode_enabled():
        raise ValueError(
            f"{what} measured by gradient-based attacks, and torch.inference_mode() turns "
            "autograd off: call this outside the inference_mode block (torch.no_grad() "
            "is fine)."
        )


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter, else of its first buffer, else the CPU."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def first_floating(model: nn.Module) -> Tensor | None:
    """The model's first floating parameter, else buffer; ``None`` if it has none.

    The tensor whose dtype and device the model takes its inputs in: a model
    without parameters (its weights held in buffers) is read from its buffers.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter, else buffer; ``None`` if it has none.

    The dtype the model takes its inputs in (``first_floating``).

    Examples:
        >>> import torch
        >>> from brittle.attacks.verify import model_dtype
        >>> model_dtype(torch.nn.Linear(2, 2).double()), model_dtype(torch.nn.ReLU())
        (torch.float64, None)
    """
    tensor = first_floating(model)
    return None if tensor is None else tensor.dtype


def decision_changes(logits: Tensor, pred: Tensor) -> Tensor:
    """Rows where the model no longer decides ``pred``: the adversarial ones.

    The decision changes where the top class is another one, or where the logits
    are not finite: there the model decides nothing, and a served monitor rejects
    the input (fail-closed). ``argmax`` alone would call a NaN row class 0, so a
    sample predicted 0 would never count it and every other sample would.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 0.0]])
        >>> decision_changes(logits, torch.tensor([0, 0, 0])).tolist()
        [True, True, False]
    """
    return (logits.argmax(dim=1) != pred) | ~torch.isfinite(logits).all(dim=1)


def verified_margins(model: nn.Module, x: Tensor, adv: Tensor, pred: Tensor, norm: Norm) -> Tensor:
    """Norm of ``adv - x`` where ``adv`` really changes the decision and stays in [0, 1].

    Everything else (the attack failed, or returned ``x`` itself) is censored: ``inf``.
    The norm is computed in the inputs' own precision and returned as float64.
    """
    with torch.no_grad():
        flipped = decision_changes(model_output(model(adv)), pred)
    inside = ((adv >= 0) & (adv <= 1)).flatten(1).all(dim=1)
    dist = per_sample_norm(adv - x, norm).to(torch.float64)
    return torch.where(flipped & inside, dist, torch.full_like(dist, math.inf))


def verified_points(
    model: nn.Module, x: Tensor, adv: Tensor, pred: Tensor, norm: Norm
) -> tuple[Tensor, Tensor]:
    """``verified_margins``, where a point that fails the check may be pushed farther out.

    An attack's point on the decision boundary changed the decision in the forward
    pass that found it, but another batch can round the logits otherwise (a few
    units in the last place) and undo it. Where a point other than ``x`` fails the
    check, the first of ``x + s * (adv - x)`` (clipped to ``[0, 1]``) for ``s`` in
    ``PUSH_SCALES`` that passes replaces it, so that a near tie is not censored as
    most robust. Every finite margin is still the norm of a point that changed the
    decision in a forward pass of ``model``.

    Args:
        model: The classifier the points are checked on.
        x: ``(B, ...)`` clean inputs.
        adv: ``(B, ...)`` the attack's points.
        pred: ``(B,)`` the decisions to change.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.

    Returns:
        ``(margins, points)``: float64 margins (``inf`` where censored) and the point
        each finite margin measures (``x`` where censored).

    Examples:
        >>> import torch
        >>> from brittle.attacks.verify import verified_points
        >>> model = torch.nn.Linear(1, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        ...     _ = model.bias.copy_(torch.tensor([-0.5, 0.5]))
        >>> x, on_boundary = torch.tensor([[0.75]]), torch.tensor([[0.5]])
        >>> margins, points = verified_points(model, x, on_boundary, torch.tensor([0]), "Linf")
        >>> round(float(margins), 6), round(float(points), 6)  # 0.5 ties: 1.001 times as far
        (0.25025, 0.49975)
    """
    margins = verified_margins(model, x, adv, pred, norm)
    shape = (-1, *[1] * (x.dim() - 1))
    dist = per_sample_norm(adv - x, norm).to(torch.float64)
    lost = (~torch.isfinite(margins) & torch.isfinite(dist) & (dist > 0)).nonzero().squeeze(1)
    points = adv.clone()
    if lost.numel():
        x_lost, delta = x[lost], adv[lost] - x[lost]
        tries = torch.cat([(x_lost + s * delta).clamp(0, 1) for s in PUSH_SCALES])
        repeat = len(PUSH_SCALES)
        found = verified_margins(
            model,
            x_lost.repeat(repeat, *[1] * (x.dim() - 1)),
            tries,
            pred[lost].repeat(repeat),
            norm,
        ).view(repeat, -1)
        passed = torch.isfinite(found)
        first = passed.to(torch.int8).argmax(dim=0)  # the smallest scale that passed
        some = passed.any(dim=0)
        columns = torch.arange(len(lost), device=x.device)
        chosen = tries.view(repeat, len(lost), *x.shape[1:])[first, columns]
        margins[lost[some]] = found[first, columns][some]
        points[lost[some]] = chosen[some]
    return margins, torch.where(torch.isfinite(margins).view(shape), points, x)
