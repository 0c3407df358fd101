"""Sequence to sequence with attention: an RNN encoder and a decoder that is itself a cell.

The decoder is an :class:`AttentionDecoderCell`, a cell in rnnkit's sense (``forward(x_t, state)``,
``init_state``, ``output``), so training runs it with :func:`rnnkit.unroll` like any other cell and
the decoding loops step the very same module: teacher forcing, greedy and beam search share every
parameter. One step, with input feeding (Luong et al., 2015; the layout of TensorFlow's
``AttentionWrapper``)::

    x_in      = [x_t ; a_{t-1}]                       previous attentional vector fed back in
    h^l       = cell_l(h^{l-1}, state^l)              the stacked layers, h^0 = x_in
    alpha_t   = softmax(score(h^L, memory))           padding of the source masked out
    context_t = sum_s alpha_t[s] memory[s]
    a_t       = tanh(W_c [h^L ; context_t])           the step's output; the vocabulary layer reads it

Scores: ``"bahdanau"`` (additive) ``v . tanh(W_k m_s + W_q h)``; ``"luong"`` (general/multiplicative)
``h . (W m_s)``. Without attention the decoder is a plain stack and its output is ``h^L``.

The encoder outputs (the *memory*) are constant for a batch, so they are not part of the state: the
decoder is bound to them with :meth:`AttentionDecoderCell.bind`, which returns a light cell view
(:class:`BoundDecoder`) holding the memory, its mask and its precomputed keys::

    bound = decoder.bind(memory, memory_lengths)
    state = bound.initial_state(encoder_hidden)
    result = rnnkit.unroll(bound, embedded_targets, state, return_states=True)
    result.states.alignments            # (N, T_out, T_src) attention weights for plotting

State: :class:`DecoderState` ``(layers, attention, alignments)``; ``layers`` holds one state per
layer (``LSTMState(h, c)`` or a tensor), ``attention`` is a_t (N, A) and ``alignments`` alpha_t
(N, T_src); without attention both are empty (N, 0) tensors.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.cells import cell_output
from rnnkit.engine import tree_map, unroll
from rnnkit.errors import ConfigError, ShapeError
from rnnkit.models.classifier import CELLS, CellSpec, lengths_tensor, make_rnn, sequence_mask

__all__ = [
    "Seq2Seq",
    "AttentionDecoderCell",
    "BoundDecoder",
    "DecoderState",
    "Memory",
    "Encoded",
    "BahdanauAttention",
    "LuongAttention",
    "exact_match",
]

AttentionKind = Literal["bahdanau", "luong"]


class DecoderState(NamedTuple):
    """Decoder state: per-layer states, the attentional vector a_t (N, A) and weights alpha_t (N, S)."""

    layers: tuple[Any, ...]
    attention: Tensor
    alignments: Tensor


class Memory(NamedTuple):
    """What the decoder attends to: encoder outputs (N, S, M), valid-position mask (N, S), keys (N, S, K)."""

    values: Tensor
    mask: Tensor
    keys: Tensor


class Encoded(NamedTuple):
    """Output of :meth:`Seq2Seq.encode`: memory (N, S, H), its lengths (N,), the encoder's final hidden."""

    memory: Tensor
    lengths: Tensor
    hidden: Any


# --------------------------------------------------------------------------------------------------
# attention scores


