"""Saving a fitted monitor without the model, and loading it back onto a model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from brittle.head import resolve_head
from brittle.pseudo import PseudoMargin

if TYPE_CHECKING:
    from brittle.monitor import Monitor

__all__ = ["save", "load"]

_FORMAT = "brittle.monitor"
_MODEL_PREFIX = "model."
_EXTRA = "_extra_state"


def save(monitor: Monitor, path: str | Path) -> Path:
    """Write ``monitor``'s own state (everything but the model's weights) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in monitor.state_dict().items() if not k.startswith(_MODEL_PREFIX)}
    torch.save({"format": _FORMAT, "state": state}, path)
    return path


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no monitor file at {str(path)!r}.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{str(path)!r} is not a monitor saved by brittle (Monitor.save).")
    return payload["state"]


def _check_head(model: nn.Module, config: dict[str, Any]) -> None:
    from brittle.monitor import _fingerprint

    name = config["head"]
    if name is None:
        return
    try:
        head = resolve_head(model, name)
    except ValueError as err:
        raise ValueError(
            f"the monitor was saved for a model with a head named {name!r}: {err}"
        ) from err
    saved = (config["num_classes"], config["feature_dim"])
    if tuple(head.weight.shape) != saved:
        raise ValueError(
            f"the monitor was saved for a head {name!r} of shape {saved} (classes, features); "
            f"this model's head has shape {tuple(head.weight.shape)}. Fit a monitor for this model."
        )
    if not torch.allclose(
        torch.tensor(_fingerprint(head.weight), dtype=torch.float64),
        torch.tensor(config["head_fingerprint"], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-6,
    ):
        raise ValueError(
            f"the monitor was saved for a model whose head {name!r} has other weights; its "
            "threshold and pair-norm table do not apply to this model. Fit a monitor for it."
        )


def load(path: str | Path, model: nn.Module) -> Monitor:
    """Load a monitor written by ``Monitor.save`` onto ``model``.

    Args:
        path: File written by ``Monitor.save``.
        model: The same classifier the monitor was fitted for.

    Returns:
        The fitted ``Monitor``, on the model's device.

    Raises:
        ValueError: if the file was saved for a model with another head.

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

    state = _read(path)
    config = state[_EXTRA]
    _check_head(model, config)
    monitor = Monitor(model, score=config["score"], norm=config["norm"], eps=config["eps"])
    if config["head"] is not None:
        monitor._attach_head(config["head"])
    if config["pseudo_features"] is not None:
        monitor.pseudo = PseudoMargin(config["pseudo_features"])
    param = next(model.parameters(), None)
    if param is not None:
        monitor.to(param.device)
    missing, unexpected = monitor.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_MODEL_PREFIX)]
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} does not match this version of brittle.Monitor "
            f"(missing {missing}, unexpected {unexpected})."
        )
    return monitor
