"""The tasks beyond MNIST: sine -> cosine and echo (streams, truncated backprop) and letter sorting (seq2seq).

``rnnkit.app`` hands a run to this module when ``cfg.task`` is not ``"mnist"``. Each task writes the
same run directory as an MNIST run (config.toml, metrics.jsonl, tensorboard/, checkpoints/,
model.safetensors, curves.png) plus its own figure and ``results.json`` with the final test figures:

=============  =====================================  ==============================================
task           model                                  figure, test figures
=============  =====================================  ==============================================
sin-cos        SequenceRegressor, state carried       series.png; MSE over held-out streams
echo           SequenceRegressor (tagging), carried   echo.png; accuracy per step of the stream
sort-letters   Seq2Seq (greedy / beam decoding)       attention.png (with attention); exact match,
                                                      overall and by word length, held-out words
=============  =====================================  ==============================================

Truncated backprop: :class:`StreamModel` keeps the final state of each training window (detached) and
starts the next window from it; :class:`~rnnkit.data.synthetic.StreamBatches` resets it at the start
of each stream. Evaluation reads whole test streams from the zero state in one pass, which gives the
same values as reading them window by window with the state carried.

The Trainer calls ``model(x)`` with one tensor, so :class:`WordSorter` packs a word batch as
``x = [source ids | decoder inputs]`` (N, S + T) and unpacks it; in eval mode it also decodes greedily,
so every evaluation reports the exact match of real decoding, not only teacher-forced figures.
"""

from __future__ import annotations

import json
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.config import dump_toml
from rnnkit.data.synthetic import TEST, TRAIN, EchoStream, SinCosStream, StreamBatches
from rnnkit.data.text import EOS, PAD, Vocab, letter_sorting_pairs, make_seq2seq_batch
from rnnkit.engine import tree_map
from rnnkit.errors import CheckpointError, ConfigError
from rnnkit.models.regressor import SequenceRegressor, detach_state
from rnnkit.models.seq2seq import Seq2Seq, exact_match
from rnnkit.recipes import RunConfig
from rnnkit.train.batching import Batches
from rnnkit.train.trainer import classification_metrics

if TYPE_CHECKING:
    from rnnkit.app import RunSummary

__all__ = [
    "TASKS",
    "StreamModel",
    "WordSorter",
    "SortOutput",
    "pack_words",
    "word_pairs",
    "sort_metrics",
    "mse_metrics",
    "write_attention",
    "TaskData",
    "build_model",
    "load_data",
    "train",
    "evaluate",
    "evaluate_run",
    "predict_run",
    "describe",
    "state_traces",
    "inspect_run",
]

TASKS = ("sin-cos", "echo", "sort-letters")
STREAM_TASKS = ("sin-cos", "echo")
Log = Callable[[str], Any]


# --------------------------------------------------------------------------------------------------
# models


class StreamModel(nn.Module):
    """A :class:`SequenceRegressor` that carries its state from one training window to the next.

    Training: each call starts from the state the previous call ended in, detached so gradients stop
    at the window's start. Eval mode: every call starts from the zero state and leaves the carried
    state alone, so evaluating in the middle of a stream does not disturb training.
    """

    def __init__(self, net: SequenceRegressor) -> None:
        super().__init__()
        self.net = net
        self.state: Any = None  # a plain attribute: not a parameter, never saved with the weights

    def reset_state(self) -> None:
        """Forget the carried state (a new stream starts)."""
        self.state = None

    def carried_state_dict(self) -> dict[str, Any]:
        """The carried state, for checkpoints: a resumed run goes on where the stream left off."""
        return {"state": self.state}

    def load_carried_state_dict(self, saved: dict[str, Any]) -> None:
        """Carry ``saved`` (from :meth:`carried_state_dict`) into the next training window."""
        device = next(self.parameters()).device
        self.state = None if saved["state"] is None else tree_map(lambda s: s.to(device), saved["state"])

    def carried_batch_size(self) -> int | None:
        """How many streams the carried state is for (None: no state carried yet)."""
        return None if self.state is None else _batch_of(self.state)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (N, T, out) for the window ``x`` (N, T, in)."""
        if not self.training:
            return self.net(x)[0]
        if self.state is not None and self.carried_batch_size() != x.shape[0]:
            raise ConfigError(
                f"StreamModel: the carried state is for {self.carried_batch_size()} streams but this window has "
                f"{x.shape[0]}; stream tasks need optim.accumulate=1 and one batch size throughout"
            )
        y, state = self.net(x, self.state)
        self.state = detach_state(state)
        return y

    def loss(self, y: Tensor, target: Tensor) -> Tensor:
        """The regressor's loss: MSE (sin-cos) or cross-entropy per step (echo)."""
        return self.net.loss(y, target)


