from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnnkit.errors import CheckpointError, ConfigError
from rnnkit.train.optim import (
    EMA,
    apply_lr,
    clip_gradients,
    constant,
    cosine,
    exponential,
    global_grad_norm,
    l1_l2_penalty,
    make_optimizer,
    make_schedule,
    one_cycle,
    step_decay,
    warmup,
)

# ---------------------------------------------------------------------------------------- schedules


def test_exponential_decay_matches_tensorflow_values():
    smooth = exponential(0.1, 0.96, 100_000)
    stairs = exponential(0.1, 0.96, 100_000, staircase=True)
    # 0.1 * 0.96 ** 0.5, 0.1 * 0.96 ** 2.5 and 0.1 * 0.96 ** 2, worked out by hand
    assert smooth(0) == stairs(0) == pytest.approx(0.1)
    assert smooth(50_000) == pytest.approx(0.0979795897113, rel=1e-12)
    assert stairs(50_000) == pytest.approx(0.1, rel=1e-15)
    assert smooth(100_000) == pytest.approx(0.096) and stairs(100_000) == pytest.approx(0.096)
    assert smooth(250_000) == pytest.approx(0.0902979898780, rel=1e-12)
    assert stairs(250_000) == pytest.approx(0.09216, rel=1e-12)


def test_exponential_staircase_differs_for_small_decay_steps():
    smooth = [exponential(1.0, 0.5, 2)(s) for s in range(5)]
    stairs = [exponential(1.0, 0.5, 2, staircase=True)(s) for s in range(5)]
    assert smooth == pytest.approx([1.0, 1 / math.sqrt(2), 0.5, 0.5 / math.sqrt(2), 0.25])
    assert stairs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])


