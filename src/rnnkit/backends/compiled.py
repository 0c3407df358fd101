"""The compiled backend: a user's cell traced once, its elementwise maths compiled, its GEMMs on oneDNN.

The reference loop runs a cell's Python every step, and autograd records and replays some 35 small
operations per step; that, not arithmetic, is where a hand-written cell loses to torch's LSTM. This
backend traces one step of the cell (forward and backward, through AOTAutograd, the tracer under
``torch.compile``), then rewrites the two graphs before anything runs:

* the products (``mm``/``addmm``) are cut out and run on oneDNN between the compiled pieces
  (:mod:`rnnkit.backends.gemm`: torch's BLAS path is 1.8-2x slower on AMD processors);
* everything between two products is compiled by TorchInductor into fused C++ kernels (a stretch
  of views and concatenations only runs as it is: a compiled call costs about 10 us);
* ``tanh`` becomes ``2 sigmoid(2x) - 1`` in float32, as in :mod:`rnnkit.backends.fastcpu`.

Summing the weight gradients of all steps in one large product after the loop (as the fused
backend does) was measured slower here: the per-step product runs at about the same rate, and
the concatenation of T factors costs more than the T additions it saves.

The time loop itself is one autograd Function: forward runs the compiled step T times saving what
backward needs, backward runs the compiled step's gradient T times in reverse. Variable lengths,
every-step states and reversal work as in the reference loop (the engine owns masking and reversal).

Safety. A trace captures one path through the cell's Python, so a plan is only used when:
* the cell has no module hooks, no plain tensor attributes (buffers are fine: they become inputs),
  no random operations (dropout), no data-dependent control flow (tracing with fake tensors fails
  on those), does not change its own attributes in forward, and its state is a tensor or a tuple
  of float tensors;
* the plan's key matches: shapes, dtypes, which inputs need gradients, how weights are tied, every
  submodule's ``training`` flag and its other attributes (numbers and strings by value; lists,
  dicts and config objects by content, at any depth; functions and anything else by identity,
  kept alive);
* when it was built, one step forward and backward on the call's own inputs agreed with the eager
  cell.
Otherwise, or when compiling fails (no C++ compiler, say), the call runs the reference loop, with
one warning per cell type. Tracing swaps the cell's tensors slot by slot and puts them back, leaves
the caller's random stream where it was, and undoes attribute rebindings of the traced call.
Each step's saved tensors go through ``save_for_backward``, so saved-tensor hooks (activation
checkpointing, offloading) see them and the backward frees them. Second derivatives
(``create_graph=True``) recompute the sequence through the reference loop. In-place edits of a
list or dict attribute inside forward cannot be undone or detected; such cells are not for tracing.

Calls without gradients (evaluation) use the training plan of the same shapes when there is one,
else (when this backend was asked for) a forward-only plan, which saves nothing for a backward.
Compiling a new shape costs a few seconds (Inductor also caches kernels on disk across processes).
A smaller batch than one with a plan (an epoch's last batch, say) runs on that plan with its rows
padded by copies of a real row, which costs the padded rows' arithmetic instead of a compile. This
is only done for cells whose rows were found independent when the plan was built (half the rows
stepped alone gave the values and gradients they give inside the whole batch) and again for each
smaller batch size on its first padded call (a cell may branch on its batch size), never under
saved-tensor hooks (activation checkpointing recomputes the forward and needs the same plan), and a
batch more than twice smaller gets its own plan once it keeps coming.
``backend="auto"`` picks this backend for cells that no built-in kernel runs on
:data:`AUTO_MIN_STEPS` steps or more on the CPU (and then falls back without a warning; also once a
cell whose attributes change from call to call has been compiled :data:`_REBUILDS` times);
``RNNKIT_COMPILE=0`` turns that off. Shorter sequences use it when asked:
``unroll(cell, x, backend="compiled")``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import operator
import os
import sys
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.backends import gemm, reference
from rnnkit.backends.reference import freeze
from rnnkit.cells import hooked, steps_split
from rnnkit.errors import RnnkitWarning, ShapeError
from rnnkit.fpmode import transforming as _transforming

__all__ = ["available", "unsupported", "worth_it", "run", "run_quietly", "clear_cache"]

_aten = torch.ops.aten
_MAX_PLANS = 256
_PLANS: OrderedDict[tuple, _Plan | None] = OrderedDict()
_WARNED: set[type] = set()
_WHY: dict[tuple, str] = {}  # why a key's build failed, for a later caller who asked for this backend
_REFUSED: dict[type, str] = {}  # cell types whose forward changes their own attributes: never traced
# Batch sizes with a training plan whose rows are computed independently, by key without the batch
# size: a smaller batch runs on such a plan with its rows padded (see _wider) instead of compiling.
_ROWS: dict[tuple, set[int]] = {}
_SEEN: OrderedDict[tuple, int] = OrderedDict()  # calls per key that ran padded on a plan over twice their size
# Builds in a row per cell and shapes (the count and the last key): more than _REBUILDS with no call
# between that found its plan means the cell's attributes change from call to call (an annealed
# temperature kept as a float, say), and every call would compile again. Per user's cell, not per
# type: a model may hold several differently configured cells of one type.
_BUILDS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[int, int]]] = weakref.WeakKeyDictionary()
_REBUILDS = 3
_PAD_CALLS = 3  # ... after which the batch size gets a plan of its own
_VIEWS = {_aten.t.default, _aten.transpose.int, _aten.permute.default, _aten.view.default,
          _aten.slice.Tensor, _aten.select.int, _aten.unsqueeze.default, _aten.squeeze.dim,
          _aten.expand.default, _aten.alias.default}
_CHEAP = _VIEWS | {_aten.cat.default, _aten.split.Tensor, _aten.split_with_sizes.default, _aten.unbind.int,
                   operator.getitem}


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether Inductor can compile here (it needs a C++ compiler); probed once per process."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = torch.fx.symbolic_trace(lambda a: torch.sigmoid(a) * a)
                example = [torch.randn(4, 4)]
                _AVAILABLE = bool(torch.allclose(torch._inductor.compile(gm, example)(*example),
                                                 torch.sigmoid(example[0]) * example[0]))
        except Exception:  # noqa: BLE001 - no compiler, no headers, a broken install: all mean "no"
            _AVAILABLE = False
    return _AVAILABLE


#: ``backend="auto"`` compiles a cell no built-in kernel runs on this many steps or more:
#: measured on a 2-core AMD EPYC, the seed-000 cell's T784 H128 B128 step took 482 ms compiled
#: against 786 ms in the reference loop, so a build of a few seconds pays for itself in about 15
#: steps; at T28 the gain (about 10 ms a step) takes hundreds of steps to repay it.
AUTO_MIN_STEPS = 256
_AUTO = os.environ.get("RNNKIT_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def worth_it(cell: nn.Module, x: Tensor, T: int) -> bool:
    """Whether ``backend="auto"`` should compile ``cell``: long sequences on the CPU, a compiler present."""
    return (_AUTO and T >= AUTO_MIN_STEPS and x.dtype == torch.float32 and unsupported(cell, x) is None
            and available())


def clear_cache() -> None:
    """Forget every traced and compiled step (they are rebuilt on the next call)."""
    _PLANS.clear()
    _WHY.clear()
    _ROWS.clear()
    _SEEN.clear()
    _BUILDS.clear()


def _custom_output(cell: nn.Module) -> bool:
    """Whether the cell's output is something other than its state's first field (as cell_output reads it)."""
    out = getattr(cell, "output", None)
    if out is None:
        return False
    from rnnkit.cells import Cell

    return getattr(out, "__func__", None) is not Cell.output


def unsupported(cell: nn.Module, x: Tensor) -> str | None:
    """Why this backend cannot run ``cell`` on ``x``, or None when it can."""
    if x.device.type != "cpu":
        return "it runs on the CPU only"
    if x.dtype not in (torch.float32, torch.float64):
        return f"it needs float32 or float64 input, got {x.dtype}"
    return None


_LINEAR = torch.ops.mkldnn._linear_pointwise if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None
_GEMMS = {_aten.mm.default, _aten.addmm.default}
if _LINEAR is not None:
    _GEMMS |= {_LINEAR.default, _LINEAR.binary}


def _layout(n: Any) -> str | None:
    """'c' for a contiguous matrix node, 't' for the transpose of one, None otherwise or unknown."""
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    if not isinstance(v, Tensor) or v.dim() != 2 or v.dtype != torch.float32 or min(v.shape) < 2:
        return None
    if v.is_contiguous():
        return "c"
    return "t" if v.t().is_contiguous() else None


def _lower_gemms(gm: torch.fx.GraphModule) -> None:
    """Point each float32 product at oneDNN's inner product (``a @ w.T``), choosing layouts once.

    Shapes and strides are fixed per plan, so the checks that :mod:`rnnkit.backends.gemm` makes on
    every call are made here once, from the trace's metadata; what does not fit stays ``aten``.
    """
    if _LINEAR is None or not gemm.onednn_available():
        return
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in (_aten.mm.default, _aten.addmm.default) or n.kwargs:
            continue
        c, a, b = (None, *n.args) if n.target is _aten.mm.default else n.args
        la, lb = _layout(a), _layout(b)
        with g.inserting_before(n):
            if la == "c" and lb in ("c", "t") and (c is None or _layout(c) == "c" or _is_bias(c, n)):
                w = b.args[0] if b.target is _aten.t.default else g.call_function(_aten.t.default, (b,))
                if c is None:
                    new = g.call_function(_LINEAR.default, (a, w, None, "none", [], ""))
                elif _is_bias(c, n):
                    new = g.call_function(_LINEAR.default, (a, w, c, "none", [], ""))
                else:
                    new = g.call_function(_LINEAR.binary, (a, c, w, None, "add"))
            elif c is None and la == "t" and lb == "c":
                # a weight gradient dG^T @ X: oneDNN is fastest at it as (X^T @ dG)^T (measured 77-125
                # us against 173-215 us at (512 x 128) @ (128 x 156), AMD EPYC Zen 5, 2 cores)
                bt = g.call_function(_aten.t.default, (b,))
                product = g.call_function(_LINEAR.default, (bt, a, None, "none", [], ""))
                new = g.call_function(_aten.t.default, (product,))
            else:
                continue
        n.replace_all_uses_with(new)
        g.erase_node(n)
    g.eliminate_dead_code()
    gm.recompile()


def _is_bias(c: Any, n: torch.fx.Node) -> bool:
    """Whether addmm's ``c`` is a bias vector as long as the product's rows."""
    v = c.meta.get("val") if isinstance(c, torch.fx.Node) else None
    out = n.meta.get("val")
    return isinstance(v, Tensor) and isinstance(out, Tensor) and v.dim() == 1 and v.is_contiguous() \
        and v.shape[0] == out.shape[1] and v.dtype == torch.float32





class _Plan:
    """One cell's compiled step for one set of shapes: forward and backward."""

    def __init__(self, fw: Callable, bw: Callable | None, n_inputs: int, n_state: int, own_output: bool,
                 prologue: Callable | None, fixed: list[int]) -> None:
        self.fw, self.bw = fw, bw
        self.rows_apart = False  # whether each batch row's step depends on that row alone (see _rows_apart)
        self.rows_key: tuple | None = None  # (key without the batch size, batch size) once smaller batches may use it
        self.output_only: list[int] = []  # tensors only the output's cotangent reaches (see _output_only)
        self.pads: dict[int, bool] = {}  # smaller batch sizes checked to run padded on this plan (see _pads_alike)
        self.n_inputs, self.n_state, self.own_output = n_inputs, n_state, own_output
        self.n_out = n_state + own_output  # what a step returns: the new state, then cell.output() if any
        self.prologue, self.fixed = prologue, fixed  # the backward's once-per-sequence part, and its inputs

    def invariants(self, saved: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """What the backward computes from the parameters alone, from one step's saved tensors."""
        return tuple(self.prologue(*(saved[k] for k in self.fixed)))


class _Same:
    """A key part that compares by identity and keeps its object alive (so its id cannot be reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


_PLAIN = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)
_INTERNALS = frozenset(vars(nn.Module())) | {"training"}  # nn.Module's own bookkeeping, not the cell's


def _own(m: nn.Module) -> dict[str, Any]:
    """A module's own attributes: everything in its ``__dict__`` but nn.Module's bookkeeping."""
    return {k: v for k, v in vars(m).items() if k not in _INTERNALS}


_DEEPEST = 64  # levels of nested attributes a key summarises; deeper structures are refused
_WALKED = 2000  # containers and objects one key summarises by content; more are refused
# Handles to shared machinery, reachable from far too much to summarise (a logger reaches every
# logger): by identity, as a trace cannot have read a value out of them anyway.
_OPAQUE = (logging.Logger, logging.LoggerAdapter, logging.Handler, threading.Thread, io.IOBase)


def _fingerprint(v: Any, seen: dict[int, Any], inside: tuple[int, ...] = ()) -> Any:
    """A hashable summary of ``v`` that changes when ``v`` would change what a trace bakes in.
    ``seen``: the summaries made so far for this key, by id (an object shared by many attributes is
    walked once); ``inside``: the ids of the containers being summarised (a reference back is a cycle)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (Tensor, nn.Module)):
        return type(v)  # parameters, buffers and submodules are walked separately; see _untraceable
    if id(v) in inside:
        return ("<cycle>", inside.index(id(v)))  # its content is already in the summary, further out
    if id(v) in seen:
        return seen[id(v)]
    config = hasattr(v, "__dict__") and not isinstance(v, (type, types.FunctionType, types.MethodType,
                                                          types.BuiltinFunctionType, types.ModuleType, *_OPAQUE))
    if not (config or isinstance(v, (list, tuple, set, frozenset, dict, functools.partial))):
        return _Same(v)  # functions, classes, modules, handles, anything else: by identity
    deeper = (*inside, id(v))
    if len(deeper) > _DEEPEST:
        raise _Unsupported(f"its attributes nest more than {_DEEPEST} levels deep, too deep to key a plan by")
    if isinstance(v, (list, tuple)) and all(isinstance(e, _PLAIN) for e in v):
        return (type(v), tuple(v))  # a row of plain values (a table's entry): its content, not counted
    if len(seen) >= _WALKED:  # by identity, a change inside would go unseen: no plan rather than a stale one
        raise _Unsupported(f"its attributes hold more than {_WALKED} containers and objects, too many to key a "
                           "plan by; keep large structures off the cell (or in a buffer)")
    seen[id(v)] = _Same(v)  # a placeholder while v's own summary is made
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        summary: Any = (type(v), tuple(_fingerprint(e, seen, deeper) for e in items))
    elif isinstance(v, dict):
        summary = (dict, tuple((_fingerprint(k, seen, deeper), _fingerprint(e, seen, deeper)) for k, e in v.items()))
    elif isinstance(v, functools.partial):
        summary = (functools.partial, _Same(v.func), _fingerprint(v.args, seen, deeper),
                   _fingerprint(v.keywords, seen, deeper))
    else:
        summary = (_Same(type(v)), _fingerprint(vars(v), seen, deeper))  # a config object, say, at any depth
    seen[id(v)] = summary
    return summary


