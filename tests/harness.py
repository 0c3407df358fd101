"""A reusable test harness for recurrent cells: run any cell, built-in or your own, through it.

Usage::

    from harness import check_cell        # copy tests/harness.py next to your own tests

    def test_my_cell():
        check_cell(lambda: MyCell(input_size=3, hidden_size=4), input_size=3)

``cell_factory`` is a no-argument callable that builds a fresh cell (an ``nn.Module`` with
``forward(x, state)`` and ``init_state(batch_size, device=None, dtype=None)``, see
:mod:`rnnkit.cells`); the harness calls it under a fixed seed. It checks, in order:

1. **init_state**: the zero state has the requested dtype and device, every tensor has the batch
   size as its first axis and is all zeros, and one step of the cell returns a state with the
   same structure (type, number of tensors, shapes).
2. **unroll vs stepping by hand**: :func:`rnnkit.unroll` with and without ``lengths``, forwards
   and ``reverse=True``, from the zero state and from a random initial state, with
   ``return_states=True``, against the cell stepped by hand over each sequence's own valid part
   (flipped for reverse). Outputs must match and be exactly zero past each sequence's end, every
   step's state must match and repeat the final state past the end, and the final state must
   keep the cell's state type.
3. **gradcheck**: ``torch.autograd.gradcheck`` in float64 through ``unroll`` (with lengths,
   reverse and return_states) with respect to the input, the initial state and every parameter.
4. **determinism**: two cells built under the same seed have equal parameters and give bitwise
   equal outputs; running one cell twice gives bitwise equal outputs.

Every check raises ``AssertionError`` with a message saying what differed. ``backend`` picks the
engine's backend (``"reference"`` runs any cell; ``"native"``/``"fused"`` only the built-ins
they support, otherwise ``unroll`` raises ``rnnkit.ShapeError``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rnnkit import unroll
from rnnkit.cells import cell_output
from rnnkit.engine import tree_flatten, tree_map

__all__ = ["check_cell", "step_by_hand", "default_lengths"]


def default_lengths(batch_size: int, seq_len: int) -> list[int]:
    """Varied lengths in [1, seq_len] that include a full and (when possible) a length-1 sequence."""
    pattern = [seq_len, 1, max(1, seq_len - 2), max(1, seq_len // 2)]
    return [pattern[n % len(pattern)] for n in range(batch_size)]


def step_by_hand(
    cell: nn.Module, x: Tensor, state: Any, lengths: Sequence[int], reverse: bool
) -> tuple[Tensor, Any, Any]:
    """The oracle: step ``cell`` over each sequence of ``x`` (N, T, I) alone, for its own length.

    Returns batch-first ``(outputs (N, T, ...), final_state, states)`` with the semantics
    :func:`rnnkit.unroll` promises: zeros in outputs past each end, the final state repeated in
    ``states`` past each end, reversed sequences put back in their original time order.
    """
    N, T = x.shape[:2]
    outs, finals, all_states = [], [], []
    for n in range(N):
        L = int(lengths[n])
        s = tree_map(lambda leaf, n=n: leaf[n : n + 1], state)
        steps = list(range(L))
        if reverse:
            steps.reverse()
        out_n: list[Tensor | None] = [None] * T
        st_n: list[Any] = [None] * T
        for t in steps:
            s = cell(x[n : n + 1, t], s)
            out_n[t], st_n[t] = cell_output(cell, s), s
        for t in range(L, T):
            out_n[t], st_n[t] = torch.zeros_like(out_n[0]), s
        outs.append(torch.stack(out_n, 1))
        finals.append(s)
        all_states.append(tree_map(lambda *leaves: torch.stack(leaves, 1), *st_n))
    cat = lambda *parts: torch.cat(parts, 0)  # noqa: E731
    return torch.cat(outs, 0), tree_map(cat, *finals), tree_map(cat, *all_states)


def _close(what: str, got: Any, want: Any, atol: float, rtol: float) -> None:
    got_leaves, want_leaves = tree_flatten(got)[0], tree_flatten(want)[0]
    assert len(got_leaves) == len(want_leaves), (
        f"{what}: {len(got_leaves)} tensors, expected {len(want_leaves)}"
    )
    for k, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        assert g.shape == w.shape, f"{what}[{k}]: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{what}[{k}]: dtype {g.dtype}, expected {w.dtype}"
        if not torch.allclose(g, w, atol=atol, rtol=rtol):
            err = (g - w).abs().max().item()
            raise AssertionError(f"{what}[{k}]: max abs difference {err:.3g} (atol={atol}, rtol={rtol})")


def _same_type(what: str, got: Any, want: Any) -> None:
    assert type(got) is type(want), f"{what}: type {type(got).__name__}, expected {type(want).__name__}"


def _check_init_state(cell: nn.Module, input_size: int, batch_size: int, dtype: torch.dtype) -> Any:
    device = next(iter(cell.parameters()), torch.empty(0)).device
    state = cell.init_state(batch_size, device=device, dtype=dtype)
    leaves = tree_flatten(state)[0]
    assert leaves, "init_state returned no tensors"
    for k, leaf in enumerate(leaves):
        assert isinstance(leaf, Tensor), f"init_state field {k} is {type(leaf).__name__}, not a Tensor"
        assert leaf.dtype == dtype, f"init_state field {k}: dtype {leaf.dtype}, asked for {dtype}"
        assert leaf.device == device, f"init_state field {k}: device {leaf.device}, asked for {device}"
        assert leaf.dim() >= 1 and leaf.shape[0] == batch_size, (
            f"init_state field {k}: shape {tuple(leaf.shape)}, expected batch size {batch_size} first"
        )
        assert not leaf.any(), f"init_state field {k} is not all zeros"
    x = torch.randn(batch_size, input_size, dtype=dtype, device=device)
    new = cell(x, state)
    _same_type("one step's state", new, state)
    new_leaves = tree_flatten(new)[0]
    assert [t.shape for t in new_leaves] == [t.shape for t in leaves], (
        f"one step changed the state's shapes: {[tuple(t.shape) for t in leaves]} -> "
        f"{[tuple(t.shape) for t in new_leaves]}"
    )
    return state


def _check_against_hand(
    cell: nn.Module, x: Tensor, zero: Any, lengths: list[int], backend: str, atol: float, rtol: float
) -> None:
    N, T = x.shape[:2]
    random_state = tree_map(lambda z: torch.randn_like(z) * 0.5, zero)
    with torch.no_grad():
        for use_lengths in (False, True):
            lens = lengths if use_lengths else [T] * N
            for reverse in (False, True):
                for name, init in (("zero", None), ("random", random_state)):
                    what = f"unroll(lengths={lens if use_lengths else None}, reverse={reverse}, state={name})"
                    res = unroll(
                        cell, x, init, lengths=lens if use_lengths else None, reverse=reverse,
                        return_states=True, backend=backend,
                    )
                    want_out, want_final, want_states = step_by_hand(
                        cell, x, zero if init is None else init, lens, reverse
                    )
                    _close(f"{what} outputs", res.outputs, want_out, atol, rtol)
                    _same_type(f"{what} final_state", res.final_state, want_final)
                    _close(f"{what} final_state", res.final_state, want_final, atol, rtol)
                    _same_type(f"{what} states", res.states, want_final)
                    _close(f"{what} states", res.states, want_states, atol, rtol)
                    for n, L in enumerate(lens):
                        assert not res.outputs[n, L:].any(), f"{what}: outputs of sequence {n} past {L} not 0"


def _check_gradcheck(
    cell: nn.Module, input_size: int, lengths: list[int], seq_len: int, backend: str
) -> None:
    cell = cell.double()
    N = len(lengths)
    names = [name for name, p in cell.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_() for name, p in cell.named_parameters() if p.requires_grad]
    x = torch.randn(N, seq_len, input_size, dtype=torch.float64, requires_grad=True)
    zero = cell.init_state(N, device=x.device, dtype=torch.float64)
    state_leaves, unflatten = tree_flatten(zero)
    state_leaves = [torch.randn_like(z).mul_(0.5).requires_grad_() for z in state_leaves]
    n_state = len(state_leaves)

    def fn(x: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        state = unflatten(list(rest[:n_state]))
        swapped = {f"cell.{name}": p for name, p in zip(names, rest[n_state:])}
        res = torch.func.functional_call(_Unroller(cell, lengths, backend), swapped, (x, state))
        return (res.outputs, *tree_flatten(res.final_state)[0], *tree_flatten(res.states)[0])

    inputs = (x, *state_leaves, *params)
    try:
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    except Exception as err:  # re-raise as a test failure that names the parameters
        raise AssertionError(f"gradcheck through unroll failed (inputs: x, state, {names}): {err}") from err


class _Unroller(nn.Module):
    """unroll as a module, so torch.func.functional_call can substitute the cell's parameters."""

    def __init__(self, cell: nn.Module, lengths: list[int], backend: str) -> None:
        super().__init__()
        self.cell, self.lengths, self.backend = cell, lengths, backend

    def forward(self, x: Tensor, state: Any) -> Any:
        return unroll(
            self.cell, x, state, lengths=self.lengths, reverse=True, return_states=True, backend=self.backend
        )


