"""The unroll engine: runs any cell over time and returns every step's state on request.

``unroll(cell, x)`` is the one time loop of rnnkit: layers, models and decoders all go through
it. It validates its inputs once, turns variable lengths into masks, reverses sequences within
their own lengths, and hands the loop to a backend:

===========  ==========================================================================
backend      what runs
===========  ==========================================================================
reference    a plain Python loop over ``cell.step`` (or ``cell(x_t, state)``): any cell
native       PyTorch's fused LSTM/GRU/RNN kernels (cuDNN on a GPU), built-in cells only
fused        rnnkit's own CPU LSTM/GRU/RNN: hoisted GEMMs and a hand-written backward
traced       a cell whose step is products of the input and a state plus elementwise maths,
             on the CPU: traced once (no compiling) into rnnkit's C++ time loops; "auto"
             picks it for other float32 cells on 256 steps or more
compiled     any cell on the CPU, traced once: Inductor-compiled elementwise maths, oneDNN GEMMs;
             "auto" picks it on 256 steps or more for cells the traced backend cannot read
triton       the built-in LSTM on a GPU: the time loop in one Triton kernel launch each way
             (not yet picked by "auto": it has not been measured against cuDNN on a GPU)
===========  ==========================================================================

``backend="auto"`` picks the fastest one that supports the cell and device; every backend
agrees with the reference loop to float tolerance, gradients included (the tests check this).

Under ``torch.compile`` the recurrence runs eagerly in a graph break, as torch.nn.LSTM's does
(:func:`eagerly`), at rnnkit's own speed; ``torch.export`` and ``torch.jit.trace`` record torch's
kernels (native, else the reference loop), which they can trace.

Shapes (batch_first=True; time-first swaps the first two axes)::

    x        (N, T, I)     lengths  (N,) ints in [1, T]
    outputs  (N, T, H)     zero past each sequence's end
    states   the state's own type, each field with a time axis: (N, T, ...)
             past a sequence's end a state repeats that sequence's final state

Reference loop (what every backend computes)::

    for t in range(T):                      # t runs backwards within each length if reverse
        state = cell(x[:, t], state)        # frozen once t >= lengths[n]
        outputs[:, t] = cell.output(state)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from rnnkit import fpmode
from rnnkit.allocator import allocator_tuned
from rnnkit.backends import cext, compiled, fused, native, reference, traced, triton_lstm
from rnnkit.cells import GRUCell, LSTMCell, steps_split
from rnnkit.errors import RnnkitWarning, ShapeError

__all__ = ["unroll", "UnrollResult", "BACKENDS", "tree_map", "tree_flatten", "tree_unflatten"]

Backend = Literal["auto", "reference", "native", "fused", "compiled", "traced", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "native", "fused", "compiled", "traced", "triton")


class UnrollResult(NamedTuple):
    """What :func:`unroll` returns: always these three fields (``states`` is None unless asked)."""

    outputs: Tensor
    final_state: Any
    states: Any


def tree_map(fn: Callable[..., Tensor], *trees: Any) -> Any:
    """Apply ``fn`` field by field to states (a tensor, or a (named) tuple of tensors)."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    fields = [tree_map(fn, *parts) for parts in zip(*trees)]
    return type(first)(*fields) if hasattr(first, "_fields") else type(first)(fields)


