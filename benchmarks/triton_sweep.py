"""Tile sizes of the triton backend's LSTM kernels against cuDNN, on a GPU, in one process.

    python benchmarks/triton_sweep.py [--shapes "T28 I28 H128 B128" ...] [--blocks "16,64,64,8/16,32,32,8" ...]

For each shape, times a layer's forward and backward (``rnnkit.LSTM`` on the triton backend, each
``RNNKIT_TRITON_BLOCKS`` configuration in turn, and on the native backend, i.e. cuDNN) with CUDA
events, median of ``--rounds`` after warm-up, rounds interleaved; checks each configuration's outputs
and gradients against cuDNN's (float32 exactly, TF32 off) so that a configuration that races or
misindexes shows as an error, not a time, then times them all with TF32 products, as users get them
(``torch.backends.cudnn.allow_tf32``, torch's default). One JSON line per (shape, configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import competitors as comp  # noqa: E402

import rnnkit  # noqa: E402

# Configurations that spill no registers at H 128 and 512 when Triton 3.6 (the GPU machines') compiles
# them for sm_90 (benchmarks/triton_compile.py, 2026-12-03): forward/backward.
DEFAULT_BLOCKS = ["default", "16,32,32,8/16,32,32,8", "16,64,32,8/16,64,32,8", "32,32,32,8/32,32,32,8",
                  "16,32,32,4/16,32,32,4"]


def step(layer: rnnkit.LSTM, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """One forward and backward of ``layer`` on ``x``: the output and every gradient."""

    def run() -> list[torch.Tensor]:
        out = layer(x)[0]
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
        return [out.detach(), *grads]

    return run


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: by CUDA events (on the CPU, where the kernels only run interpreted, by
    the clock, for the script's own test)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def with_blocks(blocks: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with RNNKIT_TRITON_BLOCKS set to ``blocks`` ("default": unset)."""

    def run() -> object:
        saved = os.environ.pop("RNNKIT_TRITON_BLOCKS", None)
        if blocks != "default":
            os.environ["RNNKIT_TRITON_BLOCKS"] = blocks
        try:
            return fn()
        finally:
            os.environ.pop("RNNKIT_TRITON_BLOCKS", None)
            if saved is not None:
                os.environ["RNNKIT_TRITON_BLOCKS"] = saved

    return run


def sweep(shapes: list[str], configs: list[str], rounds: int, device: torch.device, tf32: bool) -> None:
    """Check, then time, every configuration at every shape; print a JSON line for each."""
    for text in shapes:
        shape = comp.Shape.parse(text)
        torch.manual_seed(0)
        native = rnnkit.LSTM(shape.I, shape.H, batch_first=True, backend="native").to(device)
        triton = rnnkit.LSTM(shape.I, shape.H, batch_first=True, backend="triton").to(device)
        triton.load_state_dict(native.state_dict())
        x = torch.randn(shape.B, shape.T, shape.I, device=device, requires_grad=True)
        torch.backends.cudnn.allow_tf32 = False  # exact products for the comparisons
        want = step(native, x)()
        runs = {"cudnn": step(native, x)}
        for blocks in configs:
            runs[blocks] = with_blocks(blocks, step(triton, x))
        errors: dict[str, str] = {}
        for name, fn in list(runs.items()):
            if name == "cudnn":
                continue
            try:
                got = fn()
                worst = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want))
                if worst > 1e-3:
                    errors[name] = f"relative error {worst:.2e} against cuDNN"
            except Exception as e:  # a configuration that does not compile or launch: reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch.backends.cudnn.allow_tf32 = tf32  # timed as users run them
        live = {k: v for k, v in runs.items() if k not in errors}
        for fn in live.values():  # warm-up: compiles, allocator
            fn()
            fn()
        times: dict[str, list[float]] = {k: [] for k in live}
        for _ in range(rounds):
            for name, fn in live.items():
                times[name].append(timed(fn, device))
        base = statistics.median(times["cudnn"])
        for name in runs:
            row = {"shape": text, "impl": "cudnn" if name == "cudnn" else f"triton {name}"}
            if name in errors:
                row["error"] = errors[name]
            else:
                ms = statistics.median(times[name])
                row |= {"ms": round(ms, 4), "vs_cudnn": round(base / ms, 3)}
            print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Sweep; print JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["T28 I28 H128 B128", "T28 I28 H256 B128", "T28 I28 H512 B512",
                                                   "T784 I1 H128 B128"])
    p.add_argument("--blocks", nargs="+", default=DEFAULT_BLOCKS)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: Triton's interpreter (TRITON_INTERPRET=1), only to test this script")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA device")
    device = torch.device(args.device)
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        sweep(args.shapes, args.blocks, args.rounds, device, tf32)
    finally:  # the caller's setting back, whatever happened
        torch.backends.cudnn.allow_tf32 = tf32
    return 0


if __name__ == "__main__":
    sys.exit(main())