def _class_values(kind: type) -> tuple:
    """The plain values a cell's classes define (``scale = 2.0`` in a class body), up to nn.Module."""
    return tuple((k, v) for klass in kind.__mro__ if klass not in (nn.Module, object)
                 for k, v in vars(klass).items() if isinstance(v, _PLAIN) and not k.startswith("__"))


def _attrs(cell: nn.Module) -> tuple:
    """What a trace may have baked in: each submodule's type, training flag and other attributes."""
    seen: dict[int, Any] = {}
    return tuple((name, type(m), m.training, _class_values(type(m)),
                  tuple((k, _fingerprint(v, seen)) for k, v in _own(m).items()))
                 for name, m in cell.named_modules())


def _untraceable(cell: nn.Module) -> str | None:
    """Why a trace of ``cell`` would not stand for it, by inspection, or None."""
    from torch.nn.modules import module as torch_module
    from torch.nn.utils import parametrize

    if getattr(parametrize, "_cache_enabled", 0):
        return "parametrize.cached() is active (a trace would fill its cache with traced tensors)"
    if any(getattr(torch_module, g, None) for g in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return "global module hooks are registered (a trace runs them once, not every step)"
    for name, m in cell.named_modules():
        if hooked(m):
            return f"module {name or type(m).__name__!r} has hooks (a trace runs them once, not every step)"
        for k, v in _own(m).items():
            if isinstance(v, Tensor):
                return (f"{type(m).__name__}.{k} is a plain tensor attribute; register it with "
                        f"register_buffer('{k}', ...) so it becomes an input of the trace")
            inside = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
            if any(isinstance(e, Tensor) for e in inside):
                return (f"{type(m).__name__}.{k} holds tensors in a {type(v).__name__}; make them buffers or "
                        "parameters (register_buffer, nn.ParameterList) so they become inputs of the trace")
    return None


class _Slots:
    """Where a cell keeps its tensors: every (module, dict, name) slot, and the distinct tensors in them.

    A module shared under two names is one slot; a Parameter shared by two modules is two slots
    holding one tensor. Swapping per slot (not per dotted name) leaves tied weights tied.
    """

    def __init__(self, cell: nn.Module) -> None:
        self.slots: list[tuple[dict, str]] = []
        self.index: list[int] = []  # slot -> distinct tensor
        self.tensors: list[Tensor] = []
        self.n_params = 0
        seen: dict[int, int] = {}
        for kind in ("_parameters", "_buffers"):
            for m in cell.modules():
                for name, t in getattr(m, kind).items():
                    if t is None:
                        continue
                    if id(t) not in seen:
                        seen[id(t)] = len(self.tensors)
                        self.tensors.append(t)
                    self.slots.append((getattr(m, kind), name))
                    self.index.append(seen[id(t)])
            if kind == "_parameters":
                self.n_params = len(self.tensors)

    @contextlib.contextmanager
    def holding(self, values: list[Tensor] | tuple[Tensor, ...]) -> Any:
        """The cell with ``values`` (one per distinct tensor) in its slots; the originals put back after."""
        saved = [(d, name, d[name]) for d, name in self.slots]
        try:
            for (d, name), i in zip(self.slots, self.index):
                d[name] = values[i]
            yield
        finally:
            for d, name, original in saved:
                d[name] = original


def _key(cell: nn.Module, slots: _Slots, x: Tensor, leaves: list[Tensor]) -> tuple:
    # no id(cell): cells of one type, configuration and tensor layout trace to the same step (the
    # tensors are inputs), so the directions and layers of a stack, and wrappers made per call, share it
    return (_attrs(cell), tuple(slots.index), tuple(x.shape[1:]), x.dtype, x.requires_grad,
            tuple((tuple(s.shape), s.dtype) for s in leaves),
            tuple((tuple(t.shape), t.stride(), t.dtype, t.requires_grad) for t in slots.tensors),
            torch.get_num_threads(), gemm.onednn_available())


_X_SHAPE, _LEAF_SHAPES = 2, 5  # where a key holds the batch size: x's (N, ...) and each leaf's (N, ...)


def _resized(key: tuple, rows: int) -> tuple:
    """``key`` as the same call would have it with a batch of ``rows`` (every leaf's first axis is the
    batch): derived from the key, so the cell's modules are not walked again."""
    x_shape, leaf_shapes = key[_X_SHAPE], key[_LEAF_SHAPES]
    return (*key[:_X_SHAPE], (rows, *x_shape[1:]), *key[_X_SHAPE + 1:_LEAF_SHAPES],
            tuple(((rows, *shape[1:]), dtype) for shape, dtype in leaf_shapes), *key[_LEAF_SHAPES + 1:])


def _strip_detach(gm: torch.fx.GraphModule) -> None:
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is _aten.detach.default:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)