def tree_flatten(tree: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """The tensors of a state, and a function that rebuilds a state of the same type from tensors."""
    if isinstance(tree, Tensor):
        return [tree], lambda leaves: leaves[0]
    leaves: list[Tensor] = []
    builders = []
    for part in tree:
        sub, build = tree_flatten(part)
        builders.append((len(sub), build))
        leaves.extend(sub)

    def unflatten(flat: list[Tensor]) -> Any:
        out, i = [], 0
        for n, build in builders:
            out.append(build(flat[i : i + n]))
            i += n
        return type(tree)(*out) if hasattr(tree, "_fields") else type(tree)(out)

    return leaves, unflatten


def tree_unflatten(like: Any, leaves: list[Tensor]) -> Any:
    """Rebuild a state shaped like ``like`` from its flat list of tensors."""
    return tree_flatten(like)[1](leaves)


def dynamo_tracing() -> bool:
    """Whether torch.compile's tracer (not torch.export's) is tracing this call."""
    # the module flag, which the tracer reads as it is: its table of tracing-state functions folds
    # torch.compiler.is_exporting() to True, and only recent releases read that one dynamically
    return torch.compiler.is_dynamo_compiling() and not getattr(torch.compiler, "_is_exporting_flag", False)


# torch.compiler.disable's lazy form, torch's own: importing torch._dynamo with rnnkit doubled its import time
@torch._disable_dynamo
def eagerly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run eagerly in a graph break of torch.compile."""
    # torch.compile breaks its graph at torch.nn.LSTM, GRU and RNN for the same reason: Inductor's
    # own lowering of torch's CPU RNN kernels fails in training (torch 2.13: the LSTM's decomposition
    # runs oneDNN's layer in inference mode whenever the input needs no gradient, and the GRU's fails
    # to lower), and rnnkit's C++ loops are opaque to it
    return fn(*args, **kwargs)


def unroll(
    cell: nn.Module,
    x: Tensor,
    state: Any = None,
    *,
    lengths: Tensor | list[int] | None = None,
    reverse: bool = False,
    return_states: bool = False,
    batch_first: bool = True,
    backend: Backend = "auto",
) -> UnrollResult:
    """Run ``cell`` over the time axis of ``x``; see the module docstring for shapes and semantics."""
    if dynamo_tracing():
        return eagerly(unroll, cell, x, state, lengths=lengths, reverse=reverse, return_states=return_states,
                       batch_first=batch_first, backend=backend)
    x, state, lengths, T, N = _validate(cell, x, state, lengths, batch_first)
    if backend not in BACKENDS:
        raise ShapeError(f"unroll: backend must be one of {BACKENDS}, got {backend!r}")
    if lengths is not None and bool((lengths == T).all()):
        lengths = None  # every sequence is full: skip masking entirely
    picked = backend == "auto"
    if N == 0:  # an empty batch (as torch.nn's layers take it): nothing to compute, any cell can step it
        backend, picked = "reference", False
    elif picked:
        backend = _pick_backend(cell, x, T, N, return_states, ragged=lengths is not None)
    elif backend != "reference":
        module = {"native": native, "fused": fused, "compiled": compiled, "traced": traced,
                  "triton": triton_lstm}[backend]
        reason = module.unsupported(cell, x)
        if reason:
            raise ShapeError(f"unroll: backend={backend!r} cannot run this cell: {reason}; use 'auto'")
        if backend != "native" and fpmode.recording():
            backend = "reference" if native.unsupported(cell, x) else "native"
            warnings.warn(f"unroll: torch.export and tracers cannot record rnnkit's own loops; recording the "
                          f"{backend} backend instead of the one asked for", RnnkitWarning, stacklevel=2)

    x_tm = x.transpose(0, 1) if batch_first else x  # (T, N, I)
    rev_index = None
    if reverse:
        if lengths is None:
            x_tm = x_tm.flip(0)
        else:
            rev_index = _reverse_index(lengths, T)
            x_tm = _gather_time(x_tm, rev_index)
    masks = None if lengths is None else _masks(lengths, T, x.device)
    if masks is not None:
        # finished rows still step the cell on the padding: a NaN or -inf there (the log of a zero pad)
        # would turn the zero gradient of those steps into NaN (0 * NaN) inside the cell's backward
        x_tm = x_tm.masked_fill(~masks, 0)

    runner = {"reference": reference.run, "native": native.run, "fused": fused.run, "compiled": compiled.run,
              "traced": traced.run, "triton": triton_lstm.run}[backend]
    if picked and backend in ("compiled", "traced"):  # chosen for the caller: fall back without a warning
        runner = compiled.run_quietly if backend == "compiled" else traced.run_quietly
    leaves, unflatten = tree_flatten(state)

    def run(x_in: Tensor, *state_leaves: Tensor) -> tuple[Tensor, ...]:
        outputs, final, states = runner(cell, x_in, unflatten(list(state_leaves)), masks, lengths, return_states)
        final_leaves = tree_flatten(final)[0]
        state_leaves_t = tree_flatten(states)[0] if states is not None else []
        return (outputs, *final_leaves, *state_leaves_t)

    if backend in ("fused", "triton"):
        # the fused Functions and the LSTM's no-graph call scope the denormal mode; on a GPU there is none
        flat = run(x_tm, *leaves)
    else:
        flat = fpmode.flushed_region(run, (x_tm, *leaves))
    outputs, final_state = flat[0], unflatten(list(flat[1 : 1 + len(leaves)]))
    states = unflatten(list(flat[1 + len(leaves) :])) if return_states else None

    if masks is not None:
        outputs = outputs * masks
    if reverse:
        if rev_index is None:
            outputs = outputs.flip(0)
            states = None if states is None else tree_map(lambda s: s.flip(0), states)
        else:
            outputs = _gather_time(outputs, rev_index)
            states = None if states is None else tree_map(lambda s: _gather_time(s, rev_index), states)
    if batch_first:
        outputs = outputs.transpose(0, 1)
        states = None if states is None else tree_map(lambda s: s.transpose(0, 1), states)
    return UnrollResult(outputs, final_state, states)


# Training on the CPU in float32, torch's own kernel (oneDNN's RNN) beats the fused backend while
# its buffers stay below glibc's mmap threshold, and loses once every step maps and faults them in
# afresh (see rnnkit.allocator): measured 2026-12-01 on an AMD EPYC (Zen 5, 2 cores), LSTM forward
# and backward, ms native / fused: T28 H128 B128 (7.3 MB of gates) 10.3 / 17.4; B160 (9.2 MB)
# 23.5 / 19.5; B256 37.5 / 37.3 with 8,900 page faults a step for native. The native backend
# therefore runs long sequences in chunks of time (backends.native.chunk_steps), which wins while a
# chunk holds at least _MIN_CHUNK_STEPS steps. With the allocator tuned it runs whole sequences:
# ahead for the LSTM up to T784 H128 B128 (205 MB: 215 / 370) and T28 H512 B512 (310 / 410), not at
# T784 H256 (1,597 / 1,363); for the GRU the fused backend leads from 11 MB (T28 B256 H128: 41.8 /
# 31.6).
_NATIVE_TRAIN_GATE_BYTES_TUNED = {LSTMCell: 256 << 20}
_MIN_CHUNK_STEPS = 8
# With the fused backend's loops in C++ (2026-12-02, same machine, allocator untuned, ms fused /
# native in chunks): T784 H128 B128 219 / 240, T784 H256 B128 731 / 882, T100 H128 B128 38.4 / 49.2
# (256-512 KB of gates a step), but T784 H64 B64 79.4 / 65.1 and T200 H128 B32 22.0 / 18.3 (64 KB a
# step): chunks of time then need this many steps for torch's kernel to stay ahead.
_MIN_CHUNK_STEPS_KERNELS = 32
# torch's GRU on the CPU is not oneDNN's kernel, and the fused backend trained faster at every
# shape measured (2026-12-02, AMD EPYC, 2 cores; train step, ms fused / torch.nn.GRU): T16 I8 H16
# B8 1.11 / 1.85, T28 H64 B64 3.9 / 5.1, T28 H128 B128 10.9 / 19.7, T28 H256 B128 23.1 / 42.4, T200
# H32 B16 10.1 / 24.9 (with the C++ loops; the Python ones were slower but still ahead). Without
# gradients the C++ loops lead from a few thousand units of batch x hidden (T28 H64 B64: 1.41 /
# 1.59; T28 H128 B128: 2.79 / 4.89; T784 I1 H128 B128: 148 / 228), not on tiny calls (T16 H16 B8:
# 0.32 / 0.22, where the fused Function's set-up dominates).
_FUSED_GRU_INFERENCE_MIN_UNITS = 2048
# The fused LSTM's C++ loops as register-blocked tiles (each thread owns rows of the batch for the
# whole sequence, the weights packed once per call, the input projection and the input gradient
# inside each step's product), measured 2026-12-02 on an AMD EPYC without AVX-512 (Zen 3, 2 cores,
# tuned allocator), forward and backward, ms fused / torch.nn.LSTM: T28 I28 H64 B64 5.56 / 6.40,
# T28 H128 B128 21.5 / 25.1, T28 H128 B32 7.05 / 7.32, T200 I8 H128 B32 31.6 / 41.4, T784 I1 H64 B64
# 70.5 / 97.2, T784 H128 B128 469 / 581; behind where each thread's packed weights outgrow its
# cache (T28 H256 B128 78.9 / 73.0, H512 B512 920 / 820; H192 even) and on tiny calls (T16 I8 H16
# B8 0.92 / 0.71).
# Later the same day, with the weights taken as torch lays them out (no copies per call) and the
# backward in larger chunks (see fused._KERNEL_CHUNK_SCALE), interleaved, untuned: T28 H128 B256
# 44.9 / 52.2, H192 B128 39.8 / 47.1, H256 B128 60.5 / 66.6, H320 B128 94.9 / 105.6, H384 B128 132 / 142
# (twice), H384 B64 77.2 / 78.6, H512 B512 988 / 925: past 256 units the margin is within the noise.
# With AVX-512 (AMD EPYC Zen 5, 2 cores, 2026-12-02 evening, benchmarks/micro_fused.py, 30 interleaved
# rounds, untuned) the same loops (6 x 4 register tiles there) against torch's oneDNN kernel:
# T28 H128 B128 7.74 / 7.88, H64 B64 2.02 / 2.02, H128 B32 3.01 / 2.96 (even), H64 B128 4.68 / 5.18,
# H32 B128 3.39 / 3.98, H128 B256 16.4 / 25.6, H192 B128 16.5 / 29.0, H256 B128 21.3 / 32.0, T100 H128
# B128 30.8 / 46.4, T200 I8 H128 B32 13.5 / 25.7, T784 I1 H64 B64 65.2 / 110, T784 H128 B128 308 / 470;
# past 256 units again close: H384 B128 64.6 / 68.0, H384 B64 25.4 / 35.7, H512 B128 102 / 104, H512
# B512 425 / 403. So one rule for both kinds of processor. Later that evening (gate gradients written
# over the gates, tanh(c) recomputed, rows split evenly among threads): T28 H128 B128 7.60 / 8.72, H64
# B64 2.03 / 2.49, H128 B32 4.62 / 5.25, H128 B256 16.6 / 33.5, T784 H128 B128 338 / 602.
# With the weight gradient summed inside the backward loop and cheaper activations (2026-12-02,
# late evening, Zen 5, micro_fused, one process each, speed-up over torch.nn.LSTM): T28 H16 B128
# 1.87x, H32 B32 1.29x, H64 B16 1.53x, T16 I8 H16 B8 1.31x, H128 B8 1.25x, H384 B64 1.36x, H384 B128
# 1.35x, H512 B64 1.25x, H512 B128 1.28x, H512 B256 1.25x, H512 B512 1.21x, T1 H128 B32 1.07x, T2
# H128 B128 1.22x; behind or even where a batch is small for the width, each thread's rows too few
# for the packed weights and partial weight gradients it goes through: H192 B16 1.08x, H256 B32
# 1.04x, H256 B16 0.98x, H256 B8 0.93x, T4 H256 B8 0.90x, H512 B32 0.90x. So: up to 512 units with
# a batch of at least an eighth of them, and, as tiny calls lost on the Zen 3 (T16 H16 B8 above),
# 1,024 units of batch x hidden.
_FUSED_LSTM_MAX_HIDDEN = 512
_FUSED_LSTM_MIN_UNITS = 1024
_FUSED_LSTM_MIN_ROWS_PER_UNIT = 1 / 8
# Without gradients the C++ forward keeps no gates (their stores were a seventh of its time), and
# then leads torch's kernel as the native backend runs it at every shape measured; torch.nn.LSTM
# itself, without the native backend's wrapping, is ahead at H256 B128 and even at H512 B64
# (2026-12-03, Zen 5 with AVX-512, 2 cores, interleaved, ms fused / native / torch.nn.LSTM): T28 H128 B128 2.20 /
# 2.52 / 2.24, H256 B128 6.83 / 7.08 / 6.62, H512 B512 102 / 115 / 116, H512 B64 11.4 / 12.1 / 11.3,
# H128 B32 0.55 / 0.67 / 0.60, H64 B64 0.35 / 0.48 / 0.41, H32 B128 0.29 / 0.46 / 0.36, T16 I8 H16 B8
# 0.041 / 0.142 / 0.097, T100 H128 B128 6.9 / 7.8 / 7.3, T784 I1 H128 B128 85 / 99 / 99, H256 226 /
# 243 / 235; keeping two steps of c instead of all (later that day): T784 H128 64 / 88 / 85, H256 192 /
# 231 / 239. So inference takes the training rule: it leads wherever that one does (the tiny call
# above, outside it, would build the kernels for a tenth of a millisecond); past 512 units unmeasured.


def _gate_width(cell: nn.Module) -> int:
    """Pre-activations per unit: 4 for an LSTM, 3 for a GRU, 1 for an Elman RNN."""
    return {LSTMCell: 4, GRUCell: 3}.get(type(cell), 1) * cell.hidden_size


def _fits_one_call(cell: nn.Module, x: Tensor, T: int, N: int) -> bool:
    """Whether the sequence's gates fit what the native backend runs as one kernel call untuned."""
    return T * N * _gate_width(cell) * x.element_size() <= native.WHOLE_GATE_BYTES


def _native_trains_faster(cell: nn.Module, x: Tensor, T: int, N: int, ragged: bool) -> bool:
    """Whether torch's kernel beats the fused backend for training on the CPU (see the notes above)."""
    if type(cell) is GRUCell or fused_lstm_trains_faster(cell, x, N):
        return False
    step_bytes = N * _gate_width(cell) * x.element_size()
    if _fits_one_call(cell, x, T, N):
        return True
    if allocator_tuned():
        return T * step_bytes <= _NATIVE_TRAIN_GATE_BYTES_TUNED.get(type(cell), native.WHOLE_GATE_BYTES)
    # packed (variable-length) sequences run in one call: no chunks
    min_steps = _MIN_CHUNK_STEPS_KERNELS if fused.kernels_available() else _MIN_CHUNK_STEPS
    return not ragged and step_bytes * min_steps <= native.CHUNK_GATE_BYTES


def fused_lstm_trains_faster(cell: nn.Module, x: Tensor, N: int) -> bool:
    """Whether the fused backend's register-blocked LSTM loops beat torch's kernel (see the notes above)."""
    H = cell.hidden_size
    # the cheap checks first: kernels_available() may build the kernels
    return (type(cell) is LSTMCell and x.dtype == torch.float32
            and H <= _FUSED_LSTM_MAX_HIDDEN and N * H >= _FUSED_LSTM_MIN_UNITS
            and N >= H * _FUSED_LSTM_MIN_ROWS_PER_UNIT
            and fused.kernels_available() and cext.threaded())


def builds_graph(cell: nn.Module, x: Tensor) -> bool:
    """Whether running a built-in ``cell`` on ``x`` builds a graph: grad mode on and x or one of the
    cell's own parameters (no module walk: a built-in cell has no submodules) needs a gradient."""
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in cell._parameters.values())
    )


