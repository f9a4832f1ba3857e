"""The monitor file: writing a monitor's state without the model, reading it back.

``brittle.load`` (in ``brittle.loading``) puts what ``read`` returns back onto a model.
The file carries a SHA-256 checksum of everything it holds (every tensor's bytes,
every plain value), so that a file altered by a single byte is called damaged
instead of loading a wrong threshold.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from brittle.arguments import file_path, parent_folders, written_whole
from brittle.identity import model_identity

if TYPE_CHECKING:
    from brittle.protocol import MonitorProtocol

__all__ = ["save", "read", "checksum"]

_FORMAT = "brittle.monitor"
_FORMAT_VERSION = 2
_MODEL_PREFIX = "model."


def _little_endian(t: Tensor, byteorder: str) -> bytes:
    """A CPU tensor's raw bytes, each element little-endian whatever ``byteorder`` holds it in."""
    if t.is_complex():
        t = torch.view_as_real(t)  # each part swapped on its own
    raw = t.reshape(-1).view(torch.uint8)
    if byteorder == "big" and t.element_size() > 1:
        raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def _digest(h: Any, value: Any, byteorder: str) -> None:
    # A canonical byte stream: type tags, sorted keys, each tensor's dtype, shape and
    # raw bytes, little-endian (repr() would abbreviate a large tensor), repr() of
    # plain values (exact for floats).
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{list(t.shape)}:".encode())
        h.update(_little_endian(t, byteorder))
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _digest(h, key, byteorder)
            _digest(h, value[key], byteorder)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}:".encode())
        for item in value:
            _digest(h, item, byteorder)
    else:
        text = repr(value)
        h.update(f"V{len(text)}:{text}".encode())


def checksum(state: dict[str, Any], model: dict[str, Any], *, byteorder: str | None = None) -> str:
    """SHA-256 (hex) of a monitor file's state and model identity, byte for byte.

    Every tensor is read little-endian, so that a file written on a big-endian
    machine (``torch.load`` hands its tensors over in this machine's order) checks
    on a little-endian one, and the other way round.

    Args:
        state: The file's monitor state.
        model: The file's model identity.
        byteorder: ``"little"`` or ``"big"``: the order this machine holds tensors in
            (``sys.byteorder``, the default).

    Examples:
        >>> import torch
        >>> a = checksum({"threshold": torch.tensor(0.25)}, {})
        >>> a == checksum({"threshold": torch.tensor(0.25)}, {})
        True
        >>> a == checksum({"threshold": torch.tensor(1.0)}, {})
        False
    """
    byteorder = sys.byteorder if byteorder is None else byteorder
    if byteorder not in ("little", "big"):
        raise ValueError(f'byteorder must be "little" or "big". Got {byteorder!r}.')
    h = hashlib.sha256()
    _digest(h, {"state": state, "model": model}, byteorder)
    return h.hexdigest()


def _check_savable(monitor: MonitorProtocol) -> None:
    if monitor.input_shape is None:
        raise ValueError(
            "this monitor has never seen an input, so its file could not recognise the model "
            "it belongs to (no probe logits). Call monitor(batch) once, or wrap with "
            "example_input=batch, before saving."
        )
    threshold = float(monitor.threshold)
    if monitor.is_fitted and not math.isfinite(threshold):
        raise ValueError(
            f"this fitted monitor has a non-finite threshold ({threshold}); it would flag "
            "nothing. Fit it again (monitor.fit(holdout)) before saving."
        )


def save(monitor: MonitorProtocol, path: str | Path) -> Path:
    """Write ``monitor``'s own state (everything but the model's weights) to ``path``.

    The file also identifies the model (its structure and its logits on a probe
    batch), so that ``load`` can refuse another one, and carries a checksum of
    all it holds. It is written under a temporary name of its own and renamed, so a
    crash never leaves half a file at ``path``, and two saves to one path at once
    leave one of the two whole files there. Missing parent folders are created; a
    failed save removes those it created (never a folder that existed before).

    Raises:
        ValueError: if the monitor has never seen an input (nothing would identify
            its model), or is fitted with a non-finite threshold.
        IsADirectoryError: if ``path`` is a directory.
    """
    _check_savable(monitor)
    path = file_path(path, "the monitor file", "monitor.pt")
    state = {k: v for k, v in monitor.state_dict().items() if not k.startswith(_MODEL_PREFIX)}
    model = model_identity(monitor.model, monitor.input_shape)
    payload = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "state": state,
        "model": model,
        "checksum": checksum(state, model),
    }
    with parent_folders(path), written_whole(path) as tmp:
        torch.save(payload, tmp)
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
    except OSError:  # the file cannot be read (permissions, I/O): not a verdict on its bytes
        raise
    # Damaged bytes surface from the unpickler as whatever it tripped on: RuntimeError,
    # EOFError, UnpicklingError, KeyError, IndexError, struct.error, AssertionError, ...
    except Exception as err:
        raise ValueError(
            f"{str(path)!r} is damaged or not a brittle monitor file: it does not load as a "
            f"monitor saved by brittle ({type(err).__name__})."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a monitor saved by brittle (Monitor.save): it is damaged or "
            "not a brittle monitor file."
        )
    version = payload.get("version")
    if version != _FORMAT_VERSION:
        newer = isinstance(version, int) and version > _FORMAT_VERSION
        advice = (
            f"upgrade brittle (this one reads format {_FORMAT_VERSION}, the file is format "
            f"{version})"
            if newer
            else "fit and save it again"
        )
        raise ValueError(f"{str(path)!r} was written by another version of brittle; {advice}.")
    saved = payload.get("checksum")
    if saved is None:
        warnings.warn(
            f"{str(path)!r} carries no checksum (saved by an older brittle), so damage to it "
            "cannot be detected; save the monitor again to add one.",
            stacklevel=3,
        )
    elif not isinstance(payload.get("state"), dict) or saved != checksum(
        payload["state"], payload.get("model", {})
    ):
        raise ValueError(
            f"{str(path)!r} is damaged: its contents do not match the checksum written with "
            "them. Save the monitor again from its source."
        )
    return payload
