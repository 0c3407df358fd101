"""Named, typed run configurations: the default MNIST-rows LSTM and the seeds' experiments.

A run is described by one :class:`RunConfig` (data, model, optimiser, training). A recipe is a
name plus overrides of the defaults, the figure its source reported, and the figure we last
measured (with where and when). ``rnnkit recipes`` prints them; ``rnnkit train RECIPE`` runs one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from rnnkit.config import from_dict, to_dict
from rnnkit.errors import ConfigError

__all__ = [
    "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "SyntheticConfig", "RunConfig", "Recipe", "RECIPES",
    "recipe_config",
]

Task = Literal["mnist", "sin-cos", "echo", "sort-letters"]


@dataclass
class DataConfig:
    """Where the data come from and how images become sequences."""

    dataset: Literal["mnist", "idx", "embedded"] = "mnist"
    data_dir: str | None = None
    view: Literal["rows", "pixels", "permuted"] = "rows"
    normalize: bool = True
    permutation_seed: int = 0
    download: bool = True
    train_limit: int | None = None  # use only the first N training images (seed 000's 1,800)
    test_limit: int | None = None

    def validate(self) -> None:
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"data.{name} must be positive or unset, got {v}")
        _check_seed("data.permutation_seed", self.permutation_seed)


def _check_seed(key: str, value: int) -> None:
    if not -(2**63) <= value < 2**64:  # what torch's generators take
        raise ConfigError(f"{key} must be in [-2**63, 2**64), got {value}")


def _check_dir_part(key: str, value: str, *, empty: bool) -> None:
    if (not value and not empty) or re.search(r"[/\\]", value) or value.startswith("."):
        raise ConfigError(f"{key} is part of a directory name: no slashes, no leading dot; got {value!r}")


_MOST_UNITS = 1 << 16  # an LSTM layer of 2**16 units holds 64 GiB of recurrent weights alone


@dataclass
class ModelConfig:
    """The sequence classifier: cell, size, readout and initialisation."""

    cell: str = "lstm"  # lstm, gru, rnn, or a dotted path to a cell class (module.Class)
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    readout: Literal["last", "last_k", "mean", "attention"] = "last"
    k: int = 3
    input_projection: int | None = None
    dropout: float = 0.0
    forget_bias: float = 0.0
    init: Literal["torch", "keras", "chrono"] = "keras"  # chrono: keras + Tallec & Ollivier's gate biases
    chrono_t_max: int | None = None  # the longest dependency chrono init aims at (the sequence length)
    head_init: Literal["default", "normal"] = "default"  # normal: N(0, 1) readout, as the TF1 tutorials
    backend: str = "auto"  # unroll backend; "traced" or "compiled" for a custom cell (see rnnkit.backends)

    def validate(self) -> None:
        for name in ("hidden", "layers", "k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name, most in (("hidden", _MOST_UNITS), ("input_projection", _MOST_UNITS), ("layers", 1024)):
            if (getattr(self, name) or 0) > most:  # a clear error, not torch's failed allocation of it
                raise ConfigError(f"model.{name} must be at most {most:,}, got {getattr(self, name):,}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.input_projection is not None and self.input_projection <= 0:
            raise ConfigError(f"model.input_projection must be positive or unset, got {self.input_projection}")
        from rnnkit.engine import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.cell not in ("lstm", "gru", "rnn") and "." not in self.cell:
            raise ConfigError(
                f"model.cell must be lstm, gru, rnn or a dotted path to a cell class (pkg.module.Class), "
                f"got {self.cell!r}"
            )


@dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule, clipping, penalties and weight averaging."""

    name: Literal["adam", "adamw", "sgd", "adagrad", "rmsprop"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["constant", "exponential", "step", "cosine", "one_cycle"] = "constant"
    decay_rate: float = 0.96
    decay_steps: int = 1000
    staircase: bool = False
    step_size: int = 1000
    gamma: float = 0.1
    min_lr: float = 0.0
    warmup_steps: int = 0
    clip_norm: float | None = None
    clip_value: float | None = None
    l1: float = 0.0
    l2: float = 0.0
    ema: float = 0.0  # decay of the weights' moving average used for evaluation; 0 = off
    accumulate: int = 1

    def validate(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"optim.lr must be positive and finite, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"optim.ema must be in [0, 1), got {self.ema}")
        if self.accumulate < 1:
            raise ConfigError(f"optim.accumulate must be >= 1, got {self.accumulate}")
        for name in ("clip_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"optim.{name} must be positive (or none for no clipping), got {value}")
        for name in ("decay_steps", "step_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "min_lr", "warmup_steps", "l1", "l2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must not be negative, got {getattr(self, name)}")
        if not self.decay_rate > 0 or not self.gamma > 0:
            raise ConfigError(f"optim.decay_rate and optim.gamma must be positive, got {self.decay_rate} "
                              f"and {self.gamma}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")


@dataclass
class TrainConfig:
    """Length of training, evaluation, logging, checkpoints and the machine."""

    batch_size: int = 128
    epochs: int | None = 3
    steps: int | None = None  # when set, overrides epochs
    min_steps: int | None = None  # train at least this many steps: small data sets get too few from epochs
    eval_every: int | None = None  # steps between test evaluations; unset = once per epoch
    eval_batch_size: int = 1000
    seed: int = 0
    device: str = "auto"  # auto picks CUDA when present
    threads: int | None = None
    tune_allocator: bool = True  # CPU: glibc malloc keeps freed memory during fit (rnnkit.allocator)
    deterministic: bool = False
    bf16: bool = False  # bfloat16 autocast: on CUDA, or on a CPU with bf16 instructions (AVX512_BF16, AMX)
    out: str = "runs"
    name: str = ""
    log_every: int = 50
    checkpoint_every: int | None = None  # steps; checkpoints are always written each epoch and at the end
    keep_last: int = 3
    progress: bool = True
    target_accuracy: float | None = None  # report the wall time when test accuracy first reaches this

    def validate(self) -> None:
        _check_seed("train.seed", self.seed)
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size must be positive, got {self.batch_size}")
        if self.steps is None and (self.epochs is None or self.epochs <= 0):
            raise ConfigError("train.epochs must be positive (or set train.steps)")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"train.steps must be positive, got {self.steps}")
        for name in ("eval_batch_size", "log_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "threads", "min_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:  # 0, like none, means the default
                raise ConfigError(f"train.{name} must be positive, or 0 or none for the default, got {value}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"train.target_accuracy is a fraction in (0, 1], like 0.98; got {self.target_accuracy}")
        _check_dir_part("train.name", self.name, empty=True)
        if self.device != "auto" and not re.fullmatch(r"(cpu|cuda)(:\d+)?", self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class SyntheticConfig:
    """The synthetic tasks' data: streams (sin-cos, echo) and random words (sort-letters); MNIST ignores it."""

    # sin-cos and echo: B = train.batch_size parallel streams, cut into windows for truncated backprop
    window: int = 20  # steps per window: the truncated-backprop length
    stream_length: int = 4000  # steps of each training stream; one stream per epoch, state reset between them
    echo_step: int = 3  # echo: the target is the input this many steps earlier
    test_streams: int = 100
    test_length: int = 400  # steps of each test stream, read from the zero state in one piece
    # sort-letters: random lowercase words of min_len..max_len letters; test words never occur in training
    train_words: int = 10_000
    test_words: int = 1_000
    min_len: int = 1
    max_len: int = 8
    embed: int = 15  # embedding width of the encoder's and the decoder's tokens
    attention: Literal["none", "bahdanau", "luong"] = "none"

    def validate(self) -> None:
        for name in ("window", "stream_length", "test_streams", "test_length", "train_words", "test_words",
                     "min_len", "max_len", "embed"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"synthetic.{name} must be positive, got {getattr(self, name)}")
        if self.echo_step < 0:
            raise ConfigError(f"synthetic.echo_step must be >= 0, got {self.echo_step}")
        if self.stream_length < self.window:
            raise ConfigError(
                f"synthetic.stream_length ({self.stream_length}) must hold at least one window ({self.window})"
            )
        if self.min_len > self.max_len:
            raise ConfigError(f"synthetic.min_len ({self.min_len}) must not exceed max_len ({self.max_len})")


@dataclass
class RunConfig:
    """Everything that defines a run; saved as config.toml in its directory."""

    recipe: str = "mnist-rows"
    task: Task = "mnist"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        _check_dir_part("recipe", self.recipe, empty=False)  # it names the run's directory when train.name does not


@dataclass(frozen=True)
class Recipe:
    """A named configuration, its source, the figure the source reported and ours."""

    name: str
    source: str
    description: str
    overrides: dict[str, Any]
    reported: str = "-"
    measured: str = "not yet measured"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "mnist-rows",
            "rnnkit default",
            "LSTM 128 over the 28 rows of each digit, last output -> Linear; Keras init, batch 256, "
            "Adam one-cycle (peak 6e-3), clipping 1.0, 3 epochs (at least 400 steps)",
            {
                "optim": {"lr": 6e-3, "schedule": "one_cycle", "clip_norm": 1.0},
                "train": {
                    "epochs": 3, "min_steps": 400, "batch_size": 256, "eval_every": 118, "target_accuracy": 0.98,
                },
            },
            reported="target: 98.5% (98% in < 60 s on 2 CPU cores)",
            measured="98.50% (seed 0; seeds 0-2: 98.50-98.62%), 98% reached after 11.8-13.6 s wall (a plain "
                     "PyTorch loop: 36-56 s); full MNIST, AMD EPYC (Zen 5) 2 cores, 2026-12-01",
        ),
        Recipe(
            "seed000",
            "seed 000 (custom LSTM cell, mini-MNIST)",
            "the first 1,800 training images, 128 units, last 3 outputs concatenated, Adam 0.01, 10 epochs of "
            "batch 64; tested on the whole test set (the seed used 200 images). The seed's cell is an LSTM with "
            "one bias per gate, which LSTMCell computes; examples/custom_cell.py writes it out as a user cell",
            {
                "data": {"train_limit": 1800},
                "model": {"readout": "last_k", "k": 3, "init": "keras"},
                "optim": {"lr": 0.01},
                "train": {"epochs": 10, "batch_size": 64},
            },
            reported="~90% (200 test images)",
            measured="91.00% on the full test set (1,800 real training images); 94.30% on the embedded "
                     "1,000-image test set; AMD EPYC 2 cores, 2026-11-23",
        ),
        Recipe(
            "seed002",
            "seed 002 (BasicLSTMCell, forget_bias 1)",
            "LSTM 128, forget bias 1, batch 128, Adam 0.001, 800 steps; the seed's N(0, 1) readout "
            "(tf.random_normal), Glorot/orthogonal LSTM weights, evaluated with an EMA (0.99) of the weights",
            {
                "model": {"forget_bias": 1.0, "init": "keras", "head_init": "normal"},
                "optim": {"lr": 1e-3, "ema": 0.99},
                "train": {"steps": 800, "epochs": None, "batch_size": 128, "eval_every": 200},
            },
            reported="99.21% (first 128 test images only)",
            measured="97.48% on the full test set (seeds 0-2: 97.05-97.48%; 95.53% without the EMA and "
                     "N(0, 1) readout); 7.1-9.1 s of training; AMD EPYC (Zen 5) 2 cores, 2026-12-01",
        ),
        Recipe(
            "seed003",
            "seed 003 (LSTMCell 64, Morvan)",
            "LSTM 64, batch 64, Adam 0.01, 1,200 steps, test accuracy every 50 steps; Glorot/orthogonal "
            "LSTM weights, evaluated with an EMA (0.99) of the weights",
            {
                "model": {"hidden": 64, "init": "keras"},
                "optim": {"lr": 0.01, "ema": 0.99},
                "train": {"steps": 1200, "epochs": None, "batch_size": 64, "eval_every": 50, "log_every": 50},
            },
            reported="not stated (screenshots); TF 2.21 compat.v1 measured 96.6-97.4% here",
            measured="98.06% on the full test set (seeds 0-2: 97.96-98.11%; 96.97% without the EMA); "
                     "2.7-3.5 s of training; AMD EPYC (Zen 5) 2 cores, 2026-12-01",
        ),
        Recipe(
            "mnist-rows-projected",
            "seed 001 (RNN case 1: input projection)",
            "Linear input projection to 128, LSTM 128, Adam 0.001",
            {
                "model": {"input_projection": 128, "init": "keras"},
                "optim": {"lr": 1e-3},
                "train": {"epochs": 3},
            },
            reported="not stated",
            measured="97.48% on the full test set after 3 epochs (1,407 steps, 23.7 s of training); AMD EPYC "
                     "(Zen 5) 2 cores, 2026-12-01",
        ),
        Recipe(
            "pixel-mnist",
            "sequential MNIST (Le et al. 2015)",
            "784 steps of one pixel, LSTM 128 with chrono gate biases (Tallec & Ollivier 2018), Adam 1e-3 "
            "with clipping",
            {
                "data": {"view": "pixels"},
                "model": {"init": "chrono", "chrono_t_max": 784},
                "optim": {"lr": 1e-3, "clip_norm": 1.0},
                "train": {"epochs": 20},
            },
            reported="LSTM 98.8-98.9% (published)",
            measured="92.14% on the full test set after the 20 epochs (9,380 steps, 43 min on 2 CPU cores, seed 0; "
                     "29.88% after 3, 71.07% after 9); with Keras init instead of chrono it sat at chance (11.35% "
                     "after 2 epochs); AMD EPYC (Zen 5), 2026-12-01",
        ),
        Recipe(
            "permuted-mnist",
            "permuted sequential MNIST (Le et al. 2015)",
            "784 steps of one pixel in a fixed random order, LSTM 128, Adam 1e-3 with clipping",
            {
                "data": {"view": "permuted"},
                "model": {"init": "keras"},
                "optim": {"lr": 1e-3, "clip_norm": 1.0},
                "train": {"epochs": 20},
            },
            reported="LSTM 88-95% (published)",
            measured="budget run only: 53.22% on the full test set after 2 of 20 epochs (938 steps, 14 min on one "
                     "CPU thread beside another run); with chrono init 30.26% after 3 epochs; AMD EPYC (Zen 5), "
                     "2026-12-01",
        ),
        Recipe(
            "sin-cos",
            "seed 001 (LSTM case 3: sin -> cos, Morvan)",
            "LSTM 10 reads sin and outputs cos at every step; 50 streams in 20-step windows, state carried from "
            "window to window (truncated backprop), Adam 0.006, 200 steps",
            {
                "task": "sin-cos",
                "model": {"cell": "lstm", "hidden": 10},
                "optim": {"name": "adam", "lr": 0.006},
                "synthetic": {"window": 20, "stream_length": 4000},
                "train": {"steps": 200, "epochs": None, "batch_size": 50, "eval_every": 50, "log_every": 10},
            },
            reported="not stated (prints the cost every 20 steps)",
            measured="test MSE 0.0349 (0.0137 from step 20 on), 200 steps in 0.8 s, 1 CPU thread, 2026-11-23",
        ),
        Recipe(
            "echo",
            "seed 001 (RNN case 2: echo, Hallström)",
            "vanilla RNN with 4 units, a random bit stream echoed 3 steps later, softmax over 2 classes per step; "
            "5 streams in 15-step windows, state carried (truncated backprop), Adagrad 0.3; 5 epochs of 666 "
            "windows (the seed ran 100; one is enough here)",
            {
                "task": "echo",
                "model": {"cell": "rnn", "hidden": 4},
                "optim": {"name": "adagrad", "lr": 0.3},
                "synthetic": {"window": 15, "stream_length": 10_000, "echo_step": 3},
                "train": {"epochs": 5, "batch_size": 5, "log_every": 50},
            },
            reported="not stated (plots only)",
            measured="100% at every step after 5 epochs (3,330 steps, 6.9 s); after 1 epoch 99.6% overall, 100% "
            "from step 3 on; 1 CPU thread, 2026-11-23",
        ),
        Recipe(
            "sort-letters",
            "seed 001 (seq2seq letter sorting)",
            "words in, letters sorted out (hello -> ehllo): 2-layer LSTM 50 encoder and decoder, embeddings 15, "
            "batch 128, Adam 0.001, clipping 5, 60 epochs; attention off (synthetic.attention=bahdanau|luong)",
            {
                "task": "sort-letters",
                "model": {"cell": "lstm", "hidden": 50, "layers": 2},
                "optim": {"name": "adam", "lr": 1e-3, "clip_norm": 5.0},
                "synthetic": {"embed": 15, "attention": "none", "train_words": 10_000, "test_words": 1_000},
                "train": {"epochs": 60, "batch_size": 128},
            },
            reported="not stated (screenshots); short words right, 15-20 letters poor",
            measured="60 epochs (4,740 steps, 1 CPU thread): 99.10% exact match on 1,000 held-out words of 1-8 "
            "letters (114 s); Bahdanau 98.90% (173 s), Luong 98.20% (143 s); 8-letter words 96.1% / 94.9% / "
            "92.7%; hello, machine, common sorted right; AMD EPYC (Zen 5), 2026-12-01",
        ),
    ]
}


def recipe_config(name: str, over: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of recipe ``name`` (defaults with the recipe's overrides applied), with the
    nested settings ``over`` (a TOML file's, say) on top."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)} (see `rnnkit recipes`)")
    data = _merge(to_dict(RunConfig()), RECIPES[name].overrides)
    data = _merge(data, over or {})
    data["recipe"] = name
    return from_dict(RunConfig, data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k] if isinstance(out.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return out


def config_fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config class (for help texts and error messages)."""
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            keys += config_fields(f.type, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys
