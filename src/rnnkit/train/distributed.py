"""Multi-process data-parallel training under ``torchrun`` (DistributedDataParallel).

    torchrun --nproc_per_node=2 -m rnnkit train [RECIPE] ...

``train.batch_size`` stays the *global* batch: each of the N processes takes batch_size / N
examples of every batch (its rank's share of the same epoch order), and DDP averages the
gradients, so N processes take the same steps as one process with the whole batch. Gloo on the
CPU, NCCL on GPUs (one per process). Only rank 0 logs, writes the run directory and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rnnkit.errors import ConfigError

__all__ = ["Dist", "world_size", "setup", "wrap", "cleanup"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files (rank 0)."""
        return self.rank == 0


def world_size() -> int:
    """How many processes torchrun launched for the job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> tuple[Dist | None, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else (None, device)."""
    world = world_size()
    if world <= 1:
        return None, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def split_batch(batch_size: int, d: Dist | None) -> int:
    """Each process's share of the global batch (which must divide evenly)."""
    if d is None:
        return batch_size
    if batch_size % d.world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} does not split over {d.world_size} processes; "
            f"use a multiple of {d.world_size}"
        )
    return batch_size // d.world_size


def wrap(model: nn.Module, d: Dist | None, device: torch.device) -> nn.Module:
    """The model wrapped for gradient averaging (unchanged in a single process)."""
    if d is None:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def cleanup(d: Dist | None) -> None:
    """Leave the process group."""
    if d is not None and dist.is_initialized():
        dist.destroy_process_group()
