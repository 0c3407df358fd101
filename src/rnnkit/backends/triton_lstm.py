"""The triton backend: an LSTM whose time loop runs on a GPU in one kernel launch each way (Triton).

A train step of a small LSTM on a GPU is mostly launches and synchronisation: cuDNN, a Python loop or
``torch.compile`` run a kernel or more per time step, each of which does microseconds of work. Here
the forward is one GEMM for every step's input projection (cuBLAS) and one Triton launch for the
whole recurrence; the backward one Triton launch for the recurrence, then GEMMs for the weight and
input gradients over all steps at once.

The kernels are persistent over time: program ``p`` owns rows ``p BB .. p BB + BB - 1`` of the batch
for every step (rows never interact through the recurrence, so programs never wait for each other)
and runs the steps one after another, a block barrier between them. A step's product ``h_{t-1}
W_hh^T`` is ``tl.dot`` tiles over ``BU`` hidden units of the four gates at a time, finished by the gate
maths while in registers; the weights stream from L2 (0.25 MB at H 128 in float32). Activated gates,
every step's h and c go to global memory for the backward, which recomputes only tanh(c).

float32 products use TF32 where ``torch.backends.cudnn.allow_tf32`` says so (torch's default, as
cuDNN's LSTM does); float64 is exact. Without a GPU the same kernels run on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported): the tests check them that way
against the reference loop, values and gradients, wherever Triton is installed.

Variable lengths, every-step states, the gradient of every step's c and second derivatives (by
recomputation, see :func:`rnnkit.backends.fused._differentiable_grads`) work as on the fused CPU
backend. Tile sizes: :func:`blocks`, or ``RNNKIT_TRITON_BLOCKS="BB,BU,BK,WARPS[/BB,BU,BK,WARPS]"`` (the
forward's, then the backward's if they differ) to try others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.backends.fused import _differentiable_grads, _graph_needed, _lstm_graph, lstm_biases
from rnnkit.cells import LSTMCell, LSTMState, hooked
from rnnkit.fpmode import transforming

__all__ = ["unsupported", "run", "available", "interpreting", "blocks"]

_DTYPES = (torch.float32, torch.float64)
# The kernels' offsets are 32-bit integers (N and T come in as int32): a buffer of 2**31 elements or
# more would wrap them.
_MAX_ELEMENTS = 1 << 31


def available() -> bool:
    """Whether Triton can be imported here (it comes with torch's CUDA builds)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported(cell: nn.Module, x: Tensor) -> str | None:
    """Why the Triton LSTM cannot run this cell on this input, or None."""
    if transforming():
        return "torch.func transforms and forward-mode AD have no rules for its hand-written backward"
    if not available():
        return "Triton is not installed (it comes with torch's CUDA builds)"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return (f"the triton backend runs on a CUDA device (on the CPU only under TRITON_INTERPRET=1), the input "
                f"is on {x.device}")
    if x.dtype not in _DTYPES:
        return f"the triton backend supports float32 and float64, got {x.dtype}"
    if why := hooked(cell):
        return why
    if type(cell) is not LSTMCell:
        return f"the triton backend runs the built-in LSTMCell only, not {type(cell).__name__}"
    if cell.peepholes or cell.cell_clip is not None or cell.proj_size:
        return "the triton LSTM has no peepholes, cell clipping or projection (proj_size)"
    if x.dim() == 3 and x.shape[0] * x.shape[1] * 4 * cell.hidden_size >= _MAX_ELEMENTS:
        return "its gates would pass 2**31 elements, beyond the kernels' 32-bit offsets (split the sequence)"
    return None


def run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool
) -> tuple[Tensor, Any, Any]:
    """Run the LSTM cell over time-major ``x`` (T, N, I); return (outputs, final state, states or None)."""
    full = x.shape[0] if lengths is None else int(lengths.min())
    b_ih, b_hh = lstm_biases(cell)
    with torch.autocast(x.device.type, enabled=False):  # the kernels' maths are the parameters' dtype
        hs, cs = _LSTMFunction.apply(x, state.h, state.c, cell.weight_ih, cell.weight_hh, b_ih, b_hh, masks, full)
    return hs, LSTMState(hs[-1], cs[-1]), (LSTMState(hs, cs) if return_states else None)


def blocks(N: int, H: int, backward: bool = False, itemsize: int = 4) -> tuple[int, int, int, int]:
    """Rows per program, units per tile, depth per product step and warps: (BB, BU, BK, warps)."""
    override = os.environ.get("RNNKIT_TRITON_BLOCKS")
    if override:
        return _parse_blocks(override.split("/")[-1 if backward else 0], override)
    span = max(16, _next_power_of_2(H))  # tl.dot needs 16 or more on every side
    # Compiled for an H100 (sm_90) ahead of time on a CPU, 2026-12-03 (benchmarks/triton_compile.py):
    # the largest tiles whose kernels spill no registers at H 16 to 512 and fit the 227 KB of shared
    # memory a block may have. float32's forward at 64 x 64 with 8 warps: 120-166 registers and 136 KB
    # (the pipelined loads of four gates' weights); its backward spilled there, at 32 x 32 158-164
    # registers (Triton 3.6, the GPU machines', uses up to 252 of 255, still without spills). float64
    # at 64 x 64 needs 272 KB: 32 x 32 both ways. Not yet timed on a GPU.
    width = 32 if backward or itemsize > 4 else 64
    return 16, min(span, width), min(span, width), 8