def _fast_tanh(gm: torch.fx.GraphModule) -> None:
    """``tanh(x)`` as ``2 sigmoid(2x) - 1`` in float32: vectorised exp beats Sleef's tanh (see fastcpu)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is _aten.tanh.default and n.meta.get("val") is not None \
                and n.meta["val"].dtype == torch.float32:
            with gm.graph.inserting_before(n):
                two_x = gm.graph.call_function(_aten.mul.Tensor, (n.args[0], 2.0))
                sig = gm.graph.call_function(_aten.sigmoid.default, (two_x,))
                twice = gm.graph.call_function(_aten.mul.Tensor, (sig, 2.0))
                y = gm.graph.call_function(_aten.sub.Tensor, (twice, 1.0))
            n.replace_all_uses_with(y)
            gm.graph.erase_node(n)
    gm.recompile()


def _invariant(gm: torch.fx.GraphModule, fixed: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes computed from ``fixed`` placeholders (and constants) only: the same at every step."""
    out: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n in fixed:
                out.add(n)
        elif n.op in ("call_function", "get_attr") and all(a in out for a in n.all_input_nodes) \
                and torch.Tag.nondeterministic_seeded not in getattr(n.target, "tags", ()):
            out.add(n)
    return out


def _narrow_sliced_products(gm: torch.fx.GraphModule, inv: set[torch.fx.Node]) -> None:
    """``linear(a, w)[:, s:e]`` with a step-invariant ``w`` as ``linear(a, w[s:e])`` (or ``mm(a, b)[:, s:e]``
    as ``mm(a, b[:, s:e])``): a smaller product.

    A cell that maps ``cat([x, state])`` gets the state's gradient this way: the backward would
    compute the gradient of x too, then drop it. The contiguous copy of ``w[s:e]`` is invariant, so
    it is made once per sequence (see :func:`_hoist_invariants`).
    """
    g = gm.graph
    for n in list(g.nodes):
        if not (n.op == "call_function" and n.target is _aten.slice.Tensor and len(n.args) >= 4
                and n.args[1] == 1 and (len(n.args) < 5 or n.args[4] == 1)):
            continue
        lin = n.args[0]
        if not (isinstance(lin, torch.fx.Node) and len(lin.users) == 1 and len(lin.args) > 1 and lin.args[1] in inv):
            continue
        # oneDNN's a @ w.T narrows w's rows; BLAS's a @ b (where oneDNN is not used) narrows b's columns
        if lin.target is getattr(_LINEAR, "default", None) and lin.args[2] is None:
            dim, op, rest = 0, _LINEAR.default, (None, *lin.args[3:])
        elif lin.target is _aten.mm.default:
            dim, op, rest = 1, _aten.mm.default, ()
        else:
            continue
        with g.inserting_before(n):
            rows = g.call_function(_aten.slice.Tensor, (lin.args[1], dim, n.args[2], n.args[3]))
            w = g.call_function(_aten.clone.default, (rows,), {"memory_format": torch.contiguous_format})
            new = g.call_function(op, (lin.args[0], w, *rest))
        inv.update((rows, w))
        n.replace_all_uses_with(new)
        g.erase_node(n)
        g.erase_node(lin)
    gm.recompile()


