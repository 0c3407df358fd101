"""The traced backend: a user's cell run by rnnkit's C++ time loops, without compiling anything.

Most recurrent cells are a few products of the step's input and the state by weights, then
elementwise maths on slices of the products, the old state and per-unit parameters. This backend
traces one step of the cell (``make_fx``, a fraction of a second) and, when the step has that
shape, turns it into:

* the products, whose weights the C++ loop packs once per call and computes step by step in
  register tiles, the input's and the recurrent state's shares together (the fused LSTM's
  machinery, ``cell_forward_steps`` in ``csrc/fused_cpu.cpp``);
* an elementwise program over H-wide slices ("slots") of the products, the states and parameter
  vectors, which the loop runs on each tile while it is in cache, keeping the values its backward
  reads; the backward runs the adjoint program derived here (reverse mode over the instructions);
* the weights' and the input's gradients summed inside the backward loop (which keeps only a ring
  of the few steps of slot gradients it reads), the weights' handed back to the weights' graph's
  outputs (:func:`_val_grads`) from where autograd takes them to the cell's parameters.

So a custom cell trains at the speed of rnnkit's own LSTM loops, not at that of a Python loop or
of per-step compiled kernels. What it takes: every product's left operand is the step's input, one
state, or their concatenation, and its right operand comes from the cell's tensors alone; every
other operation is one of the elementwise ops in :data:`_UNARY`/:data:`_BINARY` (and views,
splits, slices and concatenations along the features); every state is (N, H) of one H; the step's
output is its first state. Anything else (a layer norm, dropout, a product of a derived value,
a custom ``output()``) is refused with the reason, and ``auto`` moves on to the compiled backend
or the reference loop. As with the compiled backend, a trace is used only for cells without hooks
or tensor attributes, keyed by the cell's attributes, and checked against the eager cell on the
call's own first rows and steps (values and gradients) when it is built. It is opt-in below
:data:`~rnnkit.backends.compiled.AUTO_MIN_STEPS` steps, where ``auto`` runs the reference loop.
"""

from __future__ import annotations

import heapq
import math
import operator
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.backends import cext, compiled, reference
from rnnkit.backends.fused import _mask_rows
from rnnkit.fpmode import flush_denormals_enabled
from rnnkit.fpmode import transforming as _transforming

__all__ = ["unsupported", "worth_it", "run", "run_quietly", "clear_cache"]

_aten = torch.ops.aten
# the C++ loop's instruction set (enum CellOp in csrc/fused_cpu.cpp)
(ADD, SUB, MUL, DIV, NEG, SIGMOID, TANH, RELU, EXP, ADDC, MULC, RSUBC, POSITIVE, COPY, ZERO, DIVC, DSIGMOID,
 DTANH) = range(18)
_SCALAR_OPS = {ADDC, MULC, RSUBC, DIVC}
_MAX_REGS = 256
_UNARY = {_aten.sigmoid.default: SIGMOID, _aten.tanh.default: TANH, _aten.relu.default: RELU,
          _aten.exp.default: EXP, _aten.neg.default: NEG}
_BINARY = {_aten.add.Tensor: ADD, _aten.sub.Tensor: SUB, _aten.mul.Tensor: MUL, _aten.div.Tensor: DIV}
_SAME = {_aten.clone.default, _aten.alias.default, _aten.contiguous.default}
_MAX_PROGRAMS = 128
_PROGRAMS: OrderedDict[tuple, _Program | None] = OrderedDict()
_WHY: dict[tuple, str] = {}
_WARNED: set[type] = set()  # cell types this backend has warned about
# Traces in a row per user's cell with no call between that found its program, and the last key's
# hash: past compiled._REBUILDS, auto stops tracing a cell whose attributes change every call.
_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


class _Unsupported(Exception):
    """The cell's step is not one this backend runs (the reason is the message)."""


@dataclass
class _Product:
    """One product A @ B (+ bias) of the step: B and the bias are outputs of the weights' graph."""

    b: int  # index of B (K, M) among the weights' graph's outputs
    bias: int | None
    parts: list[tuple[str, int]]  # A's columns, in order: ("x", I) or ("s", H)
    slots: int  # M / H
    first: int = 0  # its first slot in the program's numbering (recurrent products first)

    @property
    def recurrent(self) -> bool:
        return any(kind == "s" for kind, _ in self.parts)


@dataclass
class _Program:
    """One cell's traced step: the weights' graph, the products, and the programs the C++ loop runs."""

    weights: torch.fx.GraphModule
    products: list[_Product]
    vectors: list[tuple[int, int]]  # parameter vectors: (weights' output, offset in units of H)
    H: int
    I: int
    n_state: int
    kr: int  # the state the recurrent products read
    G: int = 0
    Gs: int = 0
    nregs: int = 0
    n_saved: int = 0  # forward values the backward reads
    keep_z: bool = False  # whether it reads the slots' pre-activations too
    reads: Tensor = field(default_factory=lambda: torch.empty(2, 0, dtype=torch.int32))  # states each program reads
    code: Tensor = field(default_factory=lambda: torch.empty(0, 4, dtype=torch.int32))
    adjoint: Tensor = field(default_factory=lambda: torch.empty(0, 4, dtype=torch.int32))
    consts: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    outs: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    io: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))


