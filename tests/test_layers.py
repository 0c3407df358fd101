"""``rnnkit.LSTM``/``GRU``/``RNN`` against ``torch.nn.LSTM``/``GRU``/``RNN``, and the layers' extras.

The torch comparison runs over an all-pairs grid (every pair of option values appears in at least
one case) in both dtypes, plus the full product of the options that interact most (kind, input
mode, direction, initial state, layout) in float64. Everything else checks one extra at a time,
mostly against a layer stepped by hand with ``layer.cell(l, reverse)``.
"""

from __future__ import annotations

import copy
import functools
import io
import itertools
import re
from typing import Any

import pytest
import torch
from conftest import require_cpu_kernels
from test_traced import LerpGRU  # a user's cell: an nn.Linear, no reset_parameters of its own
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit import LayerResult, RnnkitWarning, ShapeError

F32, F64 = torch.float32, torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")

# name -> (input_size, hidden_size, T, lengths); len(lengths) is the batch size, max(lengths) == T,
# lengths unsorted and each preset has a length-1 sequence.
SIZES = {
    "s": (3, 5, 6, [4, 6, 1, 3]),
    "xs": (1, 2, 3, [1, 3]),
    "m": (7, 4, 5, [2, 5, 1, 5, 3]),
}
KINDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]
MODES = ["batched", "unbatched", "packed_unsorted", "packed_sorted"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers -------------------------------------------------------------------------------------
def _classes(kind: str) -> tuple[type[nn.Module], type[nn.Module]]:
    base = kind.split("_")[0]
    return {"lstm": (rnnkit.LSTM, nn.LSTM), "gru": (rnnkit.GRU, nn.GRU), "rnn": (rnnkit.RNN, nn.RNN)}[base]


def _kind_kwargs(kind: str, hidden_size: int) -> dict[str, Any]:
    if kind == "lstm_proj":
        return {"proj_size": max(1, hidden_size // 2)}
    if kind.startswith("rnn"):
        return {"nonlinearity": kind.split("_")[1]}
    return {}


def _out_size(kind: str, hidden_size: int) -> int:
    return _kind_kwargs(kind, hidden_size).get("proj_size", hidden_size)


def _build(kind: str, input_size: int, hidden_size: int, *, seed: int, lib: str = "rnnkit", **kw: Any) -> nn.Module:
    ours, theirs = _classes(kind)
    torch.manual_seed(seed)
    cls = ours if lib == "rnnkit" else theirs
    return cls(input_size, hidden_size, **_kind_kwargs(kind, hidden_size), **kw)


def _pair(kind: str, input_size: int, hidden_size: int, *, load: str = "torch->rnnkit", ours_kw=None, **kw: Any):
    """An rnnkit layer and a torch layer with the same weights, moved by a strict state_dict load."""
    ours = _build(kind, input_size, hidden_size, seed=1, **kw, **(ours_kw or {}))
    ref = _build(kind, input_size, hidden_size, seed=2, lib="torch", **kw)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))  # the load matters
    if load == "torch->rnnkit":
        ours.load_state_dict(ref.state_dict(), strict=True)
    else:
        ref.load_state_dict(ours.state_dict(), strict=True)
    for (na, a), (nb, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert na == nb and torch.equal(a, b)
    return ours, ref


def _leaves(state: Any) -> list[Tensor]:
    return [state] if isinstance(state, Tensor) else list(state)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 2e-5} if dtype == F32 else {"rtol": 1e-7, "atol": 1e-9}


def _close(a: Any, b: Any, dtype: torch.dtype = F64) -> None:
    torch.testing.assert_close(a, b, **_tol(dtype))


def _random_hx(kind: str, shape_h: tuple[int, ...], shape_c: tuple[int, ...], dtype: torch.dtype, gen) -> tuple:
    h = torch.randn(shape_h, generator=gen, dtype=dtype)
    if kind.startswith("lstm"):
        return (h, torch.randn(shape_c, generator=gen, dtype=dtype))
    return (h,)


def _run(model: nn.Module, x: Tensor, hx: tuple | None, *, mode: str, batch_first: bool, lengths: list[int]):
    """Forward and backward with fixed random cotangents; returns output, hidden and every gradient."""
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else tuple(h.detach().clone().requires_grad_() for h in hx)
    inp: Any = x
    if mode.startswith("packed"):
        inp = pack_padded_sequence(
            x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=mode == "packed_sorted"
        )
    if hx is None:
        out, hidden = model(inp)
    else:
        out, hidden = model(inp, hx if len(hx) == 2 else hx[0])
    outs = [out.data if isinstance(out, PackedSequence) else out, *_leaves(hidden)]
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = {"input": x.grad}
    grads.update({f"hx[{i}]": h.grad for i, h in enumerate(hx or ())})
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return out, hidden, grads


def _assert_same(ours: tuple, ref: tuple, dtype: torch.dtype) -> None:
    (out_a, hid_a, g_a), (out_b, hid_b, g_b) = ours, ref
    if isinstance(out_b, PackedSequence):
        assert isinstance(out_a, PackedSequence)
        _close(out_a.data, out_b.data, dtype)
        assert torch.equal(out_a.batch_sizes, out_b.batch_sizes)
        for field in ("sorted_indices", "unsorted_indices"):
            a, b = getattr(out_a, field), getattr(out_b, field)
            assert (a is None and b is None) or torch.equal(a, b), field
    else:
        assert isinstance(out_a, Tensor)
        _close(out_a, out_b, dtype)
    assert isinstance(hid_a, Tensor) == isinstance(hid_b, Tensor)
    ha, hb = _leaves(hid_a), _leaves(hid_b)
    assert len(ha) == len(hb)
    for a, b in zip(ha, hb):
        _close(a, b, dtype)
    assert list(g_a) == list(g_b)  # same parameter names, same order
    for name in g_b:
        assert g_a[name] is not None and g_b[name] is not None, name
        torch.testing.assert_close(g_a[name], g_b[name], **_tol(dtype), msg=lambda m, n=name: f"{n}: {m}")


def _all_pairs(axes: dict[str, list]) -> list[dict[str, Any]]:
    """A small deterministic set of cases in which every pair of values of two axes occurs (greedy)."""
    names = list(axes)
    todo = {
        (a, i, b, j)
        for a, b in itertools.combinations(names, 2)
        for i in range(len(axes[a]))
        for j in range(len(axes[b]))
    }

    def key(a: str, i: int, b: str, j: int) -> tuple:
        return (a, i, b, j) if names.index(a) < names.index(b) else (b, j, a, i)

    cases = []
    while todo:
        a, i, b, j = min(todo)
        case = {a: i, b: j}
        for name in names:
            if name not in case:
                case[name] = max(
                    range(len(axes[name])), key=lambda v, n=name: sum(key(n, v, o, case[o]) in todo for o in case)
                )
        todo -= {key(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}
        cases.append({n: axes[n][case[n]] for n in names})
    return cases


def _case_id(case: dict[str, Any]) -> str:
    parts = []
    for k, v in case.items():
        if isinstance(v, bool):
            parts.append(k if v else f"no_{k}")
        elif isinstance(v, torch.dtype):
            parts.append(str(v).replace("torch.", ""))
        elif k == "num_layers":
            parts.append(f"L{v}")
        elif k == "sizes":
            parts.append(f"size_{v}")
        else:
            parts.append(str(v))
    return "-".join(parts)


PAIRWISE = _all_pairs(
    {
        "kind": KINDS,
        "mode": MODES,
        "sizes": list(SIZES),
        "num_layers": [1, 2, 3],
        "bias": [True, False],
        "batch_first": [False, True],
        "bidirectional": [False, True],
        "hx": [True, False],
        "dtype": [F32, F64],
        "load": ["torch->rnnkit", "rnnkit->torch"],
    }
)
PRODUCT = [
    {
        "kind": kind, "mode": mode, "sizes": "s", "num_layers": 2, "bias": True, "batch_first": bf,
        "bidirectional": bi, "hx": hx, "dtype": F64, "load": "torch->rnnkit" if bf else "rnnkit->torch",
    }
    for kind, mode, bi, hx, bf in itertools.product(KINDS, MODES, [False, True], [True, False], [False, True])
]


def _compare_with_torch(case: dict[str, Any]) -> None:
    input_size, hidden_size, T, lengths = SIZES[case["sizes"]]
    kind, mode, dtype, bf = case["kind"], case["mode"], case["dtype"], case["batch_first"]
    if mode == "packed_sorted":
        lengths = sorted(lengths, reverse=True)
    kw = {k: case[k] for k in ("num_layers", "bias", "batch_first", "bidirectional")}
    device = case.get("device", "cpu")
    ours_kw = {"backend": case["backend"]} if "backend" in case else {}
    ours, ref = _pair(kind, input_size, hidden_size, load=case["load"], dtype=dtype, ours_kw=ours_kw, **kw)
    ours, ref = ours.to(device), ref.to(device)
    gen = torch.Generator().manual_seed(7)
    N, D = len(lengths), 2 if case["bidirectional"] else 1
    if mode == "unbatched":
        x = torch.randn(T, input_size, generator=gen, dtype=dtype)
        batch_shape: tuple[int, ...] = ()
    else:
        x = torch.randn((N, T, input_size) if bf else (T, N, input_size), generator=gen, dtype=dtype)
        batch_shape = (N,)
    hx = None
    if case["hx"]:
        DL = D * case["num_layers"]
        hx = _random_hx(kind, (DL, *batch_shape, _out_size(kind, hidden_size)), (DL, *batch_shape, hidden_size),
                        dtype, gen)
    x = x.to(device)
    hx = None if hx is None else tuple(h.to(device) for h in hx)
    run = {"mode": mode, "batch_first": bf, "lengths": lengths}
    _assert_same(_run(ours, x, hx, **run), _run(ref, x, hx, **run), dtype)


# -- the torch comparison ------------------------------------------------------------------------
@pytest.mark.parametrize("case", PAIRWISE, ids=[_case_id(c) for c in PAIRWISE])
def test_matches_torch_all_pairs(case):
    _compare_with_torch(case)


@pytest.mark.parametrize("case", PRODUCT, ids=[_case_id(c) for c in PRODUCT])
def test_matches_torch_full_product_float64(case):
    _compare_with_torch(case)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("mode", ["batched", "packed_unsorted"])
def test_matches_torch_with_each_backend(backend, kind, mode):
    case = {
        "kind": kind, "mode": mode, "sizes": "s", "num_layers": 2, "bias": True, "batch_first": True,
        "bidirectional": True, "hx": True, "dtype": F64, "load": "torch->rnnkit", "backend": backend,
    }
    _compare_with_torch(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_on_cuda(kind, mode):
    case = {
        "kind": kind, "mode": mode, "sizes": "s", "num_layers": 2, "bias": True, "batch_first": True,
        "bidirectional": True, "hx": True, "dtype": F64, "load": "torch->rnnkit", "device": "cuda",
    }
    _compare_with_torch(case)


def test_all_pairs_grid_covers_every_pair():
    assert len(PAIRWISE) < 40
    axes = {k: {repr(c[k]) for c in PAIRWISE} for k in PAIRWISE[0]}
    for a, b in itertools.combinations(axes, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in PAIRWISE}
        assert seen == set(itertools.product(axes[a], axes[b])), (a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("bias,bidirectional,num_layers", [(True, True, 2), (False, False, 3)])
def test_same_seed_gives_torchs_initial_weights(kind, dtype, bias, bidirectional, num_layers):
    kw = {"bias": bias, "bidirectional": bidirectional, "num_layers": num_layers, "dtype": dtype}
    ours = _build(kind, 4, 6, seed=5, **kw)
    after_ours = torch.rand(3)
    ref = _build(kind, 4, 6, seed=5, lib="torch", **kw)
    after_ref = torch.rand(3)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert torch.equal(after_ours, after_ref)  # the same random numbers were drawn


@pytest.mark.parametrize(
    "kind,args",
    [
        ("lstm", (3, 5, 2, False, True, 0.25, True, 2)),  # input, hidden, layers, bias, batch_first, dropout, bi, proj
        ("gru", (3, 5, 3, True, False, 0.5, True)),
        ("rnn", (3, 5, 2, "relu", False, True, 0.0, False)),  # ... layers, nonlinearity, bias, ...
    ],
)
def test_positional_arguments_and_attributes_match_torch(kind, args):
    ours_cls, torch_cls = _classes(kind)
    torch.manual_seed(0)
    ours = ours_cls(*args)
    torch.manual_seed(0)
    ref = torch_cls(*args)
    attrs = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"]
    attrs += ["proj_size"] if kind == "lstm" else ["nonlinearity"] if kind == "rnn" else []
    assert {a: getattr(ours, a) for a in attrs} == {a: getattr(ref, a) for a in attrs}
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))


def test_layer_one_sees_both_directions_of_layer_zero():
    lstm = rnnkit.LSTM(3, 5, num_layers=2, bidirectional=True)
    assert lstm.weight_ih_l1.shape == (20, 10) and lstm.weight_ih_l1_reverse.shape == (20, 10)
    proj = rnnkit.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    assert proj.weight_ih_l1.shape == (20, 4) and proj.weight_hr_l1.shape == (2, 5)
    summed = rnnkit.GRU(3, 5, num_layers=2, bidirectional=True, merge_mode="sum")
    assert summed.weight_ih_l1.shape == (15, 5)
    x = torch.randn(4, 2, 3)
    out = lstm(x)[0]
    with torch.no_grad():
        lstm.weight_hh_l0_reverse.mul_(-1)  # only the reverse direction of layer 0 changes...
    out2 = lstm(x)[0]
    assert not torch.allclose(out[..., :5], out2[..., :5])  # ...yet layer 1's forward direction sees it


# -- dropout between layers ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_dropout_eval_is_identity_and_matches_torch(kind):
    ours, ref = _pair(kind, 3, 5, num_layers=3, dropout=0.5, bidirectional=True, dtype=F64)
    ours.eval()
    ref.eval()
    assert all(not c.training for c in ours.cells())
    x = torch.randn(5, 4, 3, dtype=F64)
    run = {"mode": "batched", "batch_first": False, "lengths": [5] * 4}
    _assert_same(_run(ours, x, None, **run), _run(ref, x, None, **run), F64)
    _close(ours(x)[0], ours(x)[0])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_training_matches_torch_when_deterministic(kind, p):
    # p=0 drops nothing; p=1 zeroes the input of every layer but the first, and not the output
    ours, ref = _pair(kind, 3, 5, num_layers=2, dropout=p, dtype=F64)
    assert ours.training and ref.training
    x = torch.randn(5, 4, 3, dtype=F64)
    run = {"mode": "batched", "batch_first": False, "lengths": [5] * 4}
    _assert_same(_run(ours, x, None, **run), _run(ref, x, None, **run), F64)
    assert bool((ours(x)[0] != 0).any())


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_training_is_deterministic_under_a_seed(kind):
    layer = _build(kind, 3, 5, seed=0, num_layers=3, dropout=0.5, bidirectional=True, dtype=F64)
    x = torch.randn(6, 4, 3, dtype=F64)

    def run(seed):
        torch.manual_seed(seed)
        out, hidden = layer(x)
        return out, _leaves(hidden)

    (a, ha), (b, hb), (c, _) = run(3), run(3), run(4)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ha, hb))
    assert not torch.equal(a, c)  # the masks do depend on the seed
    layer.eval()
    assert not torch.equal(a, layer(x)[0])


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(RnnkitWarning, match="num_layers=1"):
        rnnkit.LSTM(3, 5, dropout=0.5)
    with pytest.warns(UserWarning):
        nn.LSTM(3, 5, dropout=0.5)