def _hoist_invariants(gm: torch.fx.GraphModule, inv: set[torch.fx.Node]) -> tuple[torch.fx.GraphModule, list[int]]:
    """Move the step-invariant computations of ``gm`` into a prologue run once per sequence.

    Returns the prologue (inputs: the invariant placeholders, in order; outputs: what the step needs)
    and the indices of those placeholders; ``gm`` then takes the prologue's outputs as extra inputs.
    """
    g = gm.graph
    places = _placeholders(gm)
    frontier = [n for n in g.nodes if n in inv and n.op != "placeholder"
                and any(u not in inv for u in n.users)]
    pro = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    used = [i for i, p in enumerate(places) if p in inv]
    for i in used:
        env[places[i]] = pro.placeholder(places[i].name)
    for n in g.nodes:
        if n in inv and n.op != "placeholder":
            env[n] = pro.node_copy(n, lambda a: env[a])
    pro.output(tuple(env[n] for n in frontier))
    with g.inserting_after(places[-1]):
        for k, n in enumerate(reversed(frontier)):
            ph = g.placeholder(f"invariant_{len(frontier) - 1 - k}")
            ph.meta = dict(n.meta)
            n.replace_all_uses_with(ph)
    g.eliminate_dead_code()
    gm.recompile()
    return torch.fx.GraphModule(gm, pro), used


def _cancel_transposes(gm: torch.fx.GraphModule) -> None:
    """``t(t(a))`` is ``a`` (the rewrites above leave such pairs; each costs a dispatch per step)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is _aten.t.default:
            inner = n.args[0]
            if isinstance(inner, torch.fx.Node) and inner.target is _aten.t.default:
                n.replace_all_uses_with(inner.args[0])
                gm.graph.erase_node(n)
                if not inner.users:
                    gm.graph.erase_node(inner)
    gm.recompile()


def _split(gm: torch.fx.GraphModule, example: list[Tensor]) -> Callable:
    """Compile the stretches between products with Inductor; run the products on oneDNN."""
    from torch.fx.passes.split_module import split_module

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    # Stages: even ones compiled, odd ones products. Each node goes to the earliest stage its inputs
    # allow, so work that does not wait for a product (a bias gradient, say) joins the stretch before
    # it instead of opening another compiled call after it.
    part: dict[torch.fx.Node, int] = {}
    for n in nodes:
        is_gemm = n.target in _GEMMS
        stage = max((part[i] + (1 if i.target in _GEMMS and not is_gemm else 0)
                     for i in n.all_input_nodes if i in part), default=0)
        part[n] = stage + 1 if (stage % 2 == 1) != is_gemm else stage
    gemm_parts = {part[n] for n in nodes if n.target in _GEMMS}
    for n in reversed(nodes):  # views feeding only products move to them (no copy for Inductor to make)
        users = {part[u] for u in n.users if u in part}
        if n.target in _VIEWS and len(users) == 1 and len(n.users) == len([u for u in n.users if u in part]):
            p = users.pop()
            if p in gemm_parts and p >= part[n]:
                part[n] = p
    # split_module keeps the graph's order: make it the stages' (stable, so still topological)
    order = {n: i for i, n in enumerate(nodes)}
    anchor = _placeholders(gm)[-1]
    for n in sorted(nodes, key=lambda n: (part[n], order[n])):
        anchor.append(n)
        anchor = n
    gm.recompile()
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    examples: dict[str, list[Tensor]] = {}

    class _Recorder(torch.fx.Interpreter):
        def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
            examples[target] = list(args)
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        _Recorder(split).run(*example)
    # One flat graph: eager stretches inlined, compiled ones called as functions (a submodule call
    # through nn.Module.__call__ costs microseconds each, every step).
    graph = split.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        sub = getattr(split, node.target)
        idx = int(node.target.rsplit("_", 1)[1])
        if idx not in gemm_parts and any(n.op == "call_function" and n.target not in _CHEAP
                                         for n in sub.graph.nodes):
            fn = _named(torch._inductor.compile(sub, examples[node.target]))
            with graph.inserting_before(node):
                call = graph.call_function(fn, node.args)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            continue
        env = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args))
        with graph.inserting_before(node):
            result = graph.graph_copy(sub.graph, env)
        if isinstance(result, (tuple, list)):
            for user in list(node.users):  # split_module unpacks tuples with getitem
                user.replace_all_uses_with(result[user.args[1]])
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(result)
        graph.erase_node(node)
    for name, _ in list(split.named_children()):
        delattr(split, name)
    graph.lint()
    split.recompile()
    return split


def _named(fn: Callable) -> Callable:
    """``fn`` under a name of this module: FX would emit an import for a function from ``torch``."""

    def compiled_stretch(*args: Tensor) -> Any:
        return fn(*args)

    return compiled_stretch


def _step_fn(cell: nn.Module, slots: _Slots, unflatten: Callable[[list[Tensor]], Any], own_output: bool
             ) -> Callable[..., tuple[Tensor, ...]]:
    """One step as a function of (the cell's tensors, x_t, the state's leaves): new leaves (+ output)."""
    from rnnkit.engine import tree_flatten

    n = len(slots.tensors)
    # the split step where the cell has one, as the reference loop steps it: a built-in cell's
    # forward also checks the state against zeros it makes, which a trace would take for the step's
    split = steps_split(cell)

    def step(*a: Tensor) -> tuple[Tensor, ...]:
        with slots.holding(a[:n]):
            state = unflatten(list(a[n + 1:]))
            new = tree_flatten(cell.step(cell.project_input(a[n]), state) if split else cell(a[n], state))[0]
            out = [cell.output(unflatten(list(new)))] if own_output else []
        # a field passed through unchanged, or returned twice, or an output that is a view of the
        # state: copies (which Inductor fuses away) keep each output a tensor of its own
        seen: set[int] = {id(t) for t in a}
        fresh = []
        for t in [*new, *out]:
            fresh.append(t.clone() if id(t) in seen or t._is_view() else t)
            seen.add(id(t))
        return tuple(fresh)

    return step


def _trace(step: Callable, args: list[Tensor]) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule | None]:
    """AOTAutograd's forward and backward graphs of one step, traced on fake tensors (no backward
    when no argument needs a gradient: then the forward is AOTAutograd's inference graph)."""
    from functorch.compile import aot_function, min_cut_rematerialization_partition

    graphs: dict[str, torch.fx.GraphModule] = {}

    def capture(kind: str) -> Callable:
        def compiler(gm: torch.fx.GraphModule, example: Any) -> torch.fx.GraphModule:
            graphs[kind] = gm
            return gm
        return compiler

    traced = aot_function(step, fw_compiler=capture("fw"), bw_compiler=capture("bw"),
                          partition_fn=min_cut_rematerialization_partition)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AOTAutograd warns that our "compiler" returns a graph, not code
        outs = traced(*args)
        if any(a.requires_grad for a in args):
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return graphs["fw"], graphs.get("bw")


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _outputs(gm: torch.fx.GraphModule) -> list[Any]:
    return list(next(n for n in gm.graph.nodes if n.op == "output").args[0])


