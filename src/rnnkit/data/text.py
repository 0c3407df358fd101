"""Token vocabularies, padded batches and a toy sequence-to-sequence task (sorting a word's letters).

Special ids are fixed so that models can rely on them: ``PAD=0`` (padding, ignored by losses and
attention), ``GO=1`` (the decoder's first input), ``EOS=2`` (end of a sequence), ``UNK=3`` (any
token the vocabulary does not know). Real tokens start at id 4.

A seq2seq batch (:func:`make_seq2seq_batch`) follows the usual teacher-forcing layout::

    target "ehllo"
    tgt_in   GO  e  h  l  l  o          decoder inputs
    tgt_out  e   h  l  l  o  EOS        what each step must predict
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.errors import DataError, ShapeError

__all__ = [
    "PAD",
    "GO",
    "EOS",
    "UNK",
    "SPECIALS",
    "Vocab",
    "pad_sequences",
    "Seq2SeqBatch",
    "make_seq2seq_batch",
    "letter_sorting_pairs",
]

PAD, GO, EOS, UNK = 0, 1, 2, 3
SPECIALS: tuple[str, ...] = ("<pad>", "<go>", "<eos>", "<unk>")


class Vocab:
    """A token <-> id mapping with the four special ids first (PAD, GO, EOS, UNK)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.itos: list[str] = list(SPECIALS)
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
        for tok in tokens:
            if tok not in self.stoi:
                self.stoi[tok] = len(self.itos)
                self.itos.append(tok)

    @classmethod
    def characters(cls, alphabet: str = string.ascii_lowercase) -> Vocab:
        """One token per character of ``alphabet``, in its order."""
        return cls(alphabet)

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {self.itos[4:12]}{'...' if len(self) > 12 else ''})"

    def encode(self, seq: Iterable[str], *, add_go: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of the tokens of ``seq`` (a string is a sequence of characters); unknown tokens map to UNK."""
        ids = [self.stoi.get(tok, UNK) for tok in seq]
        return ([GO] if add_go else []) + ids + ([EOS] if add_eos else [])

    def decode(self, ids: Iterable[int] | Tensor, *, join: str | None = "") -> str | list[str]:
        """Tokens of ``ids`` up to the first EOS, skipping PAD and GO; joined with ``join`` unless None."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ShapeError(f"Vocab.decode takes one sequence (T,), got {tuple(ids.shape)}; decode row by row")
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, GO):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIALS[UNK])
        return out if join is None else join.join(out)

    def decode_batch(self, ids: Tensor, *, join: str = "") -> list[str]:
        """:meth:`decode` for every row of an (N, T) tensor."""
        return [self.decode(row, join=join) for row in ids]  # type: ignore[misc]

    def pad(self, seqs: Sequence[Iterable[str]], *, add_eos: bool = False) -> tuple[Tensor, Tensor]:
        """Encode and pad a batch of token sequences: ``(ids (N, T_max), lengths (N,))``."""
        return pad_sequences([self.encode(s, add_eos=add_eos) for s in seqs])


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int = PAD) -> tuple[Tensor, Tensor]:
    """Right-pad variable-length id lists into ``(ids (N, T_max) long, lengths (N,) long)``."""
    if not seqs:
        raise DataError("pad_sequences: got an empty batch; pass at least one sequence")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise DataError(
            f"pad_sequences: sequence {lengths.index(0)} is empty; every sequence needs at least one token "
            f"(the RNN needs lengths >= 1)"
        )
    ids = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids, torch.tensor(lengths, dtype=torch.long)


class Seq2SeqBatch(NamedTuple):
    """A padded batch for teacher forcing; all tensors long, PAD past each sequence's end."""

    src: Tensor  # (N, S)
    src_lengths: Tensor  # (N,)
    tgt_in: Tensor  # (N, T): GO + target
    tgt_out: Tensor  # (N, T): target + EOS
    tgt_lengths: Tensor  # (N,): len(target) + 1


def make_seq2seq_batch(
    pairs: Sequence[tuple[Iterable[str], Iterable[str]]], src_vocab: Vocab, tgt_vocab: Vocab | None = None
) -> Seq2SeqBatch:
    """Encode and pad (source, target) pairs into a :class:`Seq2SeqBatch` (target vocab defaults to source's)."""
    tgt_vocab = tgt_vocab or src_vocab
    src, src_lengths = pad_sequences([src_vocab.encode(s) for s, _ in pairs])
    targets = [tgt_vocab.encode(t) for _, t in pairs]
    tgt_in, tgt_lengths = pad_sequences([[GO, *t] for t in targets])
    tgt_out, _ = pad_sequences([[*t, EOS] for t in targets])
    return Seq2SeqBatch(src, src_lengths, tgt_in, tgt_out, tgt_lengths)


def letter_sorting_pairs(
    num: int,
    *,
    min_len: int = 1,
    max_len: int = 8,
    alphabet: str = string.ascii_lowercase,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """``num`` random words over ``alphabet`` with lengths in [min_len, max_len], each paired with its letters sorted.

    Example: ``("hello", "ehllo")``. The same seed always gives the same pairs (a private RNG, not
    the global one).
    """
    if not 1 <= min_len <= max_len:
        raise DataError(f"letter_sorting_pairs: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if not alphabet:
        raise DataError("letter_sorting_pairs: alphabet is empty; pass e.g. alphabet='abcdef'")
    rng = random.Random(seed)
    words = ("".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))) for _ in range(num))
    return [(w, "".join(sorted(w))) for w in words]
