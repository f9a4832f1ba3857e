"""The monitor file: writing a monitor's state without the model, reading it back.

``brittle.load`` (in ``brittle.loading``) puts what ``read`` returns back onto a model.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from brittle.identity import model_identity

if TYPE_CHECKING:
    from brittle.protocol import MonitorProtocol

__all__ = ["save", "read"]

_FORMAT = "brittle.monitor"
_FORMAT_VERSION = 2
_MODEL_PREFIX = "model."


def save(monitor: MonitorProtocol, path: str | Path) -> Path:
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


def read(path: str | Path) -> dict[str, Any]:
    """The payload of a monitor file: its format, state and model identity.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is damaged, foreign or of another format version.
    """
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
