"""One called step of rnnkit's built-in cells against torch.nn's, side by side in one process.

    .venv/bin/python benchmarks/cell_step.py [--write]

What a hand-written loop pays per step (a decoder, a tutorial's loop): ``cell(x, hx)`` under
no_grad and, separately, a step's forward and backward, for LSTM, GRU and RNN cells with the same
weights; the implementations alternate within each round, and each figure is the median over the
rounds of the mean over a block of calls. ``--write`` appends the table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import rnnkit

SHAPES = ((1, 32), (32, 64), (128, 128))  # (N, H); the input has 28 features (MNIST rows)
KINDS = {"LSTMCell": (rnnkit.LSTMCell, nn.LSTMCell), "GRUCell": (rnnkit.GRUCell, nn.GRUCell),
         "RNNCell": (rnnkit.RNNCell, nn.RNNCell)}


def _calls(cell: nn.Module, x: torch.Tensor, hx: object, train: bool) -> Callable[[], None]:
    """One call of the cell (with a backward of its output's sum when ``train``)."""
    def call() -> None:
        if train:
            new = cell(x, hx)
            (new[0] if isinstance(new, tuple) else new).sum().backward()
        else:
            with torch.no_grad():
                cell(x, hx)
    return call


def measure(rounds: int, block: int) -> list[str]:
    """The table's rows: microseconds per call for rnnkit's cell and torch's, and their ratio."""
    rows = []
    for name, (ours_cls, theirs_cls) in KINDS.items():
        for N, H in SHAPES:
            torch.manual_seed(0)
            ours, theirs = ours_cls(28, H), theirs_cls(28, H)
            theirs.load_state_dict(ours.state_dict())
            x = torch.randn(N, 28)
            hx = (torch.zeros(N, H), torch.zeros(N, H)) if name == "LSTMCell" else torch.zeros(N, H)
            for train in (False, True):
                runs = {"rnnkit": _calls(ours, x, hx, train), "torch": _calls(theirs, x, hx, train)}
                times: dict[str, list[float]] = {k: [] for k in runs}
                for r in range(rounds + 1):
                    for k, fn in (runs.items() if r % 2 else list(runs.items())[::-1]):
                        t0 = time.perf_counter()
                        for _ in range(block):
                            fn()
                        if r:  # the first round warms up
                            times[k].append((time.perf_counter() - t0) / block * 1e6)
                ours_us, theirs_us = (statistics.median(times[k]) for k in ("rnnkit", "torch"))
                rows.append(f"| {name} | N{N} H{H} | {'forward + backward' if train else 'no_grad'} | "
                            f"{ours_us:.1f} | {theirs_us:.1f} | {theirs_us / ours_us:.2f}x |")
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    """Measure every cell, shape and mode; print (and optionally append) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block", type=int, default=100, help="calls per timed block")
    p.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # the harness's header lines and writer

    rows = ["| cell | shape | call | rnnkit us | torch.nn us | torch / rnnkit |",
            "| --- | --- | --- | ---: | ---: | ---: |", *measure(args.rounds, args.block)]
    return run.side_report("benchmarks/cell_step.py", "One called cell step",
                           __doc__.split("\n\n")[2].replace("\n", " "), rows, args.write)


if __name__ == "__main__":
    main()
