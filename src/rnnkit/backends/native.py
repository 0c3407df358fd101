"""The native backend: PyTorch's fused LSTM/GRU/RNN kernels (cuDNN on a GPU) for built-in cells.

Every-step states: the kernels return every step's h but only the last c. For an LSTM with
``return_states=True`` the cell states are recovered from the kernel's outputs rather than by
falling back to the slow loop: the gates of all steps come from one batched matmul over
``x_t`` and ``h_{t-1}``, leaving only the cheap elementwise recurrence ``c_t = f_t c_{t-1} + i_t g_t``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.allocator import allocator_tuned
from rnnkit.cells import GRUCell, LSTMCell, LSTMState, RNNCell


def unsupported(cell: nn.Module, x: Tensor) -> str | None:
    """Why the fused kernels cannot run this cell, or None when they can."""
    kind = type(cell)
    if kind is LSTMCell:
        if cell.peepholes or cell.cell_clip is not None:
            return "torch's LSTM kernel has no peepholes or cell clipping"
        return None
    if kind is GRUCell:
        return None if cell.reset_after else "torch's GRU kernel only has reset_after=True"
    if kind is RNNCell:
        return None
    return f"{kind.__name__} is not a built-in LSTMCell, GRUCell or RNNCell"


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


def chunk_steps(cell: nn.Module, x: Tensor, inputs: list[Tensor]) -> int:
    """Time steps per kernel call: all of them, except for long CPU training with an untuned allocator.

    ``inputs``: the kernel's weights (the first is ``weight_ih``) and initial state.
    """
    T, N = x.shape[0], x.shape[1]
    per_step = N * inputs[0].shape[0] * x.element_size()
    if x.device.type != "cpu" or T * per_step <= WHOLE_GATE_BYTES or allocator_tuned():
        return T
    if not torch.is_grad_enabled() or not (x.requires_grad or any(t.requires_grad for t in inputs)):
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
    if lengths is None:
        steps = chunk_steps(cell, x, [*weights, *(hx if is_lstm else [hx])])
        if steps >= x.shape[0]:
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
            cs = recover_cell_states(cell, x, state, out, masks)
            # past each end repeat the kernel's final c exactly, as hs does with its final h
            cs = cs if masks is None else torch.where(masks, cs, final[1].unsqueeze(0))
            states = LSTMState(hs, cs)
        else:
            states = hs
    return out, final_state, states


def recover_cell_states(cell: LSTMCell, x: Tensor, state: LSTMState, hs: Tensor, masks: Tensor | None) -> Tensor:
    """Every step's c (T, N, H) from the inputs and every step's h, without re-running the kernel."""
    h_prev = torch.cat([state.h.unsqueeze(0), hs[:-1]])
    # Past a sequence's end h_prev is the kernel's zero padding: finite, and those steps are frozen below.
    gates = cell.project_input(x) + h_prev @ cell.weight_hh.t()
    i, f, g, _ = gates.chunk(4, dim=-1)
    f, ig = torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g)
    c, cs = state.c, []
    for t in range(x.shape[0]):
        new = torch.addcmul(ig[t], f[t], c)
        c = new if masks is None else torch.where(masks[t], new, c)
        cs.append(c)
    return torch.stack(cs)