# -- lengths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_tensor_equals_packed_path(kind, bidirectional, batch_first):
    I, H, T, lengths = SIZES["s"]
    layer = _build(kind, I, H, seed=0, num_layers=2, bidirectional=bidirectional, batch_first=batch_first, dtype=F64)
    N = len(lengths)
    x = torch.randn((N, T, I) if batch_first else (T, N, I), dtype=F64)  # garbage past each end, not zeros
    x1 = x.clone().requires_grad_()
    out, hidden = layer(x1, lengths=torch.tensor(lengths))
    out.sum().backward()
    x2 = x.clone().requires_grad_()
    packed = pack_padded_sequence(x2, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    pout, phidden = layer(packed)
    padded, plens = pad_packed_sequence(pout, batch_first=batch_first, total_length=T)
    padded.sum().backward()
    assert plens.tolist() == lengths
    _close(out, padded)
    for a, b in zip(_leaves(hidden), _leaves(phidden)):
        _close(a, b)
    _close(x1.grad, x2.grad)
    # lengths as a plain list too
    out_list, _ = layer(x, lengths=lengths)
    _close(out, out_list)
    out_tm = out if not batch_first else out.transpose(0, 1)
    x_tm = x if not batch_first else x.transpose(0, 1)
    for n, length in enumerate(lengths):
        assert bool((out_tm[length:, n] == 0).all())  # zero past each end
        # h_n at each sequence's own end: the sequence run alone, cut to its length
        one = x_tm[:length, n : n + 1]
        alone_out, alone_hidden = layer(one.transpose(0, 1) if batch_first else one)
        alone_tm = alone_out if not batch_first else alone_out.transpose(0, 1)
        _close(out_tm[:length, n], alone_tm[:, 0])
        for a, b in zip(_leaves(hidden), _leaves(alone_hidden)):
            _close(a[:, n], b[:, 0])


def test_lengths_with_all_full_sequences_equals_no_lengths():
    layer = rnnkit.GRU(3, 4, bidirectional=True)
    x = torch.randn(5, 2, 3)
    out, h = layer(x, lengths=torch.tensor([5, 5]))
    out2, h2 = layer(x)
    _close(out, out2, F32)
    _close(h, h2, F32)


# -- a layer stepped by hand ----------------------------------------------------------------------
def _by_hand(layer: nn.Module, x: Tensor, lengths: list[int] | None = None, hx: Any = None):
    """Step ``layer.cell(l, reverse)`` over one sequence at a time; x is time-first (T, N, I).

    Returns output (T, N, W) zero past each end, hidden leaves (D*L, N, ...) and states leaves
    (D*L, T, N, ...) that repeat each sequence's final state past its end.
    """
    T, N = x.shape[:2]
    lengths = lengths or [T] * N
    D = 2 if layer.bidirectional else 1
    K = D * layer.num_layers
    hx_leaves = None if hx is None else _leaves(hx)
    outputs, finals, steps = [None] * N, [[None] * N for _ in range(K)], [[None] * N for _ in range(K)]
    for n, length in enumerate(lengths):
        inp = x[:length, n]
        for layer_index in range(layer.num_layers):
            halves = []
            for d in range(D):
                k = layer_index * D + d
                cell = layer.cell(layer_index, d == 1)
                if hx_leaves is None:
                    state = cell.init_state(1, dtype=x.dtype)
                else:
                    fields = [h[k, n : n + 1] for h in hx_leaves]
                    state = fields[0] if len(fields) == 1 else tuple(fields)
                seq: list[Any] = [None] * length
                for t in range(length) if d == 0 else reversed(range(length)):
                    state = cell(inp[t : t + 1], state)
                    seq[t] = state
                halves.append(torch.cat([_leaves(s)[0] for s in seq]))
                finals[k][n] = _leaves(state)
                steps[k][n] = [_leaves(s) for s in seq] + [_leaves(state)] * (T - length)
            if D == 1:
                inp = halves[0]
            elif layer.merge_mode == "concat":
                inp = torch.cat(halves, dim=-1)
            else:
                inp = halves[0] + halves[1] if layer.merge_mode == "sum" else (halves[0] + halves[1]) / 2
        outputs[n] = torch.cat([inp, inp.new_zeros(T - length, inp.shape[-1])])
    output = torch.stack(outputs, dim=1)
    n_fields = len(finals[0][0])
    hidden = [torch.stack([torch.cat([finals[k][n][f] for n in range(N)]) for k in range(K)]) for f in range(n_fields)]
    def at(k: int, t: int, f: int) -> Tensor:
        return torch.cat([steps[k][n][t][f] for n in range(N)])

    states = [torch.stack([torch.stack([at(k, t, f) for t in range(T)]) for k in range(K)]) for f in range(n_fields)]
    return output, hidden, states


RETURN_STATES_CASES = [
    # kind, batch_first, use_lengths, merge_mode, hx
    ("lstm", True, True, "concat", True),
    ("lstm", False, False, "concat", False),
    ("lstm_proj", False, True, "concat", False),
    ("lstm_proj", True, False, "sum", True),
    ("gru", True, True, "mean", False),
    ("gru", False, True, "concat", True),
    ("rnn_tanh", True, False, "concat", False),
    ("rnn_relu", False, True, "sum", True),
]


@pytest.mark.parametrize("kind,batch_first,use_lengths,merge_mode,use_hx", RETURN_STATES_CASES)
def test_return_states(kind, batch_first, use_lengths, merge_mode, use_hx):
    I, H, T, lengths = SIZES["s"]
    N, L, D = len(lengths), 2, 2
    Hout = _out_size(kind, H)
    layer = _build(kind, I, H, seed=0, num_layers=L, bidirectional=True, batch_first=batch_first,
                   merge_mode=merge_mode, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    x_tm = torch.randn(T, N, I, generator=gen, dtype=F64)
    x = x_tm.transpose(0, 1) if batch_first else x_tm
    hx = _random_hx(kind, (D * L, N, Hout), (D * L, N, H), F64, gen) if use_hx else None
    hx_arg = None if hx is None else (hx if len(hx) == 2 else hx[0])
    lens = lengths if use_lengths else None
    res = layer(x, hx_arg, lengths=lens, return_states=True)
    assert isinstance(res, LayerResult)
    output, hidden = layer(x, hx_arg, lengths=lens)
    _close(res.output, output)
    for a, b in zip(_leaves(res.hidden), _leaves(hidden)):
        _close(a, b)

    is_lstm = kind.startswith("lstm")
    if is_lstm:
        assert res.states._fields == ("h", "c")
    states = _leaves(res.states)
    assert len(states) == (2 if is_lstm else 1)
    layout = (N, T) if batch_first else (T, N)
    assert states[0].shape == (D * L, *layout, Hout)
    if is_lstm:
        assert states[1].shape == (D * L, *layout, H)
    states_tm = [s.transpose(1, 2) if batch_first else s for s in states]
    out_tm = output.transpose(0, 1) if batch_first else output
    assert out_tm.shape == (T, N, Hout * (2 if merge_mode == "concat" else 1))

    # every step of every layer and direction equals the cells stepped by hand
    exp_out, exp_hidden, exp_states = _by_hand(layer, x_tm, lens, hx)
    _close(out_tm, exp_out)
    for a, b in zip(_leaves(hidden), exp_hidden):
        _close(a, b)
    for a, b in zip(states_tm, exp_states):
        _close(a, b)

    # the last layer's states are the output, split per direction (zero past each end)
    mask = torch.ones(T, N, 1, dtype=F64)
    for n, length in enumerate(lens or [T] * N):
        mask[length:, n] = 0
    fwd, rev = states_tm[0][-2] * mask, states_tm[0][-1] * mask
    if merge_mode == "concat":
        _close(out_tm[..., :Hout], fwd)
        _close(out_tm[..., Hout:], rev)
    else:
        _close(out_tm, (fwd + rev) * (1.0 if merge_mode == "sum" else 0.5))
    # each direction's state at its sequence's end is h_n / c_n (the reverse one ends at t=0)
    for k in range(D * L):
        for n, length in enumerate(lens or [T] * N):
            t_end = length - 1 if k % 2 == 0 else 0
            for s, h in zip(states_tm, _leaves(hidden)):
                _close(s[k, t_end, n], h[k, n])
    # the first layer by hand, step by step, with layer.cell(0)
    cell = layer.cell(0)
    if hx is None:
        state = cell.init_state(N, dtype=F64)
    else:
        state = (hx[0][0], hx[1][0]) if is_lstm else hx[0][0]
    for t in range(T):
        new = cell(x_tm[t], state)
        keep = torch.tensor([t < length for length in lens or [T] * N]).view(N, 1)
        fields = [torch.where(keep, a, b) for a, b in zip(_leaves(new), _leaves(state))]
        state = tuple(fields) if is_lstm else fields[0]
        for s, f in zip(states_tm, fields):
            _close(s[0, t], f)


@pytest.mark.parametrize("batch_first", [False, True])
def test_return_states_unbatched(batch_first):
    layer = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, proj_size=2, dtype=F64)
    x = torch.randn(5, 3, dtype=F64)  # (T, I) whatever batch_first says, as in torch
    res = layer(x, return_states=True)
    assert res.output.shape == (5, 4)
    assert res.hidden[0].shape == (4, 2) and res.hidden[1].shape == (4, 4)
    assert res.states.h.shape == (4, 5, 2) and res.states.c.shape == (4, 5, 4)
    batched = layer(x.unsqueeze(0 if batch_first else 1), return_states=True)
    b_out = batched.output[0] if batch_first else batched.output[:, 0]
    b_states = [s[:, 0] if batch_first else s[:, :, 0] for s in batched.states]
    _close(res.output, b_out)
    for a, b in zip(res.states, b_states):
        _close(a, b)
    for a, b in zip(res.hidden, batched.hidden):
        _close(a, b[:, 0])


# -- merge modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("merge_mode", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_merge_mode_equals_two_single_direction_layers(merge_mode, kind, num_layers):
    I, H, T, N = 3, 4, 5, 2
    bi = _build(kind, I, H, seed=0, num_layers=num_layers, bidirectional=True, merge_mode=merge_mode, dtype=F64)
    x = torch.randn(T, N, I, dtype=F64)
    out, hidden = bi(x)
    assert out.shape == (T, N, H)
    sd = bi.state_dict()
    inp, finals = x, []
    for layer_index in range(num_layers):
        halves = []
        for suffix, flip in ((f"_l{layer_index}", False), (f"_l{layer_index}_reverse", True)):
            one = _build(kind, inp.shape[-1], H, seed=9, dtype=F64)
            one.load_state_dict({n[: -len(suffix)] + "_l0": sd[n] for n in sd if n.endswith(suffix)}, strict=True)
            o, h = one(inp.flip(0) if flip else inp)
            halves.append(o.flip(0) if flip else o)
            finals.append(_leaves(h))
        inp = halves[0] + halves[1]
        if merge_mode == "mean":
            inp = inp / 2
    _close(out, inp)
    for f, got in enumerate(_leaves(hidden)):
        _close(got, torch.cat([fin[f] for fin in finals]))


# -- a user's cell --------------------------------------------------------------------------------
class TinyCell(nn.Module):
    """A user cell: h' = tanh(lin(x) + u * h), a submodule and a plain parameter."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.lin = nn.Linear(input_size, hidden_size)
        self.u = nn.Parameter(torch.rand(hidden_size))

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype or self.u.dtype)

    def forward(self, x: Tensor, state: Tensor) -> Tensor:
        return torch.tanh(self.lin(x) + self.u * state)


@pytest.mark.parametrize("merge_mode", ["concat", "mean"])
def test_user_cell(merge_mode):
    I, H, T, lengths = SIZES["s"]
    torch.manual_seed(0)
    layer = rnnkit.RNN(I, H, num_layers=2, bidirectional=True, batch_first=True, cell=TinyCell,
                       merge_mode=merge_mode, dtype=F64)
    names = [n for n, _ in layer.named_parameters()]
    # the cell's own parameters in its own order (a module's direct parameters come before its submodules')
    assert names == [
        f"{p}_l{k}{r}" for k in range(2) for r in ("", "_reverse") for p in ("u", "lin_weight", "lin_bias")
    ]
    assert layer.lin_weight_l1.shape == (H, 2 * H if merge_mode == "concat" else H)
    assert layer.u_l0.dtype == F64
    x = torch.randn(len(lengths), T, I, dtype=F64)
    out, h_n = layer(x, lengths=torch.tensor(lengths))
    assert out.shape == (len(lengths), T, 2 * H if merge_mode == "concat" else H) and h_n.shape == (4, len(lengths), H)
    exp_out, exp_hidden, _ = _by_hand(layer, x.transpose(0, 1), lengths)
    _close(out.transpose(0, 1), exp_out)
    _close(h_n, exp_hidden[0])
    (out.sum() + h_n.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert layer.cell(1, reverse=True).lin.weight is layer.lin_weight_l1_reverse
    # with an initial state too
    hx = torch.randn(4, len(lengths), H, dtype=F64)
    out_hx, h_hx = layer(x, hx, lengths=lengths)
    exp_out, exp_hidden, _ = _by_hand(layer, x.transpose(0, 1), lengths, hx)
    _close(out_hx.transpose(0, 1), exp_out)
    _close(h_hx, exp_hidden[0])
    # the state_dict round-trips into a fresh layer
    torch.manual_seed(1)
    fresh = rnnkit.RNN(I, H, num_layers=2, bidirectional=True, batch_first=True, cell=TinyCell,
                       merge_mode=merge_mode, dtype=F64)
    assert not torch.equal(fresh.u_l0, layer.u_l0)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    out2, h2 = fresh(x, lengths=torch.tensor(lengths))
    _close(out2, out)
    _close(h2, h_n)


def test_user_cell_factory_and_bad_cells():
    layer = rnnkit.GRU(3, 4, cell=lambda i, h: TinyCell(i, h))
    assert [n for n, _ in layer.named_parameters()] == ["u_l0", "lin_weight_l0", "lin_bias_l0"]
    with pytest.raises(ShapeError, match="init_state"):
        rnnkit.GRU(3, 4, cell=lambda i, h: nn.Linear(i, h))
    with pytest.raises(ShapeError, match="proj_size"):
        rnnkit.LSTM(3, 4, proj_size=2, cell=TinyCell)


# -- recurrent dropout, zoneout and the LSTM cell's options -----------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize(
    "extra", [{"zoneout": 0.3}, {"recurrent_dropout": 0.4}, {"zoneout": 0.2, "recurrent_dropout": 0.3}]
)
def test_regularisers_eval_is_deterministic_and_training_reproducible(kind, extra):
    layer = _build(kind, 3, 4, seed=0, num_layers=2, bidirectional=True, dtype=F64, **extra)
    x = torch.randn(6, 3, 3, dtype=F64)
    lengths = [6, 1, 4]

    def run(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        out, hidden = layer(x, lengths=lengths)
        return [out, *_leaves(hidden)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    layer.eval()
    e1, e2 = run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(e1, e2))
    assert not torch.equal(a[0], e1[0])
    if "zoneout" not in extra:  # recurrent dropout is off at test time: the plain layer
        plain = _build(kind, 3, 4, seed=0, num_layers=2, bidirectional=True, dtype=F64).eval()
        out, hidden = plain(x, lengths=lengths)
        for u, v in zip(e1, [out, *_leaves(hidden)]):
            _close(u, v)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_zoneout_eval_is_the_expectation(kind):
    p, N, I, H = 0.3, 3, 2, 4
    layer = _build(kind, I, H, seed=0, zoneout=p, dtype=F64).eval()
    x = torch.randn(1, N, I, dtype=F64)
    old = _random_hx(kind, (1, N, _out_size(kind, H)), (1, N, H), F64, torch.Generator().manual_seed(0))
    out, hidden = layer(x, old if len(old) == 2 else old[0])
    cell = layer.cell(0)
    new = _leaves(cell(x[0], tuple(o[0] for o in old) if len(old) == 2 else old[0][0]))
    expected = [n * (1 - p) + o[0] * p for n, o in zip(new, old)]
    _close(out[0], expected[0])
    for got, want in zip(_leaves(hidden), expected):
        _close(got[0], want)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_zoneout_one_keeps_the_initial_state_in_training(kind):
    L, D, N, H, T = 2, 2, 3, 4, 5
    layer = _build(kind, 2, H, seed=0, num_layers=L, bidirectional=True, zoneout=1.0, dtype=F64)
    assert layer.training
    hx = _random_hx(kind, (L * D, N, H), (L * D, N, H), F64, torch.Generator().manual_seed(0))
    out, hidden = layer(torch.randn(T, N, 2, dtype=F64), hx if len(hx) == 2 else hx[0])
    for got, want in zip(_leaves(hidden), hx):
        _close(got, want)
    _close(out, torch.cat([hx[0][-2], hx[0][-1]], dim=-1).expand(T, N, 2 * H))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_recurrent_dropout_zero_equals_no_dropout(kind):
    layer = _build(kind, 3, 4, seed=0, num_layers=2, bidirectional=True, recurrent_dropout=0.0, dtype=F64)
    plain = _build(kind, 3, 4, seed=0, num_layers=2, bidirectional=True, dtype=F64)
    assert layer.training and plain.training
    x = torch.randn(5, 2, 3, dtype=F64)
    run = {"mode": "batched", "batch_first": False, "lengths": [5, 5]}
    _assert_same(_run(layer, x, None, **run), _run(plain, x, None, **run), F64)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_recurrent_dropout_one_drops_only_the_recurrent_h(kind):
    # p=1 zeroes h on its way into the recurrence at every step; an LSTM still carries c.
    T, N, I, H = 4, 3, 2, 5
    layer = _build(kind, I, H, seed=0, recurrent_dropout=1.0, dtype=F64)
    x = torch.randn(T, N, I, dtype=F64)
    out, hidden = layer(x)
    cell = layer.cell(0)
    state = cell.init_state(N, dtype=F64)
    for t in range(T):
        dropped = (torch.zeros_like(state[0]), state[1]) if kind == "lstm" else torch.zeros_like(state)
        state = cell(x[t], dropped)
        _close(out[t], _leaves(state)[0])
    for got, want in zip(_leaves(hidden), _leaves(state)):
        _close(got[0], want)


def test_recurrent_dropout_mask_is_one_per_sequence():
    # h_t = relu(W_hh (m * h_{t-1}) / (1 - p)) with W_hh = I and no input: units dropped once stay zero,
    # the kept ones double every step; a mask redrawn per step would keep killing units.
    T, N, H, p = 6, 4, 32, 0.5
    layer = rnnkit.RNN(1, H, nonlinearity="relu", bias=False, recurrent_dropout=p, dtype=F64)
    with torch.no_grad():
        layer.weight_ih_l0.zero_()
        layer.weight_hh_l0.copy_(torch.eye(H, dtype=F64))
    torch.manual_seed(0)
    out, _ = layer(torch.zeros(T, N, 1, dtype=F64), torch.ones(1, N, H, dtype=F64))
    kept = out[0] != 0
    assert 0 < int(kept.sum()) < N * H
    assert not all(torch.equal(kept[0], kept[n]) for n in range(1, N))  # each sequence draws its own
    for t in range(T):
        _close(out[t], kept.to(F64) * 2.0 ** (t + 1))


def test_lstm_cell_options_pass_through():
    kw = {"num_layers": 2, "bidirectional": True, "dtype": F64}
    layer = rnnkit.LSTM(3, 4, forget_bias=1.0, peepholes=True, cell_clip=0.5, **kw)
    for c in layer.cells():
        assert (c.forget_bias, c.peepholes, c.cell_clip) == (1.0, True, 0.5)
    names = [n for n, _ in layer.named_parameters()]
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        assert {f"weight_ci{suffix}", f"weight_cf{suffix}", f"weight_co{suffix}"} <= set(names)
    x = 5 * torch.randn(7, 3, 3, dtype=F64)
    res = layer(x, return_states=True)
    assert float(res.states.c.detach().abs().max()) == pytest.approx(0.5)  # clipped, and the clip is reached
    exp_out, _, _ = _by_hand(layer, x)
    _close(res.output, exp_out)
    res.output.sum().backward()
    assert layer.weight_cf_l1_reverse.grad is not None and bool((layer.weight_co_l0.grad != 0).any())
    # forget_bias adds to the forget gate's pre-activation: the same as shifting bias_ih
    fb = rnnkit.LSTM(3, 4, forget_bias=1.0, **kw)
    shifted = rnnkit.LSTM(3, 4, **kw)
    sd = fb.state_dict()
    for k in sd:
        if k.startswith("bias_ih"):
            sd[k] = sd[k].clone()
            sd[k][4:8] += 1.0
    shifted.load_state_dict(sd)
    _close(fb(x)[0], shifted(x)[0])
    assert "forget_bias" not in "".join(fb.state_dict())


def test_gru_reset_after_false_passes_through():
    layer = rnnkit.GRU(3, 4, num_layers=2, reset_after=False, dtype=F64)
    assert all(not c.reset_after for c in layer.cells())
    x = torch.randn(5, 2, 3, dtype=F64)
    _close(layer(x)[0], _by_hand(layer, x)[0])


# -- conversions, copies and gradients ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
@pytest.mark.parametrize("how", ["to", "double", "deepcopy", "assign"])
def test_conversions_keep_cells_bound(kind, how):
    ours, ref = _pair(kind, 3, 4, num_layers=2, bidirectional=True)
    ours(torch.randn(3, 2, 3))  # bind the cells once before converting
    x = torch.randn(5, 2, 3, dtype=F64)
    run = {"mode": "batched", "batch_first": False, "lengths": [5, 5]}
    if how in ("to", "double"):
        layer = ours.to(F64) if how == "to" else ours.double()
        ref = ref.double()
        assert layer.cell(1, reverse=True).weight_hh.dtype == F64
        with pytest.raises(ShapeError, match="float32"):
            layer(x.float())
    elif how == "deepcopy":
        layer = copy.deepcopy(ours.double())
        ref = ref.double()
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(1.0)  # the copy must not see changes to the original
        assert layer.cell(0).weight_ih is not ours.weight_ih_l0
    else:
        ref = _build(kind, 3, 4, seed=11, lib="torch", num_layers=2, bidirectional=True, dtype=F64)
        old = ours.weight_ih_l0
        ours.load_state_dict(ref.state_dict(), assign=True)
        layer = ours
        assert layer.weight_ih_l0 is not old and layer.weight_ih_l0.dtype == F64
        assert isinstance(layer.weight_ih_l0, nn.Parameter)
    for name, p in layer.named_parameters():
        base, _, rest = name.rpartition("_l")
        layer_index, _, reverse = rest.partition("_")
        assert getattr(layer.cell(int(layer_index), reverse == "reverse"), base) is p, name
    _assert_same(_run(layer, x, None, **run), _run(ref, x, None, **run), F64)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_layers_parameters(kind):
    layer = _build(kind, 3, 4, seed=0, num_layers=2, bidirectional=True)
    out, _ = layer(torch.randn(5, 2, 3))
    out.square().sum().backward()
    assert layer.weight_hh_l0.grad is not None
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool((p.grad != 0).any()), name
    before = layer(torch.ones(5, 2, 3))[0].detach()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    assert not torch.allclose(layer(torch.ones(5, 2, 3))[0], before)


# -- bad input ----------------------------------------------------------------------------------
def _x(*shape: int, dtype: torch.dtype = F32) -> Tensor:
    return torch.randn(*shape, dtype=dtype)


# id -> (call given a module namespace (rnnkit or torch.nn), fragments of the message, torch raises too)
BAD = {
    "4d_input": (lambda m: m.LSTM(3, 5)(_x(2, 2, 2, 3)), ["2D or 3D", "4D", "(2, 2, 2, 3)"], True),
    "2d_input_is_fine_but_1d_is_not": (lambda m: m.GRU(3, 5)(_x(3)), ["2D or 3D", "1D"], True),
    "feature_size": (lambda m: m.GRU(3, 5)(_x(4, 2, 7)), ["Expected 3", "got 7"], True),
    "feature_size_batch_first": (lambda m: m.RNN(3, 5, batch_first=True)(_x(2, 4, 6)), ["Expected 3", "got 6"], True),
    "hx_shape": (lambda m: m.GRU(3, 5, 2)(_x(4, 2, 3), _x(2, 3, 5)), ["(2, 2, 5)", "(2, 3, 5)"], True),
    "hx_layers": (lambda m: m.RNN(3, 5, 2)(_x(4, 2, 3), _x(1, 2, 5)), ["(2, 2, 5)", "(1, 2, 5)"], True),
    "lstm_c_shape": (
        lambda m: m.LSTM(3, 5)(_x(4, 2, 3), (_x(1, 2, 5), _x(1, 2, 4))), ["(1, 2, 5)", "(1, 2, 4)"], True,
    ),
    "lstm_proj_h_shape": (
        lambda m: m.LSTM(3, 5, proj_size=2)(_x(4, 2, 3), (_x(1, 2, 5), _x(1, 2, 5))), ["(1, 2, 2)", "(1, 2, 5)"], True,
    ),
    # torch indexes hx[0], hx[1]: a RuntimeError when D*L >= 2 (an IndexError when D*L == 1)
    "lstm_hx_tensor": (
        lambda m: m.LSTM(3, 5, bidirectional=True)(_x(4, 2, 3), _x(2, 2, 5)), ["(2, 2, 5), (2, 2, 5)", "got"], True,
    ),
    "gru_hx_tuple": (lambda m: m.GRU(3, 5)(_x(4, 2, 3), (_x(1, 2, 5), _x(1, 2, 5))), ["(1, 2, 5)", "got"], False),
    "hx_3d_for_unbatched": (lambda m: m.LSTM(3, 5)(_x(4, 3), (_x(1, 1, 5), _x(1, 1, 5))), ["2-D", "(1, 1, 5)"], True),
    "hx_2d_for_batched": (lambda m: m.GRU(3, 5)(_x(4, 2, 3), _x(1, 5)), ["(1, 2, 5)", "(1, 5)"], True),
    "hx_dtype": (
        lambda m: m.LSTM(3, 5)(_x(4, 2, 3), (_x(1, 2, 5, dtype=F64), _x(1, 2, 5, dtype=F64))),
        ["float64", "float32"], True,
    ),
    "gru_hx_dtype": (lambda m: m.GRU(3, 5)(_x(4, 2, 3), _x(1, 2, 5, dtype=F64)), ["float64", "float32"], True),
    "input_dtype": (lambda m: m.RNN(3, 5)(_x(4, 2, 3, dtype=F64)), ["float64", "float32"], True),
    "lengths_and_packed": (
        lambda m: m.LSTM(3, 5)(pack_padded_sequence(_x(4, 2, 3), [4, 2]), lengths=[4, 2]),
        ["lengths", "PackedSequence"], False,
    ),
    "lengths_out_of_range": (lambda m: m.GRU(3, 5)(_x(4, 2, 3), lengths=[5, 2]), ["[1, T=4]", "5"], False),
    "lengths_wrong_count": (lambda m: m.GRU(3, 5)(_x(4, 2, 3), lengths=[4, 2, 1]), ["(2,)", "(3,)"], False),
    "nonlinearity": (lambda m: m.RNN(3, 5, nonlinearity="sigmoid"), ["'sigmoid'", "'tanh' or 'relu'"], True),
    "negative_hidden_size": (lambda m: m.LSTM(3, -5), ["hidden_size", "positive", "-5"], True),
    "zero_layers": (lambda m: m.GRU(3, 5, num_layers=0), ["num_layers", "positive", "0"], True),
    "dropout_above_one": (lambda m: m.LSTM(3, 5, 2, dropout=1.5), ["[0, 1]", "1.5"], True),
    "dropout_negative": (lambda m: m.GRU(3, 5, 2, dropout=-0.1), ["[0, 1]", "-0.1"], True),
    "proj_size_equal_hidden": (lambda m: m.LSTM(3, 5, proj_size=5), ["hidden_size-1=4", "got 5"], True),
    "proj_size_above_hidden": (lambda m: m.LSTM(3, 5, proj_size=9), ["hidden_size-1=4", "got 9"], True),
    "proj_size_negative": (lambda m: m.LSTM(3, 5, proj_size=-1), ["proj_size", "got -1"], True),
    "merge_mode": (lambda m: m.GRU(3, 5, bidirectional=True, merge_mode="max"), ["'sum'", "'max'"], False),
    "zoneout_range": (lambda m: m.GRU(3, 5, zoneout=2.0), ["zoneout", "[0, 1]", "2.0"], False),
    "backend": (lambda m: m.GRU(3, 5, backend="cudnn"), ["'native'", "'cudnn'"], False),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_shape_error(case):
    call, fragments, torch_raises = BAD[case]
    with pytest.raises(ShapeError) as ours:
        call(rnnkit)
    err = ours.value
    assert isinstance(err, ValueError) and isinstance(err, RuntimeError)
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"
    if torch_raises:  # code written for torch.nn still catches rnnkit's error
        with pytest.raises(Exception) as theirs:
            call(nn)
        assert isinstance(err, theirs.type), f"torch raised {theirs.type.__name__}, rnnkit {type(err).__mro__}"


# -- more of torch.nn's surface (a helper's QA pass found these missing or different) ------------
@pytest.mark.parametrize("kind", KINDS)
def test_torch_attributes_and_reset_parameters_match_torch(kind):
    ours, ref = _pair(kind, 3, 4, num_layers=2, bidirectional=True)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours.mode == ref.mode
    assert [[tuple(t.shape) for t in ws] for ws in ours.all_weights] == [[tuple(t.shape) for t in ws]
                                                                         for ws in ref.all_weights]
    torch.manual_seed(5)
    ours.reset_parameters()
    torch.manual_seed(5)
    ref.reset_parameters()
    for a, b in zip(ours._flat_weights, ref._flat_weights, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["weight_norm", "orthogonal", "prune"])
def test_parametrized_and_pruned_weights_work_as_in_torch(how):
    import torch.nn.utils.prune  # noqa: F401 - a submodule torch does not import by itself

    ours, ref = _pair("lstm", 3, 4, dtype=F64)
    for m in (ours, ref):
        torch.manual_seed(0)
        if how == "weight_norm":
            nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        elif how == "orthogonal":
            nn.utils.parametrizations.orthogonal(m, "weight_hh_l0")
        else:
            nn.utils.prune.l1_unstructured(m, "weight_ih_l0", amount=0.5)
    x = torch.randn(2, 5, 3, dtype=F64)
    got, want = ours(x)[0], ref(x)[0]
    _close(got, want)
    got.sum().backward()
    want.sum().backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        _close(a.grad, b.grad), n


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_empty_batch_gives_empty_outputs_like_torch(kind):
    ours, ref = _pair(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=F64)
    x = torch.randn(0, 6, 3, dtype=F64)
    (o1, h1), (o2, h2) = ours(x), ref(x)
    assert o1.shape == o2.shape
    assert [t.shape for t in _leaves(h1)] == [t.shape for t in _leaves(h2)]
    assert ours(x, lengths=[])[0].shape == o2.shape  # and an empty list of lengths


def test_every_step_states_of_a_packed_sequence_follow_batch_first():
    layer = rnnkit.GRU(4, 6, batch_first=True).double()
    x, lengths = torch.randn(3, 5, 4, dtype=F64), torch.tensor([5, 2, 3])
    padded = layer(x, lengths=lengths, return_states=True).states
    packed = layer(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False),
                   return_states=True).states
    assert packed.shape == padded.shape == (1, 3, 5, 6)
    _close(packed, padded)


@pytest.mark.parametrize("cls", [rnnkit.GRU, rnnkit.RNN])
def test_proj_size_on_gru_or_rnn_is_a_clear_error(cls):
    with pytest.raises(ShapeError, match="proj_size is only supported by LSTM"):
        cls(4, 6, proj_size=2)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_outputs_can_be_modified_in_place(kind, backend):
    ours, ref = _pair(kind, 3, 4, ours_kw={"backend": backend}, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    outs = []
    for m in (ours, ref):
        out = m(x)[0]
        torch.nn.functional.relu(out, inplace=True)
        out.sum().backward()
        outs.append([p.grad for p in m.parameters()])
    for a, b in zip(*outs, strict=True):
        _close(a, b)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("backend", ["auto", "native", "reference"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_func_grad_works_like_torch(kind, backend, dtype):
    ours, ref = _pair(kind, 3, 4, ours_kw={"backend": backend})
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = torch.randn(5, 2, 3, dtype=dtype)

    def loss(m):
        return lambda params, x: torch.func.functional_call(m, params, (x,))[0].square().sum()

    got = torch.func.grad(loss(ours))(dict(ours.named_parameters()), x)
    want = torch.func.grad(loss(ref))(dict(ref.named_parameters()), x)
    for name in want:
        _close(got[name], want[name], dtype)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_float64_second_derivatives_match_torch_on_auto_and_fused(kind):
    ours, ref = _pair(kind, 3, 4, dtype=F64)
    fused = _pair(kind, 3, 4, dtype=F64)[0]
    fused.backend = "fused"  # its backward recomputes the sequence for create_graph=True
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    pens = []
    for m in (ours, fused, ref):
        g, = torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
        pens.append(torch.autograd.grad(g.square().sum(), list(m.parameters())))
    for a, b, c in zip(*pens, strict=True):
        _close(a, c)
        _close(b, c)


def test_reset_parameters_of_a_weight_normed_layer_reinitialises_its_originals():
    ours, ref = _pair("lstm", 3, 4)
    for m in (ours, ref):
        nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    torch.manual_seed(7)
    ours.reset_parameters()
    torch.manual_seed(7)
    ref.reset_parameters()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_float64_gru_without_a_torch_kernel_still_has_second_derivatives():
    torch.manual_seed(0)
    layer = rnnkit.GRU(2, 3, reset_after=False, dtype=F64)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: layer(v)[0], (x,))


class _NarrowReadout(nn.Module):
    """A user cell whose output() is 3 wide: fine alone, not stacked."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.lin = nn.Linear(input_size + hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 3)

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(torch.cat([x, h], 1)))

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h)


