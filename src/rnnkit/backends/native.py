"""The native backend: PyTorch's fused LSTM/GRU/RNN kernels (cuDNN on a GPU) for built-in cells.

Every-step states: the kernels return every step's h but only the last c. For an LSTM with
``return_states=True``:

* In float32 on the CPU torch's kernel is oneDNN's RNN, whose training forward keeps every
  step's c in its workspace for the backward. They are read from there, at the cost of a copy
  (inference then runs the training forward too). Where they sit is learnt once per shape from a
  call on random data (:func:`_calibrate`), and each call checks its first chunk of time of each
  length (the whole sequence when it is not chunked): c_1 must follow from the chunk's initial
  state, and its final c from its last slot. When that fails, the states are recomputed instead
  (below). The backward of those states, run only when
  the loss reads them, recomputes them differentiably.
* Everywhere else they are recomputed from the kernel's outputs: the i, f, g gates of all steps
  come from one batched matmul over ``x_t`` and ``h_{t-1}``, leaving only the elementwise
  recurrence ``c_t = f_t c_{t-1} + i_t g_t``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.allocator import allocator_tuned
from rnnkit.cells import GRUCell, LSTMCell, LSTMState, RNNCell, hooked
from rnnkit.fpmode import transforming as _transforming
from rnnkit.fpmode import vmapping


def unsupported(cell: nn.Module, x: Tensor) -> str | None:
    """Why torch's kernels cannot run this cell, or None when they can."""
    kind = type(cell)
    if kind not in (LSTMCell, GRUCell, RNNCell):
        return f"{kind.__name__} is not a built-in LSTMCell, GRUCell or RNNCell"
    if kind is LSTMCell and (cell.peepholes or cell.cell_clip is not None):
        return "torch's LSTM kernel has no peepholes or cell clipping"
    if kind is GRUCell and not cell.reset_after:
        return "torch's GRU kernel only has reset_after=True"
    if why := hooked(cell):
        return why
    if vmapping():
        return "torch's RNN kernels have no torch.func.vmap rule"
    return None


def flat_weights(cell: nn.Module) -> tuple[list[Tensor], bool]:
    """The cell's weights in the order torch's kernels take them, and whether biases are included."""
    weights = [cell.weight_ih, cell.weight_hh]
    if isinstance(cell, LSTMCell):
        if cell.bias and not cell.forget_bias:  # the kernel sums the two biases itself
            weights += [cell.bias_ih, cell.bias_hh]
        elif cell.forget_bias:  # it folds into the input bias (fused_bias works without biases too)
            b = cell.fused_bias()
            weights += [b, torch.zeros_like(b)]
        if cell.proj_size:
            weights.append(cell.weight_hr)
        return weights, bool(cell.bias or cell.forget_bias)
    if cell.bias:
        weights += [cell.bias_ih, cell.bias_hh]
    return weights, cell.bias


def _kernel(cell: nn.Module) -> Any:
    if isinstance(cell, LSTMCell):
        return torch._VF.lstm
    if isinstance(cell, GRUCell):
        return torch._VF.gru
    return torch._VF.rnn_tanh if cell.nonlinearity == "tanh" else torch._VF.rnn_relu


# Training on the CPU the kernel allocates its workspace for the whole sequence in each call; past
# glibc's mmap threshold that memory is mapped and page-faulted in afresh every step (see
# rnnkit.allocator). Unless the allocator is tuned, a sequence whose gates exceed WHOLE_GATE_BYTES
# runs as a chain of calls over chunks of time of at most CHUNK_GATE_BYTES of gates each, the state
# handed from chunk to chunk. Measured 2026-12-01 (AMD EPYC Zen 5, 2 cores, forward and backward,
# ms, fused / whole / chunks of 4 MB): LSTM T784 B128 H128 293 / 336 / 235, H256 832 / 839 / 620;
# GRU T784 H128 566 / 494 / 496; LSTM T28 B128 H256 31.5 / 21.9-47 / 25.0 (whole 47 when it
# faults, as in the benchmark harness). One-step chunks lose (T28 B512 H512: 350 / 369 / 400).
WHOLE_GATE_BYTES = 8 << 20
CHUNK_GATE_BYTES = 4 << 20


