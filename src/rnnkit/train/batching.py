"""Batches from in-memory tensors, with a position that checkpoints can save and restore exactly.

Each epoch's order is a pure function of ``(seed, epoch)``, so resuming at (epoch, index) replays
exactly the batches an uninterrupted run would have seen, without storing the permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from rnnkit.errors import ConfigError, ShapeError


@dataclass
class Position:
    """Where a pass over the data stands: the epoch and the index of the next batch in it."""

    epoch: int = 0
    batch: int = 0


class Batches:
    """Shuffled mini-batches of ``(inputs, targets)`` tensors; the last partial batch is kept.

    Iterating yields the remaining batches of the current epoch and then advances to the next
    epoch; ``position`` says where the next batch comes from (saved in checkpoints).
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise ShapeError(
                f"Batches: inputs have {inputs.shape[0]} examples but targets have {targets.shape[0]}"
            )
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.position = Position()

    def __len__(self) -> int:
        """Batches per epoch (for this rank)."""
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _per_rank(self) -> int:
        return self.inputs.shape[0] // self.world_size

    def order(self, epoch: int) -> Tensor:
        """The example order of ``epoch``: a permutation seeded by (seed, epoch), this rank's share."""
        n = self.inputs.shape[0]
        if self.shuffle:
            mixed = self.seed * 1_000_003 + epoch
            if not -(2**63) <= mixed < 2**64:  # past torch's range: folded (seeds within keep their orders)
                mixed %= 2**64
            g = torch.Generator().manual_seed(mixed)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        # Distributed: rank r takes every world_size-th example, so ranks see disjoint shares.
        per = self._per_rank()
        return idx[self.rank : per * self.world_size : self.world_size]

    def epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The remaining batches of the current epoch; the position advances as they are taken."""
        pos = self.position
        idx = self.order(pos.epoch)
        for b in range(pos.batch, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            pos.batch = b + 1
            yield self.inputs[sel], self.targets[sel]
        self.position = Position(pos.epoch + 1, 0)

    def state_dict(self) -> dict[str, int]:
        """The position, for checkpoints."""
        return {"epoch": self.position.epoch, "batch": self.position.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position."""
        self.position = Position(int(state["epoch"]), int(state["batch"]))
        self.seed = int(state.get("seed", self.seed))


def eval_batches(inputs: Tensor, targets: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches in order, for evaluation and prediction."""
    for i in range(0, inputs.shape[0], batch_size):
        yield inputs[i : i + batch_size], targets[i : i + batch_size]