def test_a_stacked_cell_whose_output_does_not_feed_the_next_layer_is_one_clear_error():
    x = torch.randn(5, 3, 4)
    assert rnnkit.RNN(4, 4, cell=_NarrowReadout)(x)[0].shape == (5, 3, 3)  # one layer: its output is the layer's
    with pytest.raises(ShapeError, match="layer 0's output has 3 features .* layer 1's cells were built for 4"):
        rnnkit.RNN(4, 4, num_layers=2, cell=_NarrowReadout)(x)


def test_a_cell_parametrized_instead_of_its_layer_is_one_clear_error():
    from torch.nn.utils import parametrize

    class Same(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return w

    layer = rnnkit.LSTM(4, 5)
    x = torch.randn(3, 2, 4)
    layer(x)  # the cells' bindings are found at the first call
    parametrize.register_parametrization(layer.cell(0), "weight_hh", Same())
    with pytest.raises(ShapeError, match=r"parametrize, prune or replace the layer's parameters"):
        layer(x)


class _TiedCell(nn.Module):
    """A user cell whose two maps share one weight."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.a = nn.Linear(hidden_size, hidden_size, bias=False)
        self.b = nn.Linear(hidden_size, hidden_size, bias=False)
        self.b.weight = self.a.weight
        self.wx = nn.Linear(input_size, hidden_size)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.wx(x) + self.a(h) + self.b(torch.tanh(h)))


def test_a_tied_weight_in_a_user_cell_follows_a_loaded_state():
    torch.manual_seed(0)
    layer, fresh = rnnkit.RNN(3, 4, cell=_TiedCell), rnnkit.RNN(3, 4, cell=_TiedCell)
    x = torch.randn(5, 2, 3)
    layer(x)
    layer.load_state_dict(fresh.state_dict(), assign=True)  # new tensors: both uses must see them
    torch.testing.assert_close(layer(x)[0], fresh(x)[0])


def _spy_fast_path(layer: nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets a 1 each time ``layer`` takes the fused LSTM's fast path."""
    taken: list[int] = []
    fast = type(layer)._fused_lstm_forward
    monkeypatch.setattr(type(layer), "_fused_lstm_forward", lambda self, *a: taken.append(1) or fast(self, *a))
    return taken


def _fast_against_general(layer: nn.Module, x: Tensor, create_graph: bool = False) -> list[int]:
    """Outputs, final states and every gradient of ``layer(x)``, by the fast path and by the general
    path (the fast path switched off): equal, bit for bit (the same loops, the same sums), but for the
    gradients of a create_graph backward, whose graphs are differentiated op by op (equal to
    rounding). Returns whether the fast path was taken. Patches in a context of its own: the
    caller's (a fixture's choice of loops, say) stay."""
    with pytest.MonkeyPatch.context() as mp:
        taken = _spy_fast_path(layer, mp)

        def run() -> tuple[list[Tensor], list[Tensor]]:
            out, (h, c) = layer(x)
            loss = out.pow(2).sum() + h.sin().sum() + c.cos().sum()
            wrt = [x, *layer.parameters()]
            grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, retain_graph=True)
            second = [torch.autograd.grad(grads[0].sum(), x, retain_graph=True)[0]] if create_graph else []
            again = torch.autograd.grad(loss, wrt)  # through the retained graph: the gates computed again
            return [out, h, c, *again], [*grads, *second]

        got, got_graph = run()
        took = list(taken)
        mp.setattr(type(layer), "_fused_lstm_cells", lambda self, x: None)
        want, want_graph = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tol = dict(rtol=1e-12, atol=1e-15) if create_graph else dict(rtol=0, atol=0)
    for a, b in zip(got_graph, want_graph):
        torch.testing.assert_close(a, b, **tol)
    return took


