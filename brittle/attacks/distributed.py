"""Sharding holdout attacks across the ranks of a torch.distributed process group.

Every rank streams the same holdout in the same order (cheap forward passes for
scores and features) but attacks only the samples it owns: global sample index
``i`` belongs to rank ``i % world_size``. Margins are assembled on every rank
with one ``all_reduce``, so the report, the threshold and the pseudo-margin
network come out the same everywhere. Works with NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Shard", "shard", "is_distributed", "sample_fingerprints"]

_FINGERPRINT_SEED = 7919
# Relative difference of two ranks' batch digests that still counts as the same data
# (the digests are float64 sums, equal bit for bit on equal data and devices).
_DIGEST_RTOL = 1e-9
# Finite stand-ins for NaN, +inf and -inf in a fingerprint, outside the inputs' [0, 1]:
# a sample holding them (fit skips it, input_margins gives it NaN) is read on every
# rank too, and a NaN or infinite digest would never compare equal to itself.
_NON_FINITE = {"nan": -1.5, "posinf": 2.5, "neginf": -2.5}
# A model's digest travels as this many 20-bit pieces of its SHA-256: whole numbers far
# below the ranks' comparison tolerance, so two digests agree only when equal.
_MODEL_PIECES, _PIECE_BITS = 4, 20


def sample_fingerprints(x: Tensor) -> Tensor:
    """``(B,)`` float64 content fingerprint per sample: a fixed random projection.

    Two samples that differ anywhere get different fingerprints (with probability
    one), and the cost is one read of the batch. NaN and Inf values count as fixed
    finite values, so every fingerprint is finite.

    Examples:
        >>> import torch
        >>> from brittle.attacks.distributed import sample_fingerprints
        >>> x = torch.rand(3, 4)
        >>> bool((sample_fingerprints(x) == sample_fingerprints(x.clone())).all())
        True
        >>> bool(sample_fingerprints(x)[0] == sample_fingerprints(x.flip(0))[0])
        False
        >>> x[1, 2] = float("nan")
        >>> bool(sample_fingerprints(x).isfinite().all())
        True
    """
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64).nan_to_num(**_NON_FINITE)
    generator = torch.Generator().manual_seed(_FINGERPRINT_SEED)
    weights = torch.rand(flat.shape[1], generator=generator, dtype=torch.float64) + 0.5
    return flat @ weights.to(flat.device)


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Shard:
    """This process's place in the group (``world == 1`` when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        """Whether work is split across several processes."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    def owns(self, index: Tensor) -> Tensor:
        """Mask of the global sample indices this rank attacks."""
        return index % self.world == self.rank

    def _device(self, like: Tensor) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
        return (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else like.device
        )

    def assemble(self, n: int, index: Tensor, values: Tensor) -> Tensor:
        """Every rank's ``values`` at their global ``index``, as one ``(n, ...)`` float64 tensor.

        Positions are owned by exactly one rank and zero elsewhere, so a sum over
        ranks puts every value in place (``inf`` included).
        """
        full = torch.zeros((n, *values.shape[1:]), dtype=torch.float64)
        full[index.cpu()] = values.to(torch.float64).cpu()
        return self._summed(full)

    def total(self, values: list[float]) -> list[float]:
        """The sums of ``values`` over the ranks (a copy of ``values`` when not sharded)."""
        return self._summed(torch.tensor(values, dtype=torch.float64)).tolist()

    def _summed(self, values: Tensor) -> Tensor:
        """The CPU tensor ``values`` summed over the ranks (itself when not sharded)."""
        if not self.active:
            return values
        buffer = values.to(self._device(values))
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.cpu()

    def _agree(self, digest: list[float]) -> bool:
        """Whether every rank passed the same ``digest`` (one all-reduce of a few numbers)."""
        values = torch.tensor(digest, dtype=torch.float64)
        both = torch.cat((values, -values)).to(self._device(values))
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        both = both.cpu()
        high, low = both[: values.numel()], -both[values.numel() :]
        scale = torch.maximum(high.abs(), low.abs()).clamp_min(1.0)
        return bool(((high - low).abs() <= _DIGEST_RTOL * scale).all())

    def check_same_samples(self, index: Tensor, fingerprints: Tensor) -> None:
        """Fail loudly unless every rank is reading the same batch of the same holdout.

        Called for each batch before it is attacked: the ranks compare the
        batch's position, size and a digest of its samples' fingerprints (which
        depends on their order), so a ``DistributedSampler`` or a shuffling loader
        is caught at the first batch, before any attack is paid for.
        """
        if not self.active:
            return
        # Positions within the batch (its place in the holdout is compared on its own):
        # weights that grew with the holdout position widened the digests' tolerance
        # with them, until a swap of two similar samples deep in a holdout went unseen.
        position = torch.arange(1, index.numel() + 1, dtype=torch.float64)
        position = position.to(fingerprints.device)
        digest = [
            0.0,
            float(index[0]) if index.numel() else -1.0,
            float(index.numel()),
            float((fingerprints * position).sum()),
            float(fingerprints.sum()),
        ]
        # Then each sample's own fingerprint (the sizes agree once the digest does): a
        # swap of two similar samples moves a sum over a large batch by less than its
        # tolerance (at 2,048 3x32x32 images, 1.6 against 3.2).
        if not (self._agree(digest) and self._agree(fingerprints.tolist())):
            raise RuntimeError(
                f"rank {self.rank} is reading other samples (or another order) than another "
                f"rank at holdout position {int(digest[1])}. Every rank must iterate the same "
                "holdout in the same order: do not use a DistributedSampler or shuffling for "
                "fit() or input_margins(); brittle shards the attacks itself."
            )

    def check_same_model(self, model: nn.Module) -> None:
        """Fail loudly unless every rank holds the same model, bit for bit.

        Called before the first batch: each rank attacks its samples with its own
        model, so ranks whose models differ (weights loaded on rank 0 alone, another
        head) would assemble margins of several models and end with other thresholds.
        The ranks compare a SHA-256 of every parameter and buffer (names, dtypes,
        shapes and bytes) in one all-reduce of five numbers, as the batch checks do.
        """
        if not self.active:
            return
        digest = hashlib.sha256()
        state = model.state_dict()
        hidden = [(name, t) for name, t in model.named_buffers() if name not in state]
        for name, tensor in [*state.items(), *hidden]:
            if not isinstance(tensor, Tensor):  # extra state: not a tensor
                continue
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}{t.dtype}{tuple(tensor.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        whole = int.from_bytes(digest.digest()[: _MODEL_PIECES * _PIECE_BITS // 8], "big")
        mask = (1 << _PIECE_BITS) - 1
        pieces = [float((whole >> (_PIECE_BITS * i)) & mask) for i in range(_MODEL_PIECES)]
        if not self._agree([2.0, *pieces]):
            raise RuntimeError(
                f"rank {self.rank} holds another model than another rank (its parameters or "
                "buffers differ). Every rank must fit the same model with the same weights: "
                "load them on every rank, not on rank 0 alone, before fit() or input_margins()."
            )

    def check_same_length(self, n: int) -> None:
        """Fail loudly when ranks streamed holdouts of different lengths."""
        if not self.active:
            return
        # Same size and first entry as check_same_samples' digest: a rank that has
        # finished while another still reads batches disagrees instead of hanging.
        if not self._agree([1.0, float(n), 0.0, 0.0, 0.0]):
            raise RuntimeError(
                f"rank {self.rank} read {n} holdout samples but another rank read a different "
                "number. Every rank must iterate the same holdout in the same order: do not "
                "use a DistributedSampler or shuffling for fit() or input_margins()."
            )

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank."""
        if not self.active:
            return
        for tensor in module.state_dict().values():
            buffer = tensor.detach().to(self._device(tensor))
            dist.broadcast(buffer, src=0)
            tensor.copy_(buffer)


def shard(distributed: bool | None = None) -> Shard:
    """This process's ``Shard``.

    Args:
        distributed: ``None`` shards when a process group is initialised, ``True``
            requires one, ``False`` never shards.
    """
    if distributed is False:
        return Shard()
    if not is_distributed():
        if distributed:
            raise RuntimeError(
                "distributed=True needs an initialised process group: call "
                "torch.distributed.init_process_group() first (torchrun sets up the environment)."
            )
        return Shard()
    return Shard(rank=dist.get_rank(), world=dist.get_world_size())
