"""Sharding holdout attacks across the ranks of a torch.distributed process group.

Every rank streams the same holdout in the same order (cheap forward passes for
scores and features) but attacks only the samples it owns: global sample index
``i`` belongs to rank ``i % world_size``. Margins are assembled on every rank
with one ``all_reduce``, so the report, the threshold and the pseudo-margin
network come out the same everywhere. Works with NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Shard", "shard", "is_distributed"]


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
        """Every rank's ``values`` at their global ``index``, as one ``(n,)`` float64 tensor.

        Positions are owned by exactly one rank and zero elsewhere, so a sum over
        ranks puts every value in place (``inf`` included).
        """
        full = torch.zeros(n, dtype=torch.float64)
        full[index.cpu()] = values.to(torch.float64).cpu()
        if not self.active:
            return full
        buffer = full.to(self._device(full))
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.cpu()

    def check_same_length(self, n: int) -> None:
        """Fail loudly when ranks streamed holdouts of different lengths."""
        if not self.active:
            return
        counts = torch.tensor([n, -n], dtype=torch.float64)
        counts = counts.to(self._device(counts))
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if int(counts[0]) != n or int(-counts[1]) != n:
            raise RuntimeError(
                f"rank {self.rank} read {n} holdout samples but another rank read a different "
                "number. Every rank must iterate the same holdout in the same order: do not "
                "use a DistributedSampler or shuffling for fit()."
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