@pytest.mark.parametrize(
    ("num_layers", "batch_first", "options"),
    [(1, True, {}), (2, False, {}), (1, False, {"bias": False}), (2, True, {"forget_bias": 1.0})],
)
def test_lstm_fast_path_matches_the_general_path(num_layers, batch_first, options, monkeypatch):
    """A plain float32 LSTM stack training or inferring from the zero state goes straight to the fused
    C++ loops (``_fused_lstm_forward``) where ``unroll`` would pick them for every layer: outputs,
    final states and every gradient (a second backward through the retained graph included) equal
    the general path's, and inference (which keeps no gates) gives the training forward's values bit
    for bit; an initial state, every-step states and frozen lower layers take the general path."""
    from rnnkit.backends import cext

    require_cpu_kernels()
    if not cext.threaded():
        pytest.skip("auto picks the fused LSTM only where its kernels run on torch's threads")
    I, H, N, T = 5, 32, 64, 7  # N * H and N / H large enough for auto to pick the fused loops
    layer = rnnkit.LSTM(I, H, num_layers, batch_first=batch_first, **options)
    x = torch.randn((N, T, I) if batch_first else (T, N, I), requires_grad=True)
    assert _fast_against_general(layer, x) == [1]
    taken = _spy_fast_path(layer, monkeypatch)
    out, hidden = layer(x)
    with torch.no_grad():  # inference: the fused loops too
        inferred, (h, c) = layer(x)
    assert taken == [1, 1] and inferred.grad_fn is None
    for a, b in ((inferred, out), (h, hidden[0]), (c, hidden[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer(x, hidden)  # an initial state: the general path checks it
    layer(x, return_states=True)
    assert taken == [1, 1]
    for name, p in layer.named_parameters():  # layer 0 frozen, x without a gradient: its layer infers
        p.requires_grad_(not name.endswith("_l0"))
    layer(x.detach())
    assert taken == ([1, 1] if num_layers > 1 else [1, 1, 1])  # one layer: nothing trains, the fast path
    for p in layer.parameters():  # nothing needs a gradient: inference in grad mode, the fast path
        p.requires_grad_(False)
    assert layer(x.detach())[0].grad_fn is None and len(taken) == (3 if num_layers > 1 else 4)


@pytest.mark.parametrize("options", [{}, {"bias": False, "forget_bias": 0.5}])
def test_lstm_fast_path_with_backend_fused_on_either_loops(options, lstm_loops, monkeypatch):
    """backend="fused" in float64 takes the fast path on the C++ and on the Python loops alike, with
    the same results as the general path, second derivatives (create_graph) and vectorised Jacobians
    (vmap-batched gradients) included; empty inputs keep the general path's results and errors."""
    from rnnkit.backends import fused

    layer = rnnkit.LSTM(3, 4, 2, batch_first=True, backend="fused", dtype=F64, **options)
    x = torch.randn(5, 6, 3, dtype=F64, requires_grad=True)
    assert fused._USE_KERNELS == (lstm_loops == "cpp")
    assert _fast_against_general(layer, x, create_graph=True) == [1]
    small = x[:2, :3].detach()
    with pytest.MonkeyPatch.context() as mp:
        taken = _spy_fast_path(layer, mp)
        jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], small, vectorize=True)  # vmap-batched grads
        assert taken == [1]
        mp.setattr(type(layer), "_fused_lstm_cells", lambda self, x: None)
        general = torch.autograd.functional.jacobian(lambda v: layer(v)[0], small, vectorize=True)
    torch.testing.assert_close(jac, general, rtol=1e-12, atol=1e-15)
    assert fused._USE_KERNELS == (lstm_loops == "cpp")  # the fixture's loops all along
    taken = _spy_fast_path(layer, monkeypatch)
    out, (h, c) = layer(torch.randn(0, 6, 3, dtype=F64))  # an empty batch
    out.sum().backward()
    assert out.shape == (0, 6, 4) and h.shape == c.shape == (2, 0, 4)
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    with pytest.raises(ShapeError, match="empty time axis"):
        layer(torch.randn(2, 0, 3, dtype=F64))
    with pytest.raises(ShapeError, match="move one of them"):  # parameters elsewhere than x
        layer.to("meta")(torch.randn(2, 6, 3, dtype=F64))
    assert taken == []


def test_lstm_forward_kernel_without_gates_gives_the_same_states():
    """Without keep_gates (inference) the C++ forward makes no gates and gives the same outputs and
    cells, bit for bit, with or without masks and an initial state; without keep_cells too, only
    the last step's cells (the loop keeps two steps), which a backward could not do with."""
    from rnnkit.backends import fused

    ops = require_cpu_kernels()
    T, N, I, H = 6, 9, 3, 20  # H not a whole number of vectors: the rows' last lanes too
    x = torch.randn(N, T, I).transpose(0, 1)  # batch-first, read in place
    w_ih, w_hh, b1, b2 = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)
    masks = torch.ones(T, N, dtype=torch.bool)
    masks[4:, :3] = False
    for h0, c0, m, full in ((None, None, fused._NO_MASKS, T), (torch.randn(N, H), torch.randn(N, H), masks, 4)):
        G, hs, cs = ops.lstm_forward(x, h0, c0, w_ih, w_hh, b1, b2, m, full, False, False)
        none, hs2, cs2 = ops.lstm_forward(x, h0, c0, w_ih, w_hh, b1, b2, m, full, False, False, False)
        assert G.shape == (T, N, 4 * H) and none is None
        torch.testing.assert_close(hs2, hs, rtol=0, atol=0)
        torch.testing.assert_close(cs2, cs, rtol=0, atol=0)
        for steps in (T, T - 1, 1):  # the last step in either slot of the two, or the only one
            _, hs3, last = ops.lstm_forward(x[:steps], h0, c0, w_ih, w_hh, b1, b2, m[:steps] if m.numel() else m,
                                            min(full, steps), False, False, False, False)
            assert last.shape == (1, N, H)
            torch.testing.assert_close(hs3, hs[:steps], rtol=0, atol=0)
            torch.testing.assert_close(last[0], cs[steps - 1], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="every step's cells"):
        ops.lstm_forward(x, None, None, w_ih, w_hh, b1, b2, fused._NO_MASKS, T, False, False, True, False)


