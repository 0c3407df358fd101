"""Recurrent cells: one small protocol, and built-ins that are drop-ins for ``torch.nn``'s cells.

The protocol
------------
A cell is an ``nn.Module`` with

* ``forward(x_t, state=None) -> new_state``: one time step, the call of ``torch.nn.LSTMCell``;
  no state means zeros. ``x_t`` is ``(N, I)`` (or ``(I,)`` unbatched for the built-ins). The
  engine calls it positionally; the built-ins also take torch's keywords (``input=``, ``hx=``)
  and ``state=``.
* ``init_state(batch_size, device=None, dtype=None) -> state``: the zero state.
* ``output(state) -> Tensor`` (optional): the step's output; by default the state itself, or its
  first field when the state is a tuple. A method, or a submodule named ``output`` (a readout
  layer applied to every step's state): so do not call a layer that ``forward`` uses ``output``.

A state is a tensor or a NamedTuple of tensors such as ``LSTMState(h, c)`` (h first, so it
unpacks like torch's ``(h, c)``). That is all :func:`rnnkit.unroll` and the layers need.

A cell may also split its step in two so the engine can hoist the input work out of the time
loop (one big matmul over all steps instead of T small ones):

* ``project_input(x) -> xp``: applied once to the whole ``(T, N, I)`` sequence;
* ``step(xp_t, state) -> new_state``: the recurrence on one projected step.

Symbols: N batch, T time, I input features, H hidden units, P projection size.

Built-ins keep torch's parameter names, gate order and default initialisation
(uniform in ``[-1/sqrt(H), 1/sqrt(H)]``); :func:`rnnkit.init.keras_init_` gives the
TensorFlow/Keras initialisation instead (Glorot input weights, orthogonal recurrent weights,
forget-gate bias 1), which learns faster on MNIST.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.errors import ShapeError

__all__ = [
    "Cell",
    "LSTMState",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "LayerNormLSTMCell",
    "cell_output",
]


class LSTMState(NamedTuple):
    """State of an LSTM: hidden ``h`` (N, P or H) and cell ``c`` (N, H)."""

    h: Tensor
    c: Tensor


def cell_output(cell: nn.Module, state: Any) -> Tensor:
    """The output of ``cell`` for ``state``: ``cell.output(state)`` or the state's first field."""
    out = getattr(cell, "output", None)
    if out is not None:
        return out(state)
    return state if isinstance(state, Tensor) else state[0]


def hooked(module: nn.Module) -> str | None:
    """Why ``module``'s own hooks need it called at every step (they run only in its ``__call__``), or None."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return (f"{type(module).__name__} has module hooks (torch.nn.utils.prune, hook-based weight_norm or "
                "spectral_norm, or your own), which run only when it is called, as the reference loop calls it")
    return None


def steps_split(cell: nn.Module) -> bool:
    """Whether the engine steps ``cell`` by its ``project_input``/``step`` split (one projection for all
    steps) rather than calling it: it has the split and no hooks of its own (see :func:`hooked`)."""
    return hasattr(cell, "project_input") and hasattr(cell, "step") and not hooked(cell)


class Cell(nn.Module):
    """Optional base class for cells: supplies ``output`` and the zero-state default.

    Subclasses implement ``init_state`` and either ``forward`` or the pair
    ``project_input``/``step`` (then ``forward`` comes for free).
    """

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> Any:
        """The zero state for ``batch_size`` sequences."""
        raise NotImplementedError

    def output(self, state: Any) -> Tensor:
        """The step's output: the state, or its first field."""
        return state if isinstance(state, Tensor) else state[0]

    def forward(self, x: Tensor, state: Any = None) -> Any:
        """One time step: ``x`` (N, I) and ``state`` (zeros when None) to the new state."""
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        return self.step(self.project_input(x), state)


