"""On-disk cache of input margins, so an interrupted ``fit()`` resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from brittle.arguments import written_whole
from brittle.attacks.settings import ENGINE_VERSIONS, AttackSettings

__all__ = ["MarginCache", "model_fingerprint"]


def _tensor_digest(h: hashlib._Hash, tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # Flattened first: a 0-d tensor (batch norm's num_batches_tracked, a scalar
    # parameter) cannot be viewed as bytes of another element size.
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _digest(tensor: Tensor) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, tensor)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of every parameter and buffer.

    Buffers registered with ``persistent=False`` (often a normalisation's mean and
    std) are left out of the ``state_dict`` but change the model's outputs: they
    are hashed too, after it.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    hidden = [(name, t) for name, t in model.named_buffers() if name not in state]
    for name, tensor in [*state.items(), *hidden]:
        h.update(name.encode())
        if isinstance(tensor, Tensor):
            _tensor_digest(h, tensor)
    return h.hexdigest()


class MarginCache:
    """Margins per batch, keyed by model weights, attack settings, the batch's bytes and positions.

    A sample's random restarts are drawn from its position in the holdout, so the
    same bytes at other positions may get other margins: the positions are part
    of the key.

    Each batch is one small file ``<key>-<batch digest>.pt`` written atomically,
    so a fit killed mid-way loses at most the batch in flight.
    """

    def __init__(
        self, directory: str | Path, model: nn.Module, settings: AttackSettings, engine: str
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        version = ENGINE_VERSIONS.get(engine, 0)
        meta = json.dumps(
            {"engine": engine, "engine_version": version, **asdict(settings)}, sort_keys=True
        )
        self.key = hashlib.sha256((model_fingerprint(model) + meta).encode()).hexdigest()[:20]
        self.hits = 0
        self.misses = 0
        self.damaged = 0

    def _path(self, x: Tensor, index: Tensor) -> Path:
        h = hashlib.sha256()
        _tensor_digest(h, x)
        _tensor_digest(h, index.long())
        return self.directory / f"{self.key}-{h.hexdigest()[:20]}.pt"

    def get(self, x: Tensor, index: Tensor) -> Tensor | None:
        """Cached margins of batch ``x`` at holdout positions ``index``, or ``None``.

        ``None`` when absent or damaged.

        An entry that does not load, has the wrong shape or fails its checksum
        is removed and recomputed, never trusted.
        """
        entry = self._load(x, index, points=False)
        return None if entry is None else entry[0]

    def get_points(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor] | None:
        """Cached margins of batch ``x`` at positions ``index``, and their adversarial points.

        ``None`` when absent or damaged, and when the entry was stored without
        points (a fit that did not train the pseudo-margin): the attack then
        runs again and the entry is rewritten with them.
        """
        entry = self._load(x, index, points=True)
        return None if entry is None or entry[1] is None else (entry[0], entry[1])

    def _load(
        self, x: Tensor, index: Tensor, *, points: bool
    ) -> tuple[Tensor, Tensor | None] | None:
        path = self._path(x, index)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            margins, digest = entry["margins"], entry["sha256"]
            adv = entry.get("points")
            valid = (
                isinstance(margins, Tensor)
                and margins.shape == (x.shape[0],)
                and digest == _digest(margins)
                and (
                    adv is None
                    or (
                        isinstance(adv, Tensor)
                        and adv.shape == x.shape
                        and entry.get("points_sha256") == _digest(adv)
                    )
                )
            )
        except Exception:  # a damaged file can fail in the zip, pickle or tensor layers
            valid = False
        if not valid:
            self.misses += 1
            self.damaged += 1
            path.unlink(missing_ok=True)
            return None
        if points and adv is None:
            self.misses += 1
            return None
        self.hits += 1
        return margins, adv

    def put(self, x: Tensor, index: Tensor, margins: Tensor, points: Tensor | None = None) -> None:
        """Store the margins of batch ``x`` at positions ``index``, and their points when given.

        Written whole, then renamed into place.
        """
        path = self._path(x, index)
        margins = margins.detach().cpu()
        entry = {"margins": margins, "sha256": _digest(margins)}
        if points is not None:
            points = points.detach().cpu()
            entry |= {"points": points, "points_sha256": _digest(points)}
        with written_whole(path) as tmp:
            torch.save(entry, tmp)