def _fresh_args(slots: _Slots, x_t: Tensor, leaves: list[Tensor], training: bool = True) -> list[Tensor]:
    """Detached copies of one step's inputs, needing gradients where the call's do (the state always)
    when ``training``, nowhere otherwise."""
    # copies, not views: AOTAutograd runs the traced step once on these, in-place updates included
    args = [t.detach().clone().requires_grad_(training and t.requires_grad) for t in slots.tensors]
    args.append(x_t.detach().clone().requires_grad_(training and x_t.requires_grad))
    args += [s.detach().clone().requires_grad_(training) for s in leaves]  # distinct tensors: no deduplication
    return args


def _trace_cell(cell: nn.Module, step: Callable, args: list[Tensor], check: Callable[[], None],
                tracer: Callable | None = None) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule | None]:
    """``check()`` and :func:`_trace` (or ``tracer(step)(*args)``, a forward graph only), refusing cells
    whose forward changes their own attributes (after undoing that) or draws random numbers."""
    before = _attrs(cell)
    snapshot = [(m, _own(m)) for m in cell.modules()]
    failure: Exception | None = None
    try:
        check()
        fw, bw = (tracer(step)(*args), None) if tracer is not None else _trace(step, args)
    except Exception as e:  # noqa: BLE001 - reported below, after the cell is put back
        failure = e
    if _attrs(cell) != before:
        changed = sorted({k for m, old in snapshot for k, v in _own(m).items() if k not in old or old[k] is not v})
        for m, old in snapshot:  # undo what the trace's call did (rebinding only, not in-place edits)
            for k in set(_own(m)) - set(old):
                del vars(m)[k]
            vars(m).update(old)
        raise _Unsupported(f"its forward changes the cell's own attributes ({', '.join(changed) or 'in place'}), "
                           "which a trace cannot repeat every step")
    if failure is not None:
        raise failure
    seeded = [n for g in (fw, bw) if g is not None for n in g.graph.nodes
              if n.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]
    if seeded:
        raise _Unsupported(f"the cell draws random numbers ({seeded[0].target}), which a trace would fix")
    return fw, bw


def _check_one_step(cell: nn.Module, slots: _Slots, x_t: Tensor, leaves: list[Tensor],
                    unflatten: Callable[[list[Tensor]], Any]) -> None:
    """One eager step must return a state like the one it took (a trace would bake in the wrong shapes);
    on copies of the cell's tensors, so in-place updates of its buffers do not count."""
    from rnnkit.engine import check_step_state

    state = unflatten([s.detach().clone() for s in leaves])
    with torch.no_grad(), slots.holding([t.detach().clone() for t in slots.tensors]):
        check_step_state(cell, state, cell(x_t.detach().clone(), state))


def _build_inference(cell: nn.Module, slots: _Slots, x_t: Tensor, leaves: list[Tensor],
                     unflatten: Callable[[list[Tensor]], Any]) -> _Plan:
    """A forward-only plan (no saved tensors), for calls without gradients where no training plan fits."""
    n_in, n_s = len(slots.tensors), len(leaves)
    own_output = _custom_output(cell)
    step = _step_fn(cell, slots, unflatten, own_output)
    args = _fresh_args(slots, x_t, leaves, training=False)
    fw, _ = _trace_cell(cell, step, args, lambda: _check_one_step(cell, slots, x_t, leaves, unflatten))
    if len(_placeholders(fw)) != n_in + 1 + n_s or len(_outputs(fw)) != n_s + own_output:
        raise _Unsupported(_ODD_SIGNATURE)
    _strip_detach(fw)
    _lower_gemms(fw)
    _fast_tanh(fw)
    _cancel_transposes(fw)
    plan = _Plan(_split(fw, args), None, n_in, n_s, own_output, None, [])
    with torch.no_grad():
        expected, got = step(*args), plan.fw(*args)
    if not all(_close(e, g) for e, g in zip(expected, got, strict=True)):
        raise _Unsupported("its compiled step does not reproduce the eager step")
    return plan


def _build(cell: nn.Module, slots: _Slots, x_t: Tensor, leaves: list[Tensor],
           unflatten: Callable[[list[Tensor]], Any]) -> _Plan:
    """Trace, rewrite, compile and check one step; raises when the cell is not one this backend can take."""
    n_in, n_s = len(slots.tensors), len(leaves)
    own_output = _custom_output(cell)
    n_out = n_s + own_output
    step = _step_fn(cell, slots, unflatten, own_output)
    fw, bw = _trace_cell(cell, step, _fresh_args(slots, x_t, leaves),
                         lambda: _check_one_step(cell, slots, x_t, leaves, unflatten))
    if bw is None:
        raise _Unsupported("its trace has no backward")
    n_saved = len(_outputs(fw)) - n_out
    tangents = [n for n in _placeholders(bw) if n.name.startswith("tangents")]
    if (len(_placeholders(fw)) != n_in + 1 + n_s or len(tangents) != n_out
            or len(_placeholders(bw)) != n_saved + n_out or len(_outputs(bw)) != n_in + 1 + n_s):
        raise _Unsupported(_ODD_SIGNATURE)
    for g in (fw, bw):
        _strip_detach(g)
        g.recompile()
    for g in (fw, bw):
        _lower_gemms(g)  # before the tanh rewrite: it reads the trace's metadata
        _fast_tanh(g)
    # what the forward saves from the parameters alone (their transposes, say) is the same every step
    fw_places, fw_outs = _placeholders(fw), _outputs(fw)
    fw_inv = _invariant(fw, set(fw_places[:n_in]))
    bw_places = _placeholders(bw)
    bw_inv = _invariant(bw, {bw_places[k] for k in range(n_saved) if fw_outs[n_out + k] in fw_inv})
    _narrow_sliced_products(bw, bw_inv)
    _cancel_transposes(fw)
    _cancel_transposes(bw)
    prologue, fixed = _hoist_invariants(bw, bw_inv)
    fw_in = [t.detach() for t in slots.tensors] + [x_t.detach(), *(s.detach() for s in leaves)]
    with torch.no_grad():
        fw_out = fw(*fw_in)
        invariants = prologue(*(fw_out[n_out + k] for k in fixed))
    gen = torch.Generator().manual_seed(0)
    cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in fw_out[:n_out]]
    bw_in = [*fw_out[n_out:], *cot, *invariants]
    plan = _Plan(_split(fw, fw_in), _split(bw, bw_in), n_in, n_s, own_output, prologue, fixed)
    if own_output:
        plan.output_only = _output_only(bw, n_in)
    _check(plan, step, slots, x_t, leaves, cot)
    plan.rows_apart = _rows_apart(step, slots, x_t, leaves)
    return plan


