"""Synthetic streams for truncated backpropagation: echoed bit streams and sine -> cosine.

A stream is B parallel sequences cut into windows of T steps. :class:`StreamBatches` yields window
0, 1, 2, ... of all B rows at once, so row b of window k+1 continues row b of window k. A model that
keeps its detached final state from one window and starts the next window from it reads one long
sequence per row, while gradients flow inside a window only (truncated backprop through time)::

    batches = StreamBatches(EchoStream(batch_size=5, window=15), length=10_000, on_stream_start=model.reset_state)
    for x, y in batches.epoch_batches():     # x (B, T, 1) float, y (B, T) class ids or (B, T, 1) values
        ...

Every window is computed on demand from ``(seed, split, epoch, window index)`` alone, so memory is
that of one window however long the stream is, a new epoch draws new data, and a checkpointed
position replays exactly the windows an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from rnnkit.errors import ConfigError
from rnnkit.train.batching import Position

__all__ = ["Stream", "EchoStream", "SinCosStream", "StreamBatches", "TRAIN", "TEST"]

#: ``split`` values: the same seed gives unrelated training and test streams
TRAIN, TEST = 0, 1


class Stream(Protocol):
    """B parallel sequences whose windows can be computed one at a time."""

    batch_size: int
    window: int

    def chunk(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Window ``index`` of epoch ``epoch``'s stream: inputs (B, T, F) and targets."""
        ...


def _rng(*key: int) -> np.random.Generator:
    # SeedSequence hashes the whole key, so nearby (epoch, index) pairs give unrelated draws; it takes
    # no negative numbers, and folding leaves every other key's draws as they were
    return np.random.default_rng([k % 2**64 for k in key])


def _check_positive(owner: str, **values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{owner}: {name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class EchoStream:
    """Random bits; the target at step t is the input at step t - ``echo_step`` (0 for t < echo_step).

    Inputs are (B, T, 1) floats in {0, 1}, targets (B, T) class ids in {0, 1}.
    """

    batch_size: int = 5
    window: int = 15
    echo_step: int = 3
    seed: int = 0
    split: int = TRAIN

    def __post_init__(self) -> None:
        _check_positive("EchoStream", batch_size=self.batch_size, window=self.window)
        if not isinstance(self.echo_step, int) or self.echo_step < 0:
            raise ConfigError(f"EchoStream: echo_step must be an int >= 0, got {self.echo_step!r}")

    def bits(self, epoch: int, index: int) -> Tensor:
        """The input bits (B, T) of window ``index``; windows before the stream's start are all zero."""
        if index < 0:
            return torch.zeros(self.batch_size, self.window, dtype=torch.long)
        draw = _rng(self.seed, self.split, epoch, index).integers(0, 2, (self.batch_size, self.window))
        return torch.from_numpy(draw).long()

    def chunk(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Inputs (B, T, 1) and targets (B, T) of window ``index``."""
        T, k = self.window, self.echo_step
        x = self.bits(epoch, index)
        # the echo reaches back past this window's start: redraw the earlier windows it needs
        back = -(-k // T)
        past = [self.bits(epoch, index - j) for j in range(back, 0, -1)]
        history = torch.cat([*past, x], dim=1)  # (B, back*T + T)
        y = history[:, history.shape[1] - T - k : history.shape[1] - k] if k else x
        return x.unsqueeze(-1).float(), y.clone()

    def sequence(self, epoch: int, length: int) -> tuple[Tensor, Tensor]:
        """The first ``length`` steps of epoch ``epoch``'s stream in one piece (for evaluation)."""
        return _concat(self, epoch, length)


@dataclass(frozen=True)
class SinCosStream:
    """Row b reads sin(u) and must output cos(u), with u = (phase_b + t) / ``scale`` at step t.

    The seed's data: u = t / (10 pi), a period of about 197 steps. Each (seed, split, epoch) draws
    every row's phase uniformly over one period. Inputs and targets are both (B, T, 1).
    """

    batch_size: int = 50
    window: int = 20
    scale: float = 10 * math.pi
    seed: int = 0
    split: int = TRAIN

    def __post_init__(self) -> None:
        _check_positive("SinCosStream", batch_size=self.batch_size, window=self.window)
        if not self.scale > 0:
            raise ConfigError(f"SinCosStream: scale must be positive, got {self.scale!r}")

    def phases(self, epoch: int) -> Tensor:
        """Each row's starting position (B,), in steps."""
        period = 2 * math.pi * self.scale
        return torch.from_numpy(_rng(self.seed, self.split, epoch).uniform(0.0, period, self.batch_size))

    def chunk(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Inputs sin (B, T, 1) and targets cos (B, T, 1) of window ``index``."""
        # float64 positions: far into a long stream float32 would lose the fractional phase
        t = torch.arange(index * self.window, (index + 1) * self.window, dtype=torch.float64)
        u = (self.phases(epoch).unsqueeze(1) + t) / self.scale  # (B, T)
        return torch.sin(u).float().unsqueeze(-1), torch.cos(u).float().unsqueeze(-1)

    def sequence(self, epoch: int, length: int) -> tuple[Tensor, Tensor]:
        """The first ``length`` steps of epoch ``epoch``'s stream in one piece (for evaluation)."""
        return _concat(self, epoch, length)


def _concat(stream: Stream, epoch: int, length: int) -> tuple[Tensor, Tensor]:
    _check_positive(type(stream).__name__ + ".sequence", length=length)
    n = -(-length // stream.window)
    xs, ys = zip(*(stream.chunk(epoch, i) for i in range(n)))
    return torch.cat(xs, dim=1)[:, :length], torch.cat(ys, dim=1)[:, :length]


class StreamBatches:
    """Consecutive windows of ``stream`` as a training data source (the :class:`~rnnkit.train.batching.Batches`
    interface: ``epoch_batches``, ``len``, ``position``, ``state_dict``).

    An epoch is one stream of ``length`` steps (``length // window`` windows); the next epoch starts a
    new stream. ``on_stream_start`` is called before each stream's first window, where a stateful
    model must drop the state it carried from the previous stream.
    """

    def __init__(
        self, stream: Stream, length: int, *, on_stream_start: Callable[[], object] | None = None
    ) -> None:
        _check_positive("StreamBatches", length=length)
        if length < stream.window:
            raise ConfigError(
                f"StreamBatches: a stream of {length} steps holds no whole window of {stream.window} steps; "
                f"make the stream longer or the window shorter"
            )
        self.stream, self.length, self.on_stream_start = stream, length, on_stream_start
        self.batch_size = stream.batch_size
        self.position = Position()

    def __len__(self) -> int:
        """Windows per epoch."""
        return self.length // self.stream.window

    def epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The remaining windows of the current stream, in order; the position advances as they are taken."""
        pos = self.position
        for b in range(pos.batch, len(self)):
            if b == 0 and self.on_stream_start is not None:
                self.on_stream_start()
            pos.batch = b + 1
            yield self.stream.chunk(pos.epoch, b)
        self.position = Position(pos.epoch + 1, 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.epoch_batches()

    def state_dict(self) -> dict[str, int]:
        """The position, for checkpoints."""
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position (the trainer restores a stateful model's carried state)."""
        self.position = Position(int(state["epoch"]), int(state["batch"]))
