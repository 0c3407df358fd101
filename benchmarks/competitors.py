"""The peers rnnkit is measured against, and the pieces every implementation shares.

Every builder takes a :class:`Shape` and a ``torch.device`` and returns a :class:`Bench`: a
``step()`` closure doing one train step and an ``infer()`` closure doing one forward pass without
gradients, both on a fixed batch. All of them train the same model:

    x (B, T, I) in [0, 1]  ->  recurrent layer, H units  ->  last step's output (B, H)
                           ->  Linear(H, 10)  ->  cross-entropy with y (B,)  ->  Adam(lr=1e-3)

A builder raises :class:`Skip` when it cannot run here (a library is missing, a setting applies to
another device); the harness prints the reason in place of figures.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit import fpmode

SEED = 0  #: every implementation starts from the same weights' seed and trains on the same batch
NUM_CLASSES = 10


# -- shared types ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One benchmark configuration: T steps of I features, H hidden units, batch B.

    ``role`` says which stated targets apply: ``"headline"`` (MNIST by rows, T28 H128) or
    ``"long"`` (pixel MNIST, T784); empty for the others.
    """

    T: int
    I: int
    H: int
    B: int
    role: str = ""

    @property
    def name(self) -> str:
        return f"T{self.T} I{self.I} H{self.H} B{self.B}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"T28 I28 H128 B128"`` (any order, spaces or commas optional) -> Shape."""
        parts = dict(re.findall(r"([TIHB])\s*(\d+)", text.upper()))
        if sorted(parts) != ["B", "H", "I", "T"] or re.sub(r"[TIHB]\s*\d+|[\s,]", "", text.upper()):
            raise ValueError(f"shape {text!r}: expected the four fields T, I, H and B, like 'T28 I28 H128 B128'")
        T, I, H, B = (int(parts[k]) for k in "TIHB")
        if min(T, I, H, B) <= 0:
            raise ValueError(f"shape {text!r}: every size must be positive")
        role = "headline" if (T, H) == (28, 128) else "long" if T >= 500 else ""
        return cls(T, I, H, B, role)


class Skip(Exception):
    """Raised by a builder that cannot run here; the message says why."""


@dataclass
class Bench:
    """What the harness times: ``step()`` and ``infer()`` on a fixed batch.

    ``scope`` is entered around every call (a process-wide setting that belongs to this
    implementation only); ``torch_memory`` says whether torch's allocator sees its tensors (so peak
    memory can be measured); ``compiles`` marks implementations whose first call compiles.
    """

    step: Callable[[], Any]
    infer: Callable[[], Any]
    scope: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    torch_memory: bool = True
    compiles: bool = False
    notes: list[str] = field(default_factory=list)


def make_batch(shape: Shape, device: torch.device) -> tuple[Tensor, Tensor]:
    """The fixed batch: x (B, T, I) uniform in [0, 1] like MNIST pixels, y (B,) labels in [0, 10)."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.rand(shape.B, shape.T, shape.I, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (shape.B,), generator=gen)
    return x.to(device), y.to(device)


@contextlib.contextmanager
def flush_denormal(on: bool) -> Iterator[None]:
    """``torch.set_flush_denormal(on)`` inside the block, the caller's mode restored after."""
    was = fpmode.denormals_are_flushed()
    torch.set_flush_denormal(on)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