def _batch_of(state: Any) -> int:
    first = state if isinstance(state, Tensor) else state[0]
    return int(first.shape[-2])  # (L*D, N, H)


class SortOutput(NamedTuple):
    """:class:`WordSorter`'s eval-mode output: teacher-forced logits (N, T, V) and greedy tokens (N, T')."""

    logits: Tensor
    greedy: Tensor


def pack_words(src: Tensor, tgt_in: Tensor, src_width: int, tgt_width: int) -> Tensor:
    """The :class:`WordSorter` input: ``src`` padded to ``src_width`` columns, then ``tgt_in`` to ``tgt_width``."""
    src = F.pad(src, (0, src_width - src.shape[1]), value=PAD)
    tgt_in = F.pad(tgt_in, (0, tgt_width - tgt_in.shape[1]), value=PAD)
    return torch.cat([src, tgt_in], dim=1)


class WordSorter(nn.Module):
    """:class:`Seq2Seq` behind the Trainer's ``model(x)``: ``x`` is [source ids (N, S) | decoder inputs (N, T)]."""

    def __init__(self, seq2seq: Seq2Seq, src_width: int) -> None:
        super().__init__()
        self.seq2seq, self.src_width = seq2seq, src_width

    def forward(self, x: Tensor) -> Tensor | SortOutput:
        """Teacher-forced logits; in eval mode with the greedy decoding of the same batch."""
        src, tgt_in = x[:, : self.src_width], x[:, self.src_width :]
        src_len = (src != PAD).sum(1)
        tgt_len = (tgt_in != PAD).sum(1)
        # the packing pads to the longest word of the data set: cut the batch to its own longest
        src, tgt_in = src[:, : int(src_len.max())], tgt_in[:, : int(tgt_len.max())]
        logits = self.seq2seq(src, src_len, tgt_in)
        if self.training:
            return logits
        return SortOutput(logits, self.seq2seq.greedy_decode(src, src_len, max_len=tgt_in.shape[1]))

    def loss(self, out: Tensor | SortOutput, tgt_out: Tensor) -> Tensor:
        """Token cross-entropy, PAD ignored."""
        logits = out.logits if isinstance(out, SortOutput) else out
        return self.seq2seq.loss(logits, tgt_out[:, : logits.shape[1]])


def sort_metrics(out: Tensor | SortOutput, tgt_out: Tensor) -> dict[str, float]:
    """Teacher-forced token accuracy, and the exact match of greedy decoding when ``out`` carries it."""
    logits = out.logits if isinstance(out, SortOutput) else out
    target = tgt_out[:, : logits.shape[1]]
    valid = target != PAD
    hits = (logits.argmax(-1) == target) & valid
    metrics = {"token_accuracy": (hits.sum() / valid.sum()).item()}
    if isinstance(out, SortOutput):
        metrics["exact_match"] = exact_match(out.greedy, tgt_out, PAD).float().mean().item()
    return metrics


def mse_metrics(out: Tensor, target: Tensor) -> dict[str, float]:
    """Mean squared error (sin-cos)."""
    return {"mse": F.mse_loss(out, target).item()}


def build_model(cfg: RunConfig) -> nn.Module:
    """The model of ``cfg.task`` as ``cfg.model`` and ``cfg.synthetic`` describe it."""
    from rnnkit.app import _cell_factory

    m, s = cfg.model, cfg.synthetic
    if cfg.task in STREAM_TASKS:
        if m.bidirectional:
            raise ConfigError(f"task {cfg.task}: a bidirectional model cannot carry its state along a stream; "
                              f"drop model.bidirectional")
        if cfg.optim.accumulate != 1:
            raise ConfigError(f"task {cfg.task}: optim.accumulate must be 1 (the state is carried per stream)")
        echo = cfg.task == "echo"
        net = SequenceRegressor(
            1, 2 if echo else 1, hidden_size=m.hidden, num_layers=m.layers, cell=_cell_factory(m.cell),
            input_projection=m.input_projection, dropout=m.dropout, forget_bias=m.forget_bias,
            task="tagging" if echo else "regression", init=m.init, backend=m.backend,
        )
        return StreamModel(net)
    if cfg.task == "sort-letters":
        if m.cell not in ("lstm", "gru", "rnn"):
            raise ConfigError(f"task sort-letters: model.cell must be lstm, gru or rnn, got {m.cell!r}")
        vocab = Vocab.characters()
        seq2seq = Seq2Seq(
            vocab, vocab, embed_size=s.embed, hidden_size=m.hidden, num_layers=m.layers,
            attention=None if s.attention == "none" else s.attention, cell=m.cell, dropout=m.dropout,
            backend=m.backend,
        )
        return WordSorter(seq2seq, s.max_len)
    raise ConfigError(f"unknown task {cfg.task!r}; known: mnist, {', '.join(TASKS)}")


