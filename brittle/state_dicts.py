"""PyTorch's ``load_state_dict``, all or nothing: checks before the copy, a trial where they cannot.

``nn.Module.load_state_dict`` copies every tensor it can and raises afterwards, so a
state with one wrong shape leaves the model part-loaded. ``Monitor.load_state_dict``
avoids that in two parts:

- ``load_errors`` finds, before anything is copied, every error PyTorch would
  report for modules that load the plain way, in PyTorch's words (a value it
  cannot copy among them: ``copy_error``);
- the modules that load their own way (``own_loaders``: batch norm, weight norm,
  any module with a load hook or extra state), whose keys no plain check can
  judge, are loaded first, each on its own, by ``load_own_loaders``, and their
  tensors put back as they were if PyTorch refuses their part, or if the rest of
  the load fails afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "own_loaders",
    "load_errors",
    "copy_error",
    "load_own_loaders",
    "saved_tensors",
    "put_back",
]

# (the dict that holds it, its name, the tensor, a copy of its values)
SavedTensors = list[tuple[dict[str, Any], str, Tensor, Tensor]]


def own_loaders(model: nn.Module, prefix: str = "model.") -> tuple[str, ...]:
    """State-dict key prefixes of ``model``'s modules that do not load as ``nn.Module`` does.

    A module with its own ``_load_from_state_dict`` (batch norm, which reads states
    saved without ``num_batches_tracked``) or with load hooks (weight norm, which
    renames the keys of older states) may accept keys a plain check calls missing
    or unexpected; one with its own ``set_extra_state`` may refuse its extra state,
    which no plain check can judge either. A module the model holds under two names
    has both prefixes: its state is saved, and loaded, under each.

    Examples:
        >>> from torch import nn
        >>> own_loaders(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        ('model.1.',)
    """
    default = nn.Module._load_from_state_dict
    return tuple(
        f"{prefix}{name}." if name else prefix
        for name, module in model.named_modules(remove_duplicate=False)
        if type(module)._load_from_state_dict is not default
        or type(module).set_extra_state is not nn.Module.set_extra_state
        or getattr(module, "_load_state_dict_pre_hooks", None)
        or getattr(module, "_load_state_dict_post_hooks", None)
    )


def load_errors(
    expected: Mapping[str, Any],
    state: Mapping[str, Any],
    strict: bool,
    skip: tuple[str, ...] = (),
    assign: bool = False,
) -> list[str]:
    """PyTorch's ``load_state_dict`` errors for ``state``, found before anything is copied.

    The same checks as ``nn.Module._load_from_state_dict``, in its words: a value that
    is not a tensor, a tensor of another shape (a 1-element vector loads into a
    scalar), one PyTorch cannot copy or, with ``assign``, take (``copy_error``), and
    with ``strict`` missing and unexpected keys. ``domain`` may be missing
    (files saved before the monitor recorded its input domain). Keys that start with
    a prefix in ``skip`` (modules that load their own way: ``own_loaders``) are left
    to PyTorch.
    """
    errors = []
    expected = {key: value for key, value in expected.items() if not key.startswith(skip)}
    state = {key: value for key, value in state.items() if not key.startswith(skip)}
    for key, target in expected.items():
        if not isinstance(target, Tensor) or key not in state:
            continue
        value = state[key]
        if not torch.overrides.is_tensor_like(value):
            errors.append(
                f'While copying the parameter named "{key}", expected torch.Tensor or '
                f"Tensor-like object from checkpoint but received {type(value)}"
            )
            continue
        if torch.nn.parameter.is_lazy(target):
            continue
        shape = value.shape
        if target.dim() == 0 and tuple(shape) == (1,):
            shape = torch.Size([])
        if shape != target.shape:
            errors.append(
                f"size mismatch for {key}: copying a param with shape {value.shape} from "
                f"checkpoint, the shape in current model is {target.shape}."
            )
            continue
        refused = copy_error(target, value, assign)
        if refused is not None:
            errors.append(
                f'While copying the parameter named "{key}", whose dimensions in the model '
                f"are {target.size()} and whose dimensions in the checkpoint are "
                f"{value.size()}, an exception occurred : {refused.args}."
            )
    if strict:
        unexpected = [key for key in state if key not in expected]
        missing = [key for key in expected if key not in state and key != "domain"]
        if unexpected:
            errors.insert(0, f"Unexpected key(s) in state_dict: {_quoted(unexpected)}. ")
        if missing:
            errors.insert(0, f"Missing key(s) in state_dict: {_quoted(missing)}. ")
    return errors


def copy_error(target: Tensor, value: Tensor, assign: bool) -> Exception | None:
    """The exception PyTorch's load would meet putting ``value`` in ``target``'s place.

    Tried on no elements, so it costs nothing: a copy out of a meta tensor (it has
    no data) or a sparse one (``copy_`` takes dense tensors), or, with ``assign``, an
    integer tensor for a parameter that requires gradients (which PyTorch makes a
    ``Parameter`` of). A copy into an inference tensor (made under
    ``torch.inference_mode()``) outside that mode is refused as well: PyTorch writes
    it and raises afterwards. ``None`` when the value loads. Shapes are checked apart.

    Examples:
        >>> import torch
        >>> copy_error(torch.zeros(2), torch.ones(2, dtype=torch.long), assign=False) is None
        True
        >>> copy_error(torch.zeros(2), torch.empty(2, device="meta"), assign=False)
        NotImplementedError('Cannot copy out of meta tensor; no data!')
    """
    if not assign and torch.is_inference(target) and not torch.is_inference_mode_enabled():
        return RuntimeError(
            "it is an inference tensor (made under torch.inference_mode(), e.g. by a first "
            "call there), which takes no copy outside that mode: load the state inside "
            "torch.inference_mode()."
        )
    try:
        with torch.no_grad():
            if not assign:
                target.new_empty(0).copy_(value.new_empty(0))
            elif isinstance(target, nn.Parameter) and target.requires_grad:
                torch.empty(0, dtype=value.dtype).requires_grad_(True)
    except Exception as err:  # PyTorch's own load catches any, and reports it
        return err
    return None


def _quoted(keys: list[str]) -> str:
    return ", ".join(f'"{key}"' for key in keys)


def saved_tensors(modules: list[nn.Module]) -> SavedTensors:
    """Every parameter and buffer of ``modules`` (not their children), with a copy of its values.

    ``put_back`` restores the same tensor objects, with the same values, in the same
    places, whatever a load copied into them or put in their stead.
    """
    return [
        (held, name, tensor, tensor.detach().clone())
        for module in modules
        for held in (module._parameters, module._buffers)
        for name, tensor in held.items()
        if tensor is not None
    ]


def put_back(saved: SavedTensors) -> None:
    """Restore what ``saved_tensors`` saved, the latest first.

    A tensor saved twice (a weight two modules share, saved again after the first
    had loaded it) ends with its first copy: the values it had before anything.
    """
    with torch.no_grad():
        for held, name, tensor, values in reversed(saved):
            if torch.is_inference(tensor) and not torch.is_inference_mode_enabled():
                with torch.inference_mode():  # the only mode that writes it in place
                    tensor.copy_(values)
            else:
                tensor.copy_(values)
            held[name] = tensor


def load_own_loaders(
    model: nn.Module,
    state: Mapping[str, Any],
    strict: bool,
    assign: bool,
    prefix: str = "model.",
) -> SavedTensors:
    """Load the parts of ``state`` that ``model``'s own-loading modules hold, one module at a time.

    Each module that loads its own way (``own_loaders``; the outermost, where they
    nest) gets its keys through its own ``load_state_dict``, with the state's
    metadata (batch norm reads its version there). If PyTorch refuses a module's
    part, or a load hook or ``set_extra_state`` raises, the tensors of that module
    and of those loaded before it are put back as they were, and the error is
    raised again. (Tensors only: an extra state that a module's
    ``set_extra_state`` took stays set when a later part is refused.) Once this
    returns, the caller can load the whole state knowing these parts load; loading
    them twice is harmless, as the same values are copied.

    Returns:
        These modules' tensors as they were before (``saved_tensors``): the caller
        puts them back (``put_back``) if the rest of its load fails.

    Raises:
        RuntimeError: PyTorch's error for a module's part, the module named by its
            prefix in ``state``.
    """
    prefixes = own_loaders(model, prefix)
    outermost = [p for p in prefixes if not any(p != q and p.startswith(q) for q in prefixes)]
    metadata = getattr(state, "_metadata", None)
    saved: SavedTensors = []
    for part in outermost:
        module = model.get_submodule(part[len(prefix) : -1]) if part != prefix else model
        sub: OrderedDict[str, Any] = OrderedDict(
            (key[len(part) :], value) for key, value in state.items() if key.startswith(part)
        )
        if metadata is not None:
            own = part[:-1]
            sub._metadata = OrderedDict(  # type: ignore[attr-defined]
                (key[len(part) :] if key != own else "", value)
                for key, value in metadata.items()
                if key == own or key.startswith(part)
            )
        saved.extend(saved_tensors(list(module.modules())))
        try:
            module.load_state_dict(sub, strict=strict, assign=assign)
        except BaseException as err:
            put_back(saved)  # this module's and those loaded before it
            if isinstance(err, RuntimeError):
                raise RuntimeError(f"{err} (in the model's module {part[:-1]!r})") from err
            raise
    return saved
