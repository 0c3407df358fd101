"""The main job, as functions: train a recipe into a run directory, evaluate or predict from one.

MNIST runs are handled here; runs of the other tasks (``cfg.task``: sin-cos, echo, sort-letters)
are handed to :mod:`rnnkit.tasks`, which writes the same layout with its own figure.

A run directory holds everything needed to reproduce and use the run, and nothing else::

    runs/NAME-YYYYmmdd-HHMMSS/
        config.toml          the resolved RunConfig (rnnkit train --config it to reproduce the run)
        metrics.jsonl        train records every log_every steps, eval records each evaluation
        tensorboard/         event files (tensorboard --logdir runs)
        checkpoints/         ckpt-STEP.safetensors: full training state, for --resume
        model.safetensors    final weights (the averaged ones when EMA is on) + JSON metadata
        curves.png           loss and accuracy against steps, train and test
        predictions.png      a grid of test digits with predicted and true labels, wrong ones marked
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.config import dump_toml, from_dict, load_toml
from rnnkit.errors import CheckpointError, ConfigError
from rnnkit.recipes import RunConfig
from rnnkit.train import distributed
from rnnkit.train.batching import Batches
from rnnkit.train.callbacks import Checkpointer, MetricsLogger, ProgressBar, TensorBoardLogger, TimeToTarget
from rnnkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rnnkit.train.optim import make_optimizer, make_schedule
from rnnkit.train.trainer import Trainer, classification_metrics

__all__ = ["RunSummary", "train", "evaluate_run", "predict_run", "load_run", "build_model", "load_data"]

Log = Callable[[str], Any]


@dataclass
class Dataset:
    """Tensors ready for training: sequences (N, T, F) and labels, plus the raw test images."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    test_images: np.ndarray
    num_classes: int
    source: str


@dataclass
class RunSummary:
    """What a training run produced."""

    run_dir: Path
    test_accuracy: float
    test_loss: float
    train_seconds: float
    steps: int
    seconds_to_target: float | None
    interrupted: bool
    headline: str = ""  # the final line to print, when the task's figure is not an accuracy
    eval_seconds: float = 0.0  # the part of train_seconds spent evaluating during training
    main: bool = True  # False in torchrun's processes other than rank 0, which report nothing


def _run_device(cfg: RunConfig) -> torch.device:
    """Where to evaluate a saved run: the device it trained on when this machine has it, else auto's."""
    try:
        return resolve_device(cfg.train.device)
    except ConfigError:
        return resolve_device("auto")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; anything else must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device {name!r} is not a device name (use auto, cpu, cuda, cuda:1)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use --device cpu or auto")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally insist on deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def load_data(cfg: RunConfig, log: Log = print) -> Dataset:
    """Load the configured MNIST-layout data and turn it into sequences of the configured view."""
    from rnnkit.data.mnist import load_embedded_mnist, load_mnist, to_sequences

    d = cfg.data
    if d.dataset == "embedded":
        data = load_embedded_mnist()
    else:
        data = load_mnist(d.data_dir, dataset=d.dataset, download=d.download, log=log)
    train_images, train_labels = data.train_images, data.train_labels
    test_images, test_labels = data.test_images, data.test_labels
    if d.train_limit:
        train_images, train_labels = train_images[: d.train_limit], train_labels[: d.train_limit]
    if d.test_limit:
        test_images, test_labels = test_images[: d.test_limit], test_labels[: d.test_limit]

    def seq(images: np.ndarray) -> Tensor:
        return to_sequences(images, d.view, normalize=d.normalize, permutation_seed=d.permutation_seed)

    source = data.source
    if d.train_limit or d.test_limit:
        source += f"; using {len(train_labels):,} train / {len(test_labels):,} test images"
    return Dataset(
        seq(train_images), torch.as_tensor(train_labels), seq(test_images), torch.as_tensor(test_labels),
        test_images, data.num_classes, source,
    )