def test_lstm_backward_kernel_gives_zero_weight_gradients_for_an_empty_batch():
    """The C++ backward called on an empty batch returns zeros for the weights (no rows start the sums)."""
    from rnnkit.backends import fused

    ops = require_cpu_kernels()
    T, I, H = 3, 2, 4
    x = torch.randn(T, 0, I)
    w_ih, w_hh, b = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H)
    G, hs, cs = ops.lstm_forward(x, None, None, w_ih, w_hh, b, b, fused._NO_MASKS, T, False, False)
    dirty = torch.full((1, I + 1 + H, 4 * H), float("nan"))  # memory the sums' buffer may be given next
    del dirty
    dx, dh0, dc0, dw_ih, dw_hh, db = ops.lstm_backward(G, cs, hs, x, None, None, w_ih, w_hh, None, None, None,
                                                       fused._NO_MASKS, T, T, 1 | 8 | 16 | 32, True, False)
    assert dx.shape == (T, 0, I) and dh0 is None and dc0 is None
    for g, like in ((dw_ih, w_ih), (dw_hh, w_hh), (db, b)):
        assert g.shape == like.shape and not g.any()


# -- what torch.nn users do with their layers ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "fused"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_transposed_weights_compute_what_torch_computes(kind: str, backend: str) -> None:
    """Weights that are transposed views (a Keras or JAX kernel loaded as w.T with assign=True, a
    parametrization returning X.t()) run as torch's do: values and every gradient."""
    ours, ref = _pair(kind, 4, 6, ours_kw={"backend": backend})
    sd = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd, assign=True)
    assert not ours.weight_hh_l0.is_contiguous() and not ours.weight_ih_l0.is_contiguous()
    x = torch.randn(7, 3, 4)
    got = _run(ours, x, None, mode="batched", batch_first=False, lengths=[7, 7, 7])
    want = _run(ref, x, None, mode="batched", batch_first=False, lengths=[7, 7, 7])
    _close(got, want, F32)