def test_step_decay_and_constant():
    sched = step_decay(1.0, step_size=3, gamma=0.1)
    assert [sched(s) for s in range(7)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    assert constant(0.3)(0) == constant(0.3)(10**9) == 0.3


def test_cosine_endpoints_and_midpoint():
    sched = cosine(0.1, total_steps=100, min_lr=0.01)
    assert sched(0) == pytest.approx(0.1)
    assert sched(50) == pytest.approx(0.055)
    assert sched(100) == pytest.approx(0.01)
    assert sched(150) == pytest.approx(0.01)


def test_one_cycle_peak_position_and_ends():
    sched = one_cycle(100, max_lr=1.0, pct_start=0.3)
    lrs = [sched(s) for s in range(101)]
    assert max(range(101), key=lambda s: lrs[s]) == 30
    assert lrs[30] == pytest.approx(1.0)
    assert lrs[0] == pytest.approx(1.0 / 25)
    assert lrs[100] == pytest.approx(1.0 / 25 / 1e4)
    assert all(a < b for a, b in zip(lrs[:30], lrs[1:31]))
    assert all(a > b for a, b in zip(lrs[30:100], lrs[31:]))
    linear = one_cycle(10, max_lr=1.0, pct_start=0.5, div_factor=10, final_div_factor=1, anneal="linear")
    assert [linear(s) for s in range(0, 11, 5)] == pytest.approx([0.1, 1.0, 0.1])
    assert linear(1) == pytest.approx(0.1 + 0.9 / 5)


def test_warmup_is_linear_then_hands_over():
    sched = warmup(constant(0.1), 4)
    assert [sched(s) for s in range(6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    inner = cosine(1.0, 100)
    wrapped = make_schedule("cosine", lr=1.0, total_steps=100, warmup_steps=9)
    assert wrapped(0) == pytest.approx(inner(0) * 0.1)
    assert wrapped(4) == pytest.approx(inner(4) * 0.5)
    assert wrapped(9) == inner(9) and wrapped(60) == inner(60)
    assert warmup(inner, 0) is inner


def test_make_schedule_by_name_and_errors():
    assert make_schedule("step", lr=1.0, step_size=2, gamma=0.5)(4) == pytest.approx(0.25)
    assert make_schedule("Exponential", lr=1.0, decay_rate=0.5, decay_steps=1)(3) == pytest.approx(0.125)
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'; choose one of constant, exponential"):
        make_schedule("cosin", lr=1.0)
    with pytest.raises(ConfigError, match="schedule 'cosine'.*it takes lr, total_steps, min_lr"):
        make_schedule("cosine", lr=1.0, total=10)
    with pytest.raises(ConfigError, match="decay_steps must be > 0, got 0"):
        make_schedule("exponential", lr=1.0, decay_rate=0.5, decay_steps=0)
    with pytest.raises(ConfigError, match="min_lr must be in"):
        cosine(0.1, 10, min_lr=0.2)
    with pytest.raises(ConfigError, match="pct_start"):
        one_cycle(10, 1.0, pct_start=1.5)


def test_apply_lr_sets_every_group():
    w, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr_scale": 0.5}], lr=1.0)
    assert apply_lr(opt, step_decay(0.2, 1, 0.5), 1) == pytest.approx(0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])


# --------------------------------------------------------------------------------------- optimisers


def _run(opt, p, grads):
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().clone().tolist())
    return out


def test_sgd_momentum_hand_computed():
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = make_optimizer("sgd", [p], lr=0.1, momentum=0.9)
    # buf1 = g1; p1 = p0 - 0.1 * buf1; buf2 = 0.9 * buf1 + g2 = [1.45, 0.1]; p2 = p1 - 0.1 * buf2
    steps = _run(opt, p, [[0.5, -1.0], [1.0, 1.0]])
    assert steps[0] == pytest.approx([0.95, 2.1], abs=1e-12)
    assert steps[1] == pytest.approx([0.805, 2.09], abs=1e-12)


def test_sgd_nesterov_hand_computed():
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = make_optimizer("sgd", [p], lr=0.1, momentum=0.9, nesterov=True)
    # buf1 = g1; update = g1 + 0.9 * buf1 = [0.95, -1.9]
    assert _run(opt, p, [[0.5, -1.0]])[0] == pytest.approx([0.905, 2.19], abs=1e-12)


def test_adam_two_steps_hand_computed():
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = make_optimizer("adam", [p], lr=0.1)
    # step 1: m = 0.05, v = 2.5e-4, m^ = 0.5, v^ = 0.25 -> p -= 0.1 * 0.5 / (0.5 + 1e-8)
    # step 2 (g = -1): m = -0.055, v = 1.24975e-3, m^ = -0.055 / 0.19, v^ = 1.24975e-3 / 1.999e-3
    steps = _run(opt, p, [[0.5], [-1.0]])
    assert steps[0][0] == pytest.approx(0.900000002, abs=1e-12)
    assert steps[1][0] == pytest.approx(0.9366103542405654, abs=1e-12)


def test_make_optimizer_kinds_and_errors():
    params = [nn.Parameter(torch.zeros(2))]
    kinds = {
        "adam": torch.optim.Adam,
        "AdamW": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
    }
    for name, cls in kinds.items():
        assert type(make_optimizer(name, params, lr=0.01, weight_decay=0.1)) is cls
    rms = make_optimizer("rmsprop", params, lr=0.01, eps=1e-5)
    assert rms.defaults["momentum"] == 0.0 and rms.defaults["eps"] == 1e-5
    assert make_optimizer("sgd", params, lr=0.01).defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="unknown optimizer 'adamax'; choose one of adam, adamw, sgd"):
        make_optimizer("adamax", params, lr=0.01)
    with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0"):
        make_optimizer("sgd", params, lr=0.01, momentum=0.0, nesterov=True)
    with pytest.raises(ConfigError, match="learning rate must be positive"):
        make_optimizer("adam", params, lr=0.0)


# ---------------------------------------------------------------------------------------- gradients


def _two_params(g1, g2):
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1, 1))
    a.grad, b.grad = torch.tensor(g1), torch.tensor(g2)
    return a, b


def test_clip_by_norm():
    a, b = _two_params([3.0, 4.0], [[12.0]])
    assert clip_gradients([a, b], max_norm=6.5) == pytest.approx(13.0)
    assert a.grad.tolist() == pytest.approx([1.5, 2.0], rel=1e-6)
    assert b.grad.item() == pytest.approx(6.0, rel=1e-6)
    a, b = _two_params([3.0, 4.0], [[12.0]])
    assert clip_gradients([a, b], max_norm=100.0) == pytest.approx(13.0)
    assert a.grad.tolist() == [3.0, 4.0] and b.grad.tolist() == [[12.0]]


