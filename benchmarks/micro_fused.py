"""Side-by-side train-step timing: torch.nn.LSTM against rnnkit's fused CPU backend.

One train step is forward + backward + Adam for a recurrent layer with a Linear(H, 10) head on
the last output and a cross-entropy loss. Both models run interleaved, round by round, in one
process, so drift in the machine's speed hits both alike; the median step time is reported.

    .venv/bin/python benchmarks/micro_fused.py                 # the default shapes
    .venv/bin/python benchmarks/micro_fused.py --shapes 28,28,128,128 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import rnnkit

# (T, I, H, N): sequential MNIST by rows, a wider layer, and pixel-by-pixel MNIST.
DEFAULT_SHAPES = ((28, 28, 128, 128), (28, 28, 256, 128), (784, 1, 128, 128))


class TorchModel(nn.Module):
    """torch.nn.LSTM and a linear head on the last step."""

    def __init__(self, I: int, H: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(I, H, batch_first=True)
        self.head = nn.Linear(H, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last step's output."""
        return self.head(self.rnn(x)[0][:, -1])


class FusedModel(nn.Module):
    """rnnkit's LSTMCell unrolled by the fused backend, and a linear head on the last step."""

    def __init__(self, I: int, H: int, backend: str = "fused") -> None:
        super().__init__()
        self.cell = rnnkit.LSTMCell(I, H)
        self.head = nn.Linear(H, 10)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last step's output."""
        return self.head(rnnkit.unroll(self.cell, x, backend=self.backend).outputs[:, -1])


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A closure doing one train step of ``model`` on (x, y)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def bench_shape(T: int, I: int, H: int, N: int, rounds: int, steps: int) -> dict[str, float]:
    """Median train-step ms of each model at one shape, interleaved rounds."""
    torch.manual_seed(0)
    x, y = torch.randn(N, T, I), torch.randint(0, 10, (N,))
    ref = TorchModel(I, H)
    fused = FusedModel(I, H)
    with torch.no_grad():  # same weights, so both train the same function
        fused.cell.weight_ih.copy_(ref.rnn.weight_ih_l0)
        fused.cell.weight_hh.copy_(ref.rnn.weight_hh_l0)
        fused.cell.bias_ih.copy_(ref.rnn.bias_ih_l0)
        fused.cell.bias_hh.copy_(ref.rnn.bias_hh_l0)
        fused.head.load_state_dict(ref.head.state_dict())
    runs = {"torch": make_step(ref, x, y), "fused": make_step(fused, x, y)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: allocator, MKL/oneDNN primitives, Adam state
        for _ in range(2):
            fn()
    order = list(runs)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            fn = runs[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return {f"{k} {stat.__name__}": stat(v) for k, v in times.items() for stat in (statistics.median, min)}


def main() -> None:
    """Parse arguments, time each shape, print a table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="*", help="T,I,H,N per shape (default: the three standard ones)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default: by shape)")
    parser.add_argument("--steps", type=int, default=0, help="train steps per round (default: by shape)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median (min) ms per train step")
    print(f"{'T':>5} {'I':>4} {'H':>4} {'N':>4} {'torch':>18} {'fused':>18} {'speed-up':>9}")
    for T, I, H, N in shapes:
        long = T * H > 50_000
        rounds = args.rounds or (6 if long else 30)
        steps = args.steps or (1 if long else 5)
        r = bench_shape(T, I, H, N, rounds, steps)
        tm, fm = r["torch median"], r["fused median"]
        print(
            f"{T:>5} {I:>4} {H:>4} {N:>4} {tm:>9.2f} ({r['torch min']:>6.2f}) "
            f"{fm:>9.2f} ({r['fused min']:>6.2f}) {tm / fm:>8.2f}x"
        )


if __name__ == "__main__":
    main()