def _refuse_unused(cfg: RunConfig) -> None:
    """A model setting the task's model has no use for is an error for a new run, not silently ignored
    (runs saved before this check still load: their settings were ignored then as now)."""
    from rnnkit.recipes import ModelConfig

    # the MNIST classifier's readout and head; sort-letters' encoder reads its embeddings one way
    keys = ("readout", "k", "head_init", "chrono_t_max") + (() if cfg.task in STREAM_TASKS else (
        "bidirectional", "input_projection", "forget_bias", "init"))
    default = ModelConfig()
    given = [f"model.{key}" for key in keys if getattr(cfg.model, key) != getattr(default, key)]
    if given:
        raise ConfigError(f"task {cfg.task}: its model does not use {', '.join(given)}; leave "
                          f"{'it' if len(given) == 1 else 'them'} unset")


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class TaskData:
    """Training batches (a stream or word batches), the test set, and what the figures need."""

    train: StreamBatches | Batches
    x_test: Tensor
    y_test: Tensor
    source: str
    test_words: list[str] | None = None


def _stream(cfg: RunConfig, split: int, batch_size: int) -> EchoStream | SinCosStream:
    s = cfg.synthetic
    if cfg.task == "echo":
        return EchoStream(batch_size, s.window, s.echo_step, seed=cfg.train.seed, split=split)
    return SinCosStream(batch_size, s.window, seed=cfg.train.seed, split=split)


