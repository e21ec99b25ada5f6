"""Where one copy of the training loop runs: its rank among the run's workers, and its device.

On Ray Train workers this comes from Ray Train's context. In local mode (`resources.num_workers: 0`) the loop
runs in the calling process without Ray Train: the driver of `metacorrect run`, or a Tune trial of a sweep or a
benchmark suite, where Ray 2.60's Train APIs (`ray.train.get_context`, `ray.train.report`) refuse to run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Placement:
    rank: int
    world: int
    local_rank: int
    local_world: int  # workers on this node
    node_rank: int
    device: torch.device

    @property
    def nodes(self) -> bool:
        """Whether the run spans several nodes."""
        return self.world > self.local_world

    @classmethod
    def train_worker(cls) -> Placement:
        """This Ray Train worker's."""
        import ray.train
        import ray.train.torch

        c = ray.train.get_context()
        return cls(c.get_world_rank(), c.get_world_size(), c.get_local_rank(), c.get_local_world_size(),
                   c.get_node_rank(), ray.train.torch.get_device())

    @classmethod
    def this_process(cls) -> Placement:
        """The only worker, in this process, on the accelerator Ray gave it (a trial's GPU) or the CPU. Ray
        Train's own device lookup (`ray.train.torch.get_device`) is the same function, behind a check that
        the caller is a Train worker."""
        from ray.air._internal.torch_utils import get_devices

        return cls(0, 1, 0, 1, 0, get_devices()[0])
