"""Models: sequence classifier, regressor/tagger, seq2seq with attention, Keras initialisation, text data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.data.text import (
    EOS,
    GO,
    PAD,
    UNK,
    Vocab,
    letter_sorting_pairs,
    make_seq2seq_batch,
    pad_sequences,
)
from rnnkit.engine import tree_flatten, unroll
from rnnkit.errors import ConfigError, DataError, ShapeError
from rnnkit.init import chrono_init_, keras_init_
from rnnkit.models import (
    AttentionDecoderCell,
    ConvFrontend,
    Readout,
    Seq2Seq,
    SequenceClassifier,
    SequenceRegressor,
    detach_state,
    exact_match,
    masked_cross_entropy,
    masked_mse,
)

READOUTS = ["last", "last_k", "mean", "attention"]
ATTENTION = [None, "bahdanau", "luong"]
# GRU/RNN run on the reference loop here: these tests are about the models, not the backends
BACKEND = {"lstm": "auto", "gru": "reference", "rnn": "reference"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread (no cross-thread sync per op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _garbage_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x`` with every padded step replaced by large random values."""
    pad = torch.arange(x.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)  # (N, T)
    return torch.where(pad.unsqueeze(-1), 100 * torch.randn_like(x), x)


# --------------------------------------------------------------------------------------------------
# classifier


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("readout", READOUTS)
def test_classifier_shapes_and_gradients(readout: str, bidirectional: bool) -> None:
    model = SequenceClassifier(5, 4, hidden_size=6, num_layers=2, readout=readout, k=3, bidirectional=bidirectional)
    x = torch.randn(3, 7, 5)
    logits = model(x, lengths=torch.tensor([7, 2, 5]))
    assert logits.shape == (3, 4)
    loss = model.loss(logits, torch.tensor([0, 3, 1]))
    loss.backward()
    assert all(p.grad is not None for p in model.rnn.parameters())
    assert model.predict(x).shape == (3,)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("readout", READOUTS)
def test_classifier_padding_never_changes_logits(readout: str, bidirectional: bool) -> None:
    model = SequenceClassifier(3, 2, hidden_size=5, readout=readout, k=3, bidirectional=bidirectional).eval()
    lengths = torch.tensor([6, 1, 4, 2])
    x = torch.randn(4, 6, 3)
    with torch.no_grad():
        logits = model(x, lengths)
        assert torch.allclose(logits, model(_garbage_padding(x, lengths), lengths), atol=1e-6)
        # and each sequence alone, cut to its length, gives the same logits
        for n, L in enumerate(lengths.tolist()):
            assert torch.allclose(logits[n], model(x[n : n + 1, :L])[0], atol=1e-5)


def test_classifier_last_readout_is_h_n_of_the_last_layer() -> None:
    model = SequenceClassifier(3, 2, hidden_size=4, num_layers=2, bidirectional=True, readout="last").eval()
    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 3, 1])
    with torch.no_grad():
        _, (h_n, _) = model.rnn(x, lengths=lengths)
        expected = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # forward and reverse direction of the top layer
        assert torch.allclose(model.features(x, lengths), expected, atol=1e-6)


def test_classifier_last_k_pads_short_sequences_with_zeros() -> None:
    model = SequenceClassifier(2, 2, hidden_size=3, readout="last_k", k=3).eval()
    x, lengths = torch.randn(2, 4, 2), torch.tensor([4, 2])
    with torch.no_grad():
        out = model.rnn(x, lengths=lengths)[0]
        feats = model.features(x, lengths).view(2, 3, 3)  # (N, k, H)
    assert torch.allclose(feats[0], out[0, 1:4])
    assert torch.equal(feats[1, 0], torch.zeros(3))
    assert torch.allclose(feats[1, 1:], out[1, :2])


def test_attention_readout_weights_are_masked() -> None:
    model = SequenceClassifier(3, 2, hidden_size=4, readout="attention")
    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 2, 3])
    w = model.readout.weights(model.rnn(x, lengths=lengths)[0], lengths)
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert torch.equal(w[1, 2:], torch.zeros(3)) and torch.equal(w[2, 3:], torch.zeros(2))


