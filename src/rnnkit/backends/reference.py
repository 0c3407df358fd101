"""The reference backend: a plain Python loop over the cell. Runs any cell; the oracle for the rest."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rnnkit.backends.fastcpu import FastCPUMode, fast_cpu_enabled
from rnnkit.cells import cell_output, steps_split


def unsupported(cell: nn.Module, x: Tensor) -> str | None:
    """The reference loop runs every cell."""
    return None


def freeze(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` in the batch rows whose sequence is still running (``mask``), else ``old`` (either may be a scalar)."""
    like = new if new.dim() else old
    return torch.where(mask.view(-1, *([1] * (like.dim() - 1))), new, old)


def run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool
) -> tuple[Tensor, Any, Any]:
    """Step the cell over x (T, N, I); steps past a sequence's end keep its state frozen."""
    if fast_cpu_enabled() and x.device.type == "cpu" and x.dtype == torch.float32:
        with FastCPUMode():  # faster products and tanh for the cell: see rnnkit.backends.fastcpu
            return _run(cell, x, state, masks, lengths, return_states)
    return _run(cell, x, state, masks, lengths, return_states)


def _run(
    cell: nn.Module, x: Tensor, state: Any, masks: Tensor | None, lengths: Tensor | None, return_states: bool
) -> tuple[Tensor, Any, Any]:
    from rnnkit.engine import check_step_state, tree_map  # the engine owns the state utilities

    T = x.shape[0]
    if steps_split(cell):
        xs, step = cell.project_input(x).unbind(0), cell.step  # one GEMM for all steps
    else:
        xs, step = x.unbind(0), cell
    full = T if lengths is None else int(lengths.min())  # steps where no sequence has ended yet
    outputs, kept = [], []
    for t in range(T):
        new = step(xs[t], state)
        if t == 0:
            check_step_state(cell, state, new)
        if t >= full:
            m = masks[t]
            new = tree_map(lambda n, o, m=m: freeze(m, n, o), new, state)
        state = new
        outputs.append(cell_output(cell, state))
        if return_states:
            kept.append(state)
    states = tree_map(lambda *s: torch.stack(s), *kept) if return_states else None
    return torch.stack(outputs), state, states
