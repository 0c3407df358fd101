"""Drop-in replacements for ``torch.nn.LSTM``, ``GRU`` and ``RNN`` that can also return every state.

Same constructor arguments, parameter names (``weight_ih_l0``, ``weight_hh_l1_reverse`` ...),
default initialisation (bit for bit, given the same seed), return convention, ``PackedSequence``
and unbatched input. A ``state_dict`` moves between ``torch.nn.LSTM`` and ``rnnkit.LSTM`` both ways.

Symbols: N batch, T time, I input_size, H hidden_size, P proj_size, L num_layers,
D = 2 if bidirectional else 1, H_out = P if P > 0 else H.

=============  ===========================================  ====================================
tensor         shape (batch_first=False; True swaps N, T)   notes
=============  ===========================================  ====================================
input          (T, N, I), (T, I) unbatched, PackedSequence
h_0, h_n       (D*L, N, H_out)                              index ``l*D + d``; d=1 is reverse
c_0, c_n       (D*L, N, H)                                  LSTM only
output         (T, N, D*H_out)                              last layer; concat of both directions
states.h       (D*L, T, N, H_out) or (D*L, N, T, H_out)     ``forward(..., return_states=True)``
states.c       (D*L, T, N, H)                               LSTM only
=============  ===========================================  ====================================

Trap (as in torch): for a bidirectional layer ``h_n[-1]`` is the reverse direction's state after
reading the *first* step, so it is not ``output[-1, :, H:]``; the forward half of ``output[-1]`` is
``h_n[-2]``.

Extras torch lacks, all keyword-only:

* ``forward(x, hx, lengths=..., return_states=True)``: lengths as a plain tensor; every step's
  states of every layer and direction (returns ``LayerResult(output, hidden, states)``).
* ``cell=``: any cell class or factory ``f(input_size, hidden_size) -> cell`` (a user's too); its
  parameters are named ``{name}_l{k}[_reverse]`` like torch's.
* ``merge_mode``: how the two directions combine, ``"concat"`` (torch's), ``"sum"`` or ``"mean"``;
  each layer of a bidirectional stack sees both directions of the layer below.
* ``recurrent_dropout`` (variational: one mask per sequence on the recurrent input h) and
  ``zoneout`` (each unit keeps its previous value with this probability while training).
* ``forget_bias``, ``peepholes``, ``cell_clip`` (LSTM), ``reset_after`` (GRU), ``backend``.

How parameters get torch's names: the layer owns every parameter under torch's name and keeps
its cells unregistered; before each use the cells are re-bound to the layer's current parameter
objects, so ``.to()``, ``load_state_dict(assign=True)`` and friends can never leave a stale copy.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit.backends import fused
from rnnkit.cells import GRUCell, LSTMCell, LSTMState, RNNCell, cell_output, steps_split
from rnnkit.engine import (
    BACKENDS,
    builds_graph,
    check_step_state,
    dynamo_tracing,
    eagerly,
    first_parameter,
    from_autocast,
    fused_infers_faster,
    fused_lstm_trains_faster,
    same_structure,
    tree_flatten,
    tree_map,
    unroll,
)
from rnnkit.errors import RnnkitWarning, ShapeError
from rnnkit.fpmode import recording

__all__ = ["LSTM", "GRU", "RNN", "LayerResult", "param_name"]

MergeMode = Literal["concat", "sum", "mean"]


def _stack(*parts: Tensor) -> Tensor:
    """``torch.stack(parts)``, but one part is a view: every-step states of a long sequence are large
    (a one-layer layer's every-step h may then share memory with its output)."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


class LayerResult(NamedTuple):
    """``forward(..., return_states=True)``: torch's (output, hidden) plus every step's states."""

    output: Tensor | PackedSequence
    hidden: Any
    states: Any


def param_name(name: str, layer: int, reverse: bool) -> str:
    """torch.nn's name for a cell parameter in a stack: ``weight_ih`` -> ``weight_ih_l1_reverse``."""
    return f"{name.replace('.', '_')}_l{layer}{'_reverse' if reverse else ''}"


def _reset_children(module: nn.Module) -> set[int]:
    """reset_parameters() of the outermost submodules that have one; the ids of the parameters reset."""
    covered: set[int] = set()
    for child in module.children():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()
            covered |= {id(p) for p in child.parameters()}
        else:
            covered |= _reset_children(child)
    return covered


def _cell_options(layer: str, own: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
    """A layer's options for its built-in cell: its own arguments (a cell_options= of the caller's would
    let the cells disagree with the layer's attributes: refused, naming those arguments)."""
    if "cell_options" in extras:
        raise ShapeError(f"{layer}: pass the built-in cell's options as the layer's own arguments "
                         f"({', '.join(f'{k}=' for k in own)}), not cell_options=")
    return own


class _RNNBase(nn.Module):
    """The shared stack: layers x directions of cells, each run by :func:`rnnkit.unroll`."""

    _default_cell: type[nn.Module]
    # torch.nn.RNNBase's own checks and helpers, for code written against torch's layers (a subclass
    # that copies torch's forward, say): the same functions, so the same rules and messages
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Any = None,
        *,
        cell: type[nn.Module] | Callable[[int, int], nn.Module] | None = None,
        cell_options: dict[str, Any] | None = None,
        merge_mode: MergeMode = "concat",
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for label, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ShapeError(f"{name}: {label} must be a positive int, got {value!r}")
        for label, p in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout), ("zoneout", zoneout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ShapeError(f"{name}: {label} must be a probability in [0, 1], got {p!r}")
        if merge_mode not in ("concat", "sum", "mean"):
            raise ShapeError(f"{name}: merge_mode must be 'concat', 'sum' or 'mean', got {merge_mode!r}")
        if backend not in BACKENDS:
            raise ShapeError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
        if proj_size and cell is not None:
            raise ShapeError(f"{name}: proj_size applies to the built-in LSTM cell; pass it to your cell instead")
        if cell is not None:  # what would not reach a user's cell, rather than ignored
            defaults = inspect.signature(self._default_cell).parameters
            changed = [f"{k}={v!r}" for k, v in (cell_options or {}).items()
                       if k not in defaults or v != defaults[k].default]
            if changed:
                raise ShapeError(f"{name}: the built-in {self._default_cell.__name__}'s options ({', '.join(changed)}) "
                                 "do not reach a cell of your own; pass them to your cell instead")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{name}: dropout={dropout} has no effect with num_layers=1: it applies between layers",
                RnnkitWarning,
                stacklevel=2,
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.merge_mode, self.recurrent_dropout, self.zoneout = merge_mode, float(recurrent_dropout), float(zoneout)
        self.backend = backend
        directions = 2 if bidirectional else 1
        out_size = proj_size or hidden_size
        options = cell_options or {}
        factory = cell if cell is not None else self._builtin_factory(bias, proj_size, device, dtype, options)
        cells: list[nn.Module] = []
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else out_size * (directions if merge_mode == "concat" else 1)
            for d in range(directions):
                c = factory(in_size, hidden_size)
                if not isinstance(c, nn.Module) or not hasattr(c, "init_state"):
                    raise ShapeError(f"{name}: cell= must build nn.Modules with init_state(), got {type(c).__name__}")
                if cell is not None and (device is not None or dtype is not None):
                    c = c.to(device=device, dtype=dtype)
                for pname, p in c.named_parameters():
                    self.register_parameter(param_name(pname, layer, d == 1), p)
                for bname, b in c.named_buffers():
                    self.register_buffer(param_name(bname, layer, d == 1), b)
                cells.append(c)
        if cell is not None and not bias:  # a factory may honour bias=False itself (functools.partial, say)
            norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)  # their shifts are not biases
            kept = sorted({f"{mn}.{pn}".lstrip(".") for c in cells for mn, m in c.named_modules()
                           if not isinstance(m, norms)
                           for pn, _ in m.named_parameters(recurse=False) if pn == "bias" or pn.startswith("bias_")})
            if kept:
                raise ShapeError(f"{name}: bias=False does not reach a cell of your own, which has {', '.join(kept)}; "
                                 "build the cell without biases instead")
        object.__setattr__(self, "_cells", cells)  # unregistered: the layer owns the parameters

    def _builtin_factory(
        self, bias: bool, proj_size: int, device: Any, dtype: Any, options: dict[str, Any]
    ) -> Callable[[int, int], nn.Module]:
        cls = self._default_cell
        if proj_size:
            if cls is not LSTMCell:
                raise ShapeError(f"{type(self).__name__}: proj_size is only supported by LSTM, got {proj_size}")
            options = {**options, "proj_size": proj_size}
        return lambda i, h: cls(i, h, bias, device=device, dtype=dtype, **options)

    # -- cells bound to this layer's parameters ---------------------------------------------------
    def cells(self) -> list[nn.Module]:
        """The cells in torch's order (layer 0 forward, layer 0 reverse, layer 1 ...), bound to this layer."""
        binds = self.__dict__.get("_binds")
        if binds is None or any(leaf not in owner._parameters for _, params, _ in binds for owner, leaf, _ in params):
            binds = self._find_binds()  # once (walking modules every call costs), or again when a cell changed
        for c, params, buffers in binds:
            own = self._parameters
            for owner, leaf, name in params:
                # getattr where the name is not a parameter of the layer's own: a parametrized,
                # weight-normed or pruned weight is computed (the dict first: Module.__getattr__ costs)
                owner._parameters[leaf] = own[name] if name in own else getattr(self, name)
            for owner, leaf, name in buffers:
                owner._buffers[leaf] = self._buffers[name]
            if c.training != self.training:
                c.train(self.training)
        return self._cells

    def __getstate__(self) -> dict[str, Any]:
        """The module's state for pickle and deepcopy, its cells bound to the layer's own tensors."""
        # a torch.func.functional_call (or grad over one) leaves the cells bound to the tensors it
        # lent, functorch wrappers or non-leaf tensors that neither pickle nor deepcopy takes
        self.cells()
        return super().__getstate__()

    def _find_binds(self) -> list[tuple[nn.Module, list[tuple[nn.Module, str, str]], list[tuple[nn.Module, str, str]]]]:
        """Where each cell's tensors live, and the layer's name for each (a tied weight: its first name's)."""
        directions, binds = 2 if self.bidirectional else 1, []
        for k, c in enumerate(self._cells):
            layer, reverse = divmod(k, directions)
            first: dict[int, str] = {}
            params = []
            for n, p in c.named_parameters(remove_duplicate=False):
                name = param_name(first.setdefault(id(p), n), layer, reverse == 1)
                if name not in self._parameters and not hasattr(self, name):
                    raise ShapeError(
                        f"{type(self).__name__}: the cell's parameter {n} has no counterpart {name} on the layer; "
                        "parametrize, prune or replace the layer's parameters (layer.weight_hh_l0, say), "
                        "not its cells'")
                params.append((*_owner(c, n), name))
            buffers = [(*_owner(c, n), param_name(n, layer, reverse == 1)) for n, _ in c.named_buffers()]
            binds.append((c, params, buffers))
        object.__setattr__(self, "_binds", binds)  # unregistered, like _cells
        return binds

    def cell(self, layer: int = 0, reverse: bool = False) -> nn.Module:
        """The cell of one layer and direction, bound to this layer's parameters (to step by hand)."""
        return self.cells()[layer * (2 if self.bidirectional else 1) + int(reverse)]

    def flatten_parameters(self) -> None:
        """No-op kept for drop-in compatibility: rnnkit's parameters need no flat cuDNN buffer."""

    def reset_parameters(self) -> None:
        """Initialise the weights again as at construction (each cell's ``reset_parameters``; for the
        built-in cells torch's uniform(-1/sqrt(H), 1/sqrt(H)), in torch's order)."""
        if set(self._flat_weights_names) != {n for n, _ in self.named_parameters()}:
            # parametrized or pruned weights: the parameters are their originals, as torch's layers
            # see it too (the cells would only write into the weights computed from them)
            bound = 1.0 / math.sqrt(self.hidden_size)
            for p in self.parameters():
                nn.init.uniform_(p, -bound, bound)
            return
        for c in self.cells():
            if hasattr(c, "reset_parameters"):
                c.reset_parameters()
                continue
            # a user's cell without one: its submodules' own (an nn.Linear's), as at its construction
            covered = _reset_children(c)
            kept = [n for n, p in c.named_parameters() if id(p) not in covered]
            if kept:
                warnings.warn(f"{type(self).__name__}.reset_parameters: {type(c).__name__} has no reset_parameters(), "
                              f"so {', '.join(kept)} keep their values; give the cell one", RnnkitWarning, stacklevel=2)

    @property
    def mode(self) -> str:
        """torch's name for the kind of recurrence: 'LSTM', 'GRU', 'RNN_TANH' or 'RNN_RELU' (else the cell's)."""
        kind = type(self._cells[0]).__name__.removesuffix("Cell")
        if kind == "RNN":
            return "RNN_RELU" if getattr(self, "nonlinearity", "tanh") == "relu" else "RNN_TANH"
        return kind

    @property
    def _flat_weights_names(self) -> list[str]:
        """Every parameter's name, layer by layer and direction by direction, as torch lists them."""
        return [n for names in self._all_weights for n in names]

    @property
    def _all_weights(self) -> list[list[str]]:
        directions = 2 if self.bidirectional else 1
        return [[param_name(pname, k // directions, k % directions == 1) for pname, _ in c.named_parameters()]
                for k, c in enumerate(self._cells)]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """The parameters per layer and direction, as ``torch.nn.LSTM.all_weights`` gives them."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Any = None,
        *,
        lengths: Tensor | list[int] | None = None,
        return_states: bool = False,
    ) -> Any:
        """Run the stack; returns ``(output, hidden)`` like torch, or a LayerResult with ``return_states``."""
        if dynamo_tracing():  # the whole stack in one graph break (see rnnkit.engine.eagerly)
            return eagerly(self.forward, input, hx, lengths=lengths, return_states=return_states)
        if hx is None and lengths is None and not return_states:
            cells = self._fused_lstm_cells(input)
            if cells is not None:
                return self._fused_lstm_forward(input, cells)
        name = type(self).__name__
        cells = self.cells()
        directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        batch_first = self.batch_first and not packed
        if packed:
            if lengths is not None:
                raise ShapeError(f"{name}: pass lengths or a PackedSequence, not both")
            x, lengths = pad_packed_sequence(input)
            unbatched = False
        else:
            x = input
            if not isinstance(x, Tensor):
                raise ShapeError(f"{name}: expected a Tensor or PackedSequence, got {type(x).__name__}")
            if x.dim() not in (2, 3):
                raise ShapeError(
                    f"{name}: Expected input to be 2D or 3D, got {x.dim()}D tensor of shape {tuple(x.shape)}"
                )
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(0 if batch_first else 1)
        if x.shape[-1] != self.input_size:
            raise ShapeError(
                f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )
        N = x.shape[0] if batch_first else x.shape[1]
        param = first_parameter(self)  # (parametrized weights: their originals, in submodules)
        x = x if param is None else from_autocast(x, param.dtype)
        states0 = self._split_hx(hx, cells, N, x, unbatched, directions)

        layer_input, finals, every = x, [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                k = layer * directions + d
                c = self._training_wrapper(cells[k], N, x)
                r = unroll(
                    c, layer_input, states0[k], lengths=lengths, reverse=d == 1,
                    return_states=return_states, batch_first=batch_first, backend=self.backend,
                )
                outs.append(r.outputs)
                finals.append(r.final_state)
                every.append(r.states)
            layer_input = self._merge(outs)
            if layer < self.num_layers - 1:
                self._check_feeds_next_layer(layer, layer_input)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)

        hidden = tree_map(lambda *f: torch.stack(f), *finals)  # a copy, as torch's: editable, and small
        output = layer_input
        states = tree_map(_stack, *every) if return_states else None
        if packed and self.batch_first and states is not None:  # the layer's layout, not the packing's
            states = tree_map(lambda s: s.transpose(1, 2), states)
        if packed:
            order = input.sorted_indices
            out_tm = output if order is None else output[:, order]
            lens = lengths if order is None else lengths[order.cpu()]  # lengths live on the CPU, order on x's device
            data = pack_padded_sequence(out_tm, lens, enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif unbatched:
            output = output.squeeze(0 if batch_first else 1)
            hidden = tree_map(lambda h: h.squeeze(1), hidden)
            if states is not None:
                states = tree_map(lambda s: s.squeeze(1 if batch_first else 2), states)
        if return_states:
            return LayerResult(output, hidden, states)
        return output, hidden

    def _fused_lstm_cells(self, x: Any) -> list[nn.Module] | None:
        """The cells, when this call can go straight to the fused LSTM's C++ loops (else None): the
        common training or inference call, from the zero state, of a plain stack of built-in LSTM
        cells, where ``unroll`` would pick the fused backend for every layer anyway (empty inputs,
        whose errors or empty results the general path gives, stay there). The general path's Python
        around the loops (checks, the backend's choice, state trees, the layers of calls) cost
        0.35-0.7 ms of a 7-9 ms train step at T28 H128 B128 (measured 2026-12-03 on a Zen 5,
        interleaved in one process)."""
        auto = self.backend == "auto"
        if (self._default_cell is not LSTMCell or not isinstance(x, Tensor) or x.dim() != 3 or 0 in x.shape
                or x.shape[-1] != self.input_size or x.device.type != "cpu" or self.backend not in ("auto", "fused")
                or self.bidirectional or self.proj_size
                or self.recurrent_dropout or self.zoneout or (self.dropout and self.training and self.num_layers > 1)
                or torch.is_autocast_enabled("cpu") or recording()):
            return None  # the general path checks, and says what is wrong, or runs what this does not
        cells = self.cells()
        for c in cells:  # (a user's cell in an LSTM layer, cell=..., has no weight_ih: its type goes first)
            if (type(c) is not LSTMCell or c.weight_ih.dtype != x.dtype or c.weight_ih.device != x.device
                    or fused.unsupported(c, x)):
                return None
        if not auto:
            return cells
        # auto trains a layer on the fused loops when that layer builds a graph (else infers there, by
        # the same rule): layer 0 does when x or its own parameters need a gradient, and then every
        # layer above does too (their inputs need one)
        N = x.shape[0] if self.batch_first else x.shape[1]
        if builds_graph(cells[0], x):
            return cells if fused_lstm_trains_faster(cells[0], x, N) else None
        # no graph from layer 0; the layers above build one only for parameters of their own
        if any(builds_graph(c, x) for c in cells[1:]):
            return None  # a partly frozen stack: the general path chooses layer by layer
        return cells if all(fused_infers_faster(c, x, N) for c in cells) else None

    def _fused_lstm_forward(self, x: Tensor, cells: list[nn.Module]) -> tuple[Tensor, LSTMState]:
        """forward() by the fused LSTM's loops, layer after layer (see _fused_lstm_cells)."""
        seq, finals = (x.transpose(0, 1) if self.batch_first else x), []
        for c in cells:
            seq, cs = fused.lstm_sequence(c, seq, every_c=False)  # only where no graph is built
            h = seq[-1]
            if h.grad_fn is None:  # inference: a copy, so that this layer's every-step outputs go now
                h = h.clone()  # (c is the last step's alone there: lstm_sequence's every_c)
            finals.append((h, cs[-1]))
        hidden = LSTMState(torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))
        return (seq.transpose(0, 1) if self.batch_first else seq), hidden

    def _check_feeds_next_layer(self, layer: int, out: Tensor) -> None:
        """A user cell whose ``output()`` is not ``hidden_size`` wide cannot feed the layer above."""
        directions = 2 if self.bidirectional and self.merge_mode == "concat" else 1
        want = (self.proj_size or self.hidden_size) * directions  # what the cells above were built for
        if out.shape[-1] != want:
            raise ShapeError(
                f"{type(self).__name__}: layer {layer}'s output has {out.shape[-1]} features (its cells' output(), "
                f"merged over directions) but layer {layer + 1}'s cells were built for {want}; a stacked cell's "
                f"output must be hidden_size={self.hidden_size} wide, or stack single-layer "
                f"{type(self).__name__}s of the widths you need"
            )

    def _split_hx(
        self, hx: Any, cells: list[nn.Module], N: int, x: Tensor, unbatched: bool, directions: int
    ) -> list[Any]:
        """One initial state per (layer, direction) from torch's stacked (D*L, N, ...) layout."""
        name = type(self).__name__
        if hx is None:
            return [None] * len(cells)
        template = cells[0].init_state(N, device=x.device, dtype=x.dtype)
        want = [(len(cells), *t.shape) for t in tree_flatten(template)[0]]
        try:
            leaves = tree_flatten(hx if not isinstance(hx, Tensor) or isinstance(template, Tensor) else (hx,))[0]
        except TypeError:
            leaves = []
        if unbatched:
            if any(not isinstance(h, Tensor) or h.dim() != 2 for h in leaves):
                got = [tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__ for h in leaves]
                raise ShapeError(
                    f"{name}: for unbatched 2-D input, hx should also be 2-D (D*L, H): "
                    f"expected {[(w[0], *w[2:]) for w in want]}, got {got}"
                )
            leaves = [h.unsqueeze(1) for h in leaves]
        leaves = [from_autocast(h, x.dtype) for h in leaves]
        got = [tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__ for h in leaves]
        if len(leaves) != len(want) or any(g != w for g, w in zip(got, want)):
            raise ShapeError(f"{name}: Expected hidden size {want if len(want) > 1 else want[0]}, got {got}")
        for h in leaves:
            if h.dtype != x.dtype or h.device != x.device:
                raise ShapeError(
                    f"{name}: hx is {h.dtype} on {h.device} but input is {x.dtype} on {x.device}; convert hx"
                )
        _, unflatten = tree_flatten(template)
        return [unflatten([h[k] for h in leaves]) for k in range(len(cells))]

    def _merge(self, outs: list[Tensor]) -> Tensor:
        if len(outs) == 1:
            return outs[0]
        if self.merge_mode == "concat":
            return torch.cat(outs, dim=-1)
        total = outs[0] + outs[1]
        return total if self.merge_mode == "sum" else total * 0.5

    def _training_wrapper(self, c: nn.Module, N: int, x: Tensor) -> nn.Module:
        """Wrap a cell for this call with recurrent dropout and/or zoneout (per-call masks)."""
        split = steps_split(c)  # (a cell with hooks of its own is called whole, every step)
        if self.recurrent_dropout and self.training:
            c = (_RecurrentDropoutSplit if split else _RecurrentDropout)(c, self.recurrent_dropout)
        if self.zoneout:
            c = (_ZoneoutSplit if split else _Zoneout)(c, self.zoneout, self.training)
        return c

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for key, default in (
            ("proj_size", 0), ("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
            ("bidirectional", False), ("merge_mode", "concat"), ("recurrent_dropout", 0.0), ("zoneout", 0.0),
        ):
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)!r}"
        return s


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = dotted.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


class _RecurrentDropout(nn.Module):
    """Variational dropout: one mask per sequence on the recurrent input of every step (Gal, 2016)."""

    def __init__(self, cell: nn.Module, p: float) -> None:
        super().__init__()
        self.cell, self.p, self.mask = cell, p, None

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> Any:
        return self.cell.init_state(batch_size, device=device, dtype=dtype)

    def output(self, state: Any) -> Tensor:
        return cell_output(self.cell, state)

    def _dropped(self, state: Any) -> Any:
        leaves, rebuild = tree_flatten(state)
        if self.mask is None:  # drawn at the first step, then reused for the whole sequence
            self.mask = F.dropout(torch.ones_like(leaves[0]), self.p, True)
        return rebuild([leaves[0] * self.mask, *leaves[1:]])  # only h feeds the recurrent matmul

    def forward(self, x: Tensor, state: Any = None) -> Any:
        return self.cell(x, self._dropped(state))


class _RecurrentDropoutSplit(_RecurrentDropout):
    """:class:`_RecurrentDropout` of a cell with ``project_input``/``step``, which it keeps (one input
    product for all steps). Methods, not per-call attributes: a per-call wrapper keys one compiled plan."""

    def project_input(self, x: Tensor) -> Tensor:
        return self.cell.project_input(x)

    def step(self, xp: Tensor, state: Any) -> Any:
        return self.cell.step(xp, self._dropped(state))


class _Zoneout(nn.Module):
    """Zoneout (Krueger et al., 2017): units keep their previous value with probability p."""

    def __init__(self, cell: nn.Module, p: float, training: bool) -> None:
        super().__init__()
        self.cell, self.p = cell, p
        self.train(training)

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> Any:
        return self.cell.init_state(batch_size, device=device, dtype=dtype)

    def output(self, state: Any) -> Tensor:
        return cell_output(self.cell, state)

    def _mix(self, old: Any, new: Any) -> Any:
        def one(o: Tensor, n: Tensor) -> Tensor:
            if not isinstance(n, Tensor) or o.shape != n.shape:  # mixing would broadcast it away: say so
                check_step_state(self.cell, old, new)
            if self.training:
                return torch.where(torch.rand_like(n) < self.p, o, n)
            return torch.lerp(n, o.to(n.dtype), self.p)  # the expectation at test time (n: autocast's dtype)

        if not same_structure(new, old):  # pairing leaves would drop extra ones or fail on None
            check_step_state(self.cell, old, new)
        return tree_map(one, old, new)

    def forward(self, x: Tensor, state: Any = None) -> Any:
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        return self._mix(state, self.cell(x, state))


class _ZoneoutSplit(_Zoneout):
    """:class:`_Zoneout` of a cell with ``project_input``/``step`` (see :class:`_RecurrentDropoutSplit`)."""

    def project_input(self, x: Tensor) -> Tensor:
        return self.cell.project_input(x)

    def step(self, xp: Tensor, state: Any) -> Any:
        return self._mix(state, self.cell.step(xp, state))


class LSTM(_RNNBase):
    """Drop-in ``torch.nn.LSTM`` (see the module docstring for shapes, names and extras)."""

    _default_cell = LSTMCell
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Any = None,
        *,
        forget_bias: float = 0.0,
        peepholes: bool = False,
        cell_clip: float | None = None,
        **extras: Any,
    ) -> None:
        options = {"forget_bias": forget_bias, "peepholes": peepholes, "cell_clip": cell_clip}
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device, dtype, cell_options=_cell_options("LSTM", options, extras), **extras,
        )


class GRU(_RNNBase):
    """Drop-in ``torch.nn.GRU``; ``reset_after=False`` gives the TensorFlow/Keras v1 variant."""

    _default_cell = GRUCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        reset_after: bool = True,
        **extras: Any,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, extras.pop("proj_size", 0),
            device, dtype, cell_options=_cell_options("GRU", {"reset_after": reset_after}, extras), **extras,
        )


class RNN(_RNNBase):
    """Drop-in ``torch.nn.RNN`` (``nonlinearity`` 'tanh' or 'relu')."""

    _default_cell = RNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        **extras: Any,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ShapeError(f"RNN: Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, extras.pop("proj_size", 0),
            device, dtype, cell_options=_cell_options("RNN", {"nonlinearity": nonlinearity}, extras), **extras,
        )
        self.nonlinearity = nonlinearity
