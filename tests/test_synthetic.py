"""Synthetic streams: windows continue each other, are made on demand, replay from a saved position, and a
stateful model trained on them carries its detached state from window to window (truncated backprop)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from rnnkit.data.synthetic import TEST, TRAIN, EchoStream, SinCosStream, StreamBatches
from rnnkit.errors import ConfigError
from rnnkit.models import SequenceRegressor
from rnnkit.tasks import StreamModel

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------ streams


@pytest.mark.parametrize("window, echo", [(15, 3), (4, 4), (2, 5), (6, 0)])
def test_echo_target_is_the_input_echo_steps_earlier_across_windows(window, echo):
    stream = EchoStream(batch_size=3, window=window, echo_step=echo, seed=1)
    xs, ys = zip(*(stream.chunk(0, k) for k in range(6)))
    x = torch.cat(xs, dim=1)[..., 0].long()  # (B, 6T)
    y = torch.cat(ys, dim=1)
    assert x.shape == y.shape == (3, 6 * window)
    assert set(x.unique().tolist()) <= {0, 1} and y.dtype == torch.long
    assert torch.equal(y[:, echo:], x[:, : x.shape[1] - echo])
    assert not y[:, :echo].any()  # before the stream's start there is nothing to echo


def test_sincos_windows_continue_one_wave_per_row():
    stream = SinCosStream(batch_size=4, window=20, seed=2)
    x, y = stream.sequence(0, 100)
    assert x.shape == y.shape == (4, 100, 1)
    t = torch.arange(100, dtype=torch.float64)
    u = (stream.phases(0).unsqueeze(1) + t) / (10 * math.pi)
    torch.testing.assert_close(x[..., 0], torch.sin(u).float())
    torch.testing.assert_close(y[..., 0], torch.cos(u).float())
    # far into a long stream the positions keep their fraction (float64 inside)
    far_x, far_y = stream.chunk(0, 10**9)
    torch.testing.assert_close(far_x.pow(2) + far_y.pow(2), torch.ones_like(far_x))


def test_windows_depend_on_seed_split_epoch_and_index_only():
    a = EchoStream(seed=5)
    assert torch.equal(a.chunk(2, 7)[0], EchoStream(seed=5).chunk(2, 7)[0])
    others = [a.chunk(3, 7)[0], a.chunk(2, 8)[0], EchoStream(seed=6).chunk(2, 7)[0],
              EchoStream(seed=5, split=TEST).chunk(2, 7)[0]]
    assert all(not torch.equal(a.chunk(2, 7)[0], o) for o in others)
    s = SinCosStream(seed=5)
    assert not torch.equal(s.phases(0), SinCosStream(seed=5, split=TEST).phases(0))
    assert not torch.equal(s.phases(0), s.phases(1))  # a new epoch reads new phases


def test_bad_stream_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="window must be a positive int"):
        EchoStream(window=0)
    with pytest.raises(ConfigError, match="echo_step must be an int >= 0"):
        EchoStream(echo_step=-1)
    with pytest.raises(ConfigError, match="holds no whole window"):
        StreamBatches(SinCosStream(window=20), length=10)


# ------------------------------------------------------------------------------------ StreamBatches


def test_stream_batches_walk_the_windows_and_call_the_reset_hook_per_stream():
    starts = []
    batches = StreamBatches(EchoStream(batch_size=2, window=5, seed=3), length=23,
                            on_stream_start=lambda: starts.append(batches.position.epoch))
    assert len(batches) == 4  # the partial last window is dropped
    first = list(batches.epoch_batches())
    assert len(first) == 4 and starts == [0]
    assert batches.position.epoch == 1 and batches.position.batch == 0
    second = list(batches)
    assert starts == [0, 1]
    assert all(torch.equal(a[0], batches.stream.chunk(0, k)[0]) for k, a in enumerate(first))
    assert not torch.equal(first[0][0], second[0][0])


def test_stream_batches_resume_replays_the_same_windows():
    stream = SinCosStream(batch_size=3, window=10, seed=4)
    full = StreamBatches(stream, length=60)
    expected = [x for x, _ in full.epoch_batches()] + [x for x, _ in full.epoch_batches()]

    part = StreamBatches(stream, length=60)
    it = part.epoch_batches()
    taken = [next(it)[0] for _ in range(4)]
    saved = part.state_dict()
    assert saved == {"epoch": 0, "batch": 4}

    resumed = StreamBatches(stream, length=60)
    resumed.load_state_dict(saved)
    rest = [x for x, _ in resumed.epoch_batches()] + [x for x, _ in resumed.epoch_batches()]
    assert len(taken + rest) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(taken + rest, expected))


def test_stream_length_costs_no_memory():
    # a stream of 10^12 steps: nothing is made until a window is asked for, and only that window
    start = time.perf_counter()
    batches = StreamBatches(EchoStream(batch_size=5, window=15), length=10**12)
    it = batches.epoch_batches()
    x, y = next(it)
    assert time.perf_counter() - start < 1.0
    assert len(batches) == 10**12 // 15 and x.shape == (5, 15, 1) and y.shape == (5, 15)


# --------------------------------------------------------------------------------- truncated backprop


def _graph_size(t: torch.Tensor) -> int:
    """Autograd nodes reachable from ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def test_stream_model_carries_the_detached_state_and_the_graph_stays_one_window_long():
    torch.manual_seed(0)
    model = StreamModel(SequenceRegressor(1, 1, hidden_size=6, cell="lstm"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay as they were
    batches = StreamBatches(SinCosStream(batch_size=3, window=8, seed=0), length=80,
                            on_stream_start=model.reset_state)
    model.train()
    outs, sizes = [], []
    for x, y in batches.epoch_batches():
        out = model(x)
        loss = model.loss(out, y)
        sizes.append(_graph_size(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
        assert all(not s.requires_grad and s.grad_fn is None for s in model.state)
    # window 10 reaches back no further than window 1: memory does not grow with the stream
    assert len(set(sizes)) == 1
    # the carried state makes the windows one sequence: same values as one pass over the whole stream
    x_all, _ = batches.stream.sequence(0, 80)
    model.eval()
    with torch.no_grad():
        whole = model(x_all)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-5, atol=1e-6)
    # the next stream starts from the zero state again
    model.train()
    next(iter(batches.epoch_batches()))
    assert model.state is None


def test_stream_model_refuses_a_window_of_another_batch_size():
    model = StreamModel(SequenceRegressor(1, 2, hidden_size=4, cell="rnn", task="tagging"))
    model.train()
    model(torch.zeros(5, 15, 1))
    with pytest.raises(ConfigError, match="optim.accumulate=1"):
        model(torch.zeros(2, 15, 1))


def test_train_and_test_streams_differ():
    train = EchoStream(batch_size=4, seed=0, split=TRAIN).sequence(0, 30)[0]
    test = EchoStream(batch_size=4, seed=0, split=TEST).sequence(0, 30)[0]
    assert not torch.equal(train, test)