def chunk_steps(cell: nn.Module, x: Tensor, inputs: list[Tensor], workspace: bool = False) -> int:
    """Time steps per kernel call: all of them, except for long CPU training with an untuned allocator.

    ``inputs``: the kernel's weights (the first is ``weight_ih``) and initial state. ``workspace``:
    the call keeps its workspace even without gradients (every step's c is read from it).
    """
    T, N = x.shape[0], x.shape[1]
    per_step = N * inputs[0].shape[0] * x.element_size()
    if x.device.type != "cpu" or T * per_step <= WHOLE_GATE_BYTES or allocator_tuned():
        return T
    if not workspace and (
        not torch.is_grad_enabled() or not (x.requires_grad or any(t.requires_grad for t in inputs))
    ):
        return T  # inference keeps no workspace
    return max(1, CHUNK_GATE_BYTES // per_step)


def run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool
) -> tuple[Tensor, Any, Any]:
    """Run one layer, one direction through torch's kernel; recover every-step c for an LSTM."""
    weights, has_bias = flat_weights(cell)
    is_lstm = isinstance(cell, LSTMCell)
    hx = (state.h.unsqueeze(0), state.c.unsqueeze(0)) if is_lstm else state.unsqueeze(0)
    kernel = _kernel(cell)
    cs = None
    if lengths is None:
        from_workspace = is_lstm and return_states and _onednn_states(cell, x, weights)
        steps = chunk_steps(cell, x, [*weights, *(hx if is_lstm else [hx])], workspace=from_workspace)
        if from_workspace:
            out, h, c, cs = _onednn_lstm(cell, x, state, weights, has_bias, steps)
            final = [h.unsqueeze(0), c.unsqueeze(0)]
        elif steps >= x.shape[0]:
            out, *final = kernel(x, hx, weights, has_bias, 1, 0.0, cell.training, False, False)
        else:  # a chain of kernel calls over time chunks, each chunk's state the next one's start
            outs = []
            for xc in x.split(steps):
                o, *final = kernel(xc, hx, weights, has_bias, 1, 0.0, cell.training, False, False)
                outs.append(o)
                hx = tuple(final) if is_lstm else final[0]
            out = torch.cat(outs)
    else:
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        order, back = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(h[:, order] for h in hx) if is_lstm else hx[:, order]
        out, *final = kernel(packed.data, packed.batch_sizes, hx, weights, has_bias, 1, 0.0, cell.training, False)
        out = pad_packed_sequence(PackedSequence(out, packed.batch_sizes, order, back), total_length=x.shape[0])[0]
        final = [f[:, back] for f in final]
    final = [f.squeeze(0) for f in final]
    final_state = LSTMState(*final) if is_lstm else final[0]
    states = None
    if return_states:
        hs = out if masks is None else torch.where(masks, out, final[0].unsqueeze(0))
        if is_lstm:
            if cs is None:
                cs = recover_cell_states(cell, x, state, out, masks)
            # past each end repeat the kernel's final c exactly, as hs does with its final h
            cs = cs if masks is None else torch.where(masks, cs, final[1].unsqueeze(0))
            states = LSTMState(hs, cs)
        else:
            states = hs
    return out, final_state, states


def recover_cell_states(cell: LSTMCell, x: Tensor, state: LSTMState, hs: Tensor, masks: Tensor | None) -> Tensor:
    """Every step's c (T, N, H) from the inputs and every step's h, without re-running the kernel."""
    return cell_states(x, state.h, state.c, hs, cell.weight_ih, cell.weight_hh, cell.fused_bias(), masks)


def cell_states(
    x: Tensor, h0: Tensor, c0: Tensor, hs: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None,
    masks: Tensor | None = None,
) -> Tensor:
    """``c_1 .. c_T`` (T, N, H) of an LSTM from its inputs, first state, every h and its weights."""
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])
    # Past a sequence's end h_prev is the kernel's zero padding: finite, and those steps are frozen below.
    f, ig = _forget_and_input(x, h_prev, w_ih, w_hh, bias)
    c, cs = c0, []
    # unbind, not indexing: the backward of T index ops would write T zero-filled (T, N, H) buffers
    for t, (f_t, ig_t) in enumerate(zip(f.unbind(0), ig.unbind(0))):
        new = torch.addcmul(ig_t, f_t, c)
        c = new if masks is None else torch.where(masks[t], new, c)
        cs.append(c)
    return torch.stack(cs)