class BahdanauAttention(nn.Module):
    """Additive score ``v . tanh(W_k m_s + W_q q)`` (Bahdanau et al., 2015)."""

    def __init__(self, query_size: int, memory_size: int, attention_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory_size, attention_size, bias=False)
        self.query = nn.Linear(query_size, attention_size)
        self.v = nn.Linear(attention_size, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        """Precompute ``W_k m`` (N, S, A) once per batch."""
        return self.key(memory)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores (N, S) of ``query`` (N, Q) against ``keys`` (N, S, A)."""
        return self.v(torch.tanh(keys + self.query(query).unsqueeze(1))).squeeze(-1)


class LuongAttention(nn.Module):
    """Multiplicative ("general") score ``q . (W m_s)`` (Luong et al., 2015)."""

    def __init__(self, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory_size, query_size, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        """Precompute ``W m`` (N, S, Q) once per batch."""
        return self.key(memory)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """Scores (N, S) of ``query`` (N, Q) against ``keys`` (N, S, Q)."""
        return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# the decoder cell


def _make_cell(cell: CellSpec, input_size: int, hidden_size: int) -> nn.Module:
    if isinstance(cell, str):
        if cell.lower() not in CELLS:
            raise ConfigError(f"cell={cell!r} is not known; use one of {sorted(CELLS)} or pass a cell class/factory")
        return CELLS[cell.lower()](input_size, hidden_size)
    if not callable(cell):
        raise ConfigError(f"cell= must be 'lstm', 'gru', 'rnn' or a cell class/factory, got {cell!r}")
    made = cell(input_size, hidden_size)
    if not isinstance(made, nn.Module) or not hasattr(made, "init_state"):
        raise ConfigError(f"cell= must build nn.Modules with init_state(), got {type(made).__name__}")
    return made


class AttentionDecoderCell(nn.Module):
    """A stacked decoder cell with optional attention and input feeding (see the module docstring).

    Step it directly only without attention; with attention, :meth:`bind` it to a batch's memory first.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        attention: AttentionKind | None = None,
        memory_size: int | None = None,
        attention_size: int | None = None,
        cell: CellSpec = "lstm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if attention not in (None, "bahdanau", "luong"):
            raise ConfigError(f"attention must be None, 'bahdanau' or 'luong', got {attention!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"AttentionDecoderCell: num_layers must be a positive int, got {num_layers!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"AttentionDecoderCell: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.attention_kind, self.dropout = attention, float(dropout)
        self.memory_size = memory_size or hidden_size
        self.attention_size = (attention_size or hidden_size) if attention else 0
        first = input_size + self.attention_size  # input feeding widens the first layer's input
        self.layers = nn.ModuleList(
            _make_cell(cell, first if k == 0 else hidden_size, hidden_size) for k in range(num_layers)
        )
        self.mechanism: nn.Module | None = None
        self.attention_layer: nn.Linear | None = None
        if attention == "bahdanau":
            self.mechanism = BahdanauAttention(hidden_size, self.memory_size, hidden_size)
        elif attention == "luong":
            self.mechanism = LuongAttention(hidden_size, self.memory_size)
        if attention:
            self.attention_layer = nn.Linear(hidden_size + self.memory_size, self.attention_size, bias=False)

    @property
    def output_size(self) -> int:
        """Width of the step output: the attentional vector's with attention, else H."""
        return self.attention_size or self.hidden_size

    def bind(self, memory: Tensor, lengths: Tensor | list[int] | None = None) -> BoundDecoder:
        """A cell view of this decoder attending to ``memory`` (N, S, M) with valid ``lengths`` (N,)."""
        if memory.dim() != 3 or memory.shape[-1] != self.memory_size:
            raise ShapeError(
                f"AttentionDecoderCell.bind: expected memory of shape (N, S, {self.memory_size}), "
                f"got {tuple(memory.shape)}"
            )
        N, S, _ = memory.shape
        mask = sequence_mask(lengths_tensor(lengths, N, S, memory.device), S)
        keys = self.mechanism.keys(memory) if self.mechanism is not None else memory[..., :0]
        return BoundDecoder(self, Memory(memory, mask, keys))

    def init_state(
        self, batch_size: int, device: Any = None, dtype: Any = None, *, memory_len: int = 0
    ) -> DecoderState:
        """The zero state; ``memory_len`` sizes the alignments (bound views pass their memory's S)."""
        ref = next(self.parameters())
        device, dtype = device or ref.device, dtype or ref.dtype
        layers = tuple(c.init_state(batch_size, device=device, dtype=dtype) for c in self.layers)
        S = memory_len if self.attention_kind else 0
        attention = torch.zeros(batch_size, self.attention_size, device=device, dtype=dtype)
        return DecoderState(layers, attention, torch.zeros(batch_size, S, device=device, dtype=dtype))

    def initial_state(self, encoder_hidden: Any, memory_len: int = 0) -> DecoderState:
        """Start from an encoder's final hidden in the layers' stacked layout (L, N, H) per tensor."""
        leaves = [encoder_hidden] if isinstance(encoder_hidden, Tensor) else list(encoder_hidden)
        if leaves[0].shape[0] != self.num_layers:
            raise ShapeError(
                f"AttentionDecoderCell: the encoder's hidden has {leaves[0].shape[0]} layers, the decoder "
                f"{self.num_layers}; build both with the same num_layers (and a unidirectional encoder)"
            )
        zero = self.init_state(leaves[0].shape[1], leaves[0].device, leaves[0].dtype, memory_len=memory_len)
        layers = tuple(tree_map(lambda h, k=k: h[k], encoder_hidden) for k in range(self.num_layers))
        # an LSTM's hidden comes as a (h, c) pair; give each layer its cell's own state type
        layers = tuple(
            type(z)(*s) if hasattr(z, "_fields") and not isinstance(s, type(z)) else s
            for z, s in zip(zero.layers, layers)
        )
        return zero._replace(layers=layers)

    def forward(self, x: Tensor, state: DecoderState | None = None, memory: Memory | None = None) -> DecoderState:
        """One decoder step: ``x`` (N, I) and the state to the new state (attending to ``memory``)."""
        if state is None:
            S = 0 if memory is None else memory.values.shape[1]
            state = self.init_state(x.shape[0], x.device, x.dtype, memory_len=S)
        if self.attention_kind and memory is None:
            raise ShapeError(
                "AttentionDecoderCell: this decoder attends to encoder outputs; step "
                "decoder.bind(memory, lengths) instead of the decoder itself"
            )
        inp = torch.cat([x, state.attention], dim=-1) if self.attention_kind else x
        layers = []
        for k, c in enumerate(self.layers):
            s = c(inp, state.layers[k])
            layers.append(s)
            inp = cell_output(c, s)
            if self.dropout and self.training and k < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, True)
        if not self.attention_kind:
            return DecoderState(tuple(layers), state.attention, state.alignments)
        scores = self.mechanism(inp, memory.keys).masked_fill(~memory.mask, float("-inf"))
        alignments = torch.softmax(scores, dim=-1)  # (N, S), exactly 0 on padding
        context = torch.bmm(alignments.unsqueeze(1), memory.values).squeeze(1)  # (N, M)
        attention = torch.tanh(self.attention_layer(torch.cat([inp, context], dim=-1)))
        return DecoderState(tuple(layers), attention, alignments)

    def output(self, state: DecoderState) -> Tensor:
        """The step's output: the attentional vector a_t, or the top layer's output without attention."""
        if self.attention_kind:
            return state.attention
        return cell_output(self.layers[-1], state.layers[-1])


class BoundDecoder(nn.Module):
    """An :class:`AttentionDecoderCell` bound to one batch's memory: a cell for :func:`rnnkit.unroll`."""

    def __init__(self, decoder: AttentionDecoderCell, memory: Memory) -> None:
        super().__init__()
        self.decoder = decoder
        self.input_size = decoder.input_size
        self.memory = memory  # this batch's tensors: plain attributes, never saved in a state_dict

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> DecoderState:
        """The zero state, alignments sized to the memory."""
        return self.decoder.init_state(batch_size, device, dtype, memory_len=self.memory.values.shape[1])

    def initial_state(self, encoder_hidden: Any) -> DecoderState:
        """The state that starts decoding from the encoder's final hidden (L, N, H) per tensor."""
        return self.decoder.initial_state(encoder_hidden, memory_len=self.memory.values.shape[1])

    def forward(self, x: Tensor, state: DecoderState | None = None) -> DecoderState:
        """One decoder step attending to the bound memory."""
        return self.decoder(x, state, self.memory)

    def output(self, state: DecoderState) -> Tensor:
        """The step's output (see :meth:`AttentionDecoderCell.output`)."""
        return self.decoder.output(state)


# --------------------------------------------------------------------------------------------------
# the model


def exact_match(pred: Tensor, target: Tensor, pad_id: int = 0) -> Tensor:
    """(N,) bool: whether each predicted sequence equals its target, both PAD past their end (EOS included)."""
    width = max(pred.shape[1], target.shape[1])
    p = F.pad(pred, (0, width - pred.shape[1]), value=pad_id)
    t = F.pad(target, (0, width - target.shape[1]), value=pad_id)
    return (p == t).all(dim=1)


def _size(vocab: Any, name: str) -> int:
    if isinstance(vocab, int) and not isinstance(vocab, bool):
        size: Any = vocab
    else:
        size = len(vocab) if hasattr(vocab, "__len__") else None
    if not isinstance(size, int) or size < 4:
        raise ConfigError(f"Seq2Seq: {name} must be a vocabulary size >= 4 (PAD, GO, EOS, UNK...) or a Vocab")
    return size


class Seq2Seq(nn.Module):
    """Embedding + RNN encoder + :class:`AttentionDecoderCell` + vocabulary projection."""

    def __init__(
        self,
        src_vocab: int | Any,
        tgt_vocab: int | Any,
        *,
        embed_size: int = 15,
        hidden_size: int = 50,
        num_layers: int = 2,
        attention: AttentionKind | None = None,
        attention_size: int | None = None,
        cell: Literal["lstm", "gru", "rnn"] = "lstm",
        pad_id: int = 0,
        go_id: int = 1,
        eos_id: int = 2,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(cell, str):
            raise ConfigError(
                f"Seq2Seq: cell must be 'lstm', 'gru' or 'rnn' (encoder and decoder use the same kind), got {cell!r}"
            )
        self.src_vocab_size, self.tgt_vocab_size = _size(src_vocab, "src_vocab"), _size(tgt_vocab, "tgt_vocab")
        self.pad_id, self.go_id, self.eos_id = pad_id, go_id, eos_id
        self.src_embed = nn.Embedding(self.src_vocab_size, embed_size, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(self.tgt_vocab_size, embed_size, padding_idx=pad_id)
        self.encoder = make_rnn(
            cell, embed_size, hidden_size, num_layers=num_layers, dropout=dropout, backend=backend
        )
        self.decoder = AttentionDecoderCell(
            embed_size, hidden_size, num_layers=num_layers, attention=attention, memory_size=hidden_size,
            attention_size=attention_size, cell=cell, dropout=dropout,
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(self.decoder.output_size, self.tgt_vocab_size)

    # -- pieces ------------------------------------------------------------------------------------
    def encode(self, src: Tensor, src_lengths: Tensor | list[int] | None = None) -> Encoded:
        """Run the encoder over ``src`` ids (N, S): memory (N, S, H) zero past each end, final hidden."""
        if src.dim() != 2 or src.is_floating_point():
            raise ShapeError(f"Seq2Seq: expected src token ids of shape (N, S), got {tuple(src.shape)} {src.dtype}")
        N, S = src.shape
        lengths = lengths_tensor(src_lengths, N, S, src.device)
        memory, hidden = self.encoder(self.src_embed(src), lengths=lengths)
        return Encoded(memory, lengths, hidden)

    def start(self, encoded: Encoded) -> tuple[BoundDecoder, DecoderState]:
        """The decoder bound to ``encoded``'s memory, and its first state (the encoder's final hidden)."""
        bound = self.decoder.bind(encoded.memory, encoded.lengths)
        return bound, bound.initial_state(encoded.hidden)

    def logits(self, outputs: Tensor) -> Tensor:
        """Vocabulary logits (..., V) of decoder outputs (..., A)."""
        return self.out(self.dropout(outputs))

    # -- training ------------------------------------------------------------------------------------
    def forward(
        self,
        src: Tensor,
        src_lengths: Tensor | list[int] | None,
        tgt_in: Tensor,
        *,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing: logits (N, T_out, V) for decoder inputs ``tgt_in`` (N, T_out) (GO first).

        With ``return_attention`` also the attention weights (N, T_out, S).
        """
        if tgt_in.dim() != 2 or tgt_in.shape[0] != src.shape[0]:
            raise ShapeError(
                f"Seq2Seq: expected tgt_in of shape (N={src.shape[0]}, T_out), got {tuple(tgt_in.shape)}"
            )
        if return_attention:
            self._require_attention()
        bound, state = self.start(self.encode(src, src_lengths))
        result = unroll(bound, self.tgt_embed(tgt_in), state, return_states=return_attention, batch_first=True)
        logits = self.logits(result.outputs)
        if return_attention:
            return logits, result.states.alignments
        return logits

    def loss(self, logits: Tensor, tgt_out: Tensor) -> Tensor:
        """Mean token cross-entropy of ``logits`` (N, T, V) against ``tgt_out`` (N, T), PAD ignored."""
        if logits.dim() != 3 or tgt_out.shape != logits.shape[:2]:
            raise ShapeError(
                f"Seq2Seq.loss: expected logits (N, T, V) and targets (N, T), got {tuple(logits.shape)} "
                f"and {tuple(tgt_out.shape)}"
            )
        # (N, T, V) -> (N*T, V) and (N, T) -> (N*T,): one token per row
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=self.pad_id)

    # -- decoding --------------------------------------------------------------------------------------
    def _require_attention(self) -> None:
        if not self.decoder.attention_kind:
            raise ConfigError("Seq2Seq: this model has no attention to return; build it with attention='luong'")

    def _max_len(self, src: Tensor, max_len: int | None) -> int:
        if max_len is None:
            return 2 * src.shape[1] + 2
        if not isinstance(max_len, int) or max_len < 1:
            raise ConfigError(f"Seq2Seq: max_len must be a positive int, got {max_len!r}")
        return max_len

    @torch.no_grad()
    def greedy_decode(
        self,
        src: Tensor,
        src_lengths: Tensor | list[int] | None = None,
        max_len: int | None = None,
        *,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Most likely token at each step: tokens (N, T_out) ending in EOS then PAD (or cut at ``max_len``).

        Stops once every sequence has produced EOS. With ``return_attention`` also the weights
        (N, T_out, S), zero after a sequence's EOS.
        """
        if return_attention:
            self._require_attention()
        max_len = self._max_len(src, max_len)
        bound, state = self.start(self.encode(src, src_lengths))
        N = src.shape[0]
        tok = torch.full((N,), self.go_id, dtype=torch.long, device=src.device)
        done = torch.zeros(N, dtype=torch.bool, device=src.device)
        tokens, alignments = [], []
        for _ in range(max_len):
            state = bound(self.tgt_embed(tok), state)
            tok = self.logits(bound.output(state)).argmax(-1)
            tok = tok.masked_fill(done, self.pad_id)
            tokens.append(tok)
            alignments.append(state.alignments.masked_fill(done.unsqueeze(1), 0.0))
            done = done | (tok == self.eos_id)
            if bool(done.all()):
                break
        out = torch.stack(tokens, dim=1)
        return (out, torch.stack(alignments, dim=1)) if return_attention else out

    @torch.no_grad()
    def beam_search(
        self,
        src: Tensor,
        src_lengths: Tensor | list[int] | None = None,
        beam_size: int = 4,
        max_len: int | None = None,
        *,
        length_penalty: float = 0.0,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Best of ``beam_size`` hypotheses per sequence: tokens (N, T_out) as :meth:`greedy_decode`.

        Hypotheses are ranked by total log-probability while searching; the final choice divides it
        by the GNMT length penalty ``((5 + length) / 6) ** length_penalty`` (0 = no normalisation).
        A hypothesis that produced EOS is kept, unchanged, until the search ends: when every beam has
        finished, at ``max_len``, or (without length penalty) once every sequence's leading beam has
        finished, since log-probabilities only fall as a hypothesis grows.
        With beam_size=1 this is exactly :meth:`greedy_decode`.
        """
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ConfigError(f"Seq2Seq.beam_search: beam_size must be a positive int, got {beam_size!r}")
        if return_attention:
            self._require_attention()
        max_len = self._max_len(src, max_len)
        B, V, N = beam_size, self.tgt_vocab_size, src.shape[0]
        device = src.device
        enc = self.encode(src, src_lengths)
        dtype = enc.memory.dtype
        # every beam of a sequence shares its memory: repeat each sequence B times, (N*B, ...) rows
        hidden = tree_map(lambda h: h.repeat_interleave(B, dim=1), enc.hidden)  # (L, N*B, H)
        enc = Encoded(enc.memory.repeat_interleave(B, 0), enc.lengths.repeat_interleave(B, 0), hidden)
        bound, state = self.start(enc)
        S = state.alignments.shape[1]  # 0 without attention

        scores = torch.full((N, B), float("-inf"), device=device, dtype=dtype)
        scores[:, 0] = 0.0  # start from one live hypothesis so the first step's beams differ
        done = torch.zeros(N, B, dtype=torch.bool, device=device)
        lengths = torch.zeros(N, B, dtype=torch.long, device=device)
        history = torch.zeros(N, B, 0, dtype=torch.long, device=device)
        align_hist = torch.zeros(N, B, 0, S, device=device, dtype=dtype)
        # a finished hypothesis may only continue with PAD, at no cost: its score stays as it was
        pad_only = torch.full((V,), float("-inf"), device=device, dtype=dtype)
        pad_only[self.pad_id] = 0.0
        rows = torch.arange(N, device=device).unsqueeze(1)  # (N, 1)
        tok = torch.full((N * B,), self.go_id, dtype=torch.long, device=device)
        for _ in range(max_len):
            state = bound(self.tgt_embed(tok), state)
            logits = self.logits(bound.output(state))  # (N*B, V), beams of a sequence adjacent
            logp = torch.log_softmax(logits, dim=-1).view(N, B, V)
            logp = torch.where(done.unsqueeze(-1), pad_only, logp)
            cand = (scores.unsqueeze(-1) + logp).view(N, B * V)  # every (beam, token) extension of a sequence
            scores, flat = cand.topk(B, dim=1)  # (N, B)
            beam, new_tok = flat // V, flat % V
            prev_done = done.gather(1, beam)
            history = torch.cat([history[rows, beam], new_tok.unsqueeze(-1)], dim=2)
            lengths = lengths.gather(1, beam) + (~prev_done).long()
            done = prev_done | (new_tok == self.eos_id)
            pick = (rows * B + beam).view(-1)  # rows of the (N*B) state each new beam continues
            state = tree_map(lambda s, pick=pick: s.index_select(0, pick), state)
            step_align = state.alignments.view(N, B, -1)  # (N*B, S) -> (N, B, S)
            step_align = step_align.masked_fill(prev_done.unsqueeze(-1), 0.0)
            align_hist = torch.cat([align_hist[rows, beam], step_align.unsqueeze(2)], dim=2)
            tok = new_tok.view(-1)  # (N, B) -> (N*B,) rows of the next step
            if bool(done.all()):
                break
            if not length_penalty and bool(done[:, 0].all()):
                # scores only fall as hypotheses grow, so a finished leader can no longer be overtaken
                break
        final = scores
        if length_penalty:
            final = scores / ((5.0 + lengths.to(scores.dtype)) / 6.0).pow(length_penalty)
        best = final.argmax(dim=1)  # (N,)
        out = history[rows.squeeze(1), best]
        return (out, align_hist[rows.squeeze(1), best]) if return_attention else out
