"""Saving a fitted monitor without the model, and loading it back onto a model."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from brittle.identity import check_identity, model_identity

if TYPE_CHECKING:
    from brittle.monitor import Monitor

__all__ = ["save", "load"]

_FORMAT = "brittle.monitor"
_FORMAT_VERSION = 2
_MODEL_PREFIX = "model."


def save(monitor: Monitor, path: str | Path) -> Path:
    """Write ``monitor``'s own state (everything but the model's weights) to ``path``.

    The file also identifies the model (its structure and its logits on a probe
    batch), so that ``load`` can refuse another one. It is written under a
    temporary name and renamed, so a crash never leaves half a file at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in monitor.state_dict().items() if not k.startswith(_MODEL_PREFIX)}
    payload = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "state": state,
        "model": model_identity(monitor.model, monitor.input_shape),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no monitor file at {str(path)!r}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(
            f"{str(path)!r} is damaged or not a brittle monitor file: it does not load as a "
            f"monitor saved by brittle ({type(err).__name__})."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a monitor saved by brittle (Monitor.save): it is damaged or "
            "not a brittle monitor file."
        )
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} was written by another version of brittle; fit and save it again."
        )
    return payload


def load(path: str | Path, model: nn.Module) -> Monitor:
    """Load a monitor written by ``Monitor.save`` onto ``model``.

    Args:
        path: File written by ``Monitor.save``.
        model: The classifier the monitor was fitted for; the same model moved to
            another device or dtype is accepted while its outputs still match.

    Returns:
        The fitted ``Monitor``, on the model's device.

    Raises:
        ValueError: if the file is damaged or not a monitor file, or ``model`` is
            not the model the monitor was fitted for.

    Examples:
        >>> import tempfile, torch, brittle
        >>> model = torch.nn.Linear(4, 3)
        >>> monitor = brittle.wrap(model, example_input=torch.rand(2, 4))
        >>> monitor.set_threshold(0.25)
        >>> path = monitor.save(tempfile.mkdtemp() + "/monitor.pt")
        >>> brittle.load(path, model).threshold
        tensor(0.2500)
    """
    from brittle.monitor import Monitor

    payload = _read(path)
    try:
        monitor = Monitor.from_state(model, payload["state"])
        check_identity(model, payload["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is damaged or not a brittle monitor file.") from err
    return monitor
