"""Two builds of rnnkit's C++ kernels side by side in one process: a git revision's against the tree's.

This host's speed drifts by 5-20% between runs a minute apart, more than most kernel changes are
worth, so two processes timed one after the other cannot tell a 3% change from noise. Here both
builds are loaded at once (the revision's with its op namespace renamed, so the two libraries do not
collide) and one layer's forward and backward alternate between them round by round: drift hits
both alike. The outputs and gradients (the input's and the parameters') of the two are compared as
well: a speed-only change should leave them bit for bit alike. Only the C++ kernels differ between
A and B: both run the working tree's Python. The layers run on the fused (or, for the custom cell,
the traced) backend whatever the shape, and each build must have been called, or the run stops.

    .venv/bin/python benchmarks/kernel_ab.py HEAD~1                         # LSTM, T28 I28 H128 B128
    .venv/bin/python benchmarks/kernel_ab.py 768b9bf --layer GRU --shape 28,28,256,128 --rounds 100
    .venv/bin/python benchmarks/kernel_ab.py HEAD --layer traced            # examples/custom_cell.py's cell

Each build takes 25-40 s the first time (the revision's is cached under its source's hash).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

import rnnkit
from rnnkit.backends import cext

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "src/rnnkit/csrc/fused_cpu.cpp"


def build_revision(revision: str) -> tuple[str, Path]:
    """The kernels' source at ``revision`` built under the op namespace ``rnnkit_ab_<hash>`` (cached by
    the source, torch's version and the build's flags, as rnnkit's own build is)."""
    text = subprocess.run(["git", "show", f"{revision}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    key = "\0".join((text, torch.__version__, " ".join(cext._flags()), cext._cpu_flags()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    namespace = f"rnnkit_ab_{digest}"
    where = cext.cache_dir() / "kernel_ab" / digest
    lib = where / "kernels.so"
    if not lib.exists():
        where.mkdir(parents=True, exist_ok=True)
        source = where / "kernels.cpp"
        source.write_text(text.replace("rnnkit_cpu", namespace))
        partial = where / "kernels.so.partial"  # renamed when whole: an interrupted build is never loaded
        command = cext._command(cext.compiler() or "c++", partial)
        command[command.index(str(cext._SOURCE))] = str(source)
        print(f"building {revision}'s kernels ({digest})...", file=sys.stderr)
        subprocess.run(command, check=True)
        partial.replace(lib)
    return namespace, lib


class Counted:
    """The kernels' ops object, counting the calls made through it (so a run proves each build ran)."""

    def __init__(self, ops: object) -> None:
        self.ops, self.calls = ops, 0

    def __getattr__(self, name: str) -> object:
        op = getattr(self.ops, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return op(*args, **kwargs)

        return counted


def make_layer(kind: str, I: int, H: int) -> nn.Module:
    """The layer the rounds time: rnnkit.LSTM or rnnkit.GRU, or the custom cell on the traced backend."""
    if kind != "traced":
        return getattr(rnnkit, kind)(I, H, batch_first=True, backend="fused")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as harness

    return harness.Unrolled(harness.seed000_cell_class()(I, H), "traced")


def last_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output at the last step (N, H), whatever the layer returns."""
    out = layer(x)
    return out[0][:, -1] if isinstance(out, tuple) else out


def compare(revision: str, kind: str, shape: Sequence[int], rounds: int, log: Callable[[str], object] = print) -> None:
    """Time ``kind``'s forward and backward with the revision's kernels (A) and the tree's (B), alternating."""
    T, I, H, N = shape
    current = cext.ops()
    if current is None:
        raise SystemExit(f"rnnkit's C++ kernels are unavailable here: {cext.unavailable()}")
    namespace, lib = build_revision(revision)
    torch.ops.load_library(str(lib))
    builds = {"A": Counted(getattr(torch.ops, namespace)), "B": Counted(current)}
    torch.manual_seed(0)
    x = torch.randn(N, T, I, requires_grad=True)
    layer = make_layer(kind, I, H)
    wrt = [x, *layer.parameters()]
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in builds}
    first: dict[str, list[torch.Tensor]] = {}
    original = cext.ops
    try:
        for r in range(rounds):
            for name in (("A", "B") if r % 2 else ("B", "A")):
                cext.ops = lambda ops=builds[name]: ops  # type: ignore[assignment]  # what the backends call
                t0 = time.perf_counter()
                out = last_output(layer, x)
                t1 = time.perf_counter()
                grads = torch.autograd.grad(out.sum(), wrt, allow_unused=True)
                t2 = time.perf_counter()
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
                if r < 2:
                    first[name] = [out.detach(), *(g for g in grads if g is not None)]
    finally:
        cext.ops = original  # type: ignore[assignment]
    for name, ops in builds.items():
        if ops.calls == 0:
            raise SystemExit(f"build {name}'s kernels were never called: {kind} at this shape runs elsewhere")
    skip = min(10, rounds // 5)
    (fa, ba), (fb, bb) = ((statistics.median(v[skip:]) * 1e3 for v in times[k]) for k in ("A", "B"))
    same = all(torch.equal(a, b) for a, b in zip(first["A"], first["B"], strict=True))
    log(f"{kind} T{T} I{I} H{H} B{N}, {rounds} rounds, A = {revision}, B = the working tree")
    log(f"  forward  ms: A {fa:.3f}  B {fb:.3f}  B/A {fb / fa:.3f}")
    log(f"  backward ms: A {ba:.3f}  B {bb:.3f}  B/A {bb / ba:.3f}")
    log(f"  both     ms: A {fa + ba:.3f}  B {fb + bb:.3f}  B/A {(fb + bb) / (fa + ba):.3f}")
    log(f"  outputs and gradients (input's and parameters') {'bit for bit the same' if same else 'DIFFER'}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``kernel_ab.py REVISION [--layer LSTM|GRU|traced] [--shape T,I,H,N] [--rounds R]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revision", help="the git revision whose kernels are A (the working tree's are B)")
    parser.add_argument("--layer", default="LSTM", choices=("LSTM", "GRU", "traced"))
    parser.add_argument("--shape", default="28,28,128,128", help="T,I,H,N (default 28,28,128,128)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4 or min(shape) <= 0:
        parser.error(f"--shape {args.shape!r}: four positive sizes T,I,H,N")
    compare(args.revision, args.layer, shape, max(2, args.rounds))


if __name__ == "__main__":
    main()