# _BuiltinCell._state_layout's memory, beside the cells rather than in them: an attribute a call
# sets is what the traced and compiled backends refuse (a step they could not repeat)
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
# The methods a built-in cell's step is made of, and whether each cell class keeps its built-in ones
_STEP_USES = ("step", "project_input", "fused_bias")
_OWN_MATHS: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


class _BuiltinCell(Cell):
    """Shared checks and shapes of the built-in cells (weights named as in torch.nn)."""

    input_size: int
    hidden_size: int
    #: number of gate blocks stacked in weight_ih (4 for LSTM, 3 for GRU, 1 for RNN)
    gates: int = 1

    def _param(self, *shape: int, factory: dict[str, Any]) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, **factory))

    def reset_parameters(self) -> None:
        """torch.nn's default: every parameter uniform in [-1/sqrt(H), 1/sqrt(H)]."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @property
    def state_size(self) -> int:
        """Width of the recurrent input (the projection size when there is one)."""
        return self.hidden_size

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> Tensor:
        """Zeros of shape (batch_size, H)."""
        w = self.weight_ih
        return torch.zeros(batch_size, self.hidden_size, device=device or w.device, dtype=dtype or w.dtype)

    def _check_step(self, x: Tensor, state: Any) -> tuple[Tensor, Any, bool]:
        """Validate one step's input and state; add a batch axis to unbatched input."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise ShapeError(f"{name}: expected the input to be a Tensor, got {type(x).__name__}")
        if x.dim() not in (1, 2):
            raise ShapeError(
                f"{name}: expected input of shape (N, {self.input_size}) or ({self.input_size},), "
                f"got {tuple(x.shape)}; to run over a sequence use rnnkit.unroll or rnnkit.{name[:-4]}"
            )
        if x.shape[-1] != self.input_size:
            raise ShapeError(
                f"{name}: input has {x.shape[-1]} features, expected input_size={self.input_size} "
                f"(input shape {tuple(x.shape)})"
            )
        w = self.weight_ih
        if x.dtype != w.dtype or x.device != w.device:
            raise ShapeError(
                f"{name}: input is {x.dtype} on {x.device} but the weights are {w.dtype} on {w.device}; "
                f"convert one of them (e.g. x.to(cell.weight_ih) or cell.to(x.dtype))"
            )
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
        if state is None:
            return x, self.init_state(x.shape[0], x.device, x.dtype), unbatched
        kind, want = self._state_layout(x)
        fields = (state,) if isinstance(state, Tensor) else tuple(state)
        if len(fields) != len(want):
            raise ShapeError(f"{name}: expected a state of {len(want)} tensor(s), got {len(fields)}")
        fixed = []
        for got, (shape, dtype) in zip(fields, want):
            if not isinstance(got, Tensor):
                raise ShapeError(f"{name}: state fields must be Tensors, got {type(got).__name__}")
            if unbatched:  # an unbatched state with it, as torch's cells require
                if got.dim() != len(shape) - 1:
                    raise ShapeError(f"{name}: for unbatched input of shape {tuple(x.shape[1:])} the state must be "
                                     f"unbatched too, of shape {tuple(shape[1:])}; got {tuple(got.shape)}")
                got = got.unsqueeze(0)
            if got.shape != shape:
                raise ShapeError(
                    f"{name}: expected a state of shape {tuple(shape)}, got {tuple(got.shape)}"
                )
            if (got.dtype != dtype and not (torch.is_autocast_enabled(x.device.type)
                                             and got.dtype == torch.get_autocast_dtype(x.device.type))
                    or got.device != x.device):  # (a state autocast lowered: torch's cells take it too)
                raise ShapeError(
                    f"{name}: state is {got.dtype} on {got.device}, expected {dtype} on {x.device}"
                )
            fixed.append(got)
        state = fixed[0] if kind is Tensor else kind(*fixed)
        return x, state, unbatched

    def _state_layout(self, x: Tensor) -> tuple[type, tuple[tuple[torch.Size, torch.dtype], ...]]:
        """The state's type and its fields' shapes and dtypes for a batch like x's, as init_state makes
        it (on the meta device), remembered per batch size and dtype: zeros made every step only to be
        compared were a sixth of a called cell's time."""
        key = (x.shape[0], x.dtype)
        layout = _LAYOUTS.get(self)
        if layout is None or layout[0] != key:
            try:
                zeros = self.init_state(x.shape[0], "meta", x.dtype)
            except (RuntimeError, NotImplementedError):  # a state made with a real tensor (a learnt h0, say)
                zeros = self.init_state(x.shape[0], x.device, x.dtype)
            kind = Tensor if isinstance(zeros, Tensor) else type(zeros)
            fields = (zeros,) if kind is Tensor else tuple(zeros)
            layout = (key, kind, tuple((t.shape, t.dtype) for t in fields))
            _LAYOUTS[self] = layout
        return layout[1], layout[2]

    def forward(self, input: Tensor, hx: Any = None, *, state: Any = None) -> Any:
        """One time step (validated): ``input`` (N, I) or (I,) and the state ``hx`` to the new state."""
        # torch.nn's argument names, for keyword calls; state= as rnnkit.Cell names it
        if state is not None:
            if hx is not None:
                raise ShapeError(f"{type(self).__name__}: pass the state once, as hx= or state=")
            hx = state
        x, state, unbatched = self._check_step(input, hx)
        new = self._torch_step(x, state) if self._own_step(x) else None
        if new is None:
            new = self.step(self.project_input(x), state)
        if unbatched:
            return new.squeeze(0) if isinstance(new, Tensor) else type(new)(*(s.squeeze(0) for s in new))
        return new

    def _own_step(self, x: Tensor) -> bool:
        """Whether this call may step by torch's op: the class's own maths (a subclass or the instance
        may override the methods its step uses), and no autocast (torch's cell ops are on CUDA
        autocast's lower-precision list, and their states would then not be the next step's dtype)."""
        cls = type(self)
        own = _OWN_MATHS.get(cls)
        if own is None:  # once per class (its methods as defined then)
            base = next(c for c in cls.__mro__ if "_torch_step" in vars(c))
            own = base is not _BuiltinCell and all(getattr(cls, n, None) is getattr(base, n, None) for n in _STEP_USES)
            _OWN_MATHS[cls] = own
        return own and not torch.is_autocast_enabled(x.device.type) and not any(n in self.__dict__ for n in _STEP_USES)

    def _torch_step(self, x: Tensor, state: Any) -> Any:
        """The step by torch's own cell op, where it computes this cell's (else None)."""
        # one op (torch.nn's cells call the same): a called cell's step took twice torch.nn.LSTMCell's
        # time at N 1 H 32 (31 against 16 us), most of it in the half-dozen ops of project_input and step
        return None

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class LSTMCell(_BuiltinCell):
    r"""Long short-term memory cell, the maths and parameter names of ``torch.nn.LSTMCell``.

    .. math::
        i, f, g, o &= \sigma(W_{ii}x + b_{ii} + W_{hi}h + b_{hi}), \ldots \quad (g \text{ uses } \tanh) \\
        c' &= f \odot c + i \odot g, \qquad h' = o \odot \tanh(c')

    Gate order in ``weight_ih`` (4H, I), ``weight_hh`` (4H, H or P), ``bias_ih``/``bias_hh`` (4H): i, f, g, o.

    Extras (all off by default, so the defaults match torch exactly):

    * ``forget_bias``: a constant added to the forget gate's pre-activation (TensorFlow's
      ``BasicLSTMCell`` used 1.0); not a parameter, so it is not saved in ``state_dict``.
    * ``peepholes``: diagonal connections from the cell state to the gates (``weight_ci``,
      ``weight_cf``, ``weight_co``, each (H,)): i and f see c, o sees c'.
    * ``cell_clip``: clamp c' to [-cell_clip, cell_clip].
    * ``proj_size``: project h' to P units with ``weight_hr`` (P, H), as ``torch.nn.LSTM``'s
      ``proj_size`` and TensorFlow's ``num_proj``; the recurrent input is then the projection.

    State: ``LSTMState(h, c)`` with h (N, P or H) and c (N, H).
    """

    gates = 4

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        forget_bias: float = 0.0,
        peepholes: bool = False,
        cell_clip: float | None = None,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        _check_sizes("LSTMCell", input_size, hidden_size)
        if proj_size < 0 or (proj_size and proj_size >= hidden_size):
            raise ShapeError(
                f"LSTMCell: proj_size must be 0 (off) or between 1 and hidden_size-1={hidden_size - 1}, "
                f"got {proj_size}"
            )
        if cell_clip is not None and not cell_clip > 0:
            raise ShapeError(f"LSTMCell: cell_clip must be positive or None, got {cell_clip}")
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.proj_size = input_size, hidden_size, proj_size
        self.forget_bias, self.peepholes, self.cell_clip = float(forget_bias), peepholes, cell_clip
        self.bias = bias
        recurrent = proj_size or hidden_size
        self.weight_ih = self._param(4 * hidden_size, input_size, factory=factory)
        self.weight_hh = self._param(4 * hidden_size, recurrent, factory=factory)
        if bias:
            self.bias_ih = self._param(4 * hidden_size, factory=factory)
            self.bias_hh = self._param(4 * hidden_size, factory=factory)
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if peepholes:
            self.weight_ci = self._param(hidden_size, factory=factory)
            self.weight_cf = self._param(hidden_size, factory=factory)
            self.weight_co = self._param(hidden_size, factory=factory)
        if proj_size:
            self.weight_hr = self._param(proj_size, hidden_size, factory=factory)
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        """Width of h: the projection size when there is one, else H."""
        return self.proj_size or self.hidden_size

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> LSTMState:
        """Zeros: h (batch_size, P or H), c (batch_size, H)."""
        w = self.weight_ih
        kw = {"device": device or w.device, "dtype": dtype or w.dtype}
        return LSTMState(
            torch.zeros(batch_size, self.state_size, **kw), torch.zeros(batch_size, self.hidden_size, **kw)
        )

    def fused_bias(self) -> Tensor | None:
        """``bias_ih + bias_hh`` with ``forget_bias`` added to the forget block (None if none)."""
        b = None
        if self.bias:
            b = self.bias_ih + self.bias_hh
        if self.forget_bias:
            H = self.hidden_size
            fb = torch.zeros(4 * H, device=self.weight_ih.device, dtype=self.weight_ih.dtype)
            fb[H : 2 * H] = self.forget_bias
            b = fb if b is None else b + fb
        return b

    def project_input(self, x: Tensor) -> Tensor:
        """``x W_ih^T + b_ih + b_hh`` (+ forget_bias): the part of the gates that needs no state."""
        return F.linear(x, self.weight_ih, self.fused_bias())

    def _torch_step(self, x: Tensor, state: Any) -> Any:
        """torch.lstm_cell's step where it has this cell's maths (no forget_bias, peepholes, clipping or
        projection; a forget_bias would be a lone bias, which CUDA's fused cell refuses)."""
        if self.forget_bias or self.peepholes or self.cell_clip is not None or self.proj_size:
            return None
        return LSTMState(*torch._VF.lstm_cell(x, (state[0], state[1]), self.weight_ih, self.weight_hh,
                                              self.bias_ih, self.bias_hh))

    def step(self, xp: Tensor, state: LSTMState) -> LSTMState:
        """One step of the recurrence on a projected input ``xp`` (N, 4H)."""
        h, c = state
        gates = torch.addmm(xp, h, self.weight_hh.t())
        i, f, g, o = gates.chunk(4, dim=1)
        if self.peepholes:
            i = i + c * self.weight_ci
            f = f + c * self.weight_cf
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if self.cell_clip is not None:
            c = c.clamp(-self.cell_clip, self.cell_clip)
        if self.peepholes:
            o = o + c * self.weight_co
        h = torch.sigmoid(o) * torch.tanh(c)
        if self.proj_size:
            h = h @ self.weight_hr.t()
        return LSTMState(h, c)

    def extra_repr(self) -> str:
        extras = [f"{self.input_size}, {self.hidden_size}"]
        if not self.bias:
            extras.append("bias=False")
        if self.proj_size:
            extras.append(f"proj_size={self.proj_size}")
        if self.forget_bias:
            extras.append(f"forget_bias={self.forget_bias}")
        if self.peepholes:
            extras.append("peepholes=True")
        if self.cell_clip is not None:
            extras.append(f"cell_clip={self.cell_clip}")
        return ", ".join(extras)