def _output_only(bw: torch.fx.GraphModule, n_in: int) -> list[int]:
    """The cell's tensors whose gradient comes from the output's cotangent alone (a readout layer in
    ``output()``): when the loss reads no output, autograd gives them no gradient, not zeros."""
    tangents = [n for n in _placeholders(bw) if n.name.startswith("tangents")]
    reach: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for n in bw.graph.nodes:
        reach[n] = {n} if n in tangents else set().union(*(reach[a] for a in n.all_input_nodes))
    outs = _outputs(bw)[:n_in]
    return [i for i, o in enumerate(outs) if isinstance(o, torch.fx.Node) and reach[o] == {tangents[-1]}]


def _rows_apart(step: Callable, slots: _Slots, x_t: Tensor, leaves: list[Tensor], k: int | None = None) -> bool:
    """Whether each batch row of the eager step depends on that row alone, values and gradients: the
    first ``k`` rows (default half), stepped on their own (another batch size), must give what they
    give inside the whole batch, and so must a gradient that is zero on the other rows (for x, the
    state and the cell's tensors). Cells that normalise over the batch, read its size, or mix rows
    only in their backward fail this, and their smaller batches get plans of their own."""
    n = x_t.shape[0]
    if n < 2 or not all(s.dim() and s.shape[0] == n for s in leaves):
        return False
    k, m = n // 2 if k is None else k, len(slots.tensors)
    whole = _fresh_args(slots, x_t, leaves)
    whole[m].requires_grad_()
    half = whole[:m] + [a.detach()[:k].clone().requires_grad_() for a in whole[m:]]
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.enable_grad():
            got_whole, got_half = step(*whole), step(*half)
            if not all(a.dim() and a.shape[0] == n and b.shape[0] == k for a, b in zip(got_whole, got_half)):
                return False
            cot = [torch.randn(b.shape, generator=gen, dtype=b.dtype) for b in got_half]
            wide = [torch.cat([c, c.new_zeros((n - k, *c.shape[1:]))]) for c in cot]
            wants = [j for j, a in enumerate(whole) if a.requires_grad]  # the same in both halves
            g_whole = torch.autograd.grad(got_whole, [whole[j] for j in wants], wide, allow_unused=True)
            g_half = torch.autograd.grad(got_half, [half[j] for j in wants], cot, allow_unused=True)
    except Exception:  # noqa: BLE001 - a cell that cannot step another batch size (a per-batch buffer, say)
        return False
    pairs = [(a[:k], b) for a, b in zip(got_whole, got_half)]
    for j, a, b in zip(wants, g_whole, g_half):
        if a is not None and b is not None and j >= m:  # x and the state: per row
            if bool(a[k:].abs().max() > 0):
                return False
            a = a[:k]
        pairs.append((a, b))
    return all((a is None and (b is None or not b.any())) or (b is None and not a.any())
               or (a is not None and b is not None and _close(a.detach(), b.detach()))
               for a, b in pairs)


_ODD_SIGNATURE = "its traced step has an unexpected signature (an input modified in place?)"


class _Unsupported(Exception):
    """The cell is one the compiled backend does not take (the reason is the message)."""


def _check(plan: _Plan, step: Callable, slots: _Slots, x_t: Tensor, leaves: list[Tensor], cot: list[Tensor]) -> None:
    """One step forward and backward of ``plan`` against the eager cell on the call's own inputs."""
    args = _fresh_args(slots, x_t, leaves)
    with torch.enable_grad():
        new = step(*args)
        wants = [a for a in args if a.requires_grad]
        expected = list(new) + list(torch.autograd.grad(new, wants, cot, allow_unused=True))
    with torch.no_grad():
        out = plan.fw(*(a.detach() for a in args))
        saved = out[plan.n_out:]
        grads = plan.bw(*saved, *cot, *plan.invariants(saved))
    got = list(out[:plan.n_out]) + [g for g, a in zip(grads, args) if a.requires_grad]
    for e, g in zip(expected, got):
        if (e is None) != (g is None) or (e is not None and not _close(e, g)):
            raise _Unsupported("its compiled step does not reproduce the eager step")


def _close(a: Tensor, b: Tensor) -> bool:
    tol = 1e-4 if a.dtype == torch.float32 else 1e-9
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol * (1 + float(a.detach().abs().max()))))


@contextlib.contextmanager
def _aside() -> Any:
    """Around steps the backend runs for itself (a build, a check): they must move neither the caller's
    random stream nor tensors through saved-tensor hooks (activation checkpointing counts what each
    forward saves); torch's own warnings while it traces and compiles are not the caller's to see, nor
    to fail on under -W error."""
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(_same, _same), \
            warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        yield


def _warn(cell: nn.Module, why: str, quiet: bool = False, template: str = "rnnkit: the compiled backend cannot "
          "run {name} ({why}); it runs the reference loop instead", warned: set[type] | None = None) -> None:
    """One warning per cell type (and set of types ``warned``, by default this backend's), attributed to
    the first caller outside rnnkit and torch."""
    warned = _WARNED if warned is None else warned
    if quiet or type(cell) in warned:
        return
    warned.add(type(cell))
    level, frame = 2, sys._getframe(1)
    inside = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        level, frame = level + 1, frame.f_back
    name = type(cell).__name__
    inner = getattr(cell, "cell", None)
    if name.startswith("_") and isinstance(inner, nn.Module):  # rnnkit's dropout/zoneout wrappers
        name = f"{type(inner).__name__} (with the layer's {name.strip('_').removesuffix('Split')})"
    warnings.warn(template.format(name=name, why=why), RnnkitWarning, stacklevel=level)