def _cell_factory(name: str) -> Any:
    """lstm/gru/rnn, or a user's cell class named by a dotted path (imported, never eval'd)."""
    if name in ("lstm", "gru", "rnn"):
        return name
    module_name, _, attr = name.rpartition(".")
    # the current directory too, so `--cell mycells.MyCell` finds ./mycells.py (last: a file there
    # must not shadow the packages rnnkit itself imports later)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"--cell {name!r}: cannot import {attr!r} from {module_name!r} ({e}); give lstm, gru, rnn or "
            f"a dotted path to a cell class importable from the current directory or PYTHONPATH"
        ) from e
    not_a_cell = isinstance(found, type) and not issubclass(found, nn.Module)
    if not_a_cell or inspect.isbuiltin(found) or not callable(found):
        raise ConfigError(f"--cell {name!r} is a {type(found).__name__}, not a cell class (an nn.Module subclass "
                          "with init_state() and forward(x, state)) or a function making one; give lstm, gru, "
                          "rnn or such a class")
    return found


def build_model(cfg: RunConfig, input_size: int, num_classes: int) -> nn.Module:
    """The sequence classifier that ``cfg.model`` describes."""
    from rnnkit.models import SequenceClassifier

    m = cfg.model
    return SequenceClassifier(
        input_size, num_classes, hidden_size=m.hidden, num_layers=m.layers, cell=_cell_factory(m.cell),
        bidirectional=m.bidirectional, readout=m.readout, k=m.k, input_projection=m.input_projection,
        dropout=m.dropout, forget_bias=m.forget_bias, init=m.init, chrono_t_max=m.chrono_t_max,
        head_init=m.head_init, backend=m.backend,
    )