def _check_determinism(
    cell_factory: Callable[[], nn.Module], input_size: int, batch_size: int, seq_len: int,
    lengths: list[int], dtype: torch.dtype, seed: int, backend: str,
) -> None:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return cell_factory().to(dtype)

    a, b = build(), build()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys(), f"same seed, different parameters: {sorted(pa)} vs {sorted(pb)}"
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"same seed, parameter {name!r} differs"
    x = torch.randn(batch_size, seq_len, input_size, dtype=dtype)
    with torch.no_grad():
        runs = [unroll(c, x, lengths=lengths, return_states=True, backend=backend) for c in (a, b, a)]
    for k in (1, 2):
        for field in ("outputs", "final_state", "states"):
            got, want = tree_flatten(getattr(runs[k], field))[0], tree_flatten(getattr(runs[0], field))[0]
            between = "two cells of the same seed" if k == 1 else "two runs of one cell"
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (
                f"not deterministic: {field} differs between {between}"
            )


def check_cell(
    cell_factory: Callable[[], nn.Module],
    input_size: int,
    *,
    batch_size: int = 3,
    seq_len: int = 4,
    lengths: Sequence[int] | None = None,
    backend: str = "reference",
    dtype: torch.dtype = torch.float64,
    gradcheck: bool = True,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Check that a cell follows rnnkit's cell protocol and runs correctly through :func:`rnnkit.unroll`.

    Args:
        cell_factory: builds a fresh cell (called under ``torch.manual_seed(seed)``).
        input_size: the cell's number of input features.
        batch_size, seq_len: sizes of the random test sequences (keep them small).
        lengths: per-sequence lengths in [1, seq_len] for the variable-length checks; by default
            a mix that includes a full sequence and a length-1 sequence.
        backend: the engine backend to check (``"reference"``, ``"native"``, ``"fused"`` or ``"auto"``).
        dtype: dtype of the value checks (float64 by default; gradcheck always runs in float64).
        gradcheck: run ``torch.autograd.gradcheck`` through ``unroll`` (the slowest check).
        seed: the random seed of the cells and inputs.
        atol, rtol: tolerances of unroll against stepping by hand (default: tight for float64,
            looser for float32).

    Raises:
        AssertionError: naming the first check that failed and what differed.
    """
    lengths = list(lengths) if lengths is not None else default_lengths(batch_size, seq_len)
    assert len(lengths) == batch_size, f"lengths has {len(lengths)} entries, batch_size is {batch_size}"
    if atol is None:
        atol = 1e-10 if dtype == torch.float64 else 1e-5
    if rtol is None:
        rtol = 1e-7 if dtype == torch.float64 else 1e-4

    torch.manual_seed(seed)
    cell = cell_factory().to(dtype)
    zero = _check_init_state(cell, input_size, batch_size, dtype)
    x = torch.randn(batch_size, seq_len, input_size, dtype=dtype)
    _check_against_hand(cell, x, zero, lengths, backend, atol, rtol)
    if gradcheck:
        torch.manual_seed(seed)
        _check_gradcheck(cell_factory(), input_size, lengths, seq_len, backend)
    _check_determinism(cell_factory, input_size, batch_size, seq_len, lengths, dtype, seed, backend)
