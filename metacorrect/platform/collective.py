"""Averaging and gathering across Ray Train workers; every operation is a no-op on one worker.

Workers may hold different numbers of rows in a step (uneven shards, a stand-in batch when a
worker's shard is exhausted), so means are weighted by the rows that count: the result equals what
one worker would compute on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Collective:
    def __init__(self, world_size: int = 1, rank: int = 0, device: torch.device | str = "cpu"):
        self.world_size = world_size
        self.rank = rank
        self.device = torch.device(device)

    @classmethod
    def from_process_group(cls, device: torch.device) -> Collective:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), device)
        return cls(1, 0, device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def weighted_mean_(self, tensors: list[Tensor], weight: float) -> float:
        """In place: t <- sum_k w_k t_k / sum_k w_k over workers (one all-reduce). Returns sum_k w_k."""
        if not self.distributed:
            return float(weight)
        flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.ones(1, device=tensors[0].device)])
        flat.mul_(weight)
        dist.all_reduce(flat)
        total = float(flat[-1])
        if total > 0:
            flat.div_(total)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        return total

    def sum(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenate every worker's tensor along dim 0 (sizes may differ), in rank order."""
        if not self.distributed:
            return tensor
        padded, sizes = self._padded(tensor)
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

    def _padded(self, tensor: Tensor) -> tuple[Tensor, list[int]]:
        """`tensor` padded to the longest worker's rows, and every worker's row count (collectives need equal
        shapes)."""
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        counts = [int(s.item()) for s in sizes]
        padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        return padded, counts

    def gather_to_first(self, tensor: Tensor) -> Tensor | None:
        """Every worker's tensor concatenated along dim 0 in rank order, on rank 0 only (None elsewhere): for
        tables that only rank 0 writes, so no other worker holds a copy of the whole set."""
        if not self.distributed:
            return tensor
        padded, sizes = self._padded(tensor)
        out = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(padded, out, dst=0)
        return torch.cat([o[:n] for o, n in zip(out, sizes)]) if self.rank == 0 else None

    def stack(self, tensor: Tensor) -> Tensor:
        """Every worker's tensor of the same shape, stacked in rank order (one all-gather)."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return torch.stack(out)

    def union(self, names: set[str]) -> list[str]:
        """Sorted union of every worker's names (e.g. metric keys some steps or workers did not report)."""
        if not self.distributed:
            return sorted(names)
        gathered: list[set[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, set(names))
        return sorted(set().union(*gathered))

    def broadcast_(self, tensors: list[Tensor], src: int = 0) -> None:
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src)

    def sync_module_(self, module: nn.Module) -> None:
        """Make replicas identical: parameters from rank 0, float buffers (BN running stats) averaged."""
        if not self.distributed:
            return
        with torch.no_grad():
            self.broadcast_(list(module.parameters()))
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            self.weighted_mean_(buffers, 1.0)
        self.broadcast_([b for b in module.buffers() if not b.is_floating_point()])
