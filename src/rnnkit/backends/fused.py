"""The fused CPU backend: LSTM, GRU and Elman RNN as autograd Functions with hand-written backwards.

Where the time goes and what this backend does about it:

* GEMMs. The input projection of many steps is one GEMM, and so are the weight gradients
  (``[x_t, 1, h_{t-1}]^T dG`` over many steps' rows, the 1 carrying the bias); per step there is
  only the recurrent GEMM, ``h W_hh^T`` forward and ``dG_t W_hh`` backward, written in place.
* Elementwise work. Each step writes into slices of buffers allocated once per call, with
  in-place activations, so the time loop allocates nothing and records no autograd graph. The
  backward loop does only the chain that depends on the recurrence: every local derivative and
  product that does not (``sigmoid'``, ``tanh'``, ``o (1 - tanh(c)^2)``, ...) is computed
  before it with a few batched ops. torch's tanh is ~3x slower than its sigmoid on the CPU, so
  tanh runs as ``2 sigmoid(2a) - 1`` with the weights that feed it doubled once per call (the C++
  LSTM loops compute theirs directly from the weights as given).
* Memory. A long LSTM sequence (over 8 MB of gates; 64 MB with the C++ loops) works through time
  in chunks of 2 MB (16 MB): the backward's scratch buffers are one chunk long (reused), and in the
  Python loops the input projection of a chunk is computed just before the chunk runs, so long
  sequences stay in cache and need no sequence-sized scratch (the C++ LSTM backward sums the weight
  gradients a group of rows at a time, copying only that group's ``[x_t, 1, h_{t-1}]``).

Time loops. The LSTM's and GRU's run in C++ (``csrc/fused_cpu.cpp``, built by
:mod:`rnnkit.backends.cext`), where the Python loops pay the interpreter, a dispatch for each of ten
or more elementwise ops and a library GEMM per step. Each thread there runs every step for its own
rows of the batch (rows never interact through the recurrence, so threads never wait for each
other), with the weights packed once per call into panels that stay in cache and each
register-blocked tile of a step's product finished by its gates before it leaves the registers;
the LSTM's input projection and input gradient are part of that product, so with the C++ loops the
LSTM computes neither as a separate GEMM, and its loops take the weights as torch lays them out (no
reordered or transposed copies per call). Its backward sums the weight gradient too, each thread its
own rows' part a few steps at a time while their gate gradients are in cache, from those steps'
rows of the inputs and outputs copied side by side. Measured 2026-12-02 on an AMD EPYC without AVX-512 (Zen 3,
2 cores), a train step at T28 I28 H128 B128 took 21.5 ms against 25.1 ms for ``torch.nn.LSTM``
(oneDNN's fused RNN; ad-hoc, allocator tuned); with the previous C++ loops (a oneDNN or BLAS
product per step and a gate pass GCC did not vectorise there) the benchmark had measured 39.7 ms
against 26.6 (allocator untuned). The GRU: 16.4 ms against 24.8 for ``torch.nn.GRU``, and 30.3
before (ad-hoc, tuned). The Python loops remain where no kernels build, and the tests run every case through both.
The Elman RNN and the reset-before GRU loop in Python.

Variable lengths: past a sequence's end its state is frozen (``h_t = h_{t-1}``); the backward then
passes that row's gradient straight to step t-1 and gives its gates none. Masking work is only
done on steps where some sequence has ended (t >= lengths.min()).

The Functions return every step's h (and c) as (T, N, H) tensors; the final state is their last
step (frozen past each end), so returning the states costs nothing extra. The GRU's are a tensor
of their own (written in the same pass), so they may be edited in place as ``torch.nn.GRU``'s may;
the LSTM keeps its outputs for the backward, as ``torch.nn.LSTM`` does on the CPU. Forward and
backward run with denormals flushed (see :mod:`rnnkit.fpmode`), restoring the caller's mode after
(the LSTM's C++ loops on x86 set and restore the mode in each of their threads themselves, so the
caller's thread is never switched), and in float32 even inside an autocast region. A backward
asked for a differentiable result (``create_graph=True``) or given vmap-batched gradients
(vectorised Jacobians and Hessians) recomputes the sequence with plain torch ops and
differentiates that instead.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.backends import cext
from rnnkit.backends.gemm import addmm_, linear, linear_add, linear_add_, mm
from rnnkit.cells import GRUCell, LSTMCell, LSTMState, RNNCell, hooked
from rnnkit.fpmode import denormals_flushed, flush_denormals_enabled, transforming

__all__ = ["unsupported", "run"]

_DTYPES = (torch.float32, torch.float64)
# GRU and RNN: steps per chunk of the backward's batched precomputation, about this many bytes
# of factors, so a chunk's operands stay in cache between the precomputation and the loop.
_CHUNK_BYTES = 4 << 20
# Bytes of gates per chunk of the LSTM's backward (and of the Python loops' forward). The weight
# gradients (and the Python loops' input projection) run as one GEMM per chunk, which is as
# efficient as one GEMM over all steps from about a thousand rows (steps * batch), while the
# chunk's buffers stay in cache and long sequences need no sequence-sized scratch memory in the
# backward. (The C++ forward runs whole sequences: its input projection is part of each step.)
_CHUNK_GATE_BYTES = 2 << 20
# A sequence with at most this many bytes of gates runs as one chunk: its weight gradients are one
# GEMM (and in the Python loops its input projection the GEMM's own result, no copy into a buffer).
# T28 H128 B128 (7.3 MB) trained 8-10% faster this way than in 2 MB chunks (2026-12-02, AMD EPYC
# Zen 5, per-step-product C++ loops); at T784 the 2 MB chunks were 17% faster than 16 MB ones (cache).
_ONE_CHUNK_GATE_BYTES = 8 << 20
# The C++ loops' backward takes chunks this many times larger: each chunk repacks the weights and
# starts its threads (the measurements below were made when a weight GEMM followed each chunk; the
# loops now sum the weight gradient themselves and write the gate gradients over the gates, so a
# chunk holds no more memory than the forward already does). With the register-blocked
# loops on Zen 3 (2026-12-02), one chunk trained T28 H128 B256 (14.7 MB of gates) 7-10% faster than
# 2 MB chunks and T28 H256 B128 6% faster; at T784 H128 B128 a step took 647 ms in 2 MB chunks, 595 in
# 4, 582 in 8, 570 in 16 and 559 in 32. (The Python loops were 19% slower at T28 B256 in 16 MB chunks.)
_KERNEL_CHUNK_SCALE = 8
# Up to this many bytes per (T, N, H) buffer the LSTM's Python forward keeps every step's tanh(c) for
# the backward (longer sequences recompute it there chunk by chunk).
_KEEP_TANH_C_BYTES = 8 << 20
# The C++ loops recompute tanh(c) in the backward instead (one tanh per unit and step against a
# (T, N, H) buffer written and read again; measured 2026-12-02 on a Zen 5, interleaved train steps,
# medians ms kept / recomputed: T28 H64 B64 1.98 / 1.84, 1.85 / 1.81, 3.77 / 3.69; H128 B128 8.00 /
# 7.95, 9.80 / 9.63; H128 B256 18.2 / 17.9; H256 B128 26.7 / 27.1; T200 I8 H128 B32 18.7 / 18.9:
# even or better, and a step's memory smaller by the buffer, 1.8 MB at T28 H128 B128).
_KERNELS_KEEP_TANH_C = False
_GATES_SPENT_LOCK = threading.Lock()
# Whether the LSTM's and GRU's time loops run in C++ when the kernels build here (the tests switch
# it off to check the Python loops, which run wherever the kernels do not).
_USE_KERNELS = True
_NO_MASKS = torch.empty(0, dtype=torch.bool)


def unsupported(cell: nn.Module, x: Tensor) -> str | None:
    """Why the fused CPU path cannot run this cell, or None."""
    if transforming():
        return "torch.func transforms and forward-mode AD have no rules for its hand-written backward"
    if x.device.type != "cpu":
        return f"the fused backend runs on the CPU only, the input is on {x.device}"
    if x.dtype not in _DTYPES:
        return f"the fused backend supports float32 and float64, got {x.dtype}"
    if why := hooked(cell):
        return why
    kind = type(cell)
    if kind is LSTMCell:
        if cell.peepholes:
            return "the fused LSTM has no peepholes"
        if cell.cell_clip is not None:
            return "the fused LSTM has no cell clipping"
        if cell.proj_size:
            return "the fused LSTM has no projection (proj_size)"
        return None
    if kind is GRUCell or kind is RNNCell:
        return None
    return f"{kind.__name__} is not a built-in LSTMCell, GRUCell or RNNCell"


def run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool
) -> tuple[Tensor, Any, Any]:
    """Run the cell over time-major ``x`` (T, N, I); return (outputs, final state, states or None)."""
    # The hand-written backwards are float32 maths: the forwards must not be autocast to bfloat16.
    with torch.autocast(x.device.type, enabled=False):
        return _run(cell, x, state, masks, lengths, return_states)


def _run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool
) -> tuple[Tensor, Any, Any]:
    T = x.shape[0]
    full = T if lengths is None else int(lengths.min())
    if type(cell) is LSTMCell:
        hs, cs = lstm_sequence(cell, x, state.h, state.c, masks, full, every_c=return_states)
        return hs, LSTMState(hs[-1], cs[-1]), (LSTMState(hs, cs) if return_states else None)
    H = cell.hidden_size
    if type(cell) is GRUCell:
        if not cell.bias:
            b_x = b_hn = None
        elif cell.reset_after:  # b_hn sits inside r * (W_hn h + b_hn): only it stays out of the projection
            b_x = torch.cat((cell.bias_ih[: 2 * H] + cell.bias_hh[: 2 * H], cell.bias_ih[2 * H :]))
            b_hn = cell.bias_hh[2 * H :]
        else:
            b_x, b_hn = cell.bias_ih + cell.bias_hh, None
        fn = _GRUFunction if cell.reset_after else _GRUResetBeforeFunction
        hs = fn.apply(x, state, cell.weight_ih, cell.weight_hh, b_x, b_hn, masks, full)
    else:
        b = cell.bias_ih + cell.bias_hh if cell.bias else None
        hs = _RNNFunction.apply(x, state, cell.weight_ih, cell.weight_hh, b, masks, full, cell.nonlinearity)
    return hs, hs[-1], (hs if return_states else None)


def lstm_sequence(
    cell: LSTMCell, x: Tensor, h0: Tensor | None = None, c0: Tensor | None = None, masks: Tensor | None = None,
    full: int | None = None, every_c: bool = True,
) -> tuple[Tensor, Tensor]:
    """Every step's (h, c) of a built-in LSTMCell over time-major ``x`` (T, N, I); h0, c0 None: zeros;
    masks (T, N, 1), false past each sequence's end, come with full, the shortest length. Without
    every_c, where no graph is built, c is the last step's alone (1, N, H)."""
    if masks is not None and full is None:  # full decides which steps read the masks at all
        raise ValueError("lstm_sequence: masks need full, the shortest sequence's length")
    b_ih, b_hh = lstm_biases(cell)
    full = x.shape[0] if full is None else full
    inputs = (x, h0, c0, cell.weight_ih, cell.weight_hh, b_ih, b_hh)
    kernels = _kernels()
    if kernels is not None and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        # no graph: the C++ forward without keeping the gates for a backward (whose stores were a
        # seventh of its time), and no Function
        with _flushed_unless_kernels(kernels, x.device):
            return tuple(_lstm_forward_kernels(kernels, inputs, masks, full, keep_gates=False, every_c=every_c)[1:3])
    return _LSTMFunction.apply(*inputs, masks, full)