# ---- From the trace to a program ------------------------------------------------------------------
#
# Values while the graph is read: ("w",) a value of the cell's tensors alone (the weights' graph
# computes it); ("x",) the input; ("rows", [reg, ...]) (N, k H) as k registers of H units;
# ("xcat", [part, ...]) a concatenation of the input and a state (a product's left operand only);
# ("split", [rows, ...]). Registers are symbolic until numbered: ("slot", product,
# k), ("state", k), ("vec", i), ("tmp", i).


class _Builder:
    """Reads one traced step into products, parameter vectors and a forward program."""

    def __init__(self, gm: torch.fx.GraphModule, n_tensors: int, n_state: int, H: int, I: int) -> None:
        self.gm, self.n_tensors, self.n_state, self.H, self.I = gm, n_tensors, n_state, H, I
        self.env: dict[torch.fx.Node, tuple] = {}
        self.code: list[tuple[int, Any, Any, Any]] = []
        self.consts: list[float] = []
        self.tmps = 0
        self.products: list[_Product] = []
        self.weight_outputs: list[torch.fx.Node] = []
        self.vectors: list[tuple[int, int]] = []
        self.vector_regs: dict[tuple[torch.fx.Node, int], tuple] = {}
        self.kr: int | None = None
        x = [n for n in gm.graph.nodes if n.op == "placeholder"][n_tensors].meta.get("val")
        self.dtype = x.dtype if isinstance(x, Tensor) else None

    # -- helpers
    def _weight_output(self, node: torch.fx.Node) -> int:
        v = node.meta.get("val")
        if isinstance(v, Tensor) and v.dtype != self.dtype:
            raise _Unsupported(f"a tensor of the cell's is {v.dtype} where the input is {self.dtype}")
        if node not in self.weight_outputs:
            self.weight_outputs.append(node)
        return self.weight_outputs.index(node)

    def _emit(self, op: int, a: Any, b: Any = None) -> tuple:
        self.tmps += 1
        dst = ("tmp", self.tmps)
        self.code.append((op, dst, a, b))
        return dst

    def _const(self, value: float) -> int:
        self.consts.append(float(value))
        return len(self.consts) - 1

    def _shape(self, node: Any) -> tuple[int, ...] | None:
        v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return tuple(v.shape) if isinstance(v, Tensor) else None

    def _regs(self, node: Any, width: int) -> list | float:
        """An elementwise operand as registers (width of them) or a number."""
        if not isinstance(node, torch.fx.Node):
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return float(node)
            raise _Unsupported(f"an elementwise operand is {type(node).__name__}")
        v = self.env[node]
        if v[0] == "rows":
            if len(v[1]) != width:
                raise _Unsupported("an elementwise operation broadcasts between widths")
            return v[1]
        if v[0] == "w":
            shape = self._shape(node)
            numel = math.prod(shape) if shape is not None else -1
            if shape is None or len([d for d in shape if d != 1]) > 1 or numel not in (1, width * self.H):
                raise _Unsupported(f"a tensor of shape {shape} of the cell's enters the elementwise maths "
                                   "(per-unit vectors and scalars can)")
            out = self._weight_output(node)
            regs = []
            for k in range(width):
                key = (node, k if numel > 1 else -1)
                if key not in self.vector_regs:
                    self.vectors.append((out, k if numel > 1 else -1))
                    self.vector_regs[key] = ("vec", len(self.vectors) - 1)
                regs.append(self.vector_regs[key])
            return regs
        raise _Unsupported("the step's input enters the elementwise maths (only products may read it)")

    def _width(self, *nodes: Any) -> int:
        for n in nodes:
            if isinstance(n, torch.fx.Node) and self.env[n][0] == "rows":
                return len(self.env[n][1])
        return 0

    def _binary(self, op: int, a: Any, b: Any) -> list:
        width = self._width(a, b)
        ra, rb = self._regs(a, width), self._regs(b, width)
        if isinstance(ra, float) and isinstance(rb, float):
            raise _Unsupported("an operation on two numbers")
        out = []
        for k in range(width):
            x = ra if isinstance(ra, float) else ra[k]
            y = rb if isinstance(rb, float) else rb[k]
            if isinstance(y, float):
                if op == ADD:
                    out.append(self._emit(ADDC, x, self._const(y)))
                elif op == SUB:
                    out.append(self._emit(ADDC, x, self._const(-y)))
                elif op == MUL:
                    out.append(self._emit(MULC, x, self._const(y)))
                else:
                    out.append(self._emit(MULC, x, self._const(1.0 / y)))
            elif isinstance(x, float):
                if op == ADD:
                    out.append(self._emit(ADDC, y, self._const(x)))
                elif op == SUB:
                    out.append(self._emit(RSUBC, y, self._const(x)))
                elif op == MUL:
                    out.append(self._emit(MULC, y, self._const(x)))
                else:
                    out.append(self._emit(DIVC, y, self._const(x)))
            else:
                out.append(self._emit(op, x, y))
        return out

    def _dim(self, node: torch.fx.Node, dim: int) -> None:
        rank = len(self._shape(node) or ())
        if rank != 2 or dim not in (1, -1):
            raise _Unsupported("a split, slice or concatenation along another axis than the features")

    def _product(self, n: torch.fx.Node, bias: Any, a: torch.fx.Node, b: torch.fx.Node) -> tuple:
        va, vb = self.env[a], self.env[b]
        if vb[0] != "w" or (bias is not None and self.env[bias][0] != "w"):
            raise _Unsupported("a product whose right operand (or bias) is not made of the cell's tensors alone")
        if va[0] == "x":
            parts = [("x", self.I)]
        elif va[0] == "rows" and len(va[1]) == 1 and va[1][0][0] == "state":
            parts = [("s", va[1][0][1])]
        elif va[0] == "xcat":
            parts = va[1]
        else:
            raise _Unsupported("a product whose left operand is neither the input nor a state (nor both)")
        states = [k for kind, k in parts if kind == "s"]
        if len(states) > 1:
            raise _Unsupported("a product reads more than one state (or one state twice)")
        if len(parts) - len(states) > 1:
            raise _Unsupported("a product reads the input twice")
        if states:
            k = states[0]
            if self.kr is not None and self.kr != k:
                raise _Unsupported("products read two different states")
            self.kr = k
        shape = self._shape(n)
        if shape is None or len(shape) != 2 or shape[1] % self.H:
            raise _Unsupported(f"a product's width is not a multiple of the state's {self.H} units")
        bias_shape = self._shape(bias) if bias is not None else None
        if bias is not None and (bias_shape is None or math.prod(bias_shape) != shape[1]):
            raise _Unsupported("a product's bias is not one vector over its columns")
        kcols = sum(self.H if kind == "s" else self.I for kind, _ in parts)
        if self._shape(b) != (kcols, shape[1]):
            raise _Unsupported("a product's weight does not match its operand")
        parts = [("x", self.I) if kind == "x" else ("s", self.H) for kind, _ in parts]
        j = len(self.products)
        self.products.append(_Product(self._weight_output(b), None if bias is None else self._weight_output(bias),
                                      parts, shape[1] // self.H))
        return ("rows", [("slot", j, k) for k in range(shape[1] // self.H)])

    # -- the walk
    def build(self) -> tuple[list, list]:
        places = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for i, p in enumerate(places):
            if i < self.n_tensors:
                self.env[p] = ("w",)
            elif i == self.n_tensors:
                self.env[p] = ("x",)
            else:
                self.env[p] = ("rows", [("state", i - self.n_tensors - 1)])
        outputs = None
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outputs = n.args[0]
                break
            if n.op != "call_function":
                raise _Unsupported(f"its trace holds a {n.op} node")
            if not n.users and n.target is _aten.detach.default:
                continue  # autograd's bookkeeping
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                raise _Unsupported(f"its step changes a tensor in place ({n.target}), which the loop would not repeat "
                                   "every step")
            inputs = n.all_input_nodes
            if inputs and all(self.env[a][0] == "w" for a in inputs):
                self.env[n] = ("w",)
                continue
            self.env[n] = self._node(n)
        if outputs is None or len(outputs) != self.n_state:
            raise _Unsupported("its step does not return one tensor per state")
        outs = []
        for o in outputs:
            v = self.env.get(o) if isinstance(o, torch.fx.Node) else None
            if v is None or v[0] != "rows" or len(v[1]) != 1 or v[1][0][0] == "vec":
                raise _Unsupported("a new state is not an (N, H) function of the products and states")
            outs.append(v[1][0])
        return outs, self.code

    def _node(self, n: torch.fx.Node) -> tuple:
        t, args, kw = n.target, n.args, n.kwargs
        if t in (_aten.mm.default, _aten.addmm.default):
            if kw:
                raise _Unsupported("a product with alpha or beta")
            if t is _aten.mm.default:
                return self._product(n, None, *args)
            if self.env[args[0]][0] == "rows":  # addmm(xp, h, W^T) onto step values (a projected input): add them
                product = self._product(n, None, *args[1:])[1]
                if self._width(args[0]) != len(product):
                    raise _Unsupported("a product is added to values of another width")
                return ("rows", [self._emit(ADD, p, q) for p, q in zip(product, self.env[args[0]][1])])
            return self._product(n, *args)
        if t is _aten.cat.default:
            parts, dim = args[0], args[1] if len(args) > 1 else 0
            self._dim(n, dim)
            vals = [self.env[p] for p in parts]
            if any(v[0] in ("x", "xcat") for v in vals):
                flat: list = []
                for v in vals:
                    if v[0] == "x":
                        flat.append(("x", 0))
                    elif v[0] == "rows" and all(r[0] == "state" for r in v[1]) and len(v[1]) == 1:
                        flat.append(("s", v[1][0][1]))
                    else:
                        raise _Unsupported("the input is concatenated with something other than a state")
                return ("xcat", flat)
            if any(v[0] != "rows" for v in vals):
                raise _Unsupported("a concatenation of the cell's tensors with the step's values")
            return ("rows", [r for v in vals for r in v[1]])
        if t in (_aten.split.Tensor, _aten.split_with_sizes.default):
            v = self.env[args[0]]
            dim = args[2] if len(args) > 2 else kw.get("dim", 0)
            self._dim(args[0], dim)
            if v[0] != "rows":
                raise _Unsupported("a split of something other than the step's (N, k H) values")
            width = len(v[1]) * self.H
            sizes = args[1] if isinstance(args[1], (list, tuple)) else [args[1]] * math.ceil(width / args[1])
            if any(s % self.H for s in sizes):
                raise _Unsupported(f"a split into pieces that are not multiples of {self.H} units")
            pieces, k = [], 0
            for s in sizes:
                pieces.append(v[1][k:k + s // self.H])
                k += s // self.H
            return ("split", pieces)
        if t is operator.getitem:
            v = self.env[args[0]]
            if v[0] != "split":
                raise _Unsupported("an item of something other than a split")
            return ("rows", v[1][args[1]])
        if t is _aten.slice.Tensor:
            v = self.env[args[0]]
            dim, start, end = (list(args[1:]) + [0, None, None])[:3]
            step = args[4] if len(args) > 4 else 1
            if v[0] != "rows" or step != 1:
                raise _Unsupported("a slice of something other than the step's (N, k H) values")
            self._dim(args[0], dim)
            width = len(v[1]) * self.H
            start, end = start or 0, width if end is None else end
            start, end = (max(0, min(b + width if b < 0 else b, width)) for b in (start, end))  # as Python slices
            if start % self.H or end % self.H:
                raise _Unsupported(f"a slice that does not fall on multiples of {self.H} units")
            return ("rows", v[1][start // self.H:end // self.H])
        if t in _SAME or (t in (_aten.view.default, _aten.reshape.default, _aten.expand.default)
                          and self._shape(n) == self._shape(args[0])):
            return self.env[args[0]]
        if t in _UNARY:
            (a,) = args
            regs = self._regs(a, self._width(a))
            if isinstance(regs, float) or not regs:
                raise _Unsupported("an activation of a number")
            return ("rows", [self._emit(_UNARY[t], r) for r in regs])
        if t in _BINARY:
            a, b = args[:2]
            alpha = kw.get("alpha", args[2] if len(args) > 2 else 1)
            if t in (_aten.add.Tensor, _aten.sub.Tensor) and alpha != 1:
                width = self._width(a, b)
                scaled = self._regs(b, width)
                if isinstance(scaled, float):
                    b = scaled * alpha
                else:  # alpha b first, then the operation reads it as n's value (replaced by the result below)
                    self.env[n] = ("rows", [self._emit(MULC, r, self._const(alpha)) for r in scaled])
                    b = n
            if kw.keys() - {"alpha"} or not self._width(a, b):
                raise _Unsupported(f"{t} on the cell's tensors and numbers only, or with keywords")
            return ("rows", self._binary(_BINARY[t], a, b))
        if t is _aten.rsub.Scalar:
            if kw or len(args) > 2:
                raise _Unsupported("rsub with alpha")
            return ("rows", self._binary(SUB, args[1], args[0]))
        if t in (_aten.add.Scalar, _aten.sub.Scalar, _aten.mul.Scalar, _aten.div.Scalar):
            op = {_aten.add.Scalar: ADD, _aten.sub.Scalar: SUB, _aten.mul.Scalar: MUL, _aten.div.Scalar: DIV}[t]
            if kw or len(args) > 2:
                raise _Unsupported(f"{t} with alpha")
            return ("rows", self._binary(op, args[0], args[1]))
        if t is _aten.lerp.Tensor:  # start + weight (end - start), the adjoint's ops for each
            start, end, weight = args
            width = self._width(start, end, weight)
            diff = self._binary(SUB, end, start)
            w, s = self._regs(weight, width), self._regs(start, width)
            out = []
            for k, d in enumerate(diff):
                p = self._emit(MULC, d, self._const(w)) if isinstance(w, float) else self._emit(MUL, d, w[k])
                out.append(self._emit(ADDC, p, self._const(s)) if isinstance(s, float) else self._emit(ADD, s[k], p))
            return ("rows", out)
        if t is _aten.reciprocal.default:
            regs = self._regs(args[0], self._width(args[0]))
            if isinstance(regs, float) or not regs:
                raise _Unsupported("a reciprocal of a number")
            return ("rows", [self._emit(DIVC, r, self._const(1.0)) for r in regs])
        if t is _aten.pow.Tensor_Scalar and args[1] == 2:
            regs = self._regs(args[0], self._width(args[0]))
            return ("rows", [self._emit(MUL, r, r) for r in regs])
        raise _Unsupported(f"its step uses {t}, which the traced backend does not run")


def _operands(op: int, a: Any, c: Any) -> tuple:
    """The registers an instruction reads (an instruction ending in C holds a constant's index in c)."""
    return (a,) if op in _SCALAR_OPS or c is None else (a, c)


def _adjoint(code: list, outs: list, seeds: list) -> tuple[list, dict]:
    """Reverse-mode code for ``code``: gradients of the registers it reads from seeds on ``outs``.

    Returns the instructions and each register's gradient register."""
    adj: dict[Any, Any] = {}
    out: list = []
    count = [0]

    def emit(op: int, a: Any, b: Any = None) -> tuple:
        count[0] += 1
        dst = ("adj", count[0])
        out.append((op, dst, a, b))
        return dst

    def acc(reg: Any, g: Any) -> None:
        adj[reg] = g if reg not in adj else emit(ADD, adj[reg], g)

    for reg, seed in zip(outs, seeds):
        acc(reg, seed)
    for op, d, a, b in reversed(code):
        if d not in adj:
            continue
        g = adj[d]
        if op == ADD:
            acc(a, g)
            acc(b, g)
        elif op == SUB:
            acc(a, g)
            acc(b, emit(NEG, g))
        elif op == MUL:
            acc(a, emit(MUL, g, b))
            acc(b, emit(MUL, g, a))
        elif op == DIV:
            q = emit(DIV, g, b)
            acc(a, q)
            acc(b, emit(NEG, emit(MUL, q, d)))
        elif op == NEG:
            acc(a, emit(NEG, g))
        elif op == SIGMOID:
            acc(a, emit(DSIGMOID, g, d))
        elif op == TANH:
            acc(a, emit(DTANH, g, d))
        elif op == RELU:
            acc(a, emit(MUL, g, emit(POSITIVE, a)))
        elif op == EXP:
            acc(a, emit(MUL, g, d))
        elif op in (ADDC, COPY):
            acc(a, g)
        elif op == MULC:
            acc(a, emit(MULC, g, b))
        elif op == RSUBC:
            acc(a, emit(NEG, g))
        elif op == DIVC:  # d = c / a: dd/da = -d / a
            acc(a, emit(NEG, emit(MUL, g, emit(DIV, d, a))))
        else:
            raise _Unsupported(f"no adjoint for instruction {op}")
    return out, adj


def _assemble(b: _Builder, outs: list, code: list) -> _Program:
    """Numbers the registers and lays out the programs and register maps the C++ loops take."""
    if not b.products:
        raise _Unsupported("its step has no product (nothing for the loop's GEMMs)")
    kr = b.kr if b.kr is not None else 0
    order = sorted(range(len(b.products)), key=lambda j: not b.products[j].recurrent)
    first = 0
    for j in order:
        b.products[j].first = first
        first += b.products[j].slots
    G = first
    Gs = sum(b.products[j].slots for j in order if b.products[j].recurrent)
    S, P = b.n_state, len(b.vectors)
    seeds = [("seed", k) for k in range(S)]
    adj_code, adj = _adjoint(code, outs, seeds)
    # the forward's values the adjoint reads: the forward keeps them for the backward (as the fused
    # LSTM keeps its activated gates), which costs less than computing them again
    reads = {r for op, _, a, c in adj_code for r in _operands(op, a, c)}
    saved = [d for _, d, _, _ in code if d in reads]
    keep_z = any(r[0] == "slot" for r in reads)  # the pre-activations themselves
    inputs = [*(("slot", j, k) for j in order for k in range(b.products[j].slots)),
              *(("state", k) for k in range(S)), *(("vec", i) for i in range(P))]
    grads = []
    for r in inputs:
        if r not in adj:
            adj[r] = ("zero",)
            if not adj_code or adj_code[0][1] != ("zero",):
                adj_code.insert(0, (ZERO, ("zero",), ("zero",), None))
        grads.append(adj[r])
    fwd_regs = _allocate(code, inputs, outs + saved)
    bwd_regs = _allocate(adj_code, inputs + seeds + saved, grads + seeds)
    nregs = max(max(fwd_regs.values()), max(bwd_regs.values())) + 1
    if nregs > _MAX_REGS:
        raise _Unsupported(f"its step needs {nregs} registers, more than the loop's {_MAX_REGS}")

    def encode(instrs: list, regs: dict) -> Tensor:
        rows = [(op, regs[d], regs[a], c if op in _SCALAR_OPS else -1 if c is None else regs[c])
                for op, d, a, c in instrs]
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)

    fwd, adj_t = encode(code, fwd_regs), encode(adj_code, bwd_regs)
    fwd_reads = {r for op, _, a, c in code for r in _operands(op, a, c)} | set(outs)  # a state passed through too
    state_reads = torch.tensor([[("state", k) in fwd_reads for k in range(S)],
                                [("state", k) in reads for k in range(S)]], dtype=torch.int32)
    out_regs = [fwd_regs[r] for r in outs + saved]
    io = [bwd_regs[r] for r in seeds + grads + saved]
    weights = _weights_graph(b)
    return _Program(weights, b.products, b.vectors, b.H, b.I, S, kr, G, Gs, nregs, len(saved), keep_z, state_reads,
                    fwd, adj_t,
                    torch.tensor(b.consts, dtype=torch.float64), torch.tensor(out_regs, dtype=torch.int32),
                    torch.tensor(io, dtype=torch.int32))


def _allocate(code: list, inputs: list, live_out: list) -> dict:
    """Physical registers for a straight-line program: inputs first, in order (the loop loads them),
    then each value in the lowest register free when it is made; a register is free again after its
    value's last read (an instruction may write the register of an operand it reads last: the loop
    reads each lane's operands before writing it). ``live_out`` values stay until the end."""
    last: dict = {}
    for i, (op, _, a, c) in enumerate(code):
        for r in _operands(op, a, c):
            last[r] = i
    for r in live_out:
        last[r] = len(code)
    regs = {r: i for i, r in enumerate(inputs)}
    free = [regs[r] for r in inputs if r not in last]
    heapq.heapify(free)
    top = len(inputs)
    for i, (op, d, a, c) in enumerate(code):
        for r in set(_operands(op, a, c)):
            if last.get(r) == i:
                heapq.heappush(free, regs[r])
        if free:
            regs[d] = heapq.heappop(free)
        else:
            regs[d], top = top, top + 1
        if d not in last:  # never read: its register is free again at once
            heapq.heappush(free, regs[d])
    return regs


def _weights_graph(b: _Builder) -> torch.fx.GraphModule:
    """The part of the trace computed from the cell's tensors alone, returning what the loop needs."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    places = [n for n in b.gm.graph.nodes if n.op == "placeholder"][:b.n_tensors]
    for p in places:
        env[p] = g.placeholder(p.name)
    needed: set[torch.fx.Node] = set()
    stack = list(b.weight_outputs)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack += n.all_input_nodes
    for n in b.gm.graph.nodes:
        if n in needed and n.op == "call_function":
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in b.weight_outputs))
    return torch.fx.GraphModule(b.gm, g)


# ---- Running a program ------------------------------------------------------------------------------


def _prepare(prog: _Program, vals: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """The loop's weights from the weights' graph's outputs: the input's (M, I) and the biases (M,)
    over all slots, the recurrent state's (Gs H, H), the parameter vectors (P, H)."""
    H, I = prog.H, prog.I
    ordered = sorted(prog.products, key=lambda p: p.first)
    wx, bias, ws = [], [], []
    any_x = any(kind == "x" for p in ordered for kind, _ in p.parts)
    any_bias = any(p.bias is not None for p in ordered)
    ref = vals[ordered[0].b]
    for p in ordered:
        B, M, at = vals[p.b], p.slots * H, 0
        x_part = s_part = None
        for kind, width in p.parts:
            if kind == "x":
                x_part = B[at:at + width]
            else:
                s_part = B[at:at + width]
            at += width
        if any_x:
            wx.append(x_part.t() if x_part is not None else ref.new_zeros(M, I))
        if s_part is not None:
            ws.append(s_part.t())
        if any_bias:
            bias.append(vals[p.bias].reshape(M) if p.bias is not None else ref.new_zeros(M))
    Wx = torch.cat(wx).contiguous() if any_x else None
    b = torch.cat(bias).contiguous() if any_bias else None
    Ws = torch.cat(ws).contiguous() if ws else ref.new_zeros(0, H)
    vecs = []
    for out, k in prog.vectors:
        v = vals[out]
        vecs.append(v.reshape(()).expand(H) if k < 0 else v.reshape(-1)[k * H:(k + 1) * H])
    pv = torch.stack(vecs) if vecs else ref.new_zeros(0, H)
    return Wx, b, Ws, pv


def _val_grads(prog: _Program, vals: tuple[Tensor, ...], dwx: Tensor, dws: Tensor, dpv: Tensor) -> list[Tensor | None]:
    """The gradients of the weights' graph's outputs from the loop's: dwx (I + 1, M) for the input
    weights and biases, dws (H, Gs H) for the recurrent weights, dpv (P, H) for the vectors (the
    transposes and slices of :func:`_prepare`, undone here instead of by autograd node by node); None
    for an output that feeds none of them."""
    H, I = prog.H, prog.I
    uses = Counter([p.b for p in prog.products] + [p.bias for p in prog.products if p.bias is not None]
                   + [out for out, _ in prog.vectors])
    grads: list[Tensor | None] = [None] * len(vals)

    def summed(i: int) -> Tensor:  # an output fed by several parts: their gradients added into zeros
        if grads[i] is None:
            grads[i] = torch.zeros_like(vals[i])
        return grads[i]

    # An output that only one product reads, all its rows (the usual nn.Linear over [x, s]), gets its
    # gradient in one piece: zeros, then an add per part, were a fifth of the backward's time outside
    # the C++ loop (T28 H128 B128, seed 000's cell).
    for p in prog.products:
        lo, hi = p.first * H, (p.first + p.slots) * H
        pieces = [dwx[:I, lo:hi] if kind == "x" else dws[:, lo:hi] for kind, _ in p.parts]
        if uses[p.b] == 1 and sum(width for _, width in p.parts) == vals[p.b].shape[0]:
            grads[p.b] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        else:
            g, at = summed(p.b), 0
            for (_, width), piece in zip(p.parts, pieces):
                g[at:at + width] += piece
                at += width
        if p.bias is not None:
            row = dwx[I, lo:hi].view(vals[p.bias].shape)
            if uses[p.bias] == 1:
                grads[p.bias] = row.clone()  # a view would keep all of dwx alive as the bias's .grad
            else:
                summed(p.bias).add_(row)
    for i, (out, k) in enumerate(prog.vectors):
        if k < 0:
            summed(out).add_(dpv[i].sum().view(vals[out].shape))
        else:
            summed(out).view(-1)[k * H:(k + 1) * H] += dpv[i]
    return grads


class _Loop(torch.autograd.Function):
    """All steps of a traced cell: the C++ loops forward and backward (products, program, gradients)."""

    @staticmethod
    def forward(ctx, prog: _Program, x: Tensor, masks: Tensor, full: int, s0_zero: bool,  # type: ignore[override]
                return_states: bool, n_vals: int, *rest: Tensor) -> tuple[Tensor, ...]:
        vals, s0 = rest[:n_vals], rest[n_vals:]
        Wx, b, Ws, pv = _prepare(prog, vals)
        T, N = x.shape[:2]
        H, M = prog.H, prog.G * prog.H
        # nothing kept for a backward that cannot come (evaluation, inference)
        keep = any(ctx.needs_input_grad)
        Z = x.new_empty((T, N, M) if prog.keep_z and keep else (0,))
        wx = Wx if Wx is not None else x.new_zeros(M, x.shape[2])
        bias = b if b is not None else x.new_zeros(M)
        S0 = torch.stack(s0) if len(s0) > 1 else s0[0].unsqueeze(0)
        S = x.new_empty(prog.n_state, T, N, H)
        Y = x.new_empty(T, N, prog.n_saved if keep else 0, H)
        outs = prog.outs if keep else prog.outs[:prog.n_state]
        cext.ops().cell_forward_steps(Z, S, Y, x, S0.contiguous(), wx, bias, Ws, pv, prog.code, prog.consts, outs,
                                      prog.Gs, prog.kr, prog.nregs, masks, full, s0_zero, flush_denormals_enabled(),
                                      prog.reads[0])
        ctx.prog, ctx.full, ctx.return_states, ctx.n_vals = prog, full, return_states, n_vals
        ctx.save_for_backward(x, Z, S, Y, S0, Wx, Ws, pv, masks, *vals)
        ctx.set_materialize_grads(False)
        finals = [S[k, T - 1].clone() for k in range(prog.n_state)]
        states = [S[k] for k in range(prog.n_state)] if return_states else []
        return (S[0], *finals, *states)

    @staticmethod
    def backward(ctx, g_out: Tensor | None, *g_rest: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("rnnkit: the traced backend has no second derivatives (create_graph=True); run "
                               "this cell with backend='reference' (or 'compiled') where you need them")
        prog = ctx.prog
        x, Z, S, Y, S0, Wx, Ws, pv, masks, *vals = ctx.saved_tensors
        T, N = x.shape[:2]
        H, M, Ms, n = prog.H, prog.G * prog.H, prog.Gs * prog.H, prog.n_state
        if all(g is None for g in g_rest[:n]):  # the loss reads no final state (the usual case)
            A = torch.zeros_like(S0)
        else:
            A = torch.stack([torch.zeros_like(S0[k]) if g is None else g for k, g in enumerate(g_rest[:n])])
        gs = None
        if ctx.return_states and any(g is not None for g in g_rest[n:]):
            gs = torch.stack([torch.zeros_like(S[k]) if g is None else g for k, g in enumerate(g_rest[n:])])
        if g_out is not None and g_out.stride(2) != 1:  # a broadcast (a .sum() loss's): the loop reads rows
            g_out = g_out.contiguous()
        I = x.shape[2]
        dx = x.new_empty(T, N, I) if Wx is not None and ctx.needs_input_grad[1] else None
        dpv = torch.empty_like(pv)
        dwx, dws = S.new_empty(I + 1, M), S.new_empty(H, Ms)
        cext.ops().cell_backward_steps(Z, S, Y, S0, A, g_out, gs, dpv, Ws, pv, prog.adjoint,
                                       prog.consts, prog.io, prog.Gs, prog.kr, prog.nregs, masks, ctx.full,
                                       flush_denormals_enabled(), x, dwx, dws, prog.reads[1], dx,
                                       Wx if dx is not None else None)
        wanted = any(ctx.needs_input_grad[7:7 + ctx.n_vals])
        grads = _val_grads(prog, vals, dwx, dws, dpv) if wanted else [None] * ctx.n_vals
        return (None, dx, None, None, None, None, None, *grads, *A.unbind(0))


def _key(cell: nn.Module, slots: compiled._Slots, x: Tensor, leaves: list[Tensor]) -> tuple:
    # the batch size is not part of it: a program's rows are independent by construction
    return (type(cell), compiled._attrs(cell), tuple(slots.index), x.shape[2], x.dtype,
            tuple((tuple(s.shape[1:]), s.dtype) for s in leaves),
            tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in slots.tensors))


def _trace(cell: nn.Module, slots: compiled._Slots, x_t: Tensor, leaves: list[Tensor],
           unflatten: Callable[[list[Tensor]], Any]) -> _Program:
    """Trace one step of ``cell`` and read it into a program; raises _Unsupported with the reason."""
    from torch.fx.experimental.proxy_tensor import make_fx

    if compiled._custom_output(cell):
        raise _Unsupported("it defines its own output()")
    H = leaves[0].shape[-1]
    if any(s.dim() != 2 or s.shape[1] != H for s in leaves):
        raise _Unsupported("its states are not all (N, H) of one H")
    step = compiled._step_fn(cell, slots, unflatten, False)
    args = [t.detach().clone() for t in slots.tensors] + [x_t.detach().clone()] + [s.detach().clone() for s in leaves]
    with torch.no_grad():
        gm, _ = compiled._trace_cell(cell, step, args, lambda: compiled._check_one_step(cell, slots, x_t, leaves,
                                                                                    unflatten), tracer=make_fx)
    b = _Builder(gm, len(slots.tensors), len(leaves), H, x_t.shape[1])
    outs, code = b.build()
    return _assemble(b, outs, code)


def _run_program(prog: _Program, tensors: list[Tensor], x: Tensor, leaves: list[Tensor], masks: Tensor | None,
                 lengths: Tensor | None, return_states: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Outputs (T, N, H), final leaves and (if asked) every step's leaves of the program over x (T, N, I)."""
    T, N = x.shape[:2]
    full = T if lengths is None else int(lengths.min())
    vals = prog.weights(*tensors)
    s0_zero = not bool(leaves[prog.kr].any())  # the usual zero state: no product at the first step
    flat = _Loop.apply(prog, x.contiguous(), _mask_rows(masks, T, N), full, s0_zero, return_states, len(vals), *vals,
                       *(s.contiguous() for s in leaves))
    n = prog.n_state
    return flat[0], list(flat[1:1 + n]), list(flat[1 + n:])


def _check(prog: _Program, cell: nn.Module, slots: compiled._Slots, x: Tensor, leaves: list[Tensor],
           unflatten: Callable[[list[Tensor]], Any]) -> None:
    """The program against the eager cell on the call's first rows and steps: values and gradients."""
    from rnnkit.engine import tree_flatten

    rows, steps = min(x.shape[1], 5), min(x.shape[0], 3)
    gen = torch.Generator().manual_seed(0)
    xs, s0 = x[:steps, :rows].detach().clone(), [s[:rows].detach().clone() for s in leaves]
    if not all(bool(t.isfinite().all()) for t in (xs, *s0)):  # a NaN in the call's data says nothing of the cell
        xs = torch.randn(xs.shape, generator=gen, dtype=xs.dtype)
        s0 = [torch.randn(s.shape, generator=gen, dtype=s.dtype) * 0.5 for s in s0]
    xs = xs.requires_grad_(True)
    s0 = [s.requires_grad_(True) for s in s0]
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in slots.tensors]
    wants = [xs, *s0, *(t for t in tensors if t.requires_grad)]
    with torch.enable_grad():
        with slots.holding(tensors):
            outs, final, _ = reference.run(cell, xs, unflatten(list(s0)), None, None, False)
        final = tree_flatten(final)[0]
        cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in (outs, *final)]
        expected = [outs, *final, *torch.autograd.grad([outs, *final], wants, cot, allow_unused=True)]
        got_outs, got_final, _ = _run_program(prog, tensors, xs, s0, None, None, False)
        got = [got_outs, *got_final, *torch.autograd.grad([got_outs, *got_final], wants, cot, allow_unused=True)]
    for e, g in zip(expected, got, strict=True):
        e = torch.zeros_like(g) if e is None and g is not None else e
        g = torch.zeros_like(e) if g is None and e is not None else g
        if e is not None and not compiled._close(e.detach(), g.detach()):
            raise _Unsupported("its traced program does not reproduce the eager step")


def _program(cell: nn.Module, slots: compiled._Slots, x: Tensor, leaves: list[Tensor],
             unflatten: Callable[[list[Tensor]], Any], quiet: bool) -> _Program | None:
    """The cached program for this cell and these shapes, built (and checked) if missing."""
    why = compiled._REFUSED.get(type(cell)) or compiled._untraceable(cell)
    key = None
    if not why:
        try:
            key = _key(cell, slots, x, leaves)
        except compiled._Unsupported as e:
            why = str(e)
    from rnnkit.engine import user_cell

    owner = user_cell(cell)
    if key is not None and key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        _TRACES.pop(owner, None)
        why = None if _PROGRAMS[key] is not None else _WHY.get(key, "an earlier trace failed")
    elif key is not None:
        count, last = _TRACES.get(owner, (0, None))
        _TRACES[owner] = (count + 1 if last != hash(key) else 1, hash(key))
        if quiet and _TRACES[owner][0] > compiled._REBUILDS:
            return None  # auto: tracing every call never pays
        prog = None
        try:
            with compiled._aside():
                prog = _trace(cell, slots, x[0], leaves, unflatten)
                _check(prog, cell, slots, x, leaves, unflatten)
        except (_Unsupported, compiled._Unsupported) as e:
            why, prog = str(e), None
            if "own attributes" in why:
                compiled._REFUSED[type(cell)] = why  # its key would change every call: never again
        except Exception as e:  # noqa: BLE001 - a step the tracer cannot follow: the other backends can
            from rnnkit.errors import ShapeError

            if isinstance(e, ShapeError):
                raise  # the cell's own mistake: the loop would raise it too
            why, prog = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", None
        _PROGRAMS[key] = prog
        if prog is None:
            _WHY[key] = why
        if len(_PROGRAMS) > _MAX_PROGRAMS:
            _WHY.pop(_PROGRAMS.popitem(last=False)[0], None)
    if why:
        compiled._warn(cell, why, quiet, "rnnkit: the traced backend cannot run {name} ({why}); it runs the "
                       "reference loop instead", _WARNED)
        return None
    return _PROGRAMS[key]


def clear_cache() -> None:
    """Forget every traced program (they are traced again on the next call)."""
    _PROGRAMS.clear()
    _WHY.clear()


def unsupported(cell: nn.Module, x: Tensor) -> str | None:
    """Why this backend cannot run ``cell`` on ``x`` whatever its step, or None when it may."""
    if x.device.type != "cpu":
        return "it runs on the CPU only"
    if x.dtype not in (torch.float32, torch.float64):
        return f"it needs float32 or float64 input, got {x.dtype}"
    why = cext.unavailable()
    return f"rnnkit's C++ kernels are unavailable here ({why})" if why else None


def worth_it(cell: nn.Module, x: Tensor, T: int) -> bool:
    """Whether ``backend="auto"`` should try this backend: where it would otherwise compile the cell
    (long sequences on the CPU, float32; ``RNNKIT_COMPILE=0`` turns both off), which it beats with
    nothing to compile."""
    return compiled._AUTO and T >= compiled.AUTO_MIN_STEPS and x.dtype == torch.float32 and unsupported(cell, x) is None


def run_quietly(*args: Any) -> tuple[Tensor, Any, Any]:
    """:func:`run` for ``backend="auto"`` (same arguments): no warning, and a cell it cannot read goes to
    the compiled backend where that pays, else to the reference loop."""
    return run(*args, quiet=True)


def run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool,
    quiet: bool = False,
) -> tuple[Tensor, Any, Any]:
    """Step the traced cell over x (T, N, I), or the fallback loop where no program can be made."""
    from rnnkit.engine import tree_flatten

    leaves, unflatten = tree_flatten(state)
    slots = compiled._Slots(cell)
    prog = None
    if not (_transforming() or torch.is_autocast_enabled("cpu") or not leaves
            or any(not s.is_floating_point() or s.dtype != x.dtype for s in leaves)
            or any(t.dtype != x.dtype for t in slots.tensors[:slots.n_params])):
        prog = _program(cell, slots, x, leaves, unflatten, quiet)
    if prog is None:
        fallback = compiled.run_quietly if quiet and compiled.worth_it(cell, x, x.shape[0]) else reference.run
        return fallback(cell, x, state, masks, lengths, return_states)
    outs, final, states = _run_program(prog, slots.tensors, x, leaves, masks, lengths, return_states)
    return outs, unflatten(final), unflatten(states) if return_states else None