@pytest.mark.parametrize("how", ["torch.func.grad", "non-leaf weights"])
def test_a_layer_pickles_and_copies_after_a_functional_call(how: str) -> None:
    """After torch.func.functional_call lent the layer other tensors (under torch.func.grad, or
    MAML's non-leaf fast weights), deepcopy and torch.save of the module work, as torch's do, and
    the copy computes with the layer's own weights."""
    from torch.func import functional_call, grad

    layer, x = rnnkit.GRU(4, 6), torch.randn(5, 3, 4)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    if how == "torch.func.grad":
        grad(lambda p: functional_call(layer, p, (x,))[0].sum())(params)
    else:
        functional_call(layer, {k: v * 1.0 for k, v in layer.named_parameters()}, (x,))
    twin = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    want = layer(x)[0]
    for other in (twin, loaded):
        torch.testing.assert_close(other(x)[0], want, rtol=0, atol=0)


def test_states_and_results_load_with_torchs_default_weights_only() -> None:
    """A saved hidden state (an LSTMState, where torch.nn.LSTM returns a tuple) or LayerResult
    loads with torch.load's defaults (weights_only), as torch.nn.LSTM's tuple does."""
    out, hidden = rnnkit.LSTM(4, 6)(torch.randn(5, 3, 4))
    result = rnnkit.LSTM(4, 6)(torch.randn(5, 3, 4), return_states=True)
    unrolled = rnnkit.unroll(rnnkit.LSTMCell(4, 6), torch.randn(3, 5, 4))
    buffer = io.BytesIO()
    torch.save({"hidden": hidden, "result": result, "unrolled": unrolled}, buffer)
    buffer.seek(0)
    back = torch.load(buffer)
    assert type(back["hidden"]) is rnnkit.LSTMState and type(back["result"]) is LayerResult
    assert type(back["unrolled"]) is rnnkit.UnrollResult
    torch.testing.assert_close(back["hidden"].c, hidden.c)
    torch.testing.assert_close(back["result"].states.h, result.states.h)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torchs_argument_checks_are_there_with_torchs_rules(kind: str) -> None:
    """check_forward_args, check_input, get_expected_hidden_size (and the LSTM's cell size),
    check_hidden_size and permute_hidden, for code written against torch's layers: the same
    results and messages as torch's."""
    ours, ref = _pair(kind, 4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4)
    h = torch.zeros(4, 3, 6)
    good = (h, h) if kind == "lstm" else h
    bad = (torch.zeros(4, 2, 6), h) if kind == "lstm" else torch.zeros(4, 2, 6)
    assert ours.get_expected_hidden_size(x, None) == ref.get_expected_hidden_size(x, None) == (4, 3, 6)
    ours.check_forward_args(x, good, None)
    for args in ((x, bad, None), (x[..., :3], good, None), (x[0], good, None)):
        with pytest.raises(RuntimeError) as theirs:
            ref.check_forward_args(*args)
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
            ours.check_forward_args(*args)
    order = torch.tensor([2, 0, 1])
    for a, b in zip(_leaves(ours.permute_hidden(good, order)), _leaves(ref.permute_hidden(good, order)), strict=True):
        assert torch.equal(a, b)