def fused_infers_faster(cell: nn.Module, x: Tensor, N: int) -> bool:
    """Whether the fused backend beats torch's kernel without gradients on the CPU (see the notes above)."""
    if fpmode.recording():  # torch.export or a tracer records the call: the C++ loops are opaque to them
        return False
    if type(cell) is LSTMCell:
        return fused_lstm_trains_faster(cell, x, N)
    return (type(cell) is GRUCell and N * cell.hidden_size >= _FUSED_GRU_INFERENCE_MIN_UNITS
            and fused.kernels_available())


def _autocast_kernel_runs(cell: nn.Module) -> bool:
    """Whether torch's kernel runs this cell under the current CPU autocast (see _torch_lstm_runs)."""
    if type(cell) is not LSTMCell:
        return True
    return _torch_lstm_runs(torch.get_autocast_dtype("cpu"), torch.is_grad_enabled())


@functools.cache
def _torch_lstm_runs(dtype: torch.dtype, grad: bool) -> bool:
    """Whether torch.nn.LSTM runs under CPU autocast to ``dtype`` here: oneDNN has no bfloat16 or float16
    LSTM on processors without those instructions (seen on an AMD EPYC Zen 3 with torch 2.13:
    torch.nn.LSTM fails to build its primitive), so rnnkit's layers take the fused backend's float32
    maths there.
    Asked of torch itself, once per dtype and grad mode, so its own rules (and their changes) decide."""
    if dtype not in (torch.bfloat16, torch.float16):  # the only dtypes CPU autocast takes
        return True
    x, h = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    weights = [torch.zeros(8, 2, requires_grad=grad), torch.zeros(8, 2, requires_grad=grad), torch.zeros(8),
               torch.zeros(8)]  # zeros, not torch.nn.LSTM's random initialisation: the caller's RNG is untouched
    try:
        with torch.autocast("cpu", dtype=dtype), torch.set_grad_enabled(grad):
            torch._VF.lstm(x, (h, h), weights, True, 1, 0.0, grad, False, False)
    except RuntimeError:
        return False
    return True