def lstm_biases(cell: LSTMCell) -> tuple[Tensor | None, Tensor | None]:
    """(b_ih, b_hh) as the LSTM Functions take them: torch's two biases, or the sum with forget_bias
    (or none at all) as b_ih and None."""
    if cell.forget_bias or not cell.bias:
        return cell.fused_bias(), None
    return cell.bias_ih, cell.bias_hh


def _differentiable_grads(graph: Any, inputs: tuple[Any, ...], grads_out: tuple[Tensor | None, ...]) -> tuple:
    """The gradients of a backward with ``create_graph=True``: differentiable, by recomputing the sequence.

    The hand-written backwards compute numbers, not graphs of them. For a second derivative (a
    gradient penalty, a Hessian-vector product, MAML) ``graph`` recomputes the Function's outputs from
    its original inputs with plain torch ops, and autograd differentiates that, keeping the graph.
    """
    with torch.enable_grad():
        outs = graph(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grads_out) if g is not None]
        wants = [a for a in inputs if isinstance(a, Tensor) and a.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wants, [g for _, g in pairs],
                                       create_graph=True, allow_unused=True) if pairs and wants else ())
    return tuple(next(got, None) if isinstance(a, Tensor) and a.requires_grad else None for a in inputs)


def _graph_needed(*grads: Tensor | None) -> bool:
    """Whether a backward must differentiate a recomputation instead of running the hand-written loops.

    So it must for ``create_graph=True`` (grad mode is on inside the backward), and for gradients
    batched by vmap (``is_grads_batched=True``, vectorised Jacobians and Hessians), which the loops'
    in-place, out= and C++ steps do not take.
    """
    return torch.is_grad_enabled() or any(g is not None and _is_batched(g) for g in grads)


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by vmap: torch.func's (FuncTorchBatched) or autograd's own (Batched)."""
    return "Batched" in str(torch._C._dispatch_keys(t))


def _float_maths(backward: Any) -> Any:
    """A backward in the forward's float maths even when called inside an autocast region."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: Tensor | None) -> Any:
        if not torch.is_autocast_enabled("cpu"):  # the usual case: no autocast object to build and enter
            return backward(ctx, *grads)
        with torch.autocast("cpu", enabled=False):
            return backward(ctx, *grads)

    return wrapped


def _frozen(masks: Tensor | None, t: int, full: int, new: Tensor, old: Tensor) -> Tensor:
    """Past a sequence's end its state stays: ``new`` where step t is inside it, else ``old``."""
    return new if t < full else torch.where(masks[t], new, old)


def _lstm_graph(x, h0, c0, w_ih, w_hh, b_ih, b_hh, masks, full):  # noqa: ANN001, ANN202
    """Every step's (h, c) of an LSTM by differentiable torch ops (gates i, f, g, o as torch has them)."""
    N, H = x.shape[1], w_hh.shape[1]
    pre = F.linear(x, w_ih, b_ih if b_hh is None else b_ih + b_hh)
    h, c, hs, cs = _zero_state(h0, x, N, H), _zero_state(c0, x, N, H), [], []
    for t in range(x.shape[0]):
        i, f, g, o = (pre[t] + h @ w_hh.t()).chunk(4, 1)
        cn = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = _frozen(masks, t, full, torch.sigmoid(o) * torch.tanh(cn), h)
        c = _frozen(masks, t, full, cn, c)
        hs.append(h)
        cs.append(c)
    return torch.stack(hs), torch.stack(cs)


def _gru_graph(x, h0, w_ih, w_hh, b_x, b_hn, masks, full, reset_after=True):  # noqa: ANN001, ANN202
    """Every step's h of a GRU by differentiable torch ops (gates r, z, n; see _run for the biases)."""
    H = h0.shape[1]
    pre = F.linear(x, w_ih, b_x)
    h, hs = h0, []
    for t in range(x.shape[0]):
        if reset_after:
            hr, hz, hn = (h @ w_hh.t()).chunk(3, 1)
            if b_hn is not None:
                hn = hn + b_hn
        else:
            hr, hz = (h @ w_hh[: 2 * H].t()).chunk(2, 1)
        xr, xz, xn = pre[t].chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + (r * hn if reset_after else (r * h) @ w_hh[2 * H :].t()))
        h = _frozen(masks, t, full, n + z * (h - n), h)
        hs.append(h)
    return (torch.stack(hs),)