@pytest.mark.parametrize("cell", ["gru", "rnn", rnnkit.LayerNormLSTMCell])
def test_classifier_other_cells(cell) -> None:
    backend = BACKEND[cell] if isinstance(cell, str) else "auto"
    model = SequenceClassifier(4, 3, hidden_size=5, cell=cell, readout="mean", backend=backend, input_projection=6)
    assert model(torch.randn(2, 3, 4), [3, 1]).shape == (2, 3)


def test_classifier_cnn_frontend() -> None:
    model = SequenceClassifier(28, 10, hidden_size=8, frontend="cnn")
    assert model.frontend(torch.randn(2, 28, 28)).shape == (2, 7, 32 * 7)  # 7 columns of C*H' features
    assert model(torch.randn(2, 28, 28)).shape == (2, 10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert ConvFrontend(12, in_channels=3)(torch.randn(2, 3, 12, 20)).shape == (2, 5, 32 * 3)
    with pytest.raises(ShapeError, match="lengths"):
        model(torch.randn(2, 28, 28), lengths=[5, 7])
    with pytest.raises(ShapeError, match="image height"):
        model(torch.randn(2, 20, 28))


def test_classifier_rejects_bad_configs_and_inputs() -> None:
    with pytest.raises(ConfigError, match="readout"):
        SequenceClassifier(3, 2, readout="max")
    with pytest.raises(ConfigError, match="cell"):
        SequenceClassifier(3, 2, cell="transformer")
    with pytest.raises(ConfigError, match="forget_bias"):
        SequenceClassifier(3, 2, cell="gru", forget_bias=1.0)
    with pytest.raises(ConfigError, match="init"):
        SequenceClassifier(3, 2, init="xavier")
    model = SequenceClassifier(3, 2, hidden_size=4)
    with pytest.raises(ShapeError, match=r"\(N, T, 3\)"):
        model(torch.randn(2, 5))
    with pytest.raises(ShapeError, match="lengths"):
        model(torch.randn(2, 5, 3), lengths=[5, 6])


# --------------------------------------------------------------------------------------------------
# keras initialisation


def _check_keras_lstm(w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor) -> None:
    H = w_hh.shape[1]
    for block in w_hh.detach().chunk(4, dim=0):  # one orthogonal (H, H) block per gate
        assert torch.allclose(block.T @ block, torch.eye(H), atol=1e-5)
    fan_in, fan_out = w_ih.shape[1], w_ih.shape[0]
    assert w_ih.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5
    assert torch.equal(b_ih[H : 2 * H], torch.ones(H))
    assert torch.count_nonzero(b_ih).item() == H and torch.count_nonzero(b_hh).item() == 0


def test_keras_init_on_layers_cells_and_torch_modules() -> None:
    model = nn.ModuleDict({
        "ours": rnnkit.LSTM(3, 6, num_layers=2, bidirectional=True),
        "cell": rnnkit.LSTMCell(3, 6),
        "torch": nn.LSTM(3, 6),
        "gru": rnnkit.GRU(3, 6),
        "ln": rnnkit.LayerNormLSTMCell(3, 6),
    })
    assert keras_init_(model) is model
    ours = model["ours"]
    for suffix in ("l0", "l1", "l1_reverse"):  # through layer.cells(): the layer's own parameters change
        p = {k: getattr(ours, f"{k}_{suffix}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        _check_keras_lstm(p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
    c = model["cell"]
    _check_keras_lstm(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)
    t = model["torch"]
    _check_keras_lstm(t.weight_ih_l0, t.weight_hh_l0, t.bias_ih_l0, t.bias_hh_l0)
    gru = model["gru"]
    for block in gru.weight_hh_l0.detach().chunk(3, dim=0):
        assert torch.allclose(block.T @ block, torch.eye(6), atol=1e-5)
    assert torch.count_nonzero(gru.bias_ih_l0).item() == 0 and torch.count_nonzero(gru.bias_hh_l0).item() == 0
    ln = model["ln"]
    assert torch.equal(ln.bias[6:12], torch.ones(6)) and torch.equal(ln.ln_c.weight, torch.ones(6))


def test_classifier_keras_init() -> None:
    model = SequenceClassifier(4, 3, hidden_size=5, init="keras", readout="attention")
    _check_keras_lstm(model.rnn.weight_ih_l0, model.rnn.weight_hh_l0, model.rnn.bias_ih_l0, model.rnn.bias_hh_l0)
    assert torch.count_nonzero(model.head.bias).item() == 0  # Keras Dense: Glorot weights, zero bias


# --------------------------------------------------------------------------------------------------
# regressor / tagger


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_regressor_carries_state_across_windows(cell: str) -> None:
    model = SequenceRegressor(2, 3, hidden_size=5, num_layers=2, cell=cell, backend=BACKEND[cell])
    x = torch.randn(4, 9, 2)
    y_full, s_full = model(x)
    y1, s1 = model(x[:, :4])
    y2, s2 = model(x[:, 4:], s1)
    assert y_full.shape == (4, 9, 3)
    assert torch.allclose(torch.cat([y1, y2], dim=1), y_full, atol=1e-6)
    for a, b in zip(tree_flatten(s2)[0], tree_flatten(s_full)[0]):
        assert torch.allclose(a, b, atol=1e-6)
    detached = detach_state(s2)
    assert all(not t.requires_grad for t in tree_flatten(detached)[0]) and detach_state(None) is None


def test_regressor_truncated_backprop_learns_a_stream() -> None:
    # sin -> cos one window at a time, the state carried (and detached) between windows
    t = torch.linspace(0, 40, 401)
    x, target = torch.sin(t).view(1, -1, 1), torch.cos(t).view(1, -1, 1)
    model = SequenceRegressor(1, 1, hidden_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(8):
        state, total = None, 0.0
        for w in range(0, 400, 50):
            y, state = model(x[:, w : w + 50], state)
            loss = model.loss(y, target[:, w : w + 50])
            opt.zero_grad()
            loss.backward()
            opt.step()
            state, total = detach_state(state), total + loss.item()
        losses.append(total)
    assert losses[-1] < 0.3 * losses[0]


def test_regressor_padding_and_masked_losses() -> None:
    model = SequenceRegressor(2, 2, hidden_size=4)
    x, lengths = torch.randn(3, 5, 2), torch.tensor([5, 2, 3])
    y, _ = model(x, lengths=lengths)
    assert torch.equal(y[1, 2:], torch.zeros(3, 2)) and torch.equal(y[2, 3:], torch.zeros(2, 2))
    target = torch.randn(3, 5, 2)
    loss = model.loss(y, target, lengths)
    assert torch.allclose(model.loss(y, _garbage_padding(target, lengths), lengths), loss)
    manual = torch.cat([(y[n, :L] - target[n, :L]).pow(2).flatten() for n, L in enumerate([5, 2, 3])]).mean()
    assert torch.allclose(loss, manual)
    assert torch.allclose(masked_mse(y, target), ((y - target) ** 2).mean())
    with pytest.raises(ShapeError, match="must match"):
        masked_mse(y, target[:, :4], lengths)


def test_tagger_uses_masked_cross_entropy() -> None:
    model = SequenceRegressor(3, 5, hidden_size=4, task="tagging", bidirectional=True)
    x, lengths = torch.randn(2, 4, 3), torch.tensor([4, 2])
    tags = torch.tensor([[1, 2, 3, 4], [0, 1, 99, 99]])  # out-of-range ids in the padding never matter
    logits, _ = model(x, lengths=lengths)
    assert logits.shape == (2, 4, 5)
    loss = model.loss(logits, tags, lengths)
    manual = nn.functional.cross_entropy(torch.cat([logits[0], logits[1, :2]]), torch.tensor([1, 2, 3, 4, 0, 1]))
    assert torch.allclose(loss, manual)
    ignored = masked_cross_entropy(logits, torch.tensor([[1, 2, 3, 4], [0, 1, 0, 0]]), ignore_index=0)
    manual = nn.functional.cross_entropy(torch.cat([logits[0], logits[1, 1:2]]), torch.tensor([1, 2, 3, 4, 1]))
    assert torch.allclose(ignored, manual)


# --------------------------------------------------------------------------------------------------
# text data


def test_vocab_and_padding() -> None:
    v = Vocab.characters("abc")
    assert len(v) == 7 and (PAD, GO, EOS, UNK) == (0, 1, 2, 3)
    assert v.encode("cab", add_go=True, add_eos=True) == [GO, 6, 4, 5, EOS]
    assert v.encode("az") == [4, UNK]
    assert v.decode([GO, 6, 4, EOS, 5, PAD]) == "ca"
    assert v.decode(torch.tensor([4, 5, PAD, PAD])) == "ab"
    ids, lengths = pad_sequences([[4, 5, 6], [7]])
    assert ids.tolist() == [[4, 5, 6], [7, PAD, PAD]] and lengths.tolist() == [3, 1]
    with pytest.raises(DataError, match="empty"):
        pad_sequences([[4], []])


def test_letter_sorting_data() -> None:
    pairs = letter_sorting_pairs(200, min_len=1, max_len=5, seed=3)
    assert pairs == letter_sorting_pairs(200, min_len=1, max_len=5, seed=3)
    assert pairs != letter_sorting_pairs(200, min_len=1, max_len=5, seed=4)
    assert all(out == "".join(sorted(w)) and 1 <= len(w) <= 5 for w, out in pairs)
    assert {len(w) for w, _ in pairs} == {1, 2, 3, 4, 5}
    v = Vocab.characters()
    batch = make_seq2seq_batch([("hello", "ehllo"), ("ba", "ab")], v)
    assert batch.src_lengths.tolist() == [5, 2] and batch.tgt_lengths.tolist() == [6, 3]
    assert v.decode(batch.tgt_out[0]) == "ehllo" and batch.tgt_out[1].tolist() == [*v.encode("ab"), EOS, 0, 0, 0]
    assert batch.tgt_in[:, 0].tolist() == [GO, GO] and torch.equal(batch.tgt_in[0, 1:], batch.tgt_out[0, :-1])


# --------------------------------------------------------------------------------------------------
# seq2seq


def _toy_batch(seed: int = 0, num: int = 6):
    v = Vocab.characters("abcdef")
    return v, make_seq2seq_batch(letter_sorting_pairs(num, min_len=1, max_len=5, alphabet="abcdef", seed=seed), v)


@pytest.mark.parametrize("attention", ATTENTION)
def test_seq2seq_teacher_forcing_shapes(attention) -> None:
    v, b = _toy_batch()
    model = Seq2Seq(len(v), len(v), hidden_size=12, attention=attention)
    logits = model(b.src, b.src_lengths, b.tgt_in)
    assert logits.shape == (*b.tgt_in.shape, len(v))
    model.loss(logits, b.tgt_out).backward()
    assert model.decoder.layers[0].weight_ih.grad is not None and model.src_embed.weight.grad is not None
    if attention:
        logits2, att = model(b.src, b.src_lengths, b.tgt_in, return_attention=True)
        assert att.shape == (*b.tgt_in.shape, b.src.shape[1]) and torch.allclose(logits, logits2)
    else:
        with pytest.raises(ConfigError, match="attention"):
            model(b.src, b.src_lengths, b.tgt_in, return_attention=True)


def test_seq2seq_gru_and_errors() -> None:
    v, b = _toy_batch()
    model = Seq2Seq(v, v, hidden_size=8, num_layers=1, cell="gru", attention="bahdanau", backend="reference")
    assert model(b.src, b.src_lengths, b.tgt_in).shape == (*b.tgt_in.shape, len(v))
    assert model.beam_search(b.src, b.src_lengths, beam_size=2, max_len=4).shape[0] == b.src.shape[0]
    with pytest.raises(ConfigError, match="attention"):
        Seq2Seq(10, 10, attention="dot")
    with pytest.raises(ShapeError, match=r"\(N, S\)"):
        model(b.src.float(), b.src_lengths, b.tgt_in)
    with pytest.raises(ShapeError, match="bind"):
        model.decoder(torch.randn(2, 15))


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_teacher_forcing_equals_stepping_the_same_cell(attention) -> None:
    v, b = _toy_batch()
    model = Seq2Seq(len(v), len(v), hidden_size=10, attention=attention).eval()
    with torch.no_grad():
        logits = model(b.src, b.src_lengths, b.tgt_in)
        bound, state = model.start(model.encode(b.src, b.src_lengths))
        steps = []
        for t in range(b.tgt_in.shape[1]):
            state = bound(model.tgt_embed(b.tgt_in[:, t]), state)
            steps.append(model.logits(bound.output(state)))
    assert torch.allclose(torch.stack(steps, dim=1), logits, atol=1e-5)


def test_seq2seq_loss_ignores_pad() -> None:
    v, b = _toy_batch()
    model = Seq2Seq(len(v), len(v), hidden_size=8, attention="luong")
    logits = model(b.src, b.src_lengths, b.tgt_in)
    pad = b.tgt_out == PAD
    assert pad.any()
    scrambled = torch.where(pad.unsqueeze(-1), 50 * torch.randn_like(logits), logits)
    assert torch.allclose(model.loss(scrambled, b.tgt_out), model.loss(logits, b.tgt_out))
    keep = ~pad
    manual = nn.functional.cross_entropy(logits[keep], b.tgt_out[keep])
    assert torch.allclose(model.loss(logits, b.tgt_out), manual)


def test_source_padding_is_invisible() -> None:
    v, b = _toy_batch()
    model = Seq2Seq(len(v), len(v), hidden_size=8, attention="bahdanau").eval()
    pad = torch.arange(b.src.shape[1]).unsqueeze(0) >= b.src_lengths.unsqueeze(1)
    noisy = torch.where(pad, torch.randint(4, len(v), b.src.shape), b.src)
    with torch.no_grad():
        assert torch.allclose(model(b.src, b.src_lengths, b.tgt_in), model(noisy, b.src_lengths, b.tgt_in), atol=1e-6)


@pytest.mark.parametrize("attention", ATTENTION)
def test_beam_one_equals_greedy(attention) -> None:
    v, b = _toy_batch(num=8)
    for seed in range(3):
        torch.manual_seed(seed)
        model = Seq2Seq(len(v), len(v), hidden_size=10, attention=attention).eval()
        greedy = model.greedy_decode(b.src, b.src_lengths, max_len=7)
        assert torch.equal(model.beam_search(b.src, b.src_lengths, beam_size=1, max_len=7), greedy)
        assert torch.equal(model.beam_search(b.src, b.src_lengths, 1, 7, length_penalty=1.0), greedy)
        if attention:
            g_tok, g_att = model.greedy_decode(b.src, b.src_lengths, 7, return_attention=True)
            b_tok, b_att = model.beam_search(b.src, b.src_lengths, 1, 7, return_attention=True)
            assert torch.equal(g_tok, b_tok) and torch.allclose(g_att, b_att)


def _force_eos_after(model: Seq2Seq, n_steps_bias: float) -> None:
    with torch.no_grad():
        model.out.bias.zero_()
        model.out.bias[EOS] = n_steps_bias


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_decoding_stops_at_eos(decode: str) -> None:
    v, b = _toy_batch()
    model = Seq2Seq(len(v), len(v), hidden_size=8, attention="luong").eval()
    run = (lambda: model.greedy_decode(b.src, b.src_lengths, 9)) if decode == "greedy" else (
        lambda: model.beam_search(b.src, b.src_lengths, beam_size=3, max_len=9)
    )
    _force_eos_after(model, 100.0)  # EOS wins at once: one step, then the loop stops
    assert torch.equal(run(), torch.full((b.src.shape[0], 1), EOS))
    _force_eos_after(model, 0.0)
    tokens = run()
    assert tokens.shape[1] <= 9
    for row in tokens.tolist():
        if EOS in row:  # nothing but PAD after the first EOS
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])
        assert PAD not in row[: row.index(EOS) if EOS in row else len(row)]


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_attention_weights_sum_to_one_and_skip_padding(attention) -> None:
    v, b = _toy_batch()
    model = Seq2Seq(len(v), len(v), hidden_size=8, attention=attention).eval()
    valid = (torch.arange(b.src.shape[1]).unsqueeze(0) < b.src_lengths.unsqueeze(1)).unsqueeze(1)  # (N, 1, S)
    with torch.no_grad():
        _, att = model(b.src, b.src_lengths, b.tgt_in, return_attention=True)
        tokens, g_att = model.greedy_decode(b.src, b.src_lengths, 8, return_attention=True)
        _, b_att = model.beam_search(b.src, b.src_lengths, 3, 8, return_attention=True)
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:2]))
    assert torch.equal(att.masked_fill(valid, 0.0), torch.zeros_like(att))
    for a in (g_att, b_att):
        assert torch.equal(a.masked_fill(valid, 0.0), torch.zeros_like(a))
        live = a.sum(-1)  # 1 while a sequence is decoding, 0 after its EOS
        assert torch.allclose(live[:, 0], torch.ones(a.shape[0]))
        assert torch.all((live - 1).abs().lt(1e-5) | live.eq(0))


def test_bound_decoder_unrolls_with_lengths_and_returns_states() -> None:
    dec = AttentionDecoderCell(4, 6, num_layers=2, attention="luong", memory_size=5)
    memory, lengths = torch.randn(3, 7, 5), torch.tensor([7, 3, 1])
    bound = dec.bind(memory, lengths)
    r = unroll(bound, torch.randn(3, 4, 4), lengths=[4, 2, 3], return_states=True)
    assert r.outputs.shape == (3, 4, 6) and r.states.alignments.shape == (3, 4, 7)
    assert torch.equal(r.states.alignments[2, :, 1:], torch.zeros(4, 6))
    assert r.final_state.layers[1].h.shape == (3, 6)


def _train_sorting(steps: int, *, seed: int = 0):
    """Train a small attention seq2seq on sorting the letters of 2-4 letter words over 'abcdef'."""
    torch.manual_seed(seed)
    v = Vocab.characters("abcdef")
    train = letter_sorting_pairs(64 * steps, min_len=2, max_len=4, alphabet="abcdef", seed=seed)
    model = Seq2Seq(len(v), len(v), embed_size=15, hidden_size=32, num_layers=1, attention="luong")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(steps):
        b = make_seq2seq_batch(train[64 * step : 64 * (step + 1)], v)
        loss = model.loss(model(b.src, b.src_lengths, b.tgt_in), b.tgt_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return v, model.eval(), losses


def test_seq2seq_loss_decreases_smoke() -> None:
    _, _, losses = _train_sorting(15)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_seq2seq_learns_letter_sorting() -> None:
    v, model, _ = _train_sorting(120)
    test = make_seq2seq_batch(letter_sorting_pairs(300, min_len=2, max_len=4, alphabet="abcdef", seed=99), v)
    greedy = model.greedy_decode(test.src, test.src_lengths, max_len=6)
    beam = model.beam_search(test.src, test.src_lengths, beam_size=3, max_len=6)
    assert exact_match(greedy, test.tgt_out).float().mean() > 0.8
    assert exact_match(beam, test.tgt_out).float().mean() > 0.8
    assert torch.equal(model.beam_search(test.src, test.src_lengths, beam_size=1, max_len=6), greedy)
    assert v.decode(model.greedy_decode(*v.pad(["fadb"]), max_len=6)[0]) == "abdf"


def test_keras_init_does_not_stack_on_a_cells_own_forget_bias():
    """TensorFlow's BasicLSTMCell(forget_bias=1) starts from a zero learned bias: the total is 1, not 2."""
    plain = keras_init_(rnnkit.LSTMCell(3, 4))
    basic = keras_init_(rnnkit.LSTMCell(3, 4, forget_bias=1.0))
    assert torch.equal(plain.fused_bias()[4:8], torch.ones(4))
    assert torch.equal(basic.fused_bias()[4:8], torch.ones(4))
    assert torch.equal(basic.bias_ih, torch.zeros(16))


def test_head_init_normal_gives_the_tutorials_readout():
    torch.manual_seed(0)
    default = SequenceClassifier(28, 10, hidden_size=128, init="keras")
    normal = SequenceClassifier(28, 10, hidden_size=128, init="keras", head_init="normal")
    assert float(default.head.weight.detach().std()) < 0.2  # Glorot over (128, 10)
    w, b = normal.head.weight.detach(), normal.head.bias.detach()
    assert 0.9 < float(w.std()) < 1.1 and float(b.abs().sum()) > 0
    with pytest.raises(ConfigError, match="head_init"):
        SequenceClassifier(28, 10, head_init="xavier")


@pytest.mark.parametrize("kind, directions, k", [("last", 1, 3), ("last", 2, 3), ("last_k", 1, 3), ("last_k", 2, 2),
                                                 ("mean", 1, 3), ("mean", 2, 3), ("last_k", 1, 7)])
def test_readout_without_lengths_equals_readout_with_full_lengths(kind, directions, k):
    """The no-lengths shortcut (views instead of gathers) pools exactly as the general path does."""
    torch.manual_seed(0)
    readout = Readout(kind, 6, directions=directions, k=k)
    outputs = torch.randn(4, 5, 6, requires_grad=True)
    fast = readout(outputs)
    general = readout(outputs, torch.full((4,), 5))
    torch.testing.assert_close(fast, general, rtol=0, atol=0)
    g1, g2 = (torch.autograd.grad(t.square().sum(), outputs)[0] for t in (fast, general))
    torch.testing.assert_close(g1, g2)


def test_chrono_init_spreads_forget_biases_over_the_horizon():
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(1, 64, num_layers=2)
    chrono_init_(lstm, 784)
    for layer in range(2):
        cell = lstm.cell(layer)
        b = cell.fused_bias().detach()
        b_i, b_f = b[:64], b[64:128]
        assert float(b_f.min()) >= 0.0 and float(b_f.max()) <= math.log(783) + 1e-6
        assert float(b_f.max()) > 3.0  # some units remember for hundreds of steps
        torch.testing.assert_close(b_i, -b_f)
        assert torch.equal(getattr(lstm, f"bias_hh_l{layer}")[:128], torch.zeros(128))
    own = chrono_init_(rnnkit.LSTMCell(1, 8, forget_bias=1.0), 100)  # the cell's constant is accounted for
    fb = own.fused_bias().detach()
    torch.testing.assert_close(fb[:8], -fb[8:16])
    with pytest.raises(ConfigError, match="t_max"):
        chrono_init_(lstm, 1)
    with pytest.raises(ConfigError, match="chrono_t_max"):
        SequenceClassifier(1, 10, init="chrono")
    model = SequenceClassifier(1, 10, hidden_size=16, init="chrono", chrono_t_max=784)
    assert float(model.rnn.cell(0).fused_bias().detach()[16:32].max()) > 2.0


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_an_input_projection_leaves_gradients_finite_under_nan_padding(kind):
    torch.manual_seed(0)
    model = (SequenceClassifier(4, 3, hidden_size=6, input_projection=5) if kind == "classifier"
             else SequenceRegressor(4, 2, hidden_size=6, input_projection=5))
    lengths = torch.tensor([5, 2, 3])
    x = torch.randn(3, 5, 4)
    for n, length in enumerate(lengths):
        x[n, length:] = float("nan")  # never read by the result
    out = model(x, lengths=lengths)
    loss = (out if kind == "classifier" else out[0].masked_fill(x[..., :2].isnan(), 0)).sum()
    loss.backward()
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