def _forget_and_input(
    x: Tensor, h_prev: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``sigmoid(f)`` and ``sigmoid(i) * tanh(g)``: the output gate is not needed for c."""
    H3 = w_hh.shape[0] * 3 // 4  # gate order i, f, g, o: the first three blocks of rows
    gates = F.linear(x, w_ih[:H3], None if bias is None else bias[:H3]) + h_prev @ w_hh[:H3].t()
    i, f, g = gates.chunk(3, dim=-1)
    return torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g)


def _next_c(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None) -> Tensor:
    f, ig = _forget_and_input(x, h, w_ih, w_hh, bias)
    return torch.addcmul(ig, f, c)


def states_from_workspace(cell: nn.Module, x: Tensor, ragged: bool = False) -> bool:
    """Whether every step's c of this LSTM call come nearly free from oneDNN's workspace."""
    return type(cell) is LSTMCell and not ragged and _onednn_states(cell, x, [cell.weight_ih, cell.weight_hh])


def _layer_op_as_expected() -> bool:
    """Whether ``aten.mkldnn_rnn_layer`` exists here with the arguments :func:`_layer` passes."""
    op = getattr(torch.ops.aten, "mkldnn_rnn_layer", None)
    if op is None or not hasattr(op, "default"):
        return False
    names = [a.name for a in op.default._schema.arguments]
    returns = len(op.default._schema.returns)
    return returns == 4 and names == [
        "input", "weight0", "weight1", "weight2", "weight3", "hx_", "cx_", "reverse", "batch_sizes", "mode",
        "hidden_size", "num_layers", "has_biases", "bidirectional", "batch_first", "train",
    ]


_LAYER_OP_OK = _layer_op_as_expected()


def _onednn_states(cell: LSTMCell, x: Tensor, weights: list[Tensor]) -> bool:
    """Whether torch's LSTM kernel here is oneDNN's, whose workspace can hold every c."""
    return (
        _LAYER_OP_OK and x.device.type == "cpu" and x.dtype == torch.float32 and not cell.proj_size
        and all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
        and not torch.is_autocast_enabled("cpu") and not _transforming()
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def _onednn_lstm(
    cell: LSTMCell, x: Tensor, state: LSTMState, weights: list[Tensor], has_bias: bool, steps: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """oneDNN's LSTM over ``x`` (T, N, I) in chunks of ``steps``: outputs, final h and c, every step's c."""
    w_ih, w_hh = weights[0].contiguous(), weights[1].contiguous()
    b_ih, b_hh = (weights[2], weights[3]) if has_bias else (w_ih.new_zeros(w_ih.shape[0]),) * 2
    bias = (b_ih + b_hh) if has_bias else None
    # the op reads its tensors' memory as dense (torch's own lstm makes them so before calling it)
    x, h0, c0 = x.contiguous(), state.h.contiguous(), state.c.contiguous()
    outs: list[Tensor] = []
    pieces: list[Tensor] | None = []  # each chunk's c_1 .. c_{T-1} in its workspace, then its final c
    h, c = h0, c0
    checked: set[int] = set()  # chunk lengths whose workspace layout this call has checked
    for xc in x.split(steps):
        o, h_next, c_next, ws = _layer(xc, w_ih, w_hh, b_ih, b_hh, h, c, cell.hidden_size, has_bias)
        if pieces is not None:
            # Equal chunks run the same oneDNN primitive, so one check per call and length covers them.
            check = xc.shape[0] not in checked
            slots = _workspace_cells(ws, xc, h, c, o, c_next, w_ih, w_hh, bias, check=check)
            pieces = None if slots is None else [*pieces, slots, c_next.detach().unsqueeze(0)]
            checked.add(xc.shape[0])
        outs.append(o)
        h, c = h_next, c_next
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if pieces is None:
        cs = cell_states(x, h0, c0, out, w_ih, w_hh, bias)
    else:
        cs = _CellStatesFromWorkspace.apply(pieces, x, h0, c0, out, w_ih, w_hh, bias)
    return out, h, c, cs


def _layer(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``aten.mkldnn_rnn_layer`` for one forward LSTM layer: output, h, c and the workspace."""
    *tensors, H, has_bias = args
    if torch.is_grad_enabled():
        return torch.ops.aten.mkldnn_rnn_layer(*tensors, False, [], 2, H, 1, has_bias, False, False, True)
    with torch.enable_grad():  # the op keeps its workspace only with grad mode on; detached inputs record no graph
        return torch.ops.aten.mkldnn_rnn_layer(
            *[t.detach() for t in tensors], False, [], 2, H, 1, has_bias, False, False, True
        )


# (T, N, I, H, bias, threads) -> (where c_1 starts in oneDNN's workspace, the workspace's size),
# in floats; None where it was not found
_SLOTS: dict[tuple[int, ...], tuple[int, int] | None] = {}
# Fewest floats in one step's c that are looked up by value
_MIN_BLOCK = 16
# Most shapes whose workspace layout is remembered
_MAX_SHAPES = 1024


def _workspace_cells(
    ws: Tensor | None, x: Tensor, h0: Tensor, c0: Tensor, hs: Tensor, c_last: Tensor,
    w_ih: Tensor, w_hh: Tensor, bias: Tensor | None, check: bool = True,
) -> Tensor | None:
    """``c_1 .. c_{T-1}`` (T-1, N, H) as the kernel left them in its workspace, or None.

    Where they sit is learnt once per shape by :func:`_calibrate`. ``check``: test this call's first
    and last step against the recurrence too (another chunk of the same call may have done so);
    None when that fails, so the caller recomputes.
    """
    T, N, H = hs.shape
    flat = _as_floats(ws)
    if flat is None:
        return None
    size = N * H
    if size < _MIN_BLOCK:  # a few floats could match by chance; such states are cheap to recompute
        return None
    if T == 1:
        return flat.new_empty(0, N, H)
    key = (T, N, x.shape[-1], H, bias is not None, torch.get_num_threads())
    if key not in _SLOTS:
        if len(_SLOTS) >= _MAX_SHAPES:  # shapes that vary without end: forget the oldest
            _SLOTS.pop(next(iter(_SLOTS)))
        _SLOTS[key] = _calibrate(*key[:5])
    found = _SLOTS[key]
    if found is None or found[1] != flat.numel():
        return None
    start = found[0]
    slots = flat[start : start + (T - 1) * size].view(T - 1, N, H)
    if check:
        with torch.no_grad():  # both ends in one batch: c_1 from the initial state, the final c from the last slot
            ends = _next_c(torch.cat([x[0], x[-1]]), torch.cat([h0, hs[-2]]), torch.cat([c0, slots[-1]]),
                           w_ih, w_hh, bias)
            if not _close(ends, torch.cat([slots[0], c_last])):
                return None
    return slots


def _calibrate(T: int, N: int, I: int, H: int, has_bias: bool) -> tuple[int, int] | None:
    """Where c_1 sits in the workspace of this shape, and the workspace's size in floats; None if not found.

    One kernel call on random data, so no other memory can match by chance. c_1 is looked up by
    value; then up to ten steps spread over the sequence (c_2 among them) and the kernel's final c
    must each follow from the slot before by one step of the recurrence (nothing of size T N H is
    recomputed: long, wide shapes would need gigabytes).
    """
    g = torch.Generator().manual_seed(20261202)

    def uniform(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.rand(*shape, generator=g) * 2 - 1) * scale

    k = H**-0.5
    x, h0, c0 = uniform(T, N, I), uniform(N, H), uniform(N, H)
    w_ih, w_hh = uniform(4 * H, I, scale=k), uniform(4 * H, H, scale=k)
    b_ih, b_hh = (uniform(4 * H, scale=k), uniform(4 * H, scale=k)) if has_bias else (torch.zeros(4 * H),) * 2
    bias = b_ih + b_hh if has_bias else None
    with torch.no_grad():
        out, _, c_last, ws = _layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, H, has_bias)
        flat = _as_floats(ws)
        if flat is None:
            return None
        start = _find_block(flat, _next_c(x[0], h0, c0, w_ih, w_hh, bias))
        if start is None or start + (T - 1) * N * H > flat.numel():
            return None
        slots = flat[start : start + (T - 1) * N * H].view(T - 1, N, H)
        # slot j holds c_{j+1}; check c_t for these t from c_{t-1} and h_{t-1} = out[t-2]
        steps = sorted(set(torch.linspace(2, T - 1, 10).round().long().tolist()) & set(range(2, T)))
        c_prev = torch.cat([slots[t - 2] for t in steps] + [slots[-1]])
        h_prev = torch.cat([out[t - 2] for t in steps] + [out[-2]])
        x_now = torch.cat([x[t - 1] for t in steps] + [x[-1]])
        want = torch.cat([slots[t - 1] for t in steps] + [c_last])
        if not _close(_next_c(x_now, h_prev, c_prev, w_ih, w_hh, bias), want):
            return None
    return start, flat.numel()


