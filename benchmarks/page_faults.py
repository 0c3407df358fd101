"""Page faults per training step with glibc's default malloc and with rnnkit's tuning, side by side.

    .venv/bin/python benchmarks/page_faults.py [--write]

Each row trains one model for a few steps in a fresh Python process (so no run inherits another's
heap or malloc settings) and reports the median step time, the minor page faults and the kernel
(system) time per step from ``getrusage``. "tuned" calls ``rnnkit.tune_allocator()`` first; see
``src/rnnkit/allocator.py``. ``--write`` appends the table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = (  # (what, T, B, H)
    ("torch.nn.LSTM", 28, 128, 128),
    ("torch.nn.LSTM", 28, 256, 128),
    ("torch.nn.LSTM", 784, 128, 128),
    ("rnnkit.LSTM", 28, 256, 128),
    ("rnnkit.LSTM", 784, 128, 128),
    ("rnnkit.LSTM backend=fused", 28, 256, 128),
    ("rnnkit.LSTM backend=fused", 784, 128, 128),
)


def one(what: str, T: int, B: int, H: int, tuned: bool, steps: int) -> tuple[float, float, float]:
    """Median ms, page faults and kernel ms per train step of ``what`` (run in a fresh process)."""
    import rnnkit

    if tuned and not rnnkit.tune_allocator():
        raise SystemExit("rnnkit.tune_allocator() did not apply (not glibc, or MALLOC_* set)")
    torch.manual_seed(0)
    I = 1 if T > 64 else 28
    if what == "torch.nn.LSTM":
        layer = torch.nn.LSTM(I, H, batch_first=True)
    else:
        layer = rnnkit.LSTM(I, H, batch_first=True, backend="fused" if what.endswith("fused") else "auto")
    head = torch.nn.Linear(H, 10)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], 1e-3)
    x, y = torch.rand(B, T, I), torch.randint(0, 10, (B,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(layer(x)[0][:, -1]), y).backward()
        opt.step()

    with rnnkit.fpmode.denormals_flushed(torch.device("cpu")):
        for _ in range(2):
            step()
        times = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / steps
    kernel_ms = 1e3 * (after.ru_stime - before.ru_stime) / steps
    return 1e3 * statistics.median(times), faults, kernel_ms


def main(argv: list[str] | None = None) -> str:
    """Run every case both ways, each in its own process; print (and optionally append) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # the harness's header lines and writer

    rows = ["| layer | shape | malloc | ms per train step | page faults per step | kernel ms per step |",
            "| --- | --- | --- | ---: | ---: | ---: |"]
    ctx = multiprocessing.get_context("spawn")
    for what, T, B, H in CASES:
        for tuned in (False, True):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                ms, faults, kernel = pool.submit(one, what, T, B, H, tuned, 3 if T > 64 else 10).result()
            rows.append(f"| {what} | T{T} B{B} H{H} | {'tuned' if tuned else 'default'} | {ms:.1f} | "
                        f"{faults:,.0f} | {kernel:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return run.side_report("benchmarks/page_faults.py", "Page faults per train step",
                           "Each row in a fresh process: " + __doc__.split("\n\n")[2].replace("\n", " "), rows,
                           args.write)


if __name__ == "__main__":
    main()