def _pick_backend(
    cell: nn.Module, x: Tensor, T: int, N: int, return_states: bool = False, ragged: bool = False
) -> str:
    native_ok = not native.unsupported(cell, x)
    if x.device.type != "cpu":
        return "native" if native_ok else "reference"
    native_ok = native_ok and x.dtype in (torch.float32, torch.float64)  # torch's CPU half kernels are uneven
    native_ok = native_ok and not (torch.is_autocast_enabled("cpu") and not _autocast_kernel_runs(cell))
    if fpmode.recording():  # torch.export and tracers can record no other
        return "native" if native_ok else "reference"
    fused_ok = not fused.unsupported(cell, x)
    # float64 is for checking numerics (gradcheck, gradgradcheck): torch's kernel has second
    # derivatives and torch.func rules; the fused backend has no torch.func rules, and its second
    # derivatives recompute the sequence
    exact = x.dtype == torch.float64

    # torch's LSTM kernel returns only the last c. In float32 the native backend reads every step's c
    # from oneDNN's workspace, which inference then has to keep too: worth it for short sequences
    # (T28 H128 B128: 3.9 ms against the fused backend's 4.7), not long ones (T784: 229 against 103;
    # both measured before the fused forward stopped keeping the gates without gradients).
    # Elsewhere it recomputes them with a batched matmul, which costs more than the fused backend,
    # which has them for free.
    states_cost = return_states and type(cell) is LSTMCell and not (
        native.states_from_workspace(cell, x, ragged)
        and (_fits_one_call(cell, x, T, N) or builds_graph(cell, x))
    )
    if exact and not native_ok:
        return "reference"  # the fused backend's second derivatives recompute the sequence: slower for checks
    if native_ok and torch.is_autocast_enabled("cpu"):
        # torch's kernel follows autocast (an LSTM's outputs come back in bfloat16, as torch.nn.LSTM's
        # do); the fused backend's hand-written maths stay float32
        return "native"
    if native_ok and (exact or not (states_cost and fused_ok)):
        # inference: fused_infers_faster says where the fused backend's loops lead (for an LSTM, up to
        # 512 units, now that they keep no gates without gradients)
        if exact or not fused_ok:
            return "native"
        if builds_graph(cell, x):
            if _native_trains_faster(cell, x, T, N, ragged):
                return "native"
        elif not fused_infers_faster(cell, x, N):
            return "native"
    if fused_ok:
        return "fused"
    if traced.worth_it(cell, x, T):
        return "traced"  # a cell it cannot read goes on, quietly, to the compiled backend or the loop
    return "compiled" if compiled.worth_it(cell, x, T) else "reference"