def _as_floats(ws: Tensor | None) -> Tensor | None:
    """The workspace as float32 values, or None when it is not the byte buffer this code knows."""
    if ws is None or ws.dtype != torch.uint8 or ws.dim() != 1 or ws.numel() % 4:
        return None
    return ws.view(torch.float32)


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def _find_block(flat: Tensor, block: Tensor, chunk: int = 1 << 22, tries: int = 64) -> int | None:
    """The offset in ``flat`` where ``block`` is stored row-major (to float tolerance), or None.

    Scans in chunks (the workspace of a long sequence is hundreds of MB), keeping offsets whose
    first, second and last values match before comparing the whole block, at most ``tries`` times.
    """
    v = block.reshape(-1)
    n, total = v.numel(), flat.numel()
    tol = 1e-5 + 1e-4 * v.abs()
    for lo in range(0, total - n + 1, chunk):
        hi = min(lo + chunk, total - n + 1)
        hits = ((flat[lo:hi] - v[0]).abs() <= tol[0]).nonzero().flatten() + lo
        for k in (1, n - 1):  # n >= _MIN_BLOCK, so both lie inside the block
            hits = hits[(flat[hits + k] - v[k]).abs() <= tol[k]]
        for p in hits[:tries].tolist():
            if _close(flat[p : p + n], v):
                return p
            tries -= 1
        if tries <= 0:
            return None
    return None


