"""Finding a classifier's last linear layer and capturing its input in the forward pass."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HeadCapture",
    "capture_head",
    "discover_head",
    "resolve_head",
    "model_output",
    "LogitsModel",
    "NO_HEAD_HINT",
    "same_values",
    "computes_linear",
]

NO_HEAD_HINT = (
    "Pass head='<module name>' naming the nn.Linear that produces the logits, "
    "for example brittle.wrap(model, head='fc')."
)


def same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same shape and values, NaN equal to NaN.

    ``torch.equal`` calls two tensors with a NaN anywhere different: one sample
    whose logits overflowed to NaN would hide the head that produced them all.

    Examples:
        >>> import math, torch
        >>> a = torch.tensor([[1.0, math.nan]])
        >>> same_values(a, a.clone()), torch.equal(a, a.clone())
        (True, False)
    """
    if a.shape != b.shape:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def computes_linear(module: nn.Linear, features: Tensor, output: Tensor) -> bool:
    """Whether ``module``'s ``output`` of ``features`` is ``features @ weight.T + bias``.

    The feature margin reads the decision boundaries off the head's weight rows, which
    holds only for a layer that computes its linear map with that weight. An
    ``nn.Linear`` subclass may compute another (a quantization-aware layer's
    fake-quantized weight, a cosine classifier's normalized rows): its weight then
    does not describe its output. A layer whose ``forward`` is ``nn.Linear``'s (a
    parametrized one too) computes it; another is checked on this call's values, up
    to float rounding (64 units in the last place of the largest output).

    Examples:
        >>> import torch
        >>> from brittle.scores.head import computes_linear
        >>> class Cosine(torch.nn.Linear):
        ...     def forward(self, x):
        ...         w = torch.nn.functional.normalize(self.weight, dim=1)
        ...         return torch.nn.functional.linear(x, w, self.bias)
        >>> layer, x = Cosine(4, 3), torch.rand(2, 4)
        >>> computes_linear(layer, x, layer(x))
        False
        >>> plain = torch.nn.Linear(4, 3)
        >>> computes_linear(plain, x, plain(x))
        True
    """
    if type(module).forward is nn.Linear.forward:
        return True
    with torch.no_grad():
        try:
            expected = F.linear(features, module.weight, module.bias)
        except (RuntimeError, TypeError):  # another input than the weight takes
            return False
        if expected.shape != output.shape or not output.is_floating_point():
            return False
        finite = expected[expected.isfinite()]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        tolerance = 64 * torch.finfo(output.dtype).eps * scale
        close = ((expected - output).abs() <= tolerance) | (expected == output)
        return bool((close | (expected.isnan() & output.isnan())).all())


@dataclass
class HeadCapture:
    """Input and output of the head recorded during one forward pass.

    The hook sits on a module that other threads may be running at the same
    time (a server's worker pool sharing one model), so it records only the
    calls made by the thread that created the capture. ``records`` holds every
    call's ``(features, output)``; ``features`` and ``output`` are the latest
    call's, for a head the model calls more than once (``call_producing``).

    ``output`` is a copy of what the head returned (gradients still flow through
    it): the model may change the returned tensor in place afterwards (``logits
    /= temperature``), and the head's own output is what the feature margin needs.
    ``returned`` holds the tensors the head returned, which the model may have
    passed on as its logits.
    """

    records: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    thread: int = field(default_factory=threading.get_ident)
    returned: list[Tensor] = field(default_factory=list)

    @property
    def calls(self) -> int:
        """How many times the head ran on this thread."""
        return len(self.records)

    @property
    def features(self) -> Tensor | None:
        """The latest call's input, ``None`` before any call."""
        return self.records[-1][0] if self.records else None

    @property
    def output(self) -> Tensor | None:
        """The latest call's output, ``None`` before any call."""
        return self.records[-1][1] if self.records else None

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        """Forward hook: record the head's input and output of this thread's call."""
        if threading.get_ident() == self.thread:
            self.records.append((args[0], output.clone()))
            self.returned.append(output)

    def call_producing(self, logits: Tensor, *, by_value: bool = True) -> HeadCapture | None:
        """The recorded call whose output is ``logits``, alone; ``None`` when no call's is.

        A model may call its head more than once in a forward pass (a shared
        classifier also applied to other features) and return one call's output:
        the latest call is then not the one that produced the logits. The output
        tensor itself is looked for first (no comparison of values, so no host
        synchronisation), then, with ``by_value`` (not while a graph is traced: the
        values are unknown there), the latest call whose output equals the logits,
        as ``discover_head`` chooses. The call found by its tensor may have had that
        tensor changed in place since (its ``output`` then differs from the logits).
        """
        # A capture built from records alone (no returned tensors) is searched by value.
        returned: list[Tensor | None] = list(self.returned)
        if len(returned) != len(self.records):
            returned = [None] * len(self.records)
        for (features, output), tensor in zip(
            reversed(self.records), reversed(returned), strict=True
        ):
            if tensor is logits:
                return HeadCapture([(features, output)], returned=[tensor])
        if not by_value:
            return None
        for features, output in reversed(self.records):
            if same_values(output, logits):
                return HeadCapture([(features, output)])
        return None