def _parse_blocks(text: str, whole: str) -> tuple[int, int, int, int]:
    """'BB,BU,BK,WARPS' as four integers, checked (``whole``: the variable's value, for the message)."""
    try:
        bb, bu, bk, warps = (int(v) for v in text.split(","))
    except ValueError as e:
        raise ValueError(f"RNNKIT_TRITON_BLOCKS must be 'BB,BU,BK,WARPS' (the forward's) optionally followed by "
                         f"'/BB,BU,BK,WARPS' (the backward's), got {whole!r}") from e
    for name, v in (("BB", bb), ("BU", bu), ("BK", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"RNNKIT_TRITON_BLOCKS: {name} must be a power of two >= 16, got {v} in {whole!r}")
    if warps < 1 or warps & (warps - 1):
        raise ValueError(f"RNNKIT_TRITON_BLOCKS: WARPS must be a power of two, got {warps} in {whole!r}")
    return bb, bu, bk, warps


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: TF32 for float32 where torch lets cuDNN use it, else exact."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting() else "ieee"


def _kernels() -> Any:
    """The kernels' module, imported on first use."""
    from rnnkit.backends import _triton_kernels

    return _triton_kernels


def _mask_rows(masks: Tensor | None, T: int, N: int, like: Tensor) -> Tensor:
    """The engine's (T, N, 1) bool masks as the kernels read them: (T, N) int8 (a placeholder for none)."""
    if masks is None:
        return torch.empty(1, dtype=torch.int8, device=like.device)
    return masks.reshape(T, N).to(torch.int8).contiguous()


class _LSTMFunction(torch.autograd.Function):
    """Every step's (h, c) of an LSTM; arguments as :class:`rnnkit.backends.fused._LSTMFunction` takes them.

    Saved for the backward: the activated gates, every step's h and c with the initial state in slot 0
    (so the weight gradient of W_hh is one GEMM over ``HS[:-1]``), the input and the weights. The
    outputs are views of those buffers from slot 1 on.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, masks, full):  # type: ignore[override]
        inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        T, N, _ = x.shape
        H = w_hh.shape[1]
        bias = b_ih if b_hh is None else b_ih + b_hh  # b_hh comes only with b_ih (lstm_biases)
        G = F.linear(x, w_ih, bias).contiguous()  # every step's input projection, one GEMM
        HS = x.new_empty(T + 1, N, H)
        CS = x.new_empty(T + 1, N, H)
        HS[0] = 0 if h0 is None else h0  # None: the zero state
        CS[0] = 0 if c0 is None else c0
        keep = any(ctx.needs_input_grad[:7])  # grad mode is off inside forward
        M = _mask_rows(masks, T, N, x)
        BB, BU, BK, warps = blocks(N, H, itemsize=x.element_size())
        with _on(x.device):
            _kernels().forward[(_cdiv(N, BB),)](
                G, HS, CS, w_hh.t().contiguous(), M, N, T, H=H, BB=BB, BU=BU, BK=BK, HAS_MASK=masks is not None,
                KEEP=keep, PREC=_precision(x.dtype), num_warps=warps)
        ctx.full = full
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(G, HS, CS, M, masks, *inputs)
        return HS[1:], CS[1:]

    @staticmethod
    def backward(ctx, gh, gc):  # type: ignore[override]
        G, HS, CS, M, masks, *inputs = ctx.saved_tensors
        if _graph_needed(gh, gc):
            return (*_differentiable_grads(_lstm_graph, (*inputs, masks, ctx.full), (gh, gc))[:7], None, None)
        x = inputs[0]
        # autograd runs the backward under the forward's autocast state: the GEMMs stay in the forward's dtype
        with torch.autocast(x.device.type, enabled=False), _on(x.device):
            return _backward(ctx.needs_input_grad, gh, gc, G, HS, CS, M, masks, *inputs)


def _backward(need, gh, gc, G, HS, CS, M, masks, x, h0, c0, w_ih, w_hh, b_ih, b_hh):  # noqa: ANN001, ANN202
    """The gradients of _LSTMFunction's inputs: the recurrence in one kernel launch, then GEMMs over all steps."""
    T, N, H4 = G.shape
    H = H4 // 4
    DG = torch.empty_like(G)
    DH = x.new_zeros(N, H) if masks is not None else x.new_empty(1)
    DC = x.new_zeros(N, H)
    DH0 = x.new_empty(N, H)
    BB, BU, BK, warps = blocks(N, H, backward=True, itemsize=x.element_size())
    _kernels().backward[(_cdiv(N, BB),)](
        G, DG, CS, _contiguous_or_dummy(gh, x), _contiguous_or_dummy(gc, x), w_hh.contiguous(), M, DH, DC, DH0,
        N, T, H=H, BB=BB, BU=BU, BK=BK, HAS_GH=gh is not None, HAS_GC=gc is not None, HAS_MASK=masks is not None,
        PREC=_precision(x.dtype), num_warps=warps)
    rows = DG.reshape(T * N, H4)
    dx = (rows @ w_ih).reshape(T, N, -1) if need[0] else None
    dw_ih = rows.t() @ x.reshape(T * N, -1) if need[3] else None
    dw_hh = rows.t() @ HS[:-1].reshape(T * N, H) if need[4] else None
    db = rows.sum(0) if need[5] or need[6] else None
    return (dx, DH0 if need[1] else None, DC if need[2] else None, dw_ih, dw_hh,
            db if need[5] else None, db if need[6] and b_hh is not None else None, None, None)


def _on(device: torch.device) -> Any:
    """Launches on ``device``'s GPU (Triton launches on the current one), or nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def _contiguous_or_dummy(t: Tensor | None, like: Tensor) -> Tensor:
    """``t`` contiguous, or a one-element placeholder the kernel never reads."""
    return like.new_empty(1) if t is None else t.contiguous()
