"""``brittle.load``: a saved monitor back onto the model it was fitted for."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

from torch import nn
from torch.nn.parameter import is_lazy

from brittle.identity import check_identity
from brittle.io import read
from brittle.monitor import Monitor

__all__ = ["load"]


def load(path: str | Path, model: nn.Module) -> Monitor:
    """Load a monitor written by ``Monitor.save`` onto ``model``.

    Args:
        path: File written by ``Monitor.save``.
        model: The classifier the monitor was fitted for; the same model moved to
            another device or dtype is accepted while its outputs still match.

    Returns:
        The fitted ``Monitor``, on the model's device.

    The pair-norm table of the feature margin is recomputed from ``model``'s head,
    not read from the file. A file from an older brittle that records no probe
    logits loads with a ``UserWarning``: only the model's structure is checked.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if the file is damaged (its checksum differs) or not a monitor
            file, holds a state no monitor could have saved (a tensor of another
            shape, an input domain that is not two finite bounds in order, a score
            choice, network size or input shape no monitor makes), holds a
            fitted monitor without a finite threshold, or ``model`` is not the model
            the monitor was fitted for (a model whose lazy modules have not been
            initialised among them).

    Examples:
        >>> import shutil, tempfile, torch, brittle
        >>> model = torch.nn.Linear(4, 3)
        >>> monitor = brittle.wrap(model, example_input=torch.rand(2, 4))
        >>> monitor.set_threshold(0.25)
        >>> folder = tempfile.mkdtemp()
        >>> path = monitor.save(folder + "/monitor.pt")
        >>> brittle.load(path, model).threshold
        tensor(0.2500)
        >>> shutil.rmtree(folder)
    """
    if not isinstance(model, nn.Module):
        # Checked first: Monitor's own TypeError would be read below as a damaged file.
        raise TypeError(f"model must be a torch.nn.Module. Got {type(model).__name__}.")
    # A lazy module's weights do not exist before its first batch (or a load of its
    # weights): it is no trained model yet, and nothing about it can be compared.
    lazy = next(
        (name for name, t in chain(model.named_parameters(), model.named_buffers()) if is_lazy(t)),
        None,
    )
    if lazy is not None:
        raise ValueError(
            f"the model's {lazy!r} is not initialised yet (a lazy module), so it is not the "
            "model the monitor was fitted for; load its weights (or run it on one batch) "
            "before brittle.load."
        )
    payload = read(path)
    try:
        monitor = Monitor.from_state(model, payload["state"])
        shape = None if monitor.input_shape is None else list(monitor.input_shape)
        if payload["model"]["input_shape"] != shape:  # save() records the same shape twice
            raise ValueError(
                f"{str(path)!r} is damaged: the input shape its model was probed with "
                f"({payload['model']['input_shape']}) is not the monitor's ({shape})."
            )
        check_identity(model, payload["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is damaged or not a brittle monitor file.") from err
    # A non-finite threshold is refused by Monitor.load_state_dict, inside from_state.
    return monitor
