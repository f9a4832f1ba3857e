"""On-disk cache of input margins, so an interrupted ``fit()`` resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from brittle.attacks.settings import ENGINE_VERSIONS, AttackSettings

__all__ = ["MarginCache", "model_fingerprint"]


def _tensor_digest(h: hashlib._Hash, tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _digest(tensor: Tensor) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, tensor)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        if isinstance(tensor, Tensor):
            _tensor_digest(h, tensor)
    return h.hexdigest()


class MarginCache:
    """Margins per batch, keyed by model weights, attack settings and the batch's bytes.

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

    def _path(self, x: Tensor) -> Path:
        h = hashlib.sha256()
        _tensor_digest(h, x)
        return self.directory / f"{self.key}-{h.hexdigest()[:20]}.pt"

    def get(self, x: Tensor) -> Tensor | None:
        """Cached margins of batch ``x``, or ``None`` when absent or damaged.

        An entry that does not load, has the wrong shape or fails its checksum
        is removed and recomputed, never trusted.
        """
        path = self._path(x)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            margins, digest = entry["margins"], entry["sha256"]
            valid = (
                isinstance(margins, Tensor)
                and margins.shape == (x.shape[0],)
                and digest == _digest(margins)
            )
        except Exception:  # a damaged file can fail in the zip, pickle or tensor layers
            valid = False
        if not valid:
            self.misses += 1
            self.damaged += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return margins

    def put(self, x: Tensor, margins: Tensor) -> None:
        """Store the margins of batch ``x`` (written whole, then renamed into place)."""
        path = self._path(x)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        margins = margins.detach().cpu()
        torch.save({"margins": margins, "sha256": _digest(margins)}, tmp)
        tmp.replace(path)