# -- torch models ----------------------------------------------------------------------------------
class Classifier(nn.Module):
    """``body(x) -> (B, H)`` features of the last step, then Linear(H, 10)."""

    def __init__(self, body: nn.Module, hidden: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class LastOutput(nn.Module):
    """A torch-style layer (``(output, hidden) = rnn(x)``, batch-first) reduced to its last output."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0][:, -1]


class LoopLSTMCell(nn.Module):
    """The tutorial LSTM cell: one nn.Linear on [x, h] gives the four gates (i, f, g, o)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.gates = nn.Linear(input_size + hidden_size, 4 * hidden_size)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class LoopLSTM(nn.Module):
    """:class:`LoopLSTMCell` stepped over time in a Python loop; returns the last h (B, H)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = LoopLSTMCell(input_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = c = x.new_zeros(x.shape[0], self.hidden_size)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], h, c)
        return h


def torch_bench(
    model: nn.Module, shape: Shape, device: torch.device, compile_model: bool = False, **options: Any
) -> Bench:
    """The train step and inference closures for a torch ``model`` mapping x to logits (the whole model
    under torch.compile's default mode with ``compile_model``)."""
    model = model.to(device)
    x, y = make_batch(shape, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if compile_model:
        model, options["compiles"] = torch.compile(model), True

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    return Bench(step, infer, **options)


# -- the PyTorch competitors -----------------------------------------------------------------------
def build_torch_lstm(shape: Shape, device: torch.device, compile_model: bool = False) -> Bench:
    """torch.nn.LSTM as PyTorch ships it: denormals not flushed (its default); with ``compile_model`` the
    model under torch.compile, which breaks its graph at the layer."""
    torch.manual_seed(SEED)
    model = Classifier(LastOutput(nn.LSTM(shape.I, shape.H, batch_first=True)), shape.H)
    scope = (lambda: flush_denormal(False)) if device.type == "cpu" else contextlib.nullcontext
    return torch_bench(model, shape, device, compile_model, scope=scope)


def build_torch_gru(shape: Shape, device: torch.device) -> Bench:
    """torch.nn.GRU as PyTorch ships it (the model rnnkit.GRU replaces; not an LSTM competitor)."""
    torch.manual_seed(SEED)
    model = Classifier(LastOutput(nn.GRU(shape.I, shape.H, batch_first=True)), shape.H)
    scope = (lambda: flush_denormal(False)) if device.type == "cpu" else contextlib.nullcontext
    return torch_bench(model, shape, device, scope=scope)


def build_torch_lstm_flush(shape: Shape, device: torch.device) -> Bench:
    """torch.nn.LSTM with torch.set_flush_denormal(True) around its own steps only."""
    if device.type != "cpu":
        raise Skip("flush-denormal is a CPU setting")
    torch.manual_seed(SEED)
    model = Classifier(LastOutput(nn.LSTM(shape.I, shape.H, batch_first=True)), shape.H)
    return torch_bench(model, shape, device, scope=lambda: flush_denormal(True))


def build_python_loop(shape: Shape, device: torch.device) -> Bench:
    """The hand-written cell in a Python loop, eager."""
    torch.manual_seed(SEED)
    return torch_bench(Classifier(LoopLSTM(shape.I, shape.H), shape.H), shape, device)


def build_compiled_cell(shape: Shape, device: torch.device) -> Bench:
    """The hand-written cell compiled with torch.compile (default mode); the time loop stays in Python."""
    torch.manual_seed(SEED)
    body = LoopLSTM(shape.I, shape.H)
    body.cell = torch.compile(body.cell)
    return torch_bench(Classifier(body, shape.H), shape, device, compiles=True)


def build_compiled_graphs(shape: Shape, device: torch.device) -> Bench:
    """The whole Python-loop model under torch.compile(mode="reduce-overhead"): CUDA graphs.

    The whole model, not the cell: a CUDA-graphed cell replayed T times in one forward would
    overwrite the outputs of its earlier steps, which autograd still needs.
    """
    if device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    if shape.T > 64:
        raise Skip(f"compiling the whole model unrolls all {shape.T} steps (impractically slow)")
    torch.manual_seed(SEED)
    model = Classifier(LoopLSTM(shape.I, shape.H), shape.H).to(device)
    compiled = torch.compile(model, mode="reduce-overhead")
    x, y = make_batch(shape, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(x), y).backward()
        opt.step()

    def infer() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            compiled(x)

    return Bench(step, infer, compiles=True)


# -- JAX -------------------------------------------------------------------------------------------
def build_jax(shape: Shape, device: torch.device) -> Bench:
    """JAX: an LSTM by lax.scan with the input projection hoisted out of the loop, jit-compiled;
    optax's Adam when optax is importable, otherwise the same update written out."""
    try:
        import jax
        import jax.numpy as jnp
    except Exception as e:  # ImportError, or a broken install (a jaxlib mismatch, a missing backend)
        raise Skip(f"jax is not importable ({e})") from None
    platform = "gpu" if device.type == "cuda" else "cpu"
    try:
        jax_device = jax.devices(platform)[0]
    except RuntimeError:
        raise Skip(f"jax has no {platform} backend here") from None

    I, H, B = shape.I, shape.H, shape.B
    rng = np.random.default_rng(SEED)

    def uniform(*dims: int, fan: int) -> np.ndarray:  # torch's default init: U(-1/sqrt(fan), 1/sqrt(fan))
        k = 1.0 / math.sqrt(fan)
        return rng.uniform(-k, k, dims).astype(np.float32)

    params = {
        "w_ih": uniform(I, 4 * H, fan=H), "w_hh": uniform(H, 4 * H, fan=H), "b": uniform(4 * H, fan=H),
        "w_out": uniform(H, NUM_CLASSES, fan=H), "b_out": uniform(NUM_CLASSES, fan=H),
    }
    params = jax.device_put(params, jax_device)
    x_t, y_t = make_batch(shape, torch.device("cpu"))
    x = jax.device_put(x_t.numpy(), jax_device)
    y = jax.device_put(y_t.numpy().astype(np.int32), jax_device)

    def logits_fn(p: dict, x: Any) -> Any:
        xp = jnp.einsum("bti,ig->tbg", x, p["w_ih"]) + p["b"]  # (T, B, 4H): all steps' input work at once

        def cell(carry: tuple, xp_t: Any) -> tuple:
            h, c = carry
            i, f, g, o = jnp.split(xp_t + h @ p["w_hh"], 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            return (jax.nn.sigmoid(o) * jnp.tanh(c), c), None

        zeros = jnp.zeros((B, H), x.dtype)
        (h, _), _ = jax.lax.scan(cell, (zeros, zeros), xp)
        return h @ p["w_out"] + p["b_out"]

    def loss_fn(p: dict, x: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(logits_fn(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    init_opt, update = _jax_adam(jax, jnp, lr=1e-3)

    @jax.jit
    def train_step(p: dict, opt_state: Any, x: Any, y: Any) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        p, opt_state = update(grads, opt_state, p)
        return p, opt_state, loss

    predict = jax.jit(logits_fn)
    state = {"params": params, "opt": init_opt(params)}

    def step() -> None:
        state["params"], state["opt"], loss = train_step(state["params"], state["opt"], x, y)
        loss.block_until_ready()

    def infer() -> None:
        predict(state["params"], x).block_until_ready()

    optimiser = "optax.adam" if _has_optax() else "Adam written out (optax not importable)"
    return Bench(step, infer, torch_memory=False, compiles=True,
                 notes=[f"jax {jax.__version__} on {jax_device}, {optimiser}; XLA picks its own threads"])


def _has_optax() -> bool:
    try:
        import optax  # noqa: F401
    except ImportError:
        return False
    return True


def _jax_adam(jax: Any, jnp: Any, lr: float) -> tuple[Callable, Callable]:
    """(init(params) -> state, update(grads, state, params) -> (params, state)) for Adam."""
    if _has_optax():
        import optax

        opt = optax.adam(lr)

        def update(grads: Any, state: Any, params: Any) -> tuple:
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return opt.init, update

    b1, b2, eps = 0.9, 0.999, 1e-8
    tree = jax.tree_util.tree_map

    def init(params: Any) -> tuple:
        return jnp.zeros((), jnp.int32), tree(jnp.zeros_like, params), tree(jnp.zeros_like, params)

    def update(grads: Any, state: tuple, params: Any) -> tuple:
        t, m, v = state
        t = t + 1
        m = tree(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = tree(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        scale = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        params = tree(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps), params, m, v)
        return params, (t, m, v)

    return init, update


# -- Keras 3 ---------------------------------------------------------------------------------------
def build_keras(shape: Shape, device: torch.device) -> Bench:
    """Keras 3: LSTM(H) and Dense(10), compiled with Adam 1e-3; one train_on_batch per step."""
    try:
        import keras
    except Exception as e:  # ImportError, or a broken install (a jaxlib mismatch, a missing backend)
        raise Skip(f"keras is not importable ({e})") from None
    if not keras.__version__.startswith("3"):
        raise Skip(f"Keras 3 needed, found {keras.__version__}")
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input((shape.T, shape.I)), keras.layers.LSTM(shape.H), keras.layers.Dense(NUM_CLASSES),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_t, y_t = make_batch(shape, torch.device("cpu"))
    x, y = x_t.numpy(), y_t.numpy()

    def step() -> None:
        model.train_on_batch(x, y)

    def infer() -> None:
        model.predict_on_batch(x)

    note = f"keras {keras.__version__}, {keras.backend.backend()} backend on that backend's default device"
    return Bench(step, infer, torch_memory=False, compiles=True, notes=[note])


# -- time to accuracy: the plain PyTorch loop ------------------------------------------------------
@dataclass
class TimeToAccuracy:
    """Seconds from the start (data loading included) to the first evaluation at or above the target."""

    seconds: float | None
    step: int | None
    accuracy: float  # the best test accuracy seen (the final one for a run that kept going)
    elapsed: float | None = None  # seconds the whole run took (for one that never reached the target)


def worker_setup(threads: int, tune_allocator: bool, module: str, path: str) -> None:
    """Prepare a fresh worker process: torch's threads, the allocator, and run.py importable as ``module``.

    Work is pickled by reference to the module that defines it; run.py loaded from its path (as the
    tests do) has a name the worker cannot import, so it is loaded the same way here.
    """
    import importlib.util
    import sys

    torch.set_num_threads(threads)
    if tune_allocator:
        import rnnkit

        rnnkit.tune_allocator()
    if module != "__main__" and module not in sys.modules:
        try:
            importlib.import_module(module)
        except ImportError:
            spec = importlib.util.spec_from_file_location(module, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[module] = loaded
            spec.loader.exec_module(loaded)


def plain_torch_time_to_accuracy(
    data_dir: str, seed: int, *, target: float, eval_every: int, epochs: int, device: torch.device,
    batch_size: int = 128,
) -> TimeToAccuracy:
    """What a PyTorch user writes: nn.LSTM(28, 128) + Linear on MNIST rows, Adam 1e-3, default init.

    The test set is evaluated every ``eval_every`` steps; the clock starts before the data are
    loaded (with rnnkit's reader, as the recipe does) and stops at the first evaluation that reaches
    ``target``, or after ``epochs`` epochs.
    """
    from rnnkit.data.mnist import load_mnist, to_sequences

    start = time.perf_counter()
    data = load_mnist(data_dir, download=False, log=None)
    x_train, y_train = to_sequences(data.train_images, "rows").to(device), torch.as_tensor(data.train_labels)
    x_test, y_test = to_sequences(data.test_images, "rows").to(device), torch.as_tensor(data.test_labels)
    y_train, y_test = y_train.to(device), y_test.to(device)
    torch.manual_seed(seed)
    model = Classifier(LastOutput(nn.LSTM(28, 128, batch_first=True)), 128).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    step, best = 0, 0.0
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=order).split(batch_size):
            idx = idx.to(device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            step += 1
            if step % eval_every == 0:
                best = max(best, _accuracy(model, x_test, y_test))
                if best >= target:
                    return TimeToAccuracy(time.perf_counter() - start, step, best)
    return TimeToAccuracy(None, None, best, time.perf_counter() - start)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size),
                                                                                y.split(batch_size)))
    model.train()
    return correct / len(y)


@dataclass
class RecipeRun:
    """Seconds spent training (evaluations excluded) and the final full-test-set accuracy."""

    train_seconds: float
    accuracy: float


def plain_torch_recipe(
    data_dir: str, seed: int, *, hidden: int, batch_size: int, lr: float, steps: int, device: torch.device,
) -> RecipeRun:
    """The seed recipes as a PyTorch user writes them: nn.LSTM(28, hidden) + Linear, Adam, default init.

    Batches are drawn epoch by epoch from a seeded permutation; the test set is evaluated once, after
    training, outside the timed part (the data are loaded before the clock starts too).
    """
    from rnnkit.data.mnist import load_mnist, to_sequences

    data = load_mnist(data_dir, download=False, log=None)
    x_train = to_sequences(data.train_images, "rows").to(device)
    y_train = torch.as_tensor(data.train_labels).to(device)
    x_test = to_sequences(data.test_images, "rows").to(device)
    y_test = torch.as_tensor(data.test_labels).to(device)
    torch.manual_seed(seed)
    model = Classifier(LastOutput(nn.LSTM(28, hidden, batch_first=True)), hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    step = 0
    while step < steps:
        for idx in torch.randperm(len(y_train), generator=order).split(batch_size):
            if step == steps:
                break
            idx = idx.to(device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            step += 1
    seconds = time.perf_counter() - start
    return RecipeRun(seconds, _accuracy(model, x_test, y_test))
