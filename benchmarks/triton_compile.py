"""Compile the triton backend's LSTM kernels for a GPU ahead of time, on any machine (no GPU needed).

    python benchmarks/triton_compile.py [--hidden 128 256 512] [--arch 90] [--blocks BB,BU,BK,WARPS ...]

For each dtype, hidden size and tile configuration (default: what ``triton_lstm.blocks`` picks),
prints the registers, spilled bytes (stack) and shared memory of the forward and the backward kernel
as Triton and ptxas build them for that architecture, with every option on (masks, gradients of h
and c). A kernel that spills is slower on the GPU, and one that asks for more shared memory than a
block may have fails at launch, so tile choices can be narrowed here before any GPU time. Exits 1 if
a default configuration spills or does not fit, or a kernel does not compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, before Triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rnnkit.backends import _triton_kernels as kernels  # noqa: E402
from rnnkit.backends import triton_lstm  # noqa: E402

# Shared memory a block may have, bytes, by compute capability (CUDA's programming guide).
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}

def signatures(ptr: str) -> dict[str, dict[str, str]]:
    """The kernels' argument types (pointers to ``ptr``, e.g. "fp32") as triton.compile takes them."""
    consts = {"H": "constexpr", "BB": "constexpr", "BU": "constexpr", "BK": "constexpr"}
    p = f"*{ptr}"
    return {
        "forward": {"G": p, "HS": p, "CS": p, "W": p, "M": "*i8", "N": "i32", "T": "i32", **consts,
                    "HAS_MASK": "constexpr", "KEEP": "constexpr", "PREC": "constexpr"},
        "backward": {"G": p, "DG": p, "CS": p, "GH": p, "GC": p, "W": p, "M": "*i8", "DH": p, "DC": p, "DH0": p,
                     "N": "i32", "T": "i32", **consts, "HAS_GH": "constexpr", "HAS_GC": "constexpr",
                     "HAS_MASK": "constexpr", "PREC": "constexpr"},
    }


def resources(cubin: bytes) -> dict[str, int]:
    """REG and STACK of a cubin, from the cuobjdump that comes with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"])}


def compile_one(name: str, H: int, config: tuple[int, int, int, int], arch: int, dtype: str) -> dict[str, object]:
    """Compile one kernel; its resources as a dict."""
    BB, BU, BK, warps = config
    prec = "tf32" if dtype == "fp32" else "ieee"
    flags = {"HAS_MASK": True, "KEEP": True} if name == "forward" else {"HAS_GH": True, "HAS_GC": True,
                                                                         "HAS_MASK": True}
    src = ASTSource(fn=getattr(kernels, name), signature=signatures(dtype)[name],
                    constexprs={"H": H, "BB": BB, "BU": BU, "BK": BK, **flags, "PREC": prec})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return {"kernel": name, "H": H, "dtype": dtype, "blocks": ",".join(map(str, config)), "sm": arch,
            **resources(compiled.asm["cubin"]), "shared": int(compiled.metadata.shared)}


def main(argv: list[str] | None = None) -> int:
    """Compile, print a line (JSON) per kernel; 1 if a default configuration spills or does not fit."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100/H200)")
    p.add_argument("--dtype", nargs="+", choices=("fp32", "fp64"), default=["fp32", "fp64"])
    p.add_argument("--blocks", nargs="+", help="BB,BU,BK,WARPS configurations (default: triton_lstm.blocks)")
    args = p.parse_args(argv)
    bad = False
    limit = SHARED_LIMIT.get(args.arch)
    for dtype in args.dtype:
        for H in args.hidden:
            for name in ("forward", "backward"):
                configs = ([triton_lstm._parse_blocks(b, b) for b in args.blocks] if args.blocks else
                           [triton_lstm.blocks(128, H, backward=name == "backward", itemsize=int(dtype[2:]) // 8)])
                for config in configs:
                    row = compile_one(name, H, config, args.arch, dtype)
                    row["fits"] = limit is None or row["shared"] <= limit
                    print(json.dumps(row), flush=True)
                    bad |= not args.blocks and (row["stack"] > 0 or not row["fits"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
