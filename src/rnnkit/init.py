"""Weight initialisation schemes for recurrent modules, applied in place to any module tree.

``keras_init_(model)`` gives every recurrent cell it finds the TensorFlow/Keras defaults:

==============  ===========================================================================
parameter       Keras default
==============  ===========================================================================
weight_ih       Glorot (Xavier) uniform over the whole (gates*H, I) matrix
weight_hh       orthogonal, one (H, H) block per gate, so each gate's recurrence is orthogonal
biases          zeros; for an LSTM the forget-gate slice ``[H:2H]`` of ``bias_ih`` is 1
                (Keras' ``unit_forget_bias``; ``bias_hh`` stays 0 so the sum is 1), unless the
                cell adds a constant ``forget_bias`` itself: then 0, so the two never stack
weight_hr       Glorot uniform (the LSTM projection)
==============  ===========================================================================

It finds rnnkit layers (through ``layer.cells()``, which binds the cells to the layer's own
parameters, so initialising a cell initialises the layer), rnnkit's built-in cells anywhere in the
tree, and ``torch.nn.LSTM``/``GRU``/``RNN`` and their cells. Other modules are left alone unless
``linear=True``, which also gives every ``nn.Linear`` Glorot weights and zero biases (Keras ``Dense``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rnnkit.cells import GRUCell, LayerNormLSTMCell, LSTMCell, RNNCell
from rnnkit.errors import ConfigError

__all__ = ["chrono_init_", "keras_init_", "orthogonal_blocks_"]

_BUILTIN = (LSTMCell, GRUCell, RNNCell, LayerNormLSTMCell)
_TORCH_LSTM = (nn.LSTM, nn.LSTMCell)
_TORCH_GATES = {nn.LSTM: 4, nn.LSTMCell: 4, nn.GRU: 3, nn.GRUCell: 3, nn.RNN: 1, nn.RNNCell: 1}


@torch.no_grad()
def orthogonal_blocks_(weight: Tensor, blocks: int) -> Tensor:
    """Fill ``weight`` (blocks*H, K) in place with an (semi-)orthogonal matrix per (H, K) row block."""
    if weight.shape[0] % blocks:
        raise ConfigError(
            f"orthogonal_blocks_: expected the first axis of weight {tuple(weight.shape)} to be a multiple of "
            f"blocks={blocks}; pass the number of gates stacked in it (4 LSTM, 3 GRU, 1 RNN)"
        )
    for block in weight.chunk(blocks, dim=0):
        nn.init.orthogonal_(block)
    return weight


@torch.no_grad()
def keras_init_(module: nn.Module, *, forget_bias: float = 1.0, linear: bool = False) -> nn.Module:
    """Initialise every recurrent cell in ``module`` as Keras does (see the module docstring); returns it."""
    _visit(module, float(forget_bias), linear)
    return module


def _visit(m: nn.Module, forget_bias: float, linear: bool) -> None:
    for mod in _modules(m):
        if isinstance(mod, _BUILTIN):
            _init_builtin(mod, forget_bias)  # a LayerNormLSTMCell's LayerNorms keep their gain 1 / offset 0
        elif type(mod) in _TORCH_GATES:
            _init_torch(mod, forget_bias)
        elif linear and isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


def _modules(m: nn.Module) -> Iterator[nn.Module]:
    """``m`` and its submodules, built-in cells and torch's recurrent modules taken whole.

    An rnnkit layer's cells are unregistered and bound to the layer's parameters on request, so a
    layer yields its bound cells (initialising a cell initialises the layer).
    """
    yield m
    if isinstance(m, _BUILTIN) or type(m) in _TORCH_GATES:
        return
    cells = getattr(m, "cells", None)
    if callable(cells) and hasattr(m, "num_layers"):
        for c in cells():
            yield from _modules(c)
        return
    for child in m.children():
        yield from _modules(child)


def _init_builtin(cell: nn.Module, forget_bias: float) -> None:
    gates = cell.gates
    nn.init.xavier_uniform_(cell.weight_ih)
    orthogonal_blocks_(cell.weight_hh, gates)
    if getattr(cell, "weight_hr", None) is not None:
        nn.init.xavier_uniform_(cell.weight_hr)
    is_lstm = isinstance(cell, (LSTMCell, LayerNormLSTMCell))
    # LayerNormLSTMCell has a single `bias`; the others torch's pair bias_ih/bias_hh
    for name in ("bias_ih", "bias_hh", "bias"):
        b = getattr(cell, name, None)
        if isinstance(b, Tensor):
            nn.init.zeros_(b)
            # a cell with its own constant forget_bias (TensorFlow's BasicLSTMCell) already adds it:
            # the learned bias starts at 0, as in TensorFlow, so the two do not stack
            if is_lstm and name in ("bias_ih", "bias") and not getattr(cell, "forget_bias", 0.0):
                H = cell.hidden_size
                b[H : 2 * H] = forget_bias


def _init_torch(m: nn.Module, forget_bias: float) -> None:
    gates = _TORCH_GATES[type(m)]
    H = m.hidden_size
    for name, p in m.named_parameters():
        if name.startswith("weight_ih"):
            nn.init.xavier_uniform_(p)
        elif name.startswith("weight_hh"):
            orthogonal_blocks_(p, gates)
        elif name.startswith("weight_hr"):
            nn.init.xavier_uniform_(p)
        elif name.startswith("bias"):
            nn.init.zeros_(p)
            if isinstance(m, _TORCH_LSTM) and name.startswith("bias_ih"):
                p[H : 2 * H] = forget_bias


@torch.no_grad()
def chrono_init_(module: nn.Module, t_max: int) -> nn.Module:
    """Chrono initialisation of every LSTM's gate biases in ``module`` for dependencies up to ``t_max`` steps.

    Tallec & Ollivier (2018): the forget-gate bias ``b_f = log(u)``, ``u ~ U[1, t_max - 1]`` per unit,
    and the input-gate bias ``b_i = -b_f``, so units start with memory time-scales spread up to
    ``t_max`` steps instead of the ~1-3 steps a forget bias of 0 or 1 gives. Meant for long
    sequences (784-step pixel MNIST). Other weights are left as they are; returns ``module``.
    """
    if not isinstance(t_max, int) or t_max < 3:
        raise ConfigError(f"chrono_init_: t_max must be an int >= 3 (the longest dependency in steps), got {t_max!r}")
    for cell in _lstm_cells(module):
        H = cell.hidden_size
        b_f = torch.log(torch.empty(H).uniform_(1.0, t_max - 1.0))
        single = getattr(cell, "bias", None)  # LayerNormLSTMCell's one bias; a bool flag on the others
        if isinstance(single, Tensor):
            b, other = single, None
        else:
            b, other = getattr(cell, "bias_ih", None), getattr(cell, "bias_hh", None)
        if b is None:
            raise ConfigError("chrono_init_: an LSTM without biases cannot hold the chrono gate biases; use bias=True")
        own = float(getattr(cell, "forget_bias", 0.0))  # a constant the cell adds itself
        b[:H] = -b_f
        b[H : 2 * H] = b_f - own
        if isinstance(other, Tensor):
            other[: 2 * H] = 0.0
    return module


def _lstm_cells(module: nn.Module) -> list[nn.Module]:
    """Every LSTM cell in ``module``: rnnkit's (bound to their layer's parameters) and ``nn.LSTMCell``."""
    return [m for m in _modules(module) if isinstance(m, (LSTMCell, LayerNormLSTMCell, nn.LSTMCell))]