def test_clip_by_value_returns_norm_before_clipping():
    a, b = _two_params([3.0, -4.0], [[12.0]])
    assert clip_gradients([a, b], max_value=3.5) == pytest.approx(13.0)
    assert a.grad.tolist() == [3.0, -3.5] and b.grad.tolist() == [[3.5]]


def test_returned_norm_is_global_norm():
    torch.manual_seed(0)
    model = nn.LSTM(3, 5)
    model(torch.randn(4, 2, 3))[0].pow(2).sum().backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert clip_gradients(model, max_norm=1e-3) == pytest.approx(expected.item(), rel=1e-6)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert after.item() == pytest.approx(1e-3, rel=1e-4)
    assert clip_gradients([nn.Parameter(torch.zeros(1))], max_norm=1.0) == 0.0  # no grads at all


# ---------------------------------------------------------------------------------------- penalties


def test_penalty_skips_biases_and_norm_gains_by_default():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, -4.0]]))
        model[0].bias.fill_(100.0)
    penalty = l1_l2_penalty(model, l1=0.1, l2=0.01)
    assert penalty.item() == pytest.approx(0.1 * 10 + 0.01 * 30)
    penalty.backward()
    assert model[0].bias.grad is None and model[1].weight.grad is None
    assert model[0].weight.grad is not None
    everything = l1_l2_penalty(model, l1=1.0, include=lambda name, p: True)
    assert everything.item() == pytest.approx(10 + 200 + 2 + 0)  # + LayerNorm gains (1, 1), biases (0, 0)
    assert l1_l2_penalty(model).item() == 0.0


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_closed_form_without_warmup():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    for k in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(k))
        ema.update()
    # s_N = d^N s_0 + (1 - d) * sum_k d^(N - k) p_k with s_0 = 0 and p_k = k
    expected = sum(0.1 * 0.9 ** (5 - k) * k for k in range(1, 6))
    assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-12)


def test_ema_warmup_decay_schedule():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    decays = []
    for _ in range(4):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13])
    # constant target 1 from s_0 = 0: s_N = 1 - prod(d_n)
    assert ema.shadow["weight"].item() == pytest.approx(1 - math.prod(decays), rel=1e-12)


def test_ema_tracks_float_buffers_and_swap_restores_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.5)
    assert "1.running_mean" in ema.shadow and "1.num_batches_tracked" not in ema.shadow
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        ema.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    assert not torch.equal(live["0.weight"], shadow["0.weight"])
    with ema.averaged() as averaged:
        assert averaged is model
        for k, v in shadow.items():
            assert torch.equal(model.state_dict()[k], v)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k])
    for k, v in ema.shadow.items():
        assert torch.equal(v, shadow[k])
    with pytest.raises(RuntimeError), ema.averaged():
        raise RuntimeError("evaluation failed")
    assert torch.equal(model[0].weight, live["0.weight"])


def test_ema_state_dict_round_trip_and_mismatch():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and other.decay == 0.9 and other.warmup
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(CheckpointError, match="missing \\['bias'\\].*wrong shape \\['weight'\\]"):
        EMA(nn.Linear(3, 2)).load_state_dict({**ema.state_dict(), "shadow": {"weight": ema.shadow["weight"]}})


def test_global_grad_norm_matches_torch_and_flags_non_finite():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4), torch.randn(5)]
    want = torch.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(global_grad_norm(grads), want)
    mixed = [grads[0], grads[1].double()]  # mixed dtypes take the per-tensor path, in float64
    torch.testing.assert_close(global_grad_norm(mixed).float(), want)
    assert not torch.isfinite(global_grad_norm([grads[0], torch.tensor([float("inf")])]))
    assert float(global_grad_norm([])) == 0.0


def test_ema_of_a_model_without_parameters_is_a_no_op():
    ema = EMA(nn.ReLU(), 0.9)
    ema.update()
    assert ema.num_updates == 1 and ema.shadow == {}