@dataclass
class _Probe:
    """Every 2-D ``nn.Linear`` output of one forward pass, in call order (this thread's).

    Only layers that compute their linear map are recorded (``computes_linear``): a
    layer whose weight does not describe its output is no head for the feature margin.

    Each output is recorded with a copy of its values as the layer returned them: a
    model may change that tensor in place afterwards (``logits /= temperature``), and
    the tensor itself would then equal the logits although the layer's output does not.
    """

    records: list[tuple[str, Tensor, Tensor, Tensor]] = field(default_factory=list)
    thread: int = field(default_factory=threading.get_ident)

    def hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if threading.get_ident() != self.thread:
                return
            if (
                isinstance(output, Tensor)
                and output.dim() == 2
                and computes_linear(module, args[0], output)  # type: ignore[arg-type]
            ):
                self.records.append((name, args[0], output, output.clone()))

        return record


def model_output(output: Any) -> Tensor:
    """The ``(batch, classes)`` logit tensor of a model's output.

    Models return logits in several shapes: a tensor; a dict (or ``ModelOutput``)
    with a ``"logits"`` key; an object with a ``.logits`` attribute (Hugging Face
    ``transformers`` classifiers); a tuple or list whose first element is the
    logits. Anything else is a ``ValueError`` that says what was received.

    Examples:
        >>> import torch
        >>> from brittle.scores.head import model_output
        >>> model_output({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
        >>> model_output((torch.zeros(2, 3), "aux")).shape
        torch.Size([2, 3])
    """
    logits = output
    if isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif not isinstance(output, Tensor) and isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(output).__name__
        raise ValueError(
            "the model must return logits of shape (batch, classes): a tensor, a dict with a "
            f"'logits' key, an object with .logits, or a tuple starting with them. Got {got}."
        )
    return logits


class LogitsModel(nn.Module):
    """The model as attack libraries need it: a logits tensor in the input's dtype.

    The output is reduced to the logit tensor (``model_output``). Libraries that
    cast their inputs to float32 (torchattacks, adv-lib, AutoAttack) would feed a
    float64 model the wrong dtype: with ``dtype`` set, inputs are cast to it
    before the model, and the logits back to the dtype the library sent.

    Args:
        model: The classifier.
        dtype: The model's input dtype; ``None`` passes inputs unchanged.

    Examples:
        >>> import torch
        >>> from brittle.scores.head import LogitsModel
        >>> model = torch.nn.Linear(3, 2).double()
        >>> LogitsModel(model, torch.float64)(torch.rand(4, 3)).dtype
        torch.float32
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``x``, in ``x``'s dtype."""
        inputs = x if self.dtype is None else x.to(self.dtype)
        return model_output(self.model(inputs)).to(x.dtype)


def resolve_head(model: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` called ``name`` inside ``model``, or a ``ValueError``."""
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"the model has no module named {name!r}. Its nn.Linear modules are {linears}."
        ) from err
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"head {name!r} must be an nn.Linear. Got {type(module).__name__}. {NO_HEAD_HINT}"
        )
    return module


@contextmanager
def capture_head(head: nn.Module | None) -> Iterator[HeadCapture]:
    """Record the head's input and output while the block runs; the hook is removed after."""
    capture = HeadCapture()
    if head is None:
        yield capture
        return
    handle = head.register_forward_hook(capture.hook)
    try:
        yield capture
    finally:
        handle.remove()


@contextmanager
def _probe_linears(model: nn.Module) -> Iterator[_Probe]:
    probe = _Probe()
    handles = [
        module.register_forward_hook(probe.hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        yield probe
    finally:
        for handle in handles:
            handle.remove()


def discover_head(model: nn.Module, x: Tensor) -> tuple[Tensor, str | None, HeadCapture]:
    """Run ``model(x)`` once and find the ``nn.Linear`` whose output equals the logits.

    The output as the layer returned it, not as the model may have changed it in
    place since: a head whose output is scaled in place is not the logits' head.

    Returns:
        The logits, the head's module name (``None`` when no linear layer produced
        the logits) and the head's captured input and output from the same pass.
    """
    with _probe_linears(model) as probe:
        logits = model_output(model(x))
    capture = HeadCapture()
    name = None
    for rec_name, features, returned, output in reversed(probe.records):
        if same_values(output, logits):
            name = rec_name
            capture = HeadCapture([(features, output)], returned=[returned])
            break
    return logits, name, capture