def build_trainer(
    cfg: RunConfig,
    model: nn.Module,
    device: torch.device,
    callbacks: list,
    train_size: int = 60_000,
    *,
    metrics: Callable[[Any, Tensor], dict[str, float]] | None = classification_metrics,
) -> Trainer:
    """Optimiser, schedule and trainer from ``cfg.optim`` (``train_size`` sets the length of cosine/1cycle)."""
    o = cfg.optim
    optimizer = make_optimizer(o.name, model.parameters(), o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    schedule = None
    if o.schedule != "constant" or o.warmup_steps:
        kwargs: dict[str, Any] = {"lr": o.lr}
        if o.schedule == "exponential":
            kwargs.update(decay_rate=o.decay_rate, decay_steps=o.decay_steps, staircase=o.staircase)
        elif o.schedule == "step":
            kwargs.update(step_size=o.step_size, gamma=o.gamma)
        elif o.schedule == "cosine":
            kwargs.update(total_steps=_total_steps(cfg, train_size), min_lr=o.min_lr)
        elif o.schedule == "one_cycle":  # optim.lr is the peak rate
            kwargs = {"max_lr": o.lr, "total_steps": _total_steps(cfg, train_size)}
        schedule = make_schedule(o.schedule, warmup_steps=o.warmup_steps, **kwargs)
    return Trainer(
        model, optimizer, schedule=schedule, clip_norm=o.clip_norm, clip_value=o.clip_value, l1=o.l1, l2=o.l2,
        ema_decay=o.ema, accumulate=o.accumulate, bf16=cfg.train.bf16, callbacks=callbacks, device=device,
        metrics=metrics, tune_allocator=cfg.train.tune_allocator,
    )


def _total_steps(cfg: RunConfig, train_size: int = 60_000) -> int:
    """Optimiser steps of the run: train.steps, else epochs over the data, at least train.min_steps."""
    t = cfg.train
    if t.steps is not None:
        return t.steps
    return max(t.epochs * -(-train_size // t.batch_size), t.min_steps or 0)


def _new_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.train.out) / f"{cfg.train.name or cfg.recipe}-{stamp}"
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:  # another run started in the same second (or a file has the name)
            if path.is_file() or not base.parent.is_dir():
                raise ConfigError(f"train.out {cfg.train.out!r} is not a directory; give --out a directory") from None
            path, i = Path(f"{base}-{i}"), i + 1
        except OSError as e:
            raise ConfigError(f"train.out {cfg.train.out!r}: cannot create a run directory there "
                              f"({e.strerror}); give --out a writable directory") from e


def train(
    cfg: RunConfig, *, resume_dir: str | Path | None = None, log: Log = print, start_time: float | None = None
) -> RunSummary:
    """Train ``cfg`` into a new run directory (or continue ``resume_dir``); returns a summary."""
    if cfg.task != "mnist":
        from rnnkit import tasks

        if distributed.world_size() > 1:  # each process would train a copy of its own into a run of its own
            raise ConfigError(f"task {cfg.task} does not train data-parallel; run it as one process "
                              f"(rnnkit train {cfg.recipe}), not under torchrun with several")
        return tasks.train(cfg, resume_dir=resume_dir, log=log, start_time=start_time)
    start = start_time if start_time is not None else time.perf_counter()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    dist, device = distributed.setup(resolve_device(t.device))
    try:
        return _train_mnist(cfg, dist, device, resume_dir, log, start)
    finally:
        distributed.cleanup(dist)


def _train_mnist(
    cfg: RunConfig, dist: distributed.Dist | None, device: torch.device, resume_dir: str | Path | None, log: Log,
    start: float,
) -> RunSummary:
    t = cfg.train
    main = dist is None or dist.is_main
    if not main:
        log = _quiet  # only rank 0 speaks and writes
    resume_from = None
    if resume_dir:  # before anything is loaded or written: a failed --resume leaves the directory as it was
        resume_from = latest_checkpoint(Path(resume_dir) / "checkpoints")
        if resume_from is None:
            raise CheckpointError(f"--resume {resume_dir}: no checkpoints in {Path(resume_dir) / 'checkpoints'}")
    seed_everything(t.seed, t.deterministic)
    data = load_data(cfg, log)
    log(f"data: {data.source}")
    model = build_model(cfg, data.x_train.shape[-1], data.num_classes).to(device)
    config_text = dump_toml(cfg)
    if not main:
        return _train_worker(cfg, dist, device, model, data, resume_from)
    if device.type == "cuda":  # the whole set fits: skip the host-to-device copy per batch
        data.x_train, data.y_train = data.x_train.to(device), data.y_train.to(device)
    batches = _batches(cfg, dist, data)
    total = _total_steps(cfg, len(data.y_train))
    # the optimiser, schedule and checkpoint are checked before anything is written: a failed
    # --resume leaves its run directory as it was, a bad setting leaves no empty one behind
    trainer = build_trainer(cfg, distributed.wrap(model, dist, device), device, [], train_size=len(data.y_train))
    run_dir = open_run(cfg, trainer, batches, resume_dir, resume_from, config_text, log)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.model.cell.upper()} {cfg.model.hidden}x{cfg.model.layers}, {n_params:,} parameters on {device}")
    if "." in cfg.model.cell and cfg.model.backend == "auto" and device.type == "cpu":
        from rnnkit.backends.compiled import AUTO_MIN_STEPS

        if data.x_train.shape[1] < AUTO_MIN_STEPS:  # longer sequences are traced or compiled by default
            log("your cell runs in rnnkit's reference loop at this sequence length; --backend traced runs it in "
                "rnnkit's C++ loops (products and elementwise maths only), --backend compiled compiles any cell")

    target = TimeToTarget(t.target_accuracy, start) if t.target_accuracy else None
    tb = TensorBoardLogger(run_dir / "tensorboard", t.log_every, config_text=config_text,
                          purge_step=trainer.step + 1 if resume_from else None)
    ckpt = Checkpointer(run_dir / "checkpoints", every=t.checkpoint_every, keep_last=t.keep_last,
                        meta={"config": config_text})
    metrics = MetricsLogger(run_dir / "metrics.jsonl", t.log_every, after=trainer.step if resume_from else None)
    trainer.callbacks = [ProgressBar(total, enabled=t.progress), metrics, tb, ckpt]
    if target:
        trainer.callbacks.append(target)
    if dist is not None:
        log(f"distributed: {dist.world_size} processes, {batches.batch_size} examples each per step")

    t0 = time.perf_counter()
    history = trainer.fit(batches, (data.x_test, data.y_test), steps=total, eval_every=t.eval_every,
                          eval_batch_size=t.eval_batch_size)
    seconds = time.perf_counter() - t0
    interrupted = bool(trainer.stop_requested and trainer.stop_requested.startswith("signal"))
    final = history[-1] if history else trainer.evaluate(data.x_test, data.y_test)
    _save_model(run_dir, trainer, cfg, data, final, config_text)
    _write_plots(run_dir, trainer, data, tb, log)
    tb.close()
    if interrupted:
        log(f"interrupted ({trainer.stop_requested}) at step {trainer.step}; checkpoint saved. "
            f"Continue with: rnnkit train --resume {run_dir}")
    _print_predictions(trainer, data, log)
    if target is not None:
        if target.seconds is not None:
            log(f"reached {100 * target.target:.1f}% test accuracy after {target.seconds:.1f} s at step {target.step}")
        else:
            log(f"did not reach {100 * target.target:.1f}% test accuracy")
    return RunSummary(run_dir, final.get("accuracy", float("nan")), final["loss"], seconds, trainer.step,
                      target.seconds if target else None, interrupted, eval_seconds=trainer.eval_seconds)


def open_run(cfg: RunConfig, trainer: Trainer, batches: Any, resume_dir: str | Path | None,
             resume_from: Path | None, config_text: str, log: Log) -> Path:
    """Restore a resumed run into ``trainer``, then (only then: a failed resume writes nothing) open
    the run directory and write its config.toml."""
    if resume_from is not None:
        _check_unchanged(cfg, resume_from, resume_dir)
        _restore_run(trainer, resume_from, batches, resume_dir)
    run_dir = Path(resume_dir) if resume_dir else _new_run_dir(cfg)
    (run_dir / "config.toml").write_text(config_text, encoding="utf-8")
    log(f"run directory: {run_dir}")
    if resume_from is not None:
        log(f"resumed from {resume_from} at step {trainer.step}")
    return run_dir


# model.backend only chooses how the same weights are computed (another machine may want another)
_MAY_CHANGE = {"model.backend"}
_SYNTHETIC_MODEL = ("embed", "attention")  # the parts of [synthetic] that shape sort-letters' model


def _check_unchanged(cfg: RunConfig, checkpoint: Path, run_dir: str | Path | None) -> None:
    """``--resume`` goes on with the model and optimiser the run trained: a change of them is refused.

    Compared with the configuration saved in the checkpoint; [train] and [data] may change. Checkpoints
    of older versions, which carry no configuration, resume unchecked.
    """
    from rnnkit.train.checkpoint import read_meta

    embedded = read_meta(checkpoint).get("config")
    if not isinstance(embedded, str):
        return
    saved = _config_from_text(embedded, checkpoint)
    pairs = [(f"{section}.{key}", value, getattr(getattr(cfg, section), key))
             for section in ("model", "optim") for key, value in dataclasses.asdict(getattr(saved, section)).items()]
    pairs += [(f"synthetic.{key}", getattr(saved.synthetic, key), getattr(cfg.synthetic, key))
              for key in _SYNTHETIC_MODEL if cfg.task == "sort-letters"]
    changed = [f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in pairs
               if old != new and key not in _MAY_CHANGE]
    if changed:
        raise CheckpointError(
            f"--resume {run_dir}: the run was trained with other settings ({', '.join(changed)}); resume without "
            f"changing them, or start a new run with the new ones (rnnkit train --config "
            f"{Path(run_dir or '') / 'config.toml'} --set ...)"
        )


def _shown(value: Any) -> str:
    """A setting as it is written on the command line (--set key=VALUE)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _config_from_text(text: str, path: Path) -> RunConfig:
    """The RunConfig saved as TOML text in a checkpoint's or model file's metadata."""
    from rnnkit.config import parse_toml

    try:
        return from_dict(RunConfig, parse_toml(text, "its configuration"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its embedded configuration does not load here ({e})") from e


def _restore_run(trainer: Trainer, checkpoint: Path, batches: Any, run_dir: str | Path | None) -> None:
    """``trainer.restore`` for ``--resume``: a checkpoint that does not fit is one line naming the fix."""
    try:
        trainer.restore(checkpoint, batches)
    except CheckpointError as e:
        if e.brief is None:
            raise  # already one line for a command-line user
        raise CheckpointError(f"--resume {run_dir}: {e.brief}; resume with the settings the run was trained "
                              "with (its config.toml), without model or optimiser changes") from e


def _quiet(message: str) -> None:
    """Logging of the processes other than rank 0."""


def _batches(cfg: RunConfig, dist: distributed.Dist | None, data: Dataset) -> Batches:
    """This process's batches: its share of every global batch of the epoch's order."""
    t = cfg.train
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    return Batches(data.x_train, data.y_train, distributed.split_batch(t.batch_size, dist), seed=t.seed,
                   rank=rank, world_size=world)


def _train_worker(
    cfg: RunConfig, dist: distributed.Dist, device: torch.device, model: nn.Module, data: Dataset,
    resume_from: Path | None,
) -> RunSummary:
    """A process other than rank 0: the same steps (DDP averages the gradients), no files, no output."""
    t = cfg.train
    trainer = build_trainer(cfg, distributed.wrap(model, dist, device), device, [], train_size=len(data.y_train))
    batches = _batches(cfg, dist, data)
    if resume_from is not None:
        trainer.restore(resume_from, batches)
    history = trainer.fit(batches, (data.x_test, data.y_test),
                          steps=_total_steps(cfg, len(data.y_train)), eval_every=t.eval_every,
                          eval_batch_size=t.eval_batch_size)
    # (a resumed run with nothing left to train: evaluated as rank 0 does)
    final = history[-1] if history else trainer.evaluate(data.x_test, data.y_test)
    return RunSummary(Path(), final.get("accuracy", float("nan")), final["loss"], 0.0, trainer.step, None, False,
                      main=False)


def _final_weights(trainer: Trainer) -> dict[str, Tensor]:
    """The weights model.safetensors holds: the averaged ones when EMA is on, copied to the CPU."""
    with trainer._averaged():
        # a copy even on the CPU, where .cpu() returns the very tensors that the swap back then overwrites
        return {k: v.detach().to("cpu", copy=True) for k, v in trainer.module.state_dict().items()}


def _save_model(run_dir: Path, trainer: Trainer, cfg: RunConfig, data: Dataset, final: dict, config_text: str) -> None:
    tensors = _final_weights(trainer)
    meta = {"kind": "rnnkit-model", "config": config_text, "input_size": int(data.x_train.shape[-1]),
            "num_classes": data.num_classes, "step": trainer.step,
            "test": {k: v for k, v in final.items() if not k.startswith("accuracy_class_")}}
    save_checkpoint(run_dir / "model.safetensors", tensors, meta)


def _write_plots(run_dir: Path, trainer: Trainer, data: Dataset, tb: TensorBoardLogger, log: Log) -> None:
    import json

    from rnnkit import plots

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plots.plot_curves(records, run_dir / "curves.png")
    n = min(20, len(data.y_test))
    pred = trainer.predict(data.x_test[:n]).argmax(-1).tolist()
    path = plots.plot_predictions(data.test_images[:n], pred, data.y_test[:n].tolist(), run_dir / "predictions.png")
    tb.add_image("test/predictions", path, trainer.step)


def _print_predictions(trainer: Trainer, data: Dataset, log: Log, n: int = 10) -> None:
    pred = trainer.predict(data.x_test[:n]).argmax(-1).tolist()
    true = data.y_test[:n].tolist()
    log("predicted: " + " ".join(str(p) for p in pred))
    log("true:      " + " ".join(str(t) for t in true))


# -- using a finished run -------------------------------------------------------------------------
def load_run(run_dir: str | Path) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """The config and the trained model of a run directory (no code from the files is run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; give a run directory written by `rnnkit train`")
    model_path = run_dir / "model.safetensors"
    if not model_path.exists():
        raise CheckpointError(
            f"{run_dir} has no model.safetensors (was the run interrupted before its end? "
            f"continue it with `rnnkit train --resume {run_dir}`)"
        )
    tensors, meta = load_checkpoint(model_path)
    if meta.get("kind") != "rnnkit-model":
        raise CheckpointError(f"{model_path} is not an rnnkit model file (no rnnkit-model metadata)")
    # The model the weights belong to is described by the configuration saved with them; where the
    # data are and what machine to use come from config.toml, which the user may have edited for this
    # machine (and which also serves runs whose model file carries no configuration).
    embedded = meta.get("config")
    if isinstance(embedded, str):
        cfg = _config_from_text(embedded, model_path)
        if (run_dir / "config.toml").exists():  # else the saved configuration alone; an edit that does
            data = load_toml(run_dir / "config.toml")  # not load is an error to see (its errors name it)
            try:
                local = from_dict(RunConfig, data)
            except ConfigError as e:
                raise ConfigError(f"{run_dir / 'config.toml'}: {e}") from None
            cfg = dataclasses.replace(cfg, data=local.data, train=local.train)
    else:
        cfg = from_dict(RunConfig, load_toml(run_dir / "config.toml"))
    if cfg.task != "mnist":
        from rnnkit import tasks

        model = tasks.build_model(cfg)
    else:
        try:
            sizes = int(meta["input_size"]), int(meta["num_classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{model_path}: its input_size/num_classes metadata is damaged ({e})") from e
        model = build_model(cfg, *sizes)
    from rnnkit.train.checkpoint import load_into

    load_into(model, tensors, strict=True, name=str(model_path))
    return cfg, model, meta


def evaluate_run(run_dir: str | Path, *, data_dir: str | None = None, log: Log = print) -> dict[str, Any]:
    """Evaluate a run's final model on its test set: loss, accuracy, per class (MNIST) or the task's figures."""
    cfg, model, meta = load_run(run_dir)
    if cfg.task != "mnist":
        from rnnkit import tasks

        if data_dir is not None:
            raise ConfigError(f"--data-dir applies to MNIST runs; task {cfg.task} makes its own test data")
        return tasks.evaluate_run(run_dir, log=log)
    if data_dir is not None:  # the run's own kind of data (MNIST, checksums included, or any IDX set)
        kind = "idx" if cfg.data.dataset == "idx" else "mnist"
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir, dataset=kind))
    data = load_data(cfg, log)
    log(f"data: {data.source}")
    classes = int(meta["num_classes"]) if "num_classes" in meta else None
    if classes is not None and len(data.y_test) and int(data.y_test.max()) >= classes:
        raise ConfigError(f"the test labels go up to {int(data.y_test.max())} but the run's model has {classes} "
                          "classes; evaluate it on data with the labels it was trained on")
    device = _run_device(cfg)
    trainer = Trainer(model.to(device), torch.optim.SGD(model.parameters(), lr=0.0), device=device)
    return trainer.evaluate(data.x_test, data.y_test, batch_size=cfg.train.eval_batch_size)


def predict_run(
    run_dir: str | Path, n: int = 10, *, words: list[str] | None = None, beam: int = 1, log: Log = print
) -> Any:
    """MNIST: predicted and true labels (and class probabilities) of the first ``n`` test images.

    Other tasks: printable lines (:func:`rnnkit.tasks.predict_run`): ``words`` sorted (sort-letters,
    greedy or ``beam`` > 1), or the first ``n`` steps of a test stream.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"predict: --n must be a positive number of examples or steps, got {n!r}")
    cfg, model, _ = load_run(run_dir)
    if cfg.task != "mnist":
        from rnnkit import tasks

        return tasks.predict_run(run_dir, words, n=n, beam=beam, log=log)
    if words:
        raise ConfigError("rnnkit predict: an MNIST run takes no words; use --n N for the first N test images")
    data = load_data(cfg, log)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(data.x_test[:n]), dim=-1)
    return probs.argmax(-1).tolist(), data.y_test[:n].tolist(), probs


@dataclass
class LRFindResult:
    """A learning-rate range test: rates tried, smoothed losses, the suggestion and the plot."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    plot: Path


def lr_find(
    cfg: RunConfig, *, start: float = 1e-7, factor: float = 1.05, max_steps: int = 400, out: str | Path | None = None,
    log: Log = print,
) -> LRFindResult:
    """Seed 003's range test: raise the rate by ``factor`` each step from ``start``; suggest the steepest descent.

    Training stops early once the smoothed loss exceeds four times its best (the rate is too high).
    The suggestion is the rate where the smoothed loss falls fastest against log(rate).
    """
    if not (start > 0 and factor > 1 and max_steps >= 10):
        raise ConfigError(
            f"lr-find needs start > 0, factor > 1 and at least 10 steps; got {start}, {factor}, {max_steps}"
        )
    if cfg.task != "mnist":
        raise ConfigError(f"lr-find runs MNIST classifiers; recipe {cfg.recipe!r} is the {cfg.task} task, which "
                          "it does not cover yet: give an MNIST recipe (rnnkit recipes lists them)")
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    seed_everything(t.seed, t.deterministic)
    data = load_data(cfg, log)
    log(f"data: {data.source}")
    model = build_model(cfg, data.x_train.shape[-1], data.num_classes).to(device)
    trainer = build_trainer(cfg, model, device, [], train_size=len(data.y_train))
    step = {"i": 0}
    trainer.schedule = lambda _: start * factor ** step["i"]  # the range test owns the rate
    batches = Batches(data.x_train, data.y_train, t.batch_size, seed=t.seed)
    lrs, losses, smooth, best, done = [], [], 0.0, float("inf"), False
    while not done:
        for x, y in batches.epoch_batches():
            loss = trainer.train_step(x, y)["loss"]
            lrs.append(trainer.schedule(step["i"]))
            # Debiased exponential average, as fast.ai's range test does: single batches are too noisy.
            smooth = 0.9 * smooth + 0.1 * loss
            value = smooth / (1 - 0.9 ** (step["i"] + 1))
            losses.append(value)
            best = min(best, value)
            step["i"] += 1
            done = step["i"] >= max_steps or not math.isfinite(value) or value > 4 * best
            if done:
                break
    suggestion = _steepest(lrs, losses)
    from rnnkit import plots

    where = Path(out or t.out)
    where.mkdir(parents=True, exist_ok=True)
    path = plots.plot_lr_find(lrs, losses, where / f"lr_find-{cfg.recipe}.png", suggestion=suggestion)
    return LRFindResult(lrs, losses, suggestion, path)


def _steepest(lrs: list[float], losses: list[float]) -> float:
    """The rate at which the loss falls fastest per unit of log(rate), ignoring the diverged tail."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    if len(finite) < 3:
        raise ConfigError("lr-find: the loss diverged at once; lower the start rate (--start)")
    best_i = min(range(len(finite)), key=lambda i: finite[i][1])
    usable = finite[: max(best_i + 1, 3)]
    slopes = [
        (usable[i + 1][1] - usable[i - 1][1]) / (math.log(usable[i + 1][0]) - math.log(usable[i - 1][0]))
        for i in range(1, len(usable) - 1)
    ]
    return usable[1 + min(range(len(slopes)), key=slopes.__getitem__)][0]