def from_autocast(t: Any, dtype: torch.dtype) -> Any:
    """``t`` back in the parameters' ``dtype`` if autocast made it lower precision, else ``t`` itself.

    Under autocast torch's RNN kernels return bfloat16/float16 outputs and states, which then feed
    the next layer or the next window of a stream; the kernels cast their inputs down again anyway.
    """
    if (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype
            and torch.is_autocast_enabled(t.device.type) and t.dtype == torch.get_autocast_dtype(t.device.type)):
        return t.to(dtype)
    return t


def _validate(
    cell: nn.Module, x: Any, state: Any, lengths: Any, batch_first: bool
) -> tuple[Tensor, Any, Tensor | None, int, int]:
    """Check everything before any computation; return x, a full state, lengths as a tensor, T, N."""
    if not isinstance(x, Tensor):
        raise ShapeError(f"unroll: expected x to be a Tensor, got {type(x).__name__}")
    layout = "(N, T, I)" if batch_first else "(T, N, I)"
    if x.dim() != 3:
        raise ShapeError(
            f"unroll: expected x of shape {layout} (batch_first={batch_first}), got {tuple(x.shape)}; "
            f"add a batch axis with x.unsqueeze({0 if batch_first else 1}) for a single sequence"
        )
    N, T = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    if T == 0:
        raise ShapeError(f"unroll: x has an empty time axis: shape {tuple(x.shape)} {layout}")
    if not x.is_floating_point():
        raise ShapeError(f"unroll: x must be floating point, got {x.dtype}; convert it with x.float()")
    want_i = getattr(cell, "input_size", None)
    if isinstance(want_i, int) and x.shape[-1] != want_i:
        raise ShapeError(
            f"unroll: x has {x.shape[-1]} features but the cell expects input_size={want_i} "
            f"(x shape {tuple(x.shape)}, layout {layout})"
        )
    weight = first_parameter(cell)
    if weight is not None:
        x = from_autocast(x, weight.dtype)
    if weight is not None and (weight.dtype != x.dtype or weight.device != x.device):
        raise ShapeError(
            f"unroll: x is {x.dtype} on {x.device} but the cell's parameters are {weight.dtype} on "
            f"{weight.device}; move one of them (x.to(param) or cell.to(x.device, x.dtype))"
        )
    init = getattr(cell, "init_state", None)
    if init is None:
        raise ShapeError(f"unroll: the cell {type(cell).__name__} has no init_state(batch_size, device, dtype)")
    expected = init(N, device=x.device, dtype=x.dtype)
    for leaf in tree_flatten(expected)[0] if same_structure(expected, expected) else [None]:
        if not isinstance(leaf, Tensor) or leaf.device != x.device or (
                leaf.is_floating_point() and leaf.dtype != x.dtype):
            got = _describe(expected) if leaf is None else f"{leaf.dtype} on {leaf.device}"
            raise ShapeError(
                f"unroll: {type(cell).__name__}.init_state({N}, device={x.device}, dtype={x.dtype}) returned "
                f"{got}; it must return tensors (or tuples of them) made with the device and dtype it is given"
            )
    if state is None:
        state = expected
    else:
        if not same_structure(state, expected):  # then both flatten to equally many tensors
            raise ShapeError(f"unroll: expected a state like {_describe(expected)}, got {_describe(state)}")
        state = tree_map(lambda s: from_autocast(s, x.dtype), state)
        for got, want in zip(tree_flatten(state)[0], tree_flatten(expected)[0]):
            if got.shape != want.shape:
                raise ShapeError(f"unroll: expected a state like {_describe(expected)}, got {_describe(state)}")
            if got.dtype != want.dtype or got.device != want.device:
                raise ShapeError(
                    f"unroll: the state is {got.dtype} on {got.device}, expected {want.dtype} on {want.device}"
                )
        if not isinstance(state, type(expected)) and hasattr(expected, "_fields"):
            state = type(expected)(*state)
    if lengths is not None:
        lengths = _check_lengths(lengths, N, T, x.device)
    return x, state, lengths, T, N