class _CellStatesFromWorkspace(torch.autograd.Function):
    """Every step's c as oneDNN's forward computed them; the backward recomputes them to differentiate."""

    @staticmethod
    def forward(ctx, pieces, x, h0, c0, hs, w_ih, w_hh, bias):  # type: ignore[override]
        ctx.save_for_backward(x, h0, c0, hs, w_ih, w_hh, bias)
        ctx.set_materialize_grads(False)  # unread states: no recomputation
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: Tensor | None):  # type: ignore[override]
        needs = ctx.needs_input_grad[1:]
        if grad is None:
            return (None,) * (1 + len(needs))
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: partial derivatives that stay differentiable in the saved tensors.
            # torch.func.vjp treats each input as independent, where autograd.grad on them would
            # also follow hs back through the kernel that computed it.
            bias = saved[-1]
            if bias is None:
                _, vjp = torch.func.vjp(lambda *t: cell_states(*t, None), *saved[:-1])
            else:
                _, vjp = torch.func.vjp(cell_states, *saved)
            grads = [*vjp(grad), None][: len(needs)]
            return (None, *[g if n else None for g, n in zip(grads, needs)])
        with torch.enable_grad():
            inputs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(saved, needs)]
            wrt = [t for t, n in zip(inputs, needs) if n and t is not None]
            got = iter(torch.autograd.grad(cell_states(*inputs), wrt, grad, allow_unused=True) if wrt else ())
        return (None, *[next(got) if n and t is not None else None for t, n in zip(inputs, needs)])