def _plan(cell: nn.Module, slots: _Slots, x: Tensor, leaves: list[Tensor],
          unflatten: Callable[[list[Tensor]], Any], training: bool, quiet: bool) -> tuple[_Plan | None, int]:
    """The cached plan for this call and the batch size it runs, built if missing.

    In order: the training plan of these shapes; one for a larger batch that the call can run on
    with its rows padded (see :func:`_wider`); for a call without gradients, a forward-only plan;
    else a new plan (a forward-only one is built only when the caller asked for this backend:
    ``quiet`` calls, auto's, never build one).
    """
    rows = x.shape[1]
    why = _REFUSED.get(type(cell)) or _untraceable(cell)
    if why:
        _warn(cell, why, quiet)
        return None, rows
    try:
        key = _key(cell, slots, x, leaves)
    except _Unsupported as e:
        _warn(cell, str(e), quiet)
        return None, rows
    from rnnkit.engine import user_cell

    builds = _BUILDS.setdefault(user_cell(cell), {})
    shapes = key[1:]
    if not training and _PLANS.get(key) is not None:
        builds.pop(shapes, None)
        return _PLANS[key], rows
    wider = _wider(x, leaves, key, training or not quiet,
                   lambda plan, rows: _pads_alike(plan, rows, cell, slots, x[0], leaves, unflatten))
    if wider is not None:
        builds.pop(shapes, None)
        return wider
    key = key if training else (*key, "inference")
    if key in _PLANS:
        builds.pop(shapes, None)
        _PLANS.move_to_end(key)
        if _PLANS[key] is None:
            _warn(cell, _WHY.get(key, "an earlier build failed"), quiet)  # once per type, as always
        return _PLANS[key], rows
    if not training and quiet:
        # a one-off evaluation would pay seconds of compiling to save a fraction of one: measured at
        # T784 N1000 H128 (seed-000 cell), 5.4 s to build, then 680-800 ms against 880-894 ms
        return None, rows
    # builds in a row, with no call that found its plan between; past _REBUILDS auto runs the loop
    # until one call's attributes are those of the call before (they have settled: build then)
    # the key's hash, not the key: it may hold the cell itself (a bound method), which must be free to die
    count, last = builds.get(shapes, (0, None))
    builds[shapes] = (count + 1, hash(key)) if last != hash(key) else (1, hash(key))
    if builds[shapes][0] > _REBUILDS:
        if quiet:  # auto: compiling every call never pays
            return None, rows
        _warn(cell, f"its attributes changed before each of the last {_REBUILDS} calls of these shapes", quiet,
              "rnnkit: the compiled backend compiles {name} again whenever its attributes change ({why}); keep a "
              "value that changes from call to call in a buffer or parameter, which a plan takes as an input")
    plan = None
    try:
        with _aside():
            plan = (_build if training else _build_inference)(cell, slots, x[0], leaves, unflatten)
    except ShapeError:
        raise  # the cell's own mistake (a step that changes its state's shape, say): the loop would raise it too
    except Exception as e:  # noqa: BLE001 - any failure to trace or compile means: run the reference loop
        why = str(e) if isinstance(e, _Unsupported) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if isinstance(e, _Unsupported) and "own attributes" in why:
            _REFUSED[type(cell)] = why  # its key would change every call: never try again
        _WHY[key] = why
        _warn(cell, why, quiet)
    _PLANS[key] = plan
    if plan is not None and plan.rows_apart:
        plan.rows_key = (_resized(key, -1), rows)
        _ROWS.setdefault(plan.rows_key[0], set()).add(rows)
    if len(_PLANS) > _MAX_PLANS:
        old_key, old = _PLANS.popitem(last=False)
        _WHY.pop(old_key, None)
        if old is not None and old.rows_key is not None:  # it can no longer take smaller batches
            free, old_rows = old.rows_key
            _ROWS[free].discard(old_rows)
            if not _ROWS[free]:
                del _ROWS[free]
    return plan, rows


def _pads_alike(plan: _Plan, rows: int, cell: nn.Module, slots: _Slots, x_t: Tensor, leaves: list[Tensor],
                unflatten: Callable[[list[Tensor]], Any]) -> bool:
    """Whether this call's batch size may run padded to ``rows`` on ``plan``: checked once per size
    with :func:`_rows_apart` on the call's rows, padded, since the build's check (half its batch)
    cannot see a cell whose Python branches on other batch sizes (``if x.shape[0] == 1``)."""
    n = x_t.shape[0]
    if n not in plan.pads:
        with _aside():
            step = _step_fn(cell, slots, unflatten, plan.own_output)
            plan.pads[n] = _rows_apart(step, slots, _pad_rows(x_t, 0, rows), [_pad_rows(s, 0, rows) for s in leaves], n)
    return plan.pads[n]


def _wider(x: Tensor, leaves: list[Tensor], key: tuple, builds: bool, fits: Callable[[_Plan, int], bool]
           ) -> tuple[_Plan, int] | None:
    """A training plan for a larger batch whose rows are computed apart, and its batch size, for a
    call with no plan of its own: run padded, the call costs a few rows more instead of a compile
    (the last, smaller batch of an epoch, say). A batch size more than twice smaller gets its own
    plan once it has come :data:`_PAD_CALLS` times, if the call would build one (``builds``).
    ``fits(plan, rows)`` checks that this batch size computes its rows alike on that plan."""
    n = x.shape[1]
    if key in _PLANS or (*key, "inference") in _PLANS or not all(s.dim() and s.shape[0] == n for s in leaves):
        return None
    # Under saved-tensor hooks, activation checkpointing may run this forward again in the backward,
    # and the two must take one plan: there, a call without a plan of its own gets one.
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return None
    for rows in sorted(_ROWS.get(_resized(key, -1), ())):
        wide = _resized(key, rows)
        plan = _PLANS.get(wide)
        if rows <= n or plan is None or not plan.rows_apart or not fits(plan, rows):
            continue
        if rows > 2 * n and builds:
            _SEEN[key] = _SEEN.pop(key, 0) + 1
            if len(_SEEN) > _MAX_PLANS:
                _SEEN.popitem(last=False)
            if _SEEN[key] > _PAD_CALLS:
                return None
        _PLANS.move_to_end(wide)
        return plan, rows
    return None


def _pad_rows(t: Tensor, dim: int, rows: int) -> Tensor:
    """``t`` with copies of its first row appended along ``dim`` up to ``rows``: real values, so the
    padding's forward is as finite as the call's and its zero gradient contributes exact zeros."""
    extra = [rows - t.shape[dim] if d == dim else -1 for d in range(t.dim())]
    return torch.cat([t, t.narrow(dim, 0, 1).expand(*extra)], dim)


def _same(t: Tensor) -> Tensor:
    return t