def _check_lengths(lengths: Any, N: int, T: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(lengths)
    if t.dim() != 1 or t.shape[0] != N:
        raise ShapeError(f"unroll: lengths must have shape ({N},), one per sequence, got {tuple(t.shape)}")
    if N == 0:  # an empty batch: [] is an empty list of lengths, whatever dtype torch gave it
        return t.to(device=device, dtype=torch.long)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ShapeError(f"unroll: lengths must be integers, got {t.dtype}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 1 or hi > T:
        raise ShapeError(f"unroll: lengths must be in [1, T={T}], got values from {lo} to {hi}")
    return t.to(device=device, dtype=torch.long)


def check_step_state(cell: nn.Module, before: Any, after: Any) -> None:
    """Raise a clear error when one step of ``cell`` returned a state unlike the one it was given."""
    if not same_structure(after, before):
        shapes = dtypes = False
    else:
        pairs = list(zip(tree_flatten(after)[0], tree_flatten(before)[0]))
        shapes = all(a.shape == b.shape for a, b in pairs)
        # under autocast a step returns the autocast dtype, as torch's own cells do
        dtypes = all(a.dtype == b.dtype or from_autocast(a, b.dtype) is not a for a, b in pairs)
    if not (shapes and dtypes):
        cell = user_cell(cell)  # not the layer's dropout or zoneout wrapper: the user's cell is at fault
        method = "step(xp, state)" if steps_split(cell) else "forward(x, state)"
        raise ShapeError(
            f"unroll: {type(cell).__name__}.{method} returned {_describe(after, shapes)} for a state of "
            f"{_describe(before, shapes)}; a step must return the next state, shaped like the state it takes "
            f"(its init_state's), in the same dtype"
        )


def user_cell(cell: nn.Module) -> nn.Module:
    """The user's cell inside the dropout and zoneout wrappers that rnnkit's layers make per call."""
    while type(cell).__module__ == "rnnkit.layers" and isinstance(getattr(cell, "cell", None), nn.Module):
        cell = cell.cell
    return cell


def first_parameter(module: Any) -> Tensor | None:
    """The module's first parameter: its own when it has one (no walk of its submodules), else the walk's."""
    own = next((p for p in getattr(module, "_parameters", {}).values() if p is not None), None)
    return own if own is not None else next(iter(module.parameters()), None)


def same_structure(got: Any, want: Any) -> bool:
    """Whether ``got`` nests tensors and (named) tuples/lists exactly as ``want`` does."""
    if isinstance(want, Tensor):
        return isinstance(got, Tensor)
    if not isinstance(got, (tuple, list)) or len(got) != len(want):
        return False
    return all(same_structure(g, w) for g, w in zip(got, want))


def _describe(state: Any, dtypes: bool = False) -> str:
    if isinstance(state, Tensor):
        return f"Tensor{tuple(state.shape)}" + (f" {state.dtype}" if dtypes else "")
    if isinstance(state, (tuple, list)):
        inner = ", ".join(_describe(s, dtypes) for s in state)
        return f"{type(state).__name__}({inner})"
    return type(state).__name__


def _masks(lengths: Tensor, T: int, device: torch.device) -> Tensor:
    """(T, N, 1) bool: True where step t is inside sequence n."""
    return (torch.arange(T, device=device).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(-1)


def _reverse_index(lengths: Tensor, T: int) -> Tensor:
    """(T, N): the time index that reverses each sequence within its length (padding stays put)."""
    t = torch.arange(T, device=lengths.device).unsqueeze(1)
    return torch.where(t < lengths, lengths - 1 - t, t)


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x (T, N, ...) reordered along time per sequence by index (T, N); an involution for reversal."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, idx)
