"""Where the time goes in one 784-step train step on the CPU: rnnkit.LSTM and a user cell.

    .venv/bin/python benchmarks/profile_long.py [--T 784] [--H 128]

Prints the share of time in matrix products, elementwise maths and everything else (Python,
autograd bookkeeping) from torch.profiler, for the fused LSTM and the Seed000Cell reference loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import rnnkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from custom_cell import Seed000Cell  # noqa: E402

GEMM = ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm")


def _is_gemm(key: str) -> bool:
    return key.startswith("aten::") and key[len("aten::"):].rstrip("_") in GEMM


def profile(name: str, run_rnn, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, H: int) -> None:
    """Profile one train step of ``run_rnn`` (after a warm-up) and print the time split."""
    head = nn.Linear(H, 10)
    opt = torch.optim.Adam([*params, *head.parameters()], 1e-3)

    def step() -> None:
        loss = nn.functional.cross_entropy(head(run_rnn(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    with torch.profiler.profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if _is_gemm(e.key))
    elementwise = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::") and not _is_gemm(e.key))
    other = total - gemm - elementwise
    print(f"{name:<34} total {total / 1e6:6.3f} s   matmul {100 * gemm / total:5.1f}%   "
          f"other aten ops {100 * elementwise / total:5.1f}%   "
          f"outside aten (Python, autograd) {100 * other / total:5.1f}%")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    print("    top ops: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}% ({e.count}x)" for e in top))


def main() -> None:
    """Profile rnnkit.LSTM (fused backend) and Seed000Cell (reference loop) at T x 1 x H x 128."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=784)
    p.add_argument("--H", type=int, default=128)
    p.add_argument("--B", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.rand(args.B, args.T, 1), torch.randint(0, 10, (args.B,))
    lstm = rnnkit.LSTM(1, args.H, batch_first=True)
    profile("rnnkit.LSTM (fused)", lambda x: lstm(x)[0][:, -1], list(lstm.parameters()), x, y, args.H)
    cell = Seed000Cell(1, args.H)
    profile("Seed000Cell (reference loop)", lambda x: rnnkit.unroll(cell, x).outputs[:, -1],
            list(cell.parameters()), x, y, args.H)


if __name__ == "__main__":
    main()