def _rnn_graph(x, h0, w_ih, w_hh, bias, masks, full, nonlinearity):  # noqa: ANN001, ANN202
    """Every step's h of an Elman RNN by differentiable torch ops."""
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    pre = F.linear(x, w_ih, bias)
    h, hs = h0, []
    for t in range(x.shape[0]):
        h = _frozen(masks, t, full, act(pre[t] + h @ w_hh.t()), h)
        hs.append(h)
    return (torch.stack(hs),)


def _chunk_steps(N: int, width: int, elem: int) -> int:
    """Steps per chunk of the GRU's precomputation (see _CHUNK_BYTES)."""
    return max(1, _CHUNK_BYTES // max(1, N * width * elem))


def _lstm_chunk(T: int, N: int, H: int, elem: int, scale: int = 1) -> int:
    """Steps per chunk of the LSTM's loops (see _CHUNK_GATE_BYTES, _ONE_CHUNK_GATE_BYTES, _KERNEL_CHUNK_SCALE)."""
    step = N * 4 * H * elem
    return T if T * step <= scale * _ONE_CHUNK_GATE_BYTES else max(1, scale * _CHUNK_GATE_BYTES // step)


def _rotate(w: Tensor, H: int) -> Tensor:
    """Gate blocks (i, f, g, o) -> (o, i, f, g), along the first axis."""
    return torch.cat((w[3 * H :], w[: 3 * H]))


def _unrotate(w: Tensor, H: int) -> Tensor:
    """Gate blocks (o, i, f, g) -> (i, f, g, o), along the first axis."""
    return torch.cat((w[H:], w[:H]))


def _rotate_scale_g(w: Tensor, H: int) -> Tensor:
    """Gate blocks (i, f, g, o) -> (o, i, f, 2g): the forward's weights (see _LSTMFunction)."""
    out = _rotate(w, H)
    out[3 * H :].mul_(2.0)
    return out


class _LSTMFunction(torch.autograd.Function):
    """Every step's (h, c) of an LSTM.

    h0 and c0 None: the zero state. b_ih and b_hh: torch's two biases, added inside (no node of
    their own in the graph); b_hh None: b_ih is the whole bias (a cell's forget_bias folded in), or
    there is none.

    With the C++ loops (``lstm_forward`` and ``lstm_backward`` in csrc/fused_cpu.cpp, one call each
    way: everything between the loops, buffers and the gradients' layouts included, is done there,
    as a handful of Python-level torch calls per direction cost more than the loops' set-up) the
    gates keep torch's order (i, f, g, o) and the weights are used as given. The Python loops keep
    them in the order (o, i, f, g), which makes the gates fed by dc (i, f, g) one block in the
    backward, and, as torch's tanh is ~3x slower than its sigmoid on the CPU, use
    ``tanh(a) = 2 sigmoid(2a) - 1``: the g rows of the weights are doubled once per call, one
    in-place sigmoid then covers a step's whole (contiguous) gate row, and tanh(c) is three cheap ops.

    Saved for the backward: the activated gates G (T, N, 4H), the outputs and, with the Python loops
    unless the sequence is long (see _KEEP_TANH_C_BYTES), every step's tanh(c). The C++ backward takes
    the weight gradients' operand [x_t, 1, h_{t-1}] from the input and the outputs, a group of rows at
    a time; the Python loops keep the inputs with a column of ones for the bias.

    The C++ backward writes the gate gradients over G: a saved tensor that then no longer holds the
    gates. A later backward through the same graph (``retain_graph=True``;
    ``torch.autograd.functional.jacobian`` without ``vectorize``) runs the forward loop again for
    them, which costs about a forward per extra backward.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, masks, full):  # type: ignore[override]
        inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)  # as given, for a differentiable backward (create_graph)
        kernels = _kernels()
        with _flushed_unless_kernels(kernels, x.device):
            if kernels is not None:
                G, hs, cs, TCs, x2 = *_lstm_forward_kernels(kernels, inputs, masks, full), None
            else:
                G, hs, cs, TCs, x2 = _lstm_forward_python(inputs, masks, full)
        ctx.full, ctx.kernels = full, kernels is not None
        ctx.gates_spent = False  # the C++ backward writes the gate gradients over G (see backward)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(_saved_rows(x2, x), G, hs, cs, TCs, masks, *inputs)
        return hs, cs

    @staticmethod
    @_float_maths
    def backward(ctx, gh, gc):  # type: ignore[override]
        x2, G, hs, cs, TCs, masks, *inputs = ctx.saved_tensors
        if _graph_needed(gh, gc):
            return (*_differentiable_grads(_lstm_graph, (*inputs, masks, ctx.full), (gh, gc))[:7], None, None)
        with _flushed_unless_kernels(ctx.kernels, G.device):
            if ctx.kernels:
                with _GATES_SPENT_LOCK:  # two threads' backwards through one retained graph: one may use G
                    spent, ctx.gates_spent = ctx.gates_spent, True
                if spent:  # a later backward through a retained graph: an earlier one wrote over G
                    G = _lstm_forward_kernels(cext.ops(), inputs, masks, ctx.full)[0]
                grads = _lstm_backward_kernels(ctx, gh, gc, inputs, G, hs, cs, TCs, masks)
            else:
                grads = _lstm_backward(ctx, gh, gc, _rows(x2, inputs[0]), inputs, G, hs, cs, TCs, masks)
        return (*grads, None, None)


# The x86 builds of the C++ loops set and restore the flush-to-zero mode in each of their threads
# (MXCSR): no Python context around them, which costs tens of microseconds a call on a busy host.
_KERNELS_FLUSH = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _flushed_unless_kernels(kernels: Any, device: torch.device) -> Any:
    """denormals_flushed(device), or nothing where the C++ loops flush for themselves."""
    return contextlib.nullcontext() if kernels and _KERNELS_FLUSH else denormals_flushed(device)


def _lstm_forward_kernels(kernels, inputs, masks, full, keep_gates=True, every_c=True):  # noqa: ANN001, ANN202
    """The forward's time loop in C++: the activated gates G (T, N, 4H; None without keep_gates), hs,
    cs (the last step's alone without every_c, which comes without keep_gates) and tanh(c) or None."""
    x = inputs[0]
    T, N, _ = x.shape
    H = inputs[4].shape[1]
    keep_tc = keep_gates and _KERNELS_KEEP_TANH_C and T * N * H * x.element_size() <= _KEEP_TANH_C_BYTES
    G, hs, cs, *tcs = kernels.lstm_forward(*inputs, _mask_rows(masks, T, N), full, keep_tc, flush_denormals_enabled(),
                                           keep_gates, every_c)
    return G, hs, cs, (tcs[0] if tcs else None)


def _lstm_forward_python(inputs, masks, full):  # noqa: ANN001, ANN202
    """The forward's time loop in Python: (G, hs, cs, TCs, x2), x2 the inputs (T * N, Ix) with a column of
    ones for a bias."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    T, N, I = x.shape
    H = w_hh.shape[1]
    h0, c0 = _zero_state(h0, x, N, H), _zero_state(c0, x, N, H)
    hs, cs = x.new_empty(T, N, H), x.new_empty(T, N, H)
    TCs = x.new_empty(T, N, H) if T * N * H * x.element_size() <= _KEEP_TANH_C_BYTES else None
    h0_zero = not bool(h0.any())  # the usual zero state: step 0 needs no recurrent GEMM
    bias = b_ih if b_hh is None else b_ih + b_hh
    if bias is None:
        x2 = x.reshape(T * N, I)
        w_in = _rotate_scale_g(w_ih, H)
    else:  # a column of ones carries the bias: no bias copy here, no separate sum for db
        x2 = x.new_empty(T, N, I + 1)
        x2[:, :, :I].copy_(x)
        x2[:, :, I].fill_(1.0)
        x2 = x2.view(T * N, I + 1)
        w_in = torch.cat((_rotate_scale_g(w_ih, H), _rotate_scale_g(bias, H).unsqueeze(1)), 1)
    whh = _rotate_scale_g(w_hh, H)
    chunk = _lstm_chunk(T, N, H, x.element_size())
    # One chunk (the common case) takes the projection's own result: no copy into a buffer.
    G = linear(x2, w_in).view(T, N, 4 * H) if chunk >= T else x.new_empty(T, N, 4 * H)
    _lstm_forward_loop(x2, h0, c0, w_in, whh, G, hs, cs, TCs, masks, full, chunk, h0_zero)
    return G, hs, cs, TCs, x2


def _zero_state(s: Tensor | None, x: Tensor, N: int, H: int) -> Tensor:
    """A state as the Python loops take it: ``s``, or zeros (N, H) for None."""
    return x.new_zeros(N, H) if s is None else s


def _lstm_forward_loop(x2, h0, c0, w_in, whh, G, hs, cs, TCs, masks, full, chunk, h0_zero):  # noqa: ANN001
    """The forward's time loop in Python (where the C++ kernels are unavailable); fills G, hs, cs, TCs."""
    T, N, H4 = G.shape
    H = H4 // 4
    H2, H3 = 2 * H, 3 * H
    G2 = G.view(T * N, H4)
    tc_s = TCs.unbind(0) if TCs is not None else (x2.new_empty(N, H),) * T
    gates = G.unbind(0)
    o_s, i_s, f_s, g_s = (
        G[:, :, :H].unbind(0),
        G[:, :, H:H2].unbind(0),
        G[:, :, H2:H3].unbind(0),
        G[:, :, H3:].unbind(0),
    )
    h_s, c_s = hs.unbind(0), cs.unbind(0)
    # 0-dim tensors: ops with a Python scalar take a slower path on small tensors.
    m1 = x2.new_full((), -1.0)
    mul, add, sigmoid = torch.mul, torch.add, torch.sigmoid
    h, c = h0, c0
    for t in range(T):
        if t % chunk == 0 and chunk < T:  # the input projection of the next chunk, just before it is used
            rows = slice(t * N, min(T, t + chunk) * N)
            linear(x2[rows], w_in, out=G2[rows])
        if t or not h0_zero:  # the activation writes the product into the buffer: no copy
            sigmoid(linear_add(gates[t], h, whh), out=gates[t])
        else:
            gates[t].sigmoid_()
        g = add(m1, g_s[t], alpha=2, out=g_s[t])
        tc = tc_s[t]
        if t < full:
            c = mul(f_s[t], c, out=c_s[t]).addcmul_(i_s[t], g)
            add(m1, sigmoid(add(c, c, out=tc), out=tc), alpha=2, out=tc)
            h = mul(o_s[t], tc, out=h_s[t])
        else:  # the unfrozen step into c_s/h_s, then the frozen rows restored
            cn = mul(f_s[t], c, out=c_s[t]).addcmul_(i_s[t], g)
            add(m1, sigmoid(add(cn, cn, out=tc), out=tc), alpha=2, out=tc)
            hn = mul(o_s[t], tc, out=h_s[t])
            m = masks[t]
            c = torch.where(m, cn, c, out=cn)
            h = torch.where(m, hn, h, out=hn)


def _kernels() -> Any:
    """The C++ time loops (:mod:`rnnkit.backends.cext`), or None to run the Python ones."""
    return cext.ops() if _USE_KERNELS else None


def kernels_available() -> bool:
    """Whether the LSTM and GRU time loops run in C++ here (else in Python)."""
    return _kernels() is not None


def _mask_rows(masks: Tensor | None, T: int, N: int) -> Tensor:
    """The engine's (T, N, 1) masks as the kernels take them: contiguous (T, N), or empty for none."""
    if masks is None:
        return _NO_MASKS
    return masks.reshape(T, N).contiguous()


def _lstm_backward_kernels(ctx, gh, gc, inputs, G, hs, cs, TCs, masks):  # noqa: ANN001
    """The backward with its time loop in C++ (gates in torch's order): chunks of steps from the last,
    the loop computing the input and weight gradients as it goes.

    The gate gradients are written over the gates G, step by step (each step reads its gates before
    it writes their gradients): no buffer as large as G, whose lines are in cache as they are written
    (measured on a Zen 5, interleaved train steps, ms separate buffer / in place: T28 H64 B64 2.16 /
    1.98 and 2.27 / 2.12, H128 B128 7.84 / 7.47 and 9.25 / 8.97). Each thread sums its rows' part of
    the weight gradient [x_t, 1, h_{t-1}]^T dG_t a few steps at a time, while those gate gradients are
    in its cache, from those rows of x and the outputs copied side by side; the partial sums of the
    threads (one (Ix + H, 4H) block each) are added at the end and copied out in torch's layout."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    T, N, H4 = G.shape
    need = ctx.needs_input_grad
    bits = sum(1 << k for k, b in enumerate((*need[:5], need[5] or need[6])) if b)
    C = min(T, _lstm_chunk(T, N, H4 // 4, G.element_size(), _KERNEL_CHUNK_SCALE))
    # cext.ops(): the kernels as the forward found them (whatever _USE_KERNELS says now)
    dx, dh0, dc0, dw_ih, dw_hh, db = cext.ops().lstm_backward(
        G, cs, hs, x, h0, c0, w_ih, w_hh, TCs, gh, gc, _mask_rows(masks, T, N), ctx.full, C, bits, b_ih is not None,
        flush_denormals_enabled())
    return dx, dh0, dc0, dw_ih, dw_hh, *_bias_grads(db, need[5], need[6] and b_hh is not None)


def _weight_operand(buf: Tensor, x_rows: Tensor, ones: bool, hs: Tensor, h0: Tensor, lo: int, hi: int) -> Tensor:
    """Steps lo..hi-1's rows of [x_t, 1, h_{t-1}] laid out in ``buf`` (x_rows: their ((hi - lo) N, I) inputs,
    or I + 1 with the ones)."""
    N, H = h0.shape
    n = hi - lo
    xh = buf[: n * N]
    I = x_rows.shape[1]
    xh[:, :I].copy_(x_rows)
    if ones:
        xh[:, I].fill_(1.0)
    for rows, prev in _with_prev(hs, h0, lo, hi):
        xh.view(n, N, -1)[rows, :, -H:].copy_(prev)
    return xh


def _lstm_backward(ctx, gh, gc, x2, inputs, G, hs, cs, TCs, masks):  # noqa: ANN001
    """The backward with its time loop in Python: chunks of steps from the last, the recurrent loop,
    then the chunk's GEMMs (input gradient and weights)."""
    _, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    T, N, H4 = G.shape
    H = H4 // 4
    h0, c0 = _zero_state(h0, G, N, H), _zero_state(c0, G, N, H)
    w_ih_r, w_hh_r = _rotate(w_ih, H), _rotate(w_hh, H)
    need_x, need_h0, need_c0, need_wih, need_whh, need_bih, need_bhh = ctx.needs_input_grad[:7]
    need_bhh = need_bhh and b_hh is not None
    need_b = (need_bih or need_bhh) and b_ih is not None
    C = min(T, _lstm_chunk(T, N, H, G.element_size()))
    # Per chunk, P receives the gates' gradients dG; DH holds the outputs' gradient, to which each
    # step adds the recurrent part for the step below.
    P, DH = G.new_empty(C, N, H4), G.new_empty(C, N, H)
    dc, carry = G.new_empty(N, H), G.new_empty(N, H)
    if gc is not None:
        dc.copy_(gc[T - 1])
    else:
        dc.zero_()
    I = w_ih_r.shape[1]
    # (in, out) weights of the backward's products, laid out once for the GEMM routine
    whh_rt = w_hh_r.t().contiguous()
    wih_rt = w_ih_r.t().contiguous() if need_x else None
    Ix = x2.shape[1]  # I, or I + 1 with the column of ones that carries the bias
    dx = G.new_empty(T, N, I) if need_x else None
    # The weight gradients of a chunk are one GEMM: [x_t, 1, h_{t-1}]^T dG over its rows.
    need_w = need_wih or need_whh or need_b
    XH = G.new_empty(C * N, Ix + H) if need_w else None
    dW = G.new_zeros(Ix + H, H4) if need_w else None
    loop = _LSTMBackwardLoop(G, cs, c0, TCs, masks, ctx.full, gc, P, DH, dc, carry, whh_rt)
    for hi in range(T, 0, -C):
        lo = max(0, hi - C)
        n = hi - lo
        dhb = DH[:n]
        if gh is None:
            dhb.zero_()
        else:
            dhb.copy_(gh[lo:hi])
        if hi < T:
            dhb[n - 1].add_(carry)
        loop.chunk(lo, hi)
        dG = P[:n].view(n * N, H4)
        if need_x:
            linear(dG, wih_rt, out=dx[lo:hi].view(n * N, -1))
        if need_w:
            linear_add_(dW, _weight_operand(XH, x2[lo * N : hi * N], False, hs, h0, lo, hi).t(), dG.t())
    return (
        dx,
        linear(P[0], whh_rt) if need_h0 else None,
        loop.dc0() if need_c0 else None,
        _unrotate(dW[:I].t(), H) if need_wih else None,
        _unrotate(dW[Ix:].t(), H) if need_whh else None,
        *_bias_grads(_unrotate(dW[I], H) if need_b else None, need_bih, need_bhh),
    )


def _bias_grads(db: Tensor | None, need_ih: bool, need_hh: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of b_ih and b_hh: both are db (the sum's gradient), each where it is needed."""
    return (db if need_ih else None), (db if need_hh else None)


class _LSTMBackwardLoop:
    """The backward's recurrent loop in Python, chunk by chunk (where the C++ kernels are unavailable).

    Per chunk the local derivatives that do not depend on the recurrence are computed first with
    a few batched ops: P holds each gate's (``sigmoid'``, ``tanh'`` times its partner), in place of
    which the loop writes dG, and K is d c_t / d h_t through h = o tanh(c), i.e. o (1 - tanh(c)^2).
    """

    def __init__(self, G, cs, c0, TCs, masks, full, gc, P, DH, dc, carry, whh_rt):  # noqa: ANN001
        T, N, H4 = G.shape
        H = H4 // 4
        C = P.shape[0]
        self.G, self.cs, self.c0, self.TCs, self.full, self.P, self.DH = G, cs, c0, TCs, full, P, DH
        self.dc, self.carry, self.whh_rt, self.H = dc, carry, whh_rt, H
        self.K = G.new_empty(C, N, H)
        self.TC = G.new_empty(C, N, H) if TCs is None else None
        self.F = None  # past a sequence's end the forget gate is replaced by 1 so dc passes through unchanged
        self.mf = self.notm = self.frozen = None
        if full < T:
            self.mf, self.notm = _masked_parts(masks, full, G.dtype)
            self.frozen = ~masks[full:]
            self.F = G.new_empty(C, N, H)
        self.m1 = G.new_full((), -1.0)
        self.gc_s = gc.unbind(0) if gc is not None else None
        self.dcn = G.new_empty(N, H)
        self.f_s: tuple[Tensor, ...] = ()

    def chunk(self, lo: int, hi: int) -> None:
        """Steps hi-1 down to lo: dG into P, the carry into the step below, dc updated."""
        G, P, K, H, full = self.G, self.P, self.K, self.H, self.full
        H2, H3 = 2 * H, 3 * H
        n = hi - lo
        m1, add, addcmul, mul = self.m1, torch.add, torch.addcmul, torch.mul
        g_, p_, k = G[lo:hi], P[:n], K[:n]
        # Factors of the whole chunk, batched: nothing here depends on the recurrence.
        if self.TCs is None:
            tc, c_ = self.TC[:n], self.cs[lo:hi]
            add(m1, add(c_, c_, out=tc).sigmoid_(), alpha=2, out=tc)  # tanh(c)
        else:
            tc = self.TCs[lo:hi]
        s, ps = g_[:, :, :H3], p_[:, :, :H3]
        addcmul(s, s, s, value=-1.0, out=ps)  # s (1 - s) for o, i, f
        p_[:, :, :H].mul_(tc)
        gg = g_[:, :, H3:]
        p_[:, :, H:H2].mul_(gg)
        pf = p_[:, :, H2:H3]
        for rows, prev in _with_prev(self.cs, self.c0, lo, hi):
            pf[rows].mul_(prev)
        pg = p_[:, :, H3:]
        mul(gg, gg, out=pg)
        addcmul(g_[:, :, H:H2], g_[:, :, H:H2], pg, value=-1.0, out=pg)  # i (1 - g^2)
        mul(tc, tc, out=k)
        ot = g_[:, :, :H]
        addcmul(ot, ot, k, value=-1.0, out=k)
        f_all = G[:, :, H2:H3]
        f_s = f_all[lo:hi].unbind(0)
        if hi > full:  # frozen rows: no gradient into the gates, dc passes through
            a = max(lo, full)
            m = self.mf[a - full : hi - full]
            P[a - lo : n].mul_(m)
            K[a - lo : n].mul_(m)
            fe = self.F[:n]
            fe.copy_(f_all[lo:hi])
            fe[a - lo :].masked_fill_(self.frozen[a - full : hi - full], 1.0)
            f_s = fe.unbind(0)
        self.f_s = f_s
        P_s, K_s, DH_s = P.unbind(0), K.unbind(0), self.DH.unbind(0)
        P3_s, Po_s = P[:, :, H:].unflatten(2, (3, H)).unbind(0), P[:, :, :H].unbind(0)
        dc, dcn, gc_s, notm = self.dc, self.dcn, self.gc_s, self.notm
        dcn_3 = dcn.unsqueeze(1)  # broadcast over the (i, f, g) blocks
        dh = DH_s[n - 1]
        for j in range(n - 1, -1, -1):
            t = lo + j
            addcmul(dc, dh, K_s[j], out=dcn)
            P3_s[j].mul_(dcn_3)
            Po_s[j].mul_(dh)
            if t == 0:
                break
            if j:  # the step below's dh: its outputs' gradient plus this step's GEMM, a new tensor
                target = linear_add(DH_s[j - 1], P_s[j], self.whh_rt)
            else:  # the step below starts the next chunk
                target = linear(P_s[j], self.whh_rt, out=self.carry)
            if t >= full:
                target.addcmul_(notm[t - full], dh)
            if gc_s is not None:
                addcmul(gc_s[t - 1], dcn, f_s[j], out=dc)
            else:
                mul(dcn, f_s[j], out=dc)
            dh = target

    def dc0(self) -> Tensor:
        """d loss / d c_0, once the chunk holding step 0 has run."""
        return torch.mul(self.dcn, self.f_s[0])


def _input_projection(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``x`` (T, N, I) as (T*N, I), and ``x W_ih^T + bias`` as a fresh (T, N, G) buffer (the GEMM's own)."""
    T, N, I = x.shape
    x2 = x.reshape(T * N, I)
    return x2, linear(x2, w_ih, bias=bias).view(T, N, -1)


def _saved_rows(x2: Tensor | None, x: Tensor) -> Tensor | None:
    """The input's rows x2 as a Function saves them: None where they are a view of the input x itself,
    which the backward reshapes again (_rows). A view of the caller's tensor made in the forward (where
    grad is off) would make autograd refuse any in-place edit of the input at once, with a message
    about views made in no_grad mode, rather than at the backward with its usual one, as torch's."""
    if x2 is not None and x2._is_view() and x2.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return None
    return x2


def _rows(x2: Tensor | None, x: Tensor) -> Tensor:
    """The input's rows (T*N, I) for a backward: the saved x2, or x reshaped again (see _saved_rows)."""
    return x.flatten(0, 1) if x2 is None else x2


def _grad_buffer(grad: Tensor | None, like: Tensor) -> Tensor:
    """A fresh (T, N, H) buffer holding the outputs' gradient (zeros if none).

    The backward loops add each step's recurrent gradient into it in place (one GEMM with beta=1
    per step), so a strided incoming gradient is copied once rather than step by step.
    """
    if grad is None:
        return torch.zeros_like(like)
    return torch.empty_like(like).copy_(grad)


def _double_rows(w: Tensor, lo: int, hi: int) -> Tensor:
    """A dense copy of ``w`` with rows lo..hi-1 doubled: pre-activations fed to ``tanh(a) = 2 sigmoid(2a) - 1``."""
    out = w.clone(memory_format=torch.contiguous_format)  # (clone keeps a transposed weight's strides)
    out[lo:hi].mul_(2.0)
    return out


def _masked_parts(masks: Tensor, full: int, dtype: torch.dtype) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Masks of the steps past ``full`` as floats, and per step 1 - mask (the frozen rows)."""
    mf = masks[full:].to(dtype)
    return mf, (1.0 - mf).unbind(0)


def _with_prev(states: Tensor, first: Tensor, lo: int, hi: int) -> list[tuple[slice, Tensor]]:
    """For steps lo..hi-1: (rows of the chunk, the states before them), the one before step 0 apart."""
    if lo > 0:
        return [(slice(None), states[lo - 1 : hi - 1])]
    pairs = [(slice(0, 1), first)]
    if hi > 1:
        pairs.append((slice(1, None), states[: hi - 1]))
    return pairs


class _RNNFunction(torch.autograd.Function):
    """Every step's h of an Elman RNN (tanh or relu); the activated pre-activations are the states.

    tanh runs as ``2 sigmoid(2a) - 1`` (torch's tanh is ~3x slower than its sigmoid on the CPU):
    the weights are doubled once per call.
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, bias, masks, full, nonlinearity):  # type: ignore[override]
        inputs = (x, h0, w_ih, w_hh, bias)  # as given, for a differentiable backward (create_graph)
        with denormals_flushed(x.device):
            T = x.shape[0]
            is_tanh = nonlinearity == "tanh"
            if is_tanh:
                x2, hs = _input_projection(x, w_ih * 2.0, None if bias is None else bias * 2.0)
                whh = w_hh * 2.0
            else:
                x2, hs = _input_projection(x, w_ih, bias)
                whh = w_hh
            m1 = x.new_full((), -1.0)
            add, sigmoid = torch.add, torch.sigmoid
            steps = hs.unbind(0)
            h0_zero = not bool(h0.any())
            h = h0
            for t in range(T):
                pre = steps[t]
                # the activation writes the step's product into its slot: no copy (gemm.linear_add)
                r = linear_add(pre, h, whh) if t or not h0_zero else pre
                new = add(m1, sigmoid(r, out=pre), alpha=2, out=pre) if is_tanh else torch.clamp_min(r, 0.0, out=pre)
                h = new if t < full else torch.where(masks[t], new, h, out=pre)
        ctx.full, ctx.tanh, ctx.has_bias, ctx.h0_zero = full, is_tanh, bias is not None, h0_zero
        ctx.set_materialize_grads(False)
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(_saved_rows(x2, x), h0, w_ih, w_hh, hs, masks, *inputs)
        return hs

    @staticmethod
    @_float_maths
    def backward(ctx, gh):  # type: ignore[override]
        x2, h0, w_ih, w_hh, hs, masks, *inputs = ctx.saved_tensors
        if _graph_needed(gh):
            grads = _differentiable_grads(_rnn_graph, (*inputs, masks, ctx.full, ctx.nonlinearity), (gh,))
            return (*grads[:5], None, None, None)
        with denormals_flushed(hs.device):
            return _rnn_backward(ctx, gh, _rows(x2, inputs[0]), h0, w_ih, w_hh, hs, masks)


def _rnn_backward(ctx, gh, x2, h0, w_ih, w_hh, hs, masks):  # noqa: ANN001
    T, N, H = hs.shape
    full = ctx.full
    need_x, need_h0, need_wih, need_whh, need_b = ctx.needs_input_grad[:5]
    # D: the activation's derivative per step, overwritten by the loop with dG.
    # Frozen rows hold the old state, not the activation: they are masked to zero anyway.
    if ctx.tanh:
        D = torch.addcmul(hs.new_ones(()), hs, hs, value=-1.0)
    else:
        D = (hs > 0).to(hs.dtype)
    notm = None
    if full < T:
        mf, notm = _masked_parts(masks, full, hs.dtype)
        D[full:].mul_(mf)
    D_s = D.unbind(0)
    DH = _grad_buffer(gh, hs)
    dh_s = DH.unbind(0)
    for t in range(T - 1, 0, -1):
        D_s[t].mul_(dh_s[t])
        addmm_(dh_s[t - 1], D_s[t], w_hh)
        if t >= full:
            dh_s[t - 1].addcmul_(notm[t - full], dh_s[t])
    D_s[0].mul_(dh_s[0])
    dG = D.view(T * N, H)
    dx = dh0 = dwih = dwhh = db = None
    if need_h0:
        dh0 = mm(D_s[0], w_hh)
    if need_x:
        dx = mm(dG, w_ih).view(T, N, -1)
    if need_wih:
        dwih = mm(dG.t(), x2)
    if need_whh:
        if T > 1:
            dwhh = mm(D[1:].view(-1, H).t(), hs[:-1].reshape(-1, H))
            if not ctx.h0_zero:
                addmm_(dwhh, D_s[0].t(), h0)
        else:
            dwhh = mm(D_s[0].t(), h0)
    if need_b and ctx.has_bias:
        db = dG.sum(0)
    return dx, dh0, dwih, dwhh, db, None, None, None


class _GRUFunction(torch.autograd.Function):
    """Every step's h of a GRU with torch's maths (reset gate after the recurrent matmul).

    Gates are kept as (r, z, n) after activation; ``Hh`` keeps ``h W_hh^T + (0, 0, b_hn)`` per
    step, whose n block ``S`` the reset gate multiplies. n's tanh runs as ``2 sigmoid(2a) - 1``
    with the n rows of the weights doubled, so ``Hh`` holds 2S. Every gradient of a step is
    ``dh`` times a factor that does not depend on the recurrence, so the backward loop is one
    broadcast multiply, one GEMM and one multiply-add per step.
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_x, b_hn, masks, full):  # type: ignore[override]
        inputs = (x, h0, w_ih, w_hh, b_x, b_hn)  # as given, for a differentiable backward (create_graph)
        with denormals_flushed(x.device):
            T, N, _ = x.shape
            H = h0.shape[1]
            H2, H3 = 2 * H, 3 * H
            x2, G = _input_projection(
                x, _double_rows(w_ih, H2, H3), None if b_x is None else _double_rows(b_x, H2, H3)
            )
            b_h = x.new_zeros(H3)
            if b_hn is not None:
                torch.mul(b_hn, 2.0, out=b_h[H2:])
            hs = x.new_empty(T, N, H)
            whh = _double_rows(w_hh, H2, H3)
            h0_zero = not bool(h0.any())
            kernels = _kernels()
            # The outputs are a tensor of their own, not the states the backward keeps: torch.nn.GRU's
            # outputs may be edited in place (its CPU kernel keeps no outputs), so these may too.
            if kernels is not None:  # Hh keeps only the n block of h W_hh^T + b_h (2S): all the backward reads
                h0 = h0.contiguous()
                Hh, out = x.new_empty(T, N, H), x.new_empty(T, N, H)
                kernels.gru_forward_steps(G, Hh, hs, out, h0, whh, b_h, _mask_rows(masks, T, N), full, h0_zero,
                                          flush_denormals_enabled())
            else:
                Hh = x.new_empty(T, N, H3)
                _gru_forward_loop(G, Hh, hs, h0, whh, b_h, masks, full, h0_zero)
                out = hs.clone()
        ctx.full, ctx.has_bx, ctx.has_bhn = full, b_x is not None, b_hn is not None
        ctx.kernels = kernels is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(_saved_rows(x2, x), h0, w_ih, w_hh, G, Hh, hs, masks, *inputs)
        return out

    @staticmethod
    @_float_maths
    def backward(ctx, gh):  # type: ignore[override]
        x2, h0, w_ih, w_hh, G, Hh, hs, masks, *inputs = ctx.saved_tensors
        if _graph_needed(gh):
            grads = _differentiable_grads(_gru_graph, (*inputs, masks, ctx.full), (gh,))
            return (*grads[:6], None, None)
        x2 = _rows(x2, inputs[0])
        with denormals_flushed(x2.device):
            if ctx.kernels:
                return _gru_backward_kernels(ctx, gh, x2, h0, w_ih, w_hh, G, Hh, hs, masks)
            return _gru_backward(ctx, gh, x2, h0, w_ih, w_hh, G, Hh, hs, masks)


def _gru_forward_loop(G, Hh, hs, h0, whh, b_h, masks, full, h0_zero):  # noqa: ANN001
    """The GRU forward's time loop in Python (where the C++ kernels are unavailable); fills G, Hh, hs."""
    T, N, H3 = G.shape
    H = H3 // 3
    H2 = 2 * H
    rz_s, r_s, z_s, n_s = (
        G[:, :, :H2].unbind(0),
        G[:, :, :H].unbind(0),
        G[:, :, H:H2].unbind(0),
        G[:, :, H2:].unbind(0),
    )
    hh_s, hrz_s, s_s = Hh.unbind(0), Hh[:, :, :H2].unbind(0), Hh[:, :, H2:].unbind(0)
    h_s = hs.unbind(0)
    m1 = G.new_full((), -1.0)
    lerp, add = torch.lerp, torch.add
    h = h0
    for t in range(T):
        if t or not h0_zero:
            linear(h, whh, out=hh_s[t], bias=b_h)
        else:
            hh_s[t].copy_(b_h)
        rz_s[t].add_(hrz_s[t]).sigmoid_()
        n = add(m1, n_s[t].addcmul_(r_s[t], s_s[t]).sigmoid_(), alpha=2, out=n_s[t])
        if t < full:
            h = lerp(n, h, z_s[t], out=h_s[t])
        else:
            h = torch.where(masks[t], lerp(n, h, z_s[t]), h, out=h_s[t])


def _gru_backward_kernels(ctx, gh, x2, h0, w_ih, w_hh, G, S2, hs, masks):  # noqa: ANN001
    """The GRU's backward with its time loop in C++; the weight gradients are a few large GEMMs after it."""
    T, N, H = hs.shape
    H2, H3 = 2 * H, 3 * H
    need_x, need_h0, need_wih, need_whh, need_bx, need_bhn = ctx.needs_input_grad[:6]
    DH = _grad_buffer(gh, hs)
    # gradients of the input projection's pre-activations (r, z, n) and of h W_hh^T + b (r, z, S)
    DGi, DGh = G.new_empty(T, N, H3), G.new_empty(T, N, H3)
    dh0 = G.new_zeros(N, H)
    w_hh = w_hh.contiguous()
    cext.ops().gru_backward_steps(G, S2, hs, h0, DH, DGi, DGh, dh0, w_hh, _mask_rows(masks, T, N), ctx.full,
                                  flush_denormals_enabled())
    dx = dwih = dwhh = dbx = dbhn = None
    if need_h0:
        addmm_(dh0, DGh[0], w_hh)
    dG = DGi.view(T * N, H3)
    if need_x:
        dx = mm(dG, w_ih).view(T, N, -1)
    # The weight gradients transposed, W^T = A^T dG: oneDNN's way round (see _lstm_backward)
    if need_wih:
        dwih = mm(x2.t(), dG).t()
    if need_whh:
        h_prev = torch.cat((h0.unsqueeze(0), hs[:-1])).view(T * N, H)
        dwhh = mm(h_prev.t(), DGh.view(T * N, H3)).t()
    if need_bx and ctx.has_bx:
        dbx = dG.sum(0)
    if need_bhn and ctx.has_bhn:
        dbhn = DGh[:, :, H2:].sum((0, 1))
    return dx, dh0 if need_h0 else None, dwih, dwhh, dbx, dbhn, None, None


def _gru_backward(ctx, gh, x2, h0, w_ih, w_hh, G, Hh, hs, masks):  # noqa: ANN001
    T, N, H = hs.shape
    H2, H3, H4 = 2 * H, 3 * H, 4 * H
    full = ctx.full
    need_x, need_h0, need_wih, need_whh, need_bx, need_bhn = ctx.needs_input_grad[:6]
    # Q: per step the factors (n, r, z, s) with dh, overwritten by the loop with
    # (da_n, da_r, da_z, dS): the first three blocks are dG of the input projection in the
    # order (n, r, z), the last three the gradient of h W_hh^T + b in the order (r, z, n).
    Q = G.new_empty(T, N, H4)
    addcmul, mul = torch.addcmul, torch.mul
    z_all = G[:, :, H:H2]
    z_eff = z_all  # past a sequence's end z is replaced by 1 so dh passes through unchanged
    mf = None
    if full < T:
        mf = masks[full:].to(G.dtype)
        z_eff = torch.cat((z_all[:full], torch.where(masks[full:], z_all[full:], 1.0)))
    chunk = _chunk_steps(N, H4, G.element_size())
    one = G.new_ones(())

    def precompute(lo: int, hi: int) -> None:
        g_, q = G[lo:hi], Q[lo:hi]
        r, z, n = g_[:, :, :H], g_[:, :, H:H2], g_[:, :, H2:]
        qn, qr, qz, qs = q[:, :, :H], q[:, :, H:H2], q[:, :, H2:H3], q[:, :, H3:]
        torch.sub(one, z, out=qs)  # 1 - z, parked in the s block
        mul(n, n, out=qn)
        addcmul(qs, qs, qn, value=-1.0, out=qn)  # (1 - z)(1 - n^2)
        addcmul(z, z, z, value=-1.0, out=qz)  # z (1 - z)
        for rows, prev in _with_prev(hs, h0, lo, hi):
            torch.sub(prev, n[rows], out=qr[rows])  # h_prev - n, parked in the r block
        qz.mul_(qr)
        addcmul(r, r, r, value=-1.0, out=qr)
        qr.mul_(Hh[lo:hi, :, H2:]).mul_(qn).mul_(0.5)  # Hh holds 2S
        mul(qn, r, out=qs)
        if hi > full:
            a = max(lo, full)
            Q[a:hi].mul_(mf[a - full : hi - full])

    Q4_s = Q.unflatten(2, (4, H)).unbind(0)
    dhh_s = Q[:, :, H:].unbind(0)
    z_s = z_eff.unbind(0)
    DH = _grad_buffer(gh, hs)
    dh_s = DH.unbind(0)
    lo = T
    for t in range(T - 1, -1, -1):
        if t < lo:
            lo = max(0, t + 1 - chunk)
            precompute(lo, t + 1)
        Q4_s[t].mul_(dh_s[t].unsqueeze(1))
        if t == 0:
            break
        addmm_(dh_s[t - 1], dhh_s[t], w_hh).addcmul_(dh_s[t], z_s[t])
    dx = dh0 = dwih = dwhh = dbx = dbhn = None
    if need_h0:
        dh0 = mm(dhh_s[0], w_hh).addcmul_(dh_s[0], z_s[0])
    dG = Q[:, :, :H3].reshape(T * N, H3)  # (n, r, z)
    if need_x:
        dx = mm(dG, torch.cat((w_ih[H2:], w_ih[:H2]))).view(T, N, -1)
    if need_wih:
        dw = mm(dG.t(), x2)
        dwih = torch.cat((dw[H:], dw[:H]))
    if need_whh:
        dhh = Q[:, :, H:]
        dwhh = mm(dhh[0].t(), h0)
        if T > 1:
            addmm_(dwhh, dhh[1:].reshape(-1, H3).t(), hs[:-1].reshape(-1, H))
    if need_bx and ctx.has_bx:
        db = dG.sum(0)
        dbx = torch.cat((db[H:], db[:H]))
    if need_bhn and ctx.has_bhn:
        dbhn = Q[:, :, H3:].sum((0, 1))
    return dx, dh0, dwih, dwhh, dbx, dbhn, None, None


class _GRUResetBeforeFunction(torch.autograd.Function):
    """Every step's h of a GRU with the reset gate before the matmul (Keras v1, ``reset_after=False``).

    All biases fold into the input projection. Per step two GEMMs: (r, z) from h, then n from
    ``r * h``, which is kept (``RH``) for the gradient of ``W_hn``. n's tanh runs as
    ``2 sigmoid(2a) - 1`` with the n rows of the weights doubled.
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_x, b_hn, masks, full):  # type: ignore[override]
        inputs = (x, h0, w_ih, w_hh, b_x, b_hn)  # as given, for a differentiable backward (create_graph)
        with denormals_flushed(x.device):
            T, N, _ = x.shape
            H = h0.shape[1]
            H2, H3 = 2 * H, 3 * H
            x2, G = _input_projection(
                x, _double_rows(w_ih, H2, H3), None if b_x is None else _double_rows(b_x, H2, H3)
            )
            RH, hs = x.new_empty(T, N, H), x.new_empty(T, N, H)
            w_rz, w_n = w_hh[:H2], w_hh[H2:] * 2.0
            rz_s, r_s, z_s, n_s = (
                G[:, :, :H2].unbind(0),
                G[:, :, :H].unbind(0),
                G[:, :, H:H2].unbind(0),
                G[:, :, H2:].unbind(0),
            )
            rh_s, h_s = RH.unbind(0), hs.unbind(0)
            m1 = x.new_full((), -1.0)
            mul, lerp, add = torch.mul, torch.lerp, torch.add
            h0_zero = not bool(h0.any())
            h = h0
            for t in range(T):
                # each activation writes its step's product into the slot: no copy (gemm.linear_add)
                first = not t and h0_zero
                torch.sigmoid(rz_s[t] if first else linear_add(rz_s[t], h, w_rz), out=rz_s[t])
                rh = mul(r_s[t], h, out=rh_s[t])
                npre = n_s[t] if first else linear_add(n_s[t], rh, w_n)
                n = add(m1, torch.sigmoid(npre, out=n_s[t]), alpha=2, out=n_s[t])
                if t < full:
                    h = lerp(n, h, z_s[t], out=h_s[t])
                else:
                    h = torch.where(masks[t], lerp(n, h, z_s[t]), h, out=h_s[t])
        ctx.full, ctx.has_bx = full, b_x is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(_saved_rows(x2, x), h0, w_ih, w_hh, G, RH, hs, masks, *inputs)
        return hs.clone()  # the outputs may be edited in place, as torch.nn.GRU's may

    @staticmethod
    @_float_maths
    def backward(ctx, gh):  # type: ignore[override]
        x2, h0, w_ih, w_hh, G, RH, hs, masks, *inputs = ctx.saved_tensors
        if _graph_needed(gh):
            grads = _differentiable_grads(_gru_graph, (*inputs, masks, ctx.full, False), (gh,))
            return (*grads[:6], None, None)
        x2 = _rows(x2, inputs[0])
        with denormals_flushed(x2.device):
            return _gru_reset_before_backward(ctx, gh, x2, h0, w_ih, w_hh, G, RH, hs, masks)


def _gru_reset_before_backward(ctx, gh, x2, h0, w_ih, w_hh, G, RH, hs, masks):  # noqa: ANN001
    T, N, H = hs.shape
    H2, H3 = 2 * H, 3 * H
    full = ctx.full
    need_x, need_h0, need_wih, need_whh, need_bx = ctx.needs_input_grad[:5]
    # Q: per step the factors (h_prev r(1-r), (h_prev - n) z(1-z), (1-z)(1-n^2)), overwritten by
    # the loop with dG (da_r, da_z, da_n).
    Q = torch.empty_like(G)
    addcmul, mul = torch.addcmul, torch.mul
    r_all, z_all = G[:, :, :H], G[:, :, H:H2]
    z_eff = z_all  # past a sequence's end z is replaced by 1 so dh passes through unchanged
    mf = None
    if full < T:
        mf = masks[full:].to(G.dtype)
        z_eff = torch.cat((z_all[:full], torch.where(masks[full:], z_all[full:], 1.0)))
    chunk = _chunk_steps(N, H3, G.element_size())
    one = G.new_ones(())

    def precompute(lo: int, hi: int) -> None:
        g_, q = G[lo:hi], Q[lo:hi]
        r, z, n = g_[:, :, :H], g_[:, :, H:H2], g_[:, :, H2:]
        qr, qz, qn = q[:, :, :H], q[:, :, H:H2], q[:, :, H2:]
        torch.sub(one, z, out=qr)  # 1 - z, parked in the r block
        mul(n, n, out=qn)
        addcmul(qr, qr, qn, value=-1.0, out=qn)  # (1 - z)(1 - n^2)
        addcmul(z, z, z, value=-1.0, out=qz)  # z (1 - z)
        addcmul(r, r, r, value=-1.0, out=qr)  # r (1 - r)
        for rows, prev in _with_prev(hs, h0, lo, hi):
            qr[rows].mul_(prev)
            qz[rows].mul_(torch.sub(prev, n[rows]))
        if hi > full:
            a = max(lo, full)
            Q[a:hi].mul_(mf[a - full : hi - full])

    Qzn_s = Q[:, :, H:].unflatten(2, (2, H)).unbind(0)
    qr_s, qn_s, qrz_s = Q[:, :, :H].unbind(0), Q[:, :, H2:].unbind(0), Q[:, :, :H2].unbind(0)
    z_s, r_s = z_eff.unbind(0), r_all.unbind(0)
    w_rz, w_n = w_hh[:H2], w_hh[H2:]
    DH = _grad_buffer(gh, hs)
    dh_s = DH.unbind(0)
    drh = torch.empty_like(dh_s[0])
    lo = T
    for t in range(T - 1, -1, -1):
        if t < lo:
            lo = max(0, t + 1 - chunk)
            precompute(lo, t + 1)
        dh = dh_s[t]
        Qzn_s[t].mul_(dh.unsqueeze(1))
        mm(qn_s[t], w_n, out=drh)  # gradient of r * h_prev
        qr_s[t].mul_(drh)
        if t == 0:
            break
        addmm_(dh_s[t - 1], qrz_s[t], w_rz).addcmul_(dh, z_s[t]).addcmul_(drh, r_s[t])
    dx = dh0 = dwih = dwhh = dbx = None
    if need_h0:
        dh0 = mm(qrz_s[0], w_rz).addcmul_(dh_s[0], z_s[0]).addcmul_(drh, r_s[0])
    dG = Q.view(T * N, H3)
    if need_x:
        dx = mm(dG, w_ih).view(T, N, -1)
    if need_wih:
        dwih = mm(dG.t(), x2)
    if need_whh:
        drz = mm(qrz_s[0].t(), h0)
        if T > 1:
            addmm_(drz, Q[1:, :, :H2].reshape(-1, H2).t(), hs[:-1].reshape(-1, H))
        dwhh = torch.cat((drz, mm(Q[:, :, H2:].reshape(-1, H).t(), RH.view(-1, H))))
    if need_bx and ctx.has_bx:
        dbx = dG.sum(0)
    return dx, dh0, dwih, dwhh, dbx, None, None, None
