"""Several processes share the calibration: each runs its slice of the batches through every
block, and the statistics are summed across processes before any layer is solved.

Launched the usual way, e.g. `torchrun --nproc-per-node 2 -m lowbit.cli quantize ...` (one
process per GPU with NCCL; gloo on CPU). Every process then solves the same summed problem
for every layer, so their models stay identical without sending weights around, and process 0
alone writes the export. The result equals a single process's up to the order in which the
floating-point sums are added.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowbit.calibrate.stats import HessianStats


class DistributedError(ValueError):
    """A setting several processes cannot share; the message says what to change."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, calibration: torch.Tensor | None) -> torch.Tensor | None:
        """This process's contiguous slice of the calibration samples."""
        if calibration is None or self.size == 1:
            return calibration
        if calibration.shape[0] < self.size:
            raise DistributedError(
                f"{calibration.shape[0]} calibration samples cannot be split across {self.size} processes; "
                "pass --samples of at least the number of processes"
            )
        return torch.tensor_split(calibration, self.size)[self.rank]

    def reduce_stats(self, stats: HessianStats) -> None:
        """Sum the statistics of every process into each one (a no-op for one process)."""
        if self.size == 1:
            return
        dist.all_reduce(stats.sum_outer)
        tokens = torch.tensor([stats.tokens], dtype=torch.float64, device=stats.sum_outer.device)
        dist.all_reduce(tokens)
        stats.tokens = int(tokens.item())


    def leave(self) -> None:
        """End the process group once the Hessians are shared: libraries used afterwards (the export
        check's compressed-tensors loader) would otherwise try to spread their own work over it on
        process 0 while the other processes have already finished."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def join_world(device: torch.device) -> World:
    """The process group torchrun (or any launcher setting RANK/WORLD_SIZE/MASTER_ADDR) describes;
    a single process without them. NCCL for CUDA devices, gloo on the CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per process: cuda becomes cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and world.size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", world.rank)))
    return device
