"""A custom cell in a few lines: seed 000's LSTM variant, trained on MNIST rows.

The cell's state is (s, h): s is the output, h the memory. Four gates come from one linear map
of [x, s_old]:  h_new = h_old * r1 + g1 * g2,  s_new = tanh(h_new) * g3.

Run it (full MNIST from a directory, or the embedded mini-MNIST when none is given):

    .venv/bin/python examples/custom_cell.py --data-dir ../shared/data/mnist --epochs 6

or through the command line tool, which accepts any cell class by its dotted path:

    PYTHONPATH=examples .venv/bin/rnnkit train --cell custom_cell.Seed000Cell --backend traced

(``--backend traced`` reads the cell's step into its product and elementwise maths and runs it in
rnnkit's C++ time loops, with nothing to compile; ``--backend compiled`` compiles any cell with
Inductor, a few seconds per batch size; without either, 28-step rows run in rnnkit's Python loop.
BENCHMARKS.md has their speeds against torch.nn.LSTM.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn


class SState(NamedTuple):
    s: Tensor  # output (first field: what the engine reads as the step's output)
    h: Tensor  # memory


class Seed000Cell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.gates = nn.Linear(input_size + hidden_size, 4 * hidden_size)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SState:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return SState(zeros, zeros)

    def forward(self, x: Tensor, state: SState) -> SState:
        r1, g1, g2, g3 = self.gates(torch.cat([x, state.s], dim=1)).chunk(4, dim=1)
        h = state.h * torch.sigmoid(r1) + torch.sigmoid(g1) * torch.tanh(g2)
        return SState(torch.tanh(h) * torch.sigmoid(g3), h)


def main() -> None:
    """Train a classifier built on Seed000Cell and print its test accuracy."""
    from rnnkit import app
    from rnnkit.config import apply_overrides
    from rnnkit.recipes import recipe_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="traced" if not torch.cuda.is_available() else "auto",
                        help="traced (the default on a CPU-only machine), compiled, auto, or reference (the loop)")
    args = parser.parse_args()
    # The config names the cell by a dotted path (configs are data, never code): make this file importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # epochs as asked: no recipe minimum of steps on top (as the command line's --epochs)
    sets = ["model.cell=custom_cell.Seed000Cell", f"train.epochs={args.epochs}", "train.min_steps=none",
            f"train.seed={args.seed}", "train.name=custom-cell", f"model.backend={args.backend}"]
    if args.data_dir:
        sets.append(f'data.data_dir="{args.data_dir}"')
    summary = app.train(apply_overrides(recipe_config("mnist-rows"), sets))
    print(f"Seed000Cell: test accuracy {100 * summary.test_accuracy:.2f}% after {summary.train_seconds:.1f} s")


if __name__ == "__main__":
    main()