def _steps(plan: _Plan, x: Tensor, masks: Tensor | None, full: int, leaves: list[Tensor], inputs: tuple[Tensor, ...],
           return_states: bool, saved: list[Tensor] | None = None, counts: list[int] | None = None
           ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The forward loop: outputs (T, N, ...), final leaves, every step's leaves stacked (if asked).

    Each step's tensors for the backward go to ``saved`` (their number to ``counts``) when given.
    """
    n_state, n_out = len(leaves), plan.n_out
    outs, kept = [], []
    for t in range(x.shape[0]):
        r = plan.fw(*inputs, x[t], *leaves)
        new = [s if s.is_contiguous() else s.contiguous() for s in r[:n_state]]
        if t >= full:
            new = [freeze(masks[t], a, b) for a, b in zip(new, leaves)]
        leaves = new
        if saved is not None:
            saved.extend(r[n_out:])
            counts.append(len(r) - n_out)
        if not plan.own_output:
            outs.append(leaves[0])
        else:  # past a sequence's end its output is that of its frozen state: the last one it had
            outs.append(freeze(masks[t], r[n_state], outs[-1]) if t >= full and outs else r[n_state])
        if return_states:
            kept.append(leaves)
    return torch.stack(outs), leaves, [torch.stack(s) for s in zip(*kept)] if return_states else []


class _Loop(torch.autograd.Function):
    """The whole time loop as one autograd node: compiled steps forward, their gradients backward."""

    @staticmethod
    def forward(ctx, plan: _Plan, owner: tuple[nn.Module, _Slots], x: Tensor, masks: Tensor | None,  # type: ignore[override]
                lengths: Tensor | None, unflatten: Callable, return_states: bool, n_state: int,
                *rest: Tensor) -> tuple[Tensor, ...]:
        full = x.shape[0] if lengths is None else int(lengths.min())
        saved: list[Tensor] = []
        counts: list[int] = []
        outs, leaves, states = _steps(plan, x, masks, full, list(rest[:n_state]), rest[n_state:], return_states,
                                      saved, counts)
        (ctx.cell, ctx.slots), ctx.plan, ctx.masks, ctx.full, ctx.counts = owner, plan, masks, full, counts
        ctx.lengths, ctx.unflatten, ctx.out_shape = lengths, unflatten, outs.shape[1:]
        ctx.return_states, ctx.n_state = return_states, n_state
        # through save_for_backward, so saved-tensor hooks (offloading, checkpointing) see every step
        ctx.save_for_backward(x, *rest, *saved)
        ctx.set_materialize_grads(False)
        return (outs, *leaves, *states)

    @staticmethod
    def backward(ctx, g_out: Tensor | None, *g_rest: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        plan, n_state = ctx.plan, ctx.n_state
        x, *stored = ctx.saved_tensors
        n_rest = n_state + plan.n_inputs
        rest, flat = stored[:n_rest], stored[n_rest:]
        if torch.is_grad_enabled():  # create_graph: differentiate the reference loop instead
            dx, *others = _reference_grads(ctx, x, rest, g_out, g_rest)
            return (None, None, dx, None, None, None, None, None, *others)
        steps, k = [], 0
        for c in ctx.counts:
            steps.append(flat[k:k + c])
            k += c
        carry: list[Tensor | None] = list(g_rest[:n_state])
        g_states = g_rest[n_state:] if ctx.return_states else [None] * n_state
        n_in, T = plan.n_inputs, x.shape[0]
        grads: list[Tensor | None] = [None] * n_in
        dxs: list[Tensor | None] = []
        zero = rest[0].new_zeros(())
        invariants = plan.invariants(steps[0])
        if g_out is not None:  # one copy, not one per step (batch-first grads arrive transposed)
            g_out = g_out.clone(memory_format=torch.contiguous_format) if plan.own_output and ctx.masks is not None \
                else g_out.contiguous()  # (a copy of our own: past a sequence's end it is added to below)
        for t in reversed(range(T)):
            g = list(carry)
            if g_out is not None and not plan.own_output:
                g[0] = g_out[t] if g[0] is None else g[0] + g_out[t]
            for j, gs in enumerate(g_states):
                if gs is not None:
                    g[j] = gs[t] if g[j] is None else g[j] + gs[t]
            # Inductor's kernels assume the strides they were compiled for: contiguous
            g = [torch.zeros_like(s) if a is None else a.contiguous() for a, s in zip(g, rest[:n_state])]
            direct = None
            if t >= ctx.full:
                m = ctx.masks[t]
                direct = [freeze(m, zero, a) for a in g]
                g = [freeze(m, a, zero) for a in g]
            if plan.own_output:
                go = g_out[t] if g_out is not None else x.new_zeros(ctx.out_shape)
                if t >= ctx.full and g_out is not None:  # a finished row's output was the step before's
                    g_out[t - 1] += freeze(ctx.masks[t], zero, go)
                    go = freeze(ctx.masks[t], go, zero)
                g.append(go)
            r = plan.bw(*steps[t], *g, *invariants)
            for i in range(n_in):
                if r[i] is not None:  # a copy first (a step's output may alias another), then in place
                    grads[i] = r[i].clone() if grads[i] is None else grads[i].add_(r[i])
            dxs.append(r[n_in])
            carry = list(r[n_in + 1:n_in + 1 + n_state])
            if direct is not None:
                carry = [b if a is None else a + b for a, b in zip(carry, direct)]
        if g_out is None:  # no output was read: what only the outputs reach gets no gradient, as in the loop
            for i in plan.output_only:
                grads[i] = None
        dx = None if dxs[0] is None else torch.stack(dxs[::-1])
        return (None, None, dx, None, None, None, None, None, *carry, *grads)


def _reference_grads(ctx: Any, x: Tensor, rest: list[Tensor], g_out: Tensor | None,
                     g_rest: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """Gradients for x, the state and the cell's tensors by the reference loop, themselves differentiable."""
    from rnnkit.engine import tree_flatten

    leaves = rest[:ctx.n_state]
    inputs = [x, *rest]
    # the cell's tensors as the forward saw them (a caller's functional_call may have swapped others in)
    with torch.enable_grad(), ctx.slots.holding(rest[ctx.n_state:]):
        outs, final, states = reference._run(ctx.cell, x, ctx.unflatten(list(leaves)), ctx.masks, ctx.lengths,
                                             ctx.return_states)
        produced = [outs, *tree_flatten(final)[0]] + (tree_flatten(states)[0] if ctx.return_states else [])
        pairs = [(p, g) for p, g in zip(produced, (g_out, *g_rest)) if g is not None]
        wants = [a for a in inputs if a.requires_grad]
        got = iter(torch.autograd.grad([p for p, _ in pairs], wants, [g for _, g in pairs],
                                       create_graph=True, allow_unused=True))
    return [next(got) if a.requires_grad else None for a in inputs]


def run_quietly(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool
) -> tuple[Tensor, Any, Any]:
    """:func:`run` without the fallback warning (for ``backend="auto"``, which chose this backend itself)."""
    return run(cell, x, state, masks, lengths, return_states, quiet=True)


def run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool,
    quiet: bool = False,
) -> tuple[Tensor, Any, Any]:
    """Step the compiled cell over x (T, N, I), or the reference loop where no plan can be made."""
    from rnnkit.engine import tree_flatten

    leaves, unflatten = tree_flatten(state)
    slots = _Slots(cell)
    # Inductor's kernels assume the strides they were compiled for: give them contiguous tensors
    # (a strided buffer is copied per call; the copy's gradient flows back through autograd)
    slots.tensors = [t if t.is_contiguous() else t.contiguous() for t in slots.tensors]
    if (_transforming() or torch.is_autocast_enabled("cpu") or any(not s.is_floating_point() for s in leaves)
            or any(s.dtype != x.dtype for s in leaves)
            or any(t.dtype != x.dtype for t in slots.tensors[:slots.n_params])):
        return reference.run(cell, x, state, masks, lengths, return_states)
    x = x.contiguous()
    leaves = [s.contiguous() for s in leaves]
    training = torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and (
        x.requires_grad or any(s.requires_grad for s in leaves) or any(t.requires_grad for t in slots.tensors))
    plan, rows = _plan(cell, slots, x, leaves, unflatten, training, quiet)
    if plan is None:
        return reference.run(cell, x, state, masks, lengths, return_states)
    n_rows, n = x.shape[1], len(leaves)
    if rows != n_rows:  # a plan for a larger batch: pad, run, and keep the call's rows
        x, leaves = _pad_rows(x, 1, rows), [_pad_rows(s, 0, rows) for s in leaves]
        masks = None if masks is None else _pad_rows(masks, 1, rows)
        lengths = None if lengths is None else _pad_rows(lengths, 0, rows)
    if not training:
        full = x.shape[0] if lengths is None else int(lengths.min())
        outs, final, states_t = _steps(plan, x, masks, full, leaves, tuple(slots.tensors), return_states)
    else:
        flat = _Loop.apply(plan, (cell, slots), x, masks, lengths, unflatten, return_states, n, *leaves,
                           *slots.tensors)
        outs, final, states_t = flat[0], list(flat[1:1 + n]), list(flat[1 + n:]) if return_states else []
    if rows != n_rows:
        outs, final, states_t = outs[:, :n_rows], [s[:n_rows] for s in final], [s[:, :n_rows] for s in states_t]
    return outs, unflatten(final), unflatten(states_t) if return_states else None