def test_sizes_that_are_not_ints_raise_typeerror_as_torchs_do() -> None:
    """torch raises TypeError for a size that is not an int; rnnkit's error is one too."""
    for build in (nn.LSTM, rnnkit.LSTM, rnnkit.GRU):
        with pytest.raises(TypeError):
            build(4.0, 6)
    with pytest.raises(TypeError, match="num_layers"):
        rnnkit.LSTM(4, 6, num_layers=2.0)


@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU, rnnkit.RNN])
def test_a_users_cell_in_any_layer_runs_its_plainest_call(cls: type[nn.Module]) -> None:
    """layer(x) of an LSTM (or GRU, RNN) built with cell= (the LSTM's fast path read weight_ih first)."""
    layer = cls(4, 6, cell=LerpGRU)
    x = torch.randn(5, 3, 4)
    out, h = layer(x)
    torch.testing.assert_close(out, rnnkit.unroll(layer.cell(0), x, batch_first=False).outputs)


def test_options_that_cannot_reach_a_users_cell_are_refused() -> None:
    """bias=False (where the cell keeps biases), nonlinearity='relu' or forget_bias with cell= would be
    ignored: an error says so; a factory that builds its cells without biases takes bias=False;
    cell_options= (which raised TypeError from every layer, and could make the cells disagree with
    the layer's own attributes) names the layer's arguments instead."""
    for build, why in ((lambda: rnnkit.RNN(4, 6, bias=False, cell=LerpGRU), "gates.bias"),
                       (lambda: rnnkit.RNN(4, 6, nonlinearity="relu", cell=LerpGRU), "nonlinearity='relu'"),
                       (lambda: rnnkit.LSTM(4, 6, forget_bias=1.0, cell=LerpGRU), "forget_bias=1.0")):
        with pytest.raises(ShapeError, match=re.escape(why)):
            build()
    factory = functools.partial(rnnkit.LayerNormLSTMCell, bias=False)
    layer = rnnkit.LSTM(4, 6, bias=False, cell=factory)
    assert "bias_l0" not in dict(layer.named_parameters())  # (its layer norms' shifts are not biases)
    for build, named in ((lambda: rnnkit.LSTM(4, 6, cell_options={"forget_bias": 1.0}), "forget_bias="),
                         (lambda: rnnkit.GRU(4, 6, cell_options={"reset_after": False}), "reset_after="),
                         (lambda: rnnkit.RNN(4, 6, cell_options={"nonlinearity": "relu"}), "nonlinearity=")):
        with pytest.raises(ShapeError, match=named):
            build()