def word_pairs(cfg: RunConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Training and held-out (word, sorted word) pairs; no held-out word occurs in training."""
    s = cfg.synthetic
    train = letter_sorting_pairs(s.train_words, min_len=s.min_len, max_len=s.max_len, seed=cfg.train.seed)
    seen = {w for w, _ in train}
    test: list[tuple[str, str]] = []
    # draw in rounds: short words are mostly taken by training, so some draws are thrown away
    for round_ in range(100):
        more = letter_sorting_pairs(4 * s.test_words, min_len=s.min_len, max_len=s.max_len,
                                    seed=cfg.train.seed + 1_000_003 * (round_ + 1))
        for w, t in more:
            if w not in seen:
                seen.add(w)
                test.append((w, t))
                if len(test) == s.test_words:
                    return train, test
    raise ConfigError(
        f"synthetic.test_words={s.test_words}: could not find that many words of {s.min_len}-{s.max_len} letters "
        f"outside the {s.train_words:,} training words; ask for fewer or allow longer words"
    )


def load_data(cfg: RunConfig, model: nn.Module | None = None) -> TaskData:
    """The task's training batches and test set (streams are made lazily, window by window)."""
    s, t = cfg.synthetic, cfg.train
    if cfg.task in STREAM_TASKS:
        reset = model.reset_state if isinstance(model, StreamModel) else None
        batches = StreamBatches(_stream(cfg, TRAIN, t.batch_size), s.stream_length, on_stream_start=reset)
        x_test, y_test = _stream(cfg, TEST, s.test_streams).sequence(0, s.test_length)
        what = f"random bits echoed {s.echo_step} steps later" if cfg.task == "echo" else "sin -> cos"
        source = (f"{what}: {t.batch_size} streams of {s.stream_length:,} steps per epoch in {len(batches)} "
                  f"windows of {s.window}; test {s.test_streams} streams of {s.test_length} steps")
        return TaskData(batches, x_test, y_test, source)
    train, test = word_pairs(cfg)
    vocab = Vocab.characters()
    tgt_width = s.max_len + 1  # the sorted word and EOS

    def pack(pairs: list[tuple[str, str]]) -> tuple[Tensor, Tensor]:
        b = make_seq2seq_batch(pairs, vocab)
        x = pack_words(b.src, b.tgt_in, s.max_len, tgt_width)
        return x, F.pad(b.tgt_out, (0, tgt_width - b.tgt_out.shape[1]), value=PAD)

    x_train, y_train = pack(train)
    x_test, y_test = pack(test)
    source = (f"random words of {s.min_len}-{s.max_len} letters: {len(train):,} training, {len(test):,} held out "
              f"(none seen in training)")
    return TaskData(Batches(x_train, y_train, t.batch_size, seed=t.seed), x_test, y_test, source,
                    [w for w, _ in test])


# --------------------------------------------------------------------------------------------------
# training


def train(
    cfg: RunConfig, *, resume_dir: str | Path | None = None, log: Log = print, start_time: float | None = None
) -> RunSummary:
    """Train a synthetic task into a new run directory (or continue ``resume_dir``); returns a summary."""
    from rnnkit import app
    from rnnkit.train.callbacks import Checkpointer, MetricsLogger, ProgressBar, TensorBoardLogger
    from rnnkit.train.checkpoint import latest_checkpoint

    del start_time  # app.train's signature; these tasks have no time-to-target figure
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = app.resolve_device(t.device)
    resume_from = None
    if resume_dir:
        resume_from = latest_checkpoint(Path(resume_dir) / "checkpoints")
        if resume_from is None:
            raise CheckpointError(f"--resume {resume_dir}: no checkpoints in {Path(resume_dir) / 'checkpoints'}")
    if resume_dir is None:
        _refuse_unused(cfg)
    app.seed_everything(t.seed, t.deterministic)
    model = build_model(cfg).to(device)
    data = load_data(cfg, model)
    log(f"data: {data.source}")
    batches = data.train
    total = t.steps if t.steps is not None else max(t.epochs * len(batches), t.min_steps or 0)
    metrics_fn = {"sin-cos": mse_metrics, "sort-letters": sort_metrics}.get(cfg.task, classification_metrics)
    # checked before anything is written (see app._train_mnist)
    trainer = app.build_trainer(cfg, model, device, [], train_size=len(batches) * batches.batch_size,
                                metrics=metrics_fn)
    config_text = dump_toml(cfg)
    run_dir = app.open_run(cfg, trainer, batches, resume_dir, resume_from, config_text, log)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {_model_line(cfg)}, {n_params:,} parameters on {device}")

    metric, mode = {"sin-cos": ("mse", "min"), "echo": ("accuracy", "max"),
                    "sort-letters": ("exact_match", "max")}[cfg.task]
    tb = TensorBoardLogger(run_dir / "tensorboard", t.log_every, config_text=config_text,
                          purge_step=trainer.step + 1 if resume_from else None)
    ckpt = Checkpointer(run_dir / "checkpoints", every=t.checkpoint_every, keep_last=t.keep_last,
                        metric=metric, mode=mode, meta={"config": config_text})
    metrics_log = MetricsLogger(run_dir / "metrics.jsonl", t.log_every, after=trainer.step if resume_from else None)
    trainer.callbacks = [ProgressBar(total, enabled=t.progress), metrics_log, tb, ckpt]

    t0 = time.perf_counter()
    trainer.fit(batches, (data.x_test, data.y_test), steps=total, eval_every=t.eval_every,
                eval_batch_size=t.eval_batch_size)
    seconds = time.perf_counter() - t0
    interrupted = bool(trainer.stop_requested and trainer.stop_requested.startswith("signal"))

    with trainer._averaged():
        results = evaluate(cfg, trainer.model, data, device)
        _write_figures(cfg, trainer.model, data, device, run_dir, results)
    tensors = app._final_weights(trainer)
    results = {"task": cfg.task, "step": trainer.step, "train_seconds": round(seconds, 3), **results}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    from rnnkit.train.checkpoint import save_checkpoint

    meta = {"kind": "rnnkit-model", "task": cfg.task, "config": config_text, "step": trainer.step,
            "test": {k: v for k, v in results.items() if isinstance(v, int | float)}}
    save_checkpoint(run_dir / "model.safetensors", tensors, meta)
    _write_curves(cfg, run_dir)
    tb.close()
    if interrupted:
        log(f"interrupted ({trainer.stop_requested}) at step {trainer.step}; checkpoint saved. "
            f"Continue with: rnnkit train --resume {run_dir}")
    for line in describe(cfg.task, results):
        log(line)
    headline = (f"final {_headline(cfg.task, results)} after {trainer.step:,} steps, {seconds:.1f} s of training; "
                f"run: {run_dir}")
    accuracy = results.get("exact_match", results.get("accuracy", float("nan")))
    return app.RunSummary(run_dir, accuracy, results["loss"], seconds, trainer.step, None, interrupted,
                          headline=headline)


def _model_line(cfg: RunConfig) -> str:
    m = cfg.model
    if cfg.task == "sort-letters":
        return (f"seq2seq {m.cell.upper()} {m.hidden}x{m.layers}, embeddings {cfg.synthetic.embed}, "
                f"attention {cfg.synthetic.attention}")
    return f"{m.cell.upper()} {m.hidden}x{m.layers} with a Linear head on every step, state carried"


def _headline(task: str, r: dict[str, Any]) -> str:
    if task == "sin-cos":
        return f"test mse: {r['mse']:.5f}"
    if task == "echo":
        return f"test accuracy: {100 * r['accuracy']:.2f}% ({100 * r['accuracy_after_echo']:.2f}% after the echo delay)"
    return f"exact match: {100 * r['exact_match']:.2f}% on {r['test_words']:,} held-out words"


def _write_curves(cfg: RunConfig, run_dir: Path) -> None:
    from rnnkit import plots

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    panels = {"sin-cos": ("mse",), "echo": ("loss", "accuracy"),
              "sort-letters": ("loss", "token_accuracy", "exact_match")}[cfg.task]
    plots.plot_curves(records, run_dir / "curves.png", metrics=panels, title=cfg.recipe)


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _stream_outputs(model: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    model.eval()
    return model(x.to(device)).float().cpu()


@torch.no_grad()
def evaluate(cfg: RunConfig, model: nn.Module, data: TaskData, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The task's test figures: mse (sin-cos), accuracy per step (echo), exact match by length (sort-letters)."""
    device = torch.device(device)
    if cfg.task == "sin-cos":
        y = _stream_outputs(model, data.x_test, device)
        mse = F.mse_loss(y, data.y_test).item()
        # from the zero state the first steps cannot know where on the wave they are: report without them too
        w = min(cfg.synthetic.window, y.shape[1] - 1)
        return {"loss": mse, "mse": mse, "mse_after_first_window": F.mse_loss(y[:, w:], data.y_test[:, w:]).item(),
                "window": cfg.synthetic.window}
    if cfg.task == "echo":
        logits = _stream_outputs(model, data.x_test, device)  # (N, L, 2)
        loss = F.cross_entropy(logits.flatten(0, 1), data.y_test.flatten()).item()
        hits = (logits.argmax(-1) == data.y_test).float()  # (N, L)
        per_step = hits.mean(0)
        k = cfg.synthetic.echo_step
        return {
            "loss": loss,
            "accuracy": hits.mean().item(),
            "accuracy_after_echo": hits[:, k:].mean().item() if hits.shape[1] > k else float("nan"),
            "echo_step": k,
            "per_step_accuracy": [round(v, 4) for v in per_step.tolist()],
        }
    # sort-letters: greedy decoding of every held-out word
    sorter: WordSorter = model  # type: ignore[assignment]
    sorter.eval()
    words = data.test_words or []
    losses, correct = [], []
    for i in range(0, data.x_test.shape[0], cfg.train.eval_batch_size):
        x = data.x_test[i : i + cfg.train.eval_batch_size].to(device)
        y = data.y_test[i : i + cfg.train.eval_batch_size].to(device)
        out = sorter(x)
        losses.append(sorter.loss(out, y).item() * x.shape[0])
        correct.append(exact_match(out.greedy, y, PAD).cpu())
    hits = torch.cat(correct)
    by_length: dict[str, list[float]] = {}
    for n in sorted({len(w) for w in words}):
        sel = torch.tensor([len(w) == n for w in words])
        by_length[str(n)] = [round(hits[sel].float().mean().item(), 4), int(sel.sum())]
    return {
        "loss": sum(losses) / len(words),
        "exact_match": hits.float().mean().item(),
        "test_words": len(words),
        "exact_match_by_length": by_length,
    }


def describe(task: str, r: dict[str, Any]) -> list[str]:
    """Lines that report a task's test figures (as printed after training and by ``rnnkit eval``)."""
    if task == "sin-cos":
        return [f"test mse: {r['mse']:.5f} over held-out streams read from the zero state; "
                f"{r['mse_after_first_window']:.5f} from step {r['window']} on"]
    if task == "echo":
        per = r.get("per_step_accuracy") or []
        shown = " ".join(f"{100 * v:.0f}" for v in per[:20])
        return [
            f"per-step accuracy (%), steps 0-{min(len(per), 20) - 1} of the stream: {shown}",
            f"test accuracy: {100 * r['accuracy']:.2f}% overall, {100 * r['accuracy_after_echo']:.2f}% from step "
            f"{r['echo_step']} on (the first {r['echo_step']} targets come before any input)",
        ]
    by = r.get("exact_match_by_length") or {}
    parts = ", ".join(f"{n}: {100 * acc:.1f}% ({count})" for n, (acc, count) in by.items())
    return [
        f"exact match by word length (letters: accuracy (words)): {parts}",
        f"exact match: {100 * r['exact_match']:.2f}% on {r['test_words']:,} held-out words (greedy decoding)",
    ]


# --------------------------------------------------------------------------------------------------
# figures


def _write_figures(cfg: RunConfig, model: nn.Module, data: TaskData, device: torch.device, run_dir: Path,
                   results: dict[str, Any]) -> None:
    from rnnkit import plots

    if cfg.task == "sin-cos":
        y = _stream_outputs(model, data.x_test[:1], device)
        plots.plot_series(
            {"input sin": data.x_test[0, :, 0], "target cos": data.y_test[0, :, 0], "predicted cos": y[0, :, 0]},
            run_dir / "series.png", title=f"sin -> cos, test stream 0 (test mse {results['mse']:.5f})",
        )
    elif cfg.task == "echo":
        T = min(cfg.synthetic.window, data.x_test.shape[1])
        rows = min(5, data.x_test.shape[0])
        probs = torch.softmax(_stream_outputs(model, data.x_test[:rows, :T], device), -1)[..., 1]
        plots.plot_echo(data.x_test[:rows, :T, 0], data.y_test[:rows, :T], probs, run_dir / "echo.png",
                        per_step_accuracy=results["per_step_accuracy"][:T])
    elif cfg.task == "sort-letters" and cfg.synthetic.attention != "none":
        words = data.test_words or []
        word = next((w for w in words if len(w) >= 5), words[0])
        write_attention(model.seq2seq, word, run_dir / "attention.png")  # type: ignore[union-attr]


def write_attention(seq2seq: Seq2Seq, word: str, path: Path) -> Path:
    """Greedy-decode ``word`` and plot its attention weights (output letters x source letters)."""
    from rnnkit import plots

    vocab = Vocab.characters()
    src, lengths = vocab.pad([word.lower()])
    device = next(seq2seq.parameters()).device
    seq2seq.eval()
    tokens, weights = seq2seq.greedy_decode(src.to(device), lengths.to(device), return_attention=True)
    ids = tokens[0].tolist()
    n = ids.index(EOS) + 1 if EOS in ids else len(ids)
    out = [vocab.itos[i] for i in ids[:n]]
    return plots.plot_attention(weights[0, :n], list(word.lower()), out, path)


# --------------------------------------------------------------------------------------------------
# using a finished run


def evaluate_run(run_dir: str | Path, *, log: Log = print) -> dict[str, Any]:
    """Evaluate a synthetic-task run's final model on its test set (regenerated from the config's seed)."""
    from rnnkit.app import _run_device
    from rnnkit.app import load_run as app_load_run

    cfg, model, _ = app_load_run(run_dir)
    data = load_data(cfg, model)
    log(f"data: {data.source}")
    device = _run_device(cfg)
    return {"task": cfg.task, **evaluate(cfg, model.to(device), data, device)}


@torch.no_grad()
def predict_run(run_dir: str | Path, words: list[str] | None = None, *, n: int = 10, beam: int = 1,
                log: Log = print) -> list[str]:
    """Printable predictions: sorted ``words`` (sort-letters), or the first ``n`` steps of test stream 0."""
    from rnnkit.app import load_run as app_load_run

    cfg, model, _ = app_load_run(run_dir)
    model.eval()
    if cfg.task == "sort-letters":
        if not words:
            raise ConfigError("rnnkit predict: give words to sort, e.g. `rnnkit predict RUN_DIR hello machine common`")
        if beam < 1:
            raise ConfigError(f"--beam must be at least 1, got {beam}")
        vocab = Vocab.characters()
        lowered = [w.lower() for w in words]
        letters = set(string.ascii_lowercase)  # what the model was trained on (Vocab.characters)
        odd = [w for w, lw in zip(words, lowered) if not set(lw) <= letters]
        if odd:
            raise ConfigError(f"rnnkit predict: the model sorts words of the letters a-z only, got {odd[0]!r}; "
                              "give words without digits, accents or punctuation")
        src, lengths = vocab.pad(lowered)
        seq2seq = model.seq2seq  # type: ignore[union-attr]
        out = (seq2seq.beam_search(src, lengths, beam_size=beam) if beam > 1
               else seq2seq.greedy_decode(src, lengths))
        lines = []
        longest = max(len(w) for w in words)
        for w, lw, row in zip(words, lowered, out):
            got = vocab.decode(row)
            want = "".join(sorted(lw))
            mark = "" if got == want else f"   <- wrong (expected {want})"
            lines.append(f"{w:<{longest}} -> {got}{mark}")
        right = sum(line.find("<- wrong") < 0 for line in lines)
        how = f"beam search, beam {beam}" if beam > 1 else "greedy"
        lines.append(f"{right}/{len(words)} sorted correctly ({how})")
        return lines
    if words:
        raise ConfigError(f"rnnkit predict: task {cfg.task} takes no words; use --n STEPS")
    x, y = _stream(cfg, TEST, 1).sequence(0, max(1, n))
    out = model(x)[0]
    if cfg.task == "sin-cos":
        lines = [f"{'step':>5}  {'sin (input)':>11}  {'cos (true)':>10}  {'predicted':>9}"]
        lines += [f"{t:>5}  {x[0, t, 0]:>11.4f}  {y[0, t, 0]:>10.4f}  {out[t, 0]:>9.4f}" for t in range(x.shape[1])]
        lines.append(f"mse over these {x.shape[1]} steps: {F.mse_loss(out, y[0]).item():.5f}")
        return lines
    probs = torch.softmax(out, -1)[:, 1]
    pred = probs.ge(0.5).long()
    lines = [f"{'step':>5}  input  target  predicted  P(1)"]
    lines += [f"{t:>5}  {int(x[0, t, 0]):>5}  {int(y[0, t]):>6}  {int(pred[t]):>9}  {probs[t]:.3f}"
              + ("" if pred[t] == y[0, t] else "   <- wrong") for t in range(x.shape[1])]
    lines.append(f"{int((pred == y[0]).sum())}/{x.shape[1]} steps right")
    return lines


# --------------------------------------------------------------------------------------------------
# looking inside: states and gates over time


@torch.no_grad()
def state_traces(rnn: nn.Module, x: Tensor) -> list[dict[str, Tensor]]:
    """Per layer and direction, every step's states of one sequence ``x`` (1, T, I) as (T, H) traces.

    The layer returns h (and c) for every step (``return_states=True``); an LSTM's gates are not
    states, so they are recomputed from the layer's input and the previous step's h (and c, for
    peepholes) with the cell's own weights: i, f, o are sigmoids in [0, 1] and g the tanh candidate.
    A bidirectional layer gives two entries, forward then reverse; the reverse direction's
    "previous" step is the next one in time, since it reads the sequence from the end.
    """
    if x.dim() != 3 or x.shape[0] != 1:
        raise ConfigError(f"inspect: expected one sequence (1, T, I), got {tuple(x.shape)}")
    batch_first = getattr(rnn, "batch_first", True)
    was = rnn.training
    rnn.eval()
    try:
        result = rnn(x if batch_first else x.transpose(0, 1), return_states=True)
    finally:
        rnn.train(was)
    directions = 2 if getattr(rnn, "bidirectional", False) else 1
    traces, layer_input = [], x[0]
    for layer in range(rnn.num_layers):
        hs = []
        for d in range(directions):
            trace, h = _direction_trace(rnn, result.states, layer * directions + d, layer_input, batch_first, d == 1)
            traces.append(trace)
            hs.append(h)
        layer_input = rnn._merge(hs)  # the next layer's input, merged as the layer itself merges it
    return traces


def _direction_trace(
    rnn: nn.Module, states: Any, k: int, inputs: Tensor, batch_first: bool, reverse: bool
) -> tuple[dict[str, Tensor], Tensor]:
    """The traces of stacked entry ``k`` (layer * D + direction) and its h (T, H)."""
    from rnnkit.cells import LSTMCell, LSTMState

    def one(s: Tensor) -> Tensor:  # (D*L, N, T, H) batch first, else (D*L, T, N, H) -> (T, H)
        return s[k, 0] if batch_first else s[k, :, 0]

    tag = " (reverse)" if reverse else ""
    if isinstance(states, LSTMState):
        h, c = one(states.h), one(states.c)
        trace = {"h (hidden)" + tag: h, "c (cell)" + tag: c}
        directions = 2 if getattr(rnn, "bidirectional", False) else 1
        cell = rnn.cell(k // directions, reverse)
        if isinstance(cell, LSTMCell):
            gates = _lstm_gates(cell, inputs, h, c, reverse)
            trace.update({name + tag: v for name, v in gates.items()})
        return trace, h
    if isinstance(states, Tensor):
        h = one(states)
        return {"h (hidden)" + tag: h}, h
    # a user cell's own state: one trace per tensor, named by its fields where it has them
    names = getattr(states, "_fields", None) or [f"state {i}" for i in range(len(states))]
    trace = {str(n) + tag: one(v) for n, v in zip(names, states) if isinstance(v, Tensor)}
    return trace, next(iter(trace.values()))


def _lstm_gates(cell: Any, inputs: Tensor, h: Tensor, c: Tensor, reverse: bool = False) -> dict[str, Tensor]:
    """Gates (T, H) of an LSTMCell that read ``inputs`` (T, I) and produced ``h``, ``c`` (T, H)."""
    if reverse:  # the step before t is t + 1; the zero state precedes the last step
        h_prev = torch.cat([h[1:], torch.zeros_like(h[:1])])
        c_prev = torch.cat([c[1:], torch.zeros_like(c[:1])])
    else:
        h_prev = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
        c_prev = torch.cat([torch.zeros_like(c[:1]), c[:-1]])
    gates = cell.project_input(inputs) + h_prev @ cell.weight_hh.t()
    i, f, g, o = gates.chunk(4, dim=1)  # torch's gate order
    if cell.peepholes:
        i, f, o = i + c_prev * cell.weight_ci, f + c_prev * cell.weight_cf, o + c * cell.weight_co
    return {"input gate i": torch.sigmoid(i), "forget gate f": torch.sigmoid(f),
            "candidate g": torch.tanh(g), "output gate o": torch.sigmoid(o)}


@torch.no_grad()
def inspect_run(run_dir: str | Path, index: int = 0, *, log: Log = print) -> list[Path]:
    """Heatmaps of states (and LSTM gates) over time for test input ``index``; one PNG per layer in the run dir."""
    from rnnkit import app, plots

    run_dir = Path(run_dir)
    cfg, model, _ = app.load_run(run_dir)
    model.eval()
    image = None
    if cfg.task == "mnist":
        data = app.load_data(cfg, log)
        _check_index(index, len(data.y_test))
        x = data.x_test[index : index + 1]
        if getattr(model, "frontend", None) is not None:
            raise ConfigError("inspect: models with a CNN front end are not supported")
        pred = int(model(x).argmax(-1))
        image = data.test_images[index] if cfg.data.view == "rows" else None
        what = f"test image {index} (label {int(data.y_test[index])}, predicted {pred})"
        rnn = model.rnn
        if model.projection is not None:
            x = model.projection(x)
    elif cfg.task in STREAM_TASKS:
        s = cfg.synthetic
        _check_index(index, s.test_streams)
        x, _ = _stream(cfg, TEST, s.test_streams).sequence(0, s.test_length)
        x = x[index : index + 1]
        net = model.net  # type: ignore[union-attr]
        what = f"test stream {index}, {x.shape[1]} steps from the zero state"
        rnn = net.rnn
        if net.projection is not None:
            x = net.projection(x)
    else:
        words = word_pairs(cfg)[1]
        _check_index(index, len(words))
        word = words[index][0]
        seq2seq = model.seq2seq  # type: ignore[union-attr]
        src, _ = Vocab.characters().pad([word])
        got = Vocab.characters().decode(seq2seq.greedy_decode(src)[0])
        what = f"encoder reading held-out word {index} {word!r} (decoded {got!r})"
        x, rnn = seq2seq.src_embed(src), seq2seq.encoder
    traces = state_traces(rnn, x)
    paths = []
    directions = 2 if getattr(rnn, "bidirectional", False) else 1
    for k, trace in enumerate(traces):
        layer, reverse = divmod(k, directions)
        part = "" if len(traces) == 1 else f"-layer{layer}" + ("-reverse" if reverse else "")
        name = f"states-{index}{part}.png"
        title = f"{cfg.recipe}: {what}" + (f", layer {layer}" if len(traces) > 1 else "")
        title += ", reverse direction" if reverse else ""
        paths.append(plots.plot_state_heatmaps(trace, run_dir / name, image=image, title=title))
    return paths


def _check_index(index: int, size: int) -> None:
    if not 0 <= index < size:
        raise ConfigError(f"inspect: --index {index} is out of range; the test set has {size} inputs (0-{size - 1})")