class GRUCell(_BuiltinCell):
    r"""Gated recurrent unit, the maths and parameter names of ``torch.nn.GRUCell``.

    .. math::
        r &= \sigma(W_{ir}x + b_{ir} + W_{hr}h + b_{hr}), \quad z = \sigma(W_{iz}x + b_{iz} + W_{hz}h + b_{hz}) \\
        n &= \tanh(W_{in}x + b_{in} + r \odot (W_{hn}h + b_{hn})), \qquad h' = (1 - z) \odot n + z \odot h

    Gate order r, z, n in ``weight_ih`` (3H, I), ``weight_hh`` (3H, H) and the biases (3H).
    ``reset_after=False`` gives the TensorFlow/Keras (v1) variant
    ``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``: the reset gate applies before the matmul.
    """

    gates = 3

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        reset_after: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes("GRUCell", input_size, hidden_size)
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias, self.reset_after = (
            input_size,
            hidden_size,
            bias,
            reset_after,
        )
        self.weight_ih = self._param(3 * hidden_size, input_size, factory=factory)
        self.weight_hh = self._param(3 * hidden_size, hidden_size, factory=factory)
        if bias:
            self.bias_ih = self._param(3 * hidden_size, factory=factory)
            self.bias_hh = self._param(3 * hidden_size, factory=factory)
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def project_input(self, x: Tensor) -> Tensor:
        """``W_i x + b_i``, plus ``b_hr, b_hz`` (the recurrent biases outside the reset gate)."""
        if not self.bias:
            return F.linear(x, self.weight_ih)
        H = self.hidden_size
        b = torch.cat([self.bias_ih[: 2 * H] + self.bias_hh[: 2 * H], self.bias_ih[2 * H :]])
        return F.linear(x, self.weight_ih, b)

    def _torch_step(self, x: Tensor, state: Any) -> Any:
        """torch.gru_cell's step where it has this cell's maths (reset_after, torch's own)."""
        if not self.reset_after:
            return None
        return torch._VF.gru_cell(x, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def step(self, xp: Tensor, h: Tensor) -> Tensor:
        """One step of the recurrence on a projected input ``xp`` (N, 3H)."""
        H = self.hidden_size
        xr, xz, xn = xp.chunk(3, dim=1)
        b_hn = self.bias_hh[2 * H :] if self.bias else None
        if self.reset_after:
            hr, hz, hn = (h @ self.weight_hh.t()).chunk(3, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            if b_hn is not None:
                hn = hn + b_hn
            n = torch.tanh(xn + r * hn)
        else:
            hr, hz = (h @ self.weight_hh[: 2 * H].t()).chunk(2, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + F.linear(r * h, self.weight_hh[2 * H :], b_hn))
        return n + z * (h - n)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if not self.bias:
            s += ", bias=False"
        if not self.reset_after:
            s += ", reset_after=False"
        return s


class RNNCell(_BuiltinCell):
    r"""Elman RNN cell, as ``torch.nn.RNNCell``: :math:`h' = \tanh(W_{ih}x + b_{ih} + W_{hh}h + b_{hh})`.

    ``nonlinearity`` is ``"tanh"`` or ``"relu"``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        _check_sizes("RNNCell", input_size, hidden_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ShapeError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias, self.nonlinearity = (
            input_size,
            hidden_size,
            bias,
            nonlinearity,
        )
        self.weight_ih = self._param(hidden_size, input_size, factory=factory)
        self.weight_hh = self._param(hidden_size, hidden_size, factory=factory)
        if bias:
            self.bias_ih = self._param(hidden_size, factory=factory)
            self.bias_hh = self._param(hidden_size, factory=factory)
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def project_input(self, x: Tensor) -> Tensor:
        """``x W_ih^T + b_ih + b_hh``."""
        return F.linear(x, self.weight_ih, self.bias_ih + self.bias_hh if self.bias else None)

    def _torch_step(self, x: Tensor, state: Any) -> Any:
        """torch.rnn_tanh_cell's or rnn_relu_cell's step."""
        op = torch._VF.rnn_tanh_cell if self.nonlinearity == "tanh" else torch._VF.rnn_relu_cell
        return op(x, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def step(self, xp: Tensor, h: Tensor) -> Tensor:
        """One step of the recurrence on a projected input ``xp`` (N, H)."""
        pre = torch.addmm(xp, h, self.weight_hh.t())
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if not self.bias:
            s += ", bias=False"
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        return s


class LayerNormLSTMCell(_BuiltinCell):
    r"""LSTM with layer normalisation (Ba et al., 2016).

    .. math::
        i, f, g, o = \mathrm{LN}_{ih}(W_{ih}x) + \mathrm{LN}_{hh}(W_{hh}h) + b, \quad
        c' = \sigma(f) c + \sigma(i)\tanh(g), \quad h' = \sigma(o)\tanh(\mathrm{LN}_c(c'))

    Parameters: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias`` (4H), and the three
    ``LayerNorm`` modules ``ln_ih``, ``ln_hh`` (over 4H) and ``ln_c`` (over H).
    """

    gates = 4

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        forget_bias: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_sizes("LayerNormLSTMCell", input_size, hidden_size)
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.forget_bias = input_size, hidden_size, float(forget_bias)
        self.weight_ih = self._param(4 * hidden_size, input_size, factory=factory)
        self.weight_hh = self._param(4 * hidden_size, hidden_size, factory=factory)
        if bias:
            self.bias = self._param(4 * hidden_size, factory=factory)
        else:
            self.register_parameter("bias", None)
        self.ln_ih = nn.LayerNorm(4 * hidden_size, eps=eps, **factory)
        self.ln_hh = nn.LayerNorm(4 * hidden_size, eps=eps, **factory)
        self.ln_c = nn.LayerNorm(hidden_size, eps=eps, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform weights and biases as torch's LSTM; layer norms start at gain 1, offset 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("ln_"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> LSTMState:
        """Zeros: h and c, each (batch_size, H)."""
        h = super().init_state(batch_size, device, dtype)
        return LSTMState(h, torch.zeros_like(h))

    def project_input(self, x: Tensor) -> Tensor:
        """``LN_ih(W_ih x) + b`` (+ forget_bias): layer norm is per row, so it hoists too."""
        xp = self.ln_ih(F.linear(x, self.weight_ih))
        if self.bias is not None:
            xp = xp + self.bias
        if self.forget_bias:
            H = self.hidden_size
            xp = torch.cat([xp[..., :H], xp[..., H : 2 * H] + self.forget_bias, xp[..., 2 * H :]], dim=-1)
        return xp

    def step(self, xp: Tensor, state: LSTMState) -> LSTMState:
        """One step of the recurrence on a projected input ``xp`` (N, 4H)."""
        h, c = state
        i, f, g, o = (xp + self.ln_hh(h @ self.weight_hh.t())).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
        return LSTMState(h, c)


def _check_sizes(name: str, input_size: int, hidden_size: int) -> None:
    for label, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ShapeError(f"{name}: {label} must be a positive int, got {value!r}")