def test_reset_parameters_resets_a_users_cell_through_its_submodules() -> None:
    """A user's cell without reset_parameters is reset through its submodules' own, as at construction
    (the same values for the same seed); a cell with parameters of its own that nothing resets warns."""
    torch.manual_seed(3)
    fresh = rnnkit.RNN(4, 6, cell=LerpGRU)
    layer = rnnkit.RNN(4, 6, cell=LerpGRU)
    torch.manual_seed(3)
    layer.reset_parameters()
    for a, b in zip(layer.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)

    class Bare(LerpGRU):
        def __init__(self, input_size: int, hidden_size: int) -> None:
            super().__init__(input_size, hidden_size)
            self.scale = nn.Parameter(torch.ones(hidden_size))

    with pytest.warns(RnnkitWarning, match="scale keep their values"):
        rnnkit.RNN(4, 6, cell=Bare).reset_parameters()


@pytest.mark.parametrize("extra", [{"zoneout": 0.1}, {"recurrent_dropout": 0.2}])
def test_a_hooked_cell_in_a_layer_runs_its_hooks_every_step_under_zoneout_and_dropout(extra: dict) -> None:
    """The wrappers of zoneout and recurrent dropout call a cell with hooks of its own whole, every
    step (their split form called its step() and skipped them)."""
    calls = []

    def hooked_cell(i: int, h: int) -> nn.Module:
        c = rnnkit.GRUCell(i, h)
        c.register_forward_pre_hook(lambda m, a: calls.append(1))
        return c

    layer = rnnkit.GRU(4, 6, cell=hooked_cell, **extra).train()
    layer(torch.randn(5, 3, 4))
    assert len(calls) == 5
