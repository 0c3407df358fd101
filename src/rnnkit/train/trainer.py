"""The trainer: ``fit``, ``evaluate`` and ``predict`` for any model that maps inputs to outputs.

The loop reads top to bottom (nanoGPT/minGPT style): take a batch, forward, loss (the model's
own ``loss`` method when it has one), backward (accumulated over micro-batches), guard against
non-finite values, clip, set the learning rate from the schedule (a pure function of the step),
step the optimiser, update the moving average, tell the callbacks. The trainer knows nothing
about the model beyond ``model(x)`` and ``model.loss(out, y)``; everything else (progress bar,
logs, TensorBoard, checkpoints, early stopping) is a callback.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.allocator import tuned_allocator
from rnnkit.errors import CheckpointError, RnnkitError, RnnkitWarning
from rnnkit.fpmode import denormals_flushed
from rnnkit.train.batching import Batches, eval_batches
from rnnkit.train.checkpoint import pack_training_state, restore_training_state
from rnnkit.train.optim import EMA, apply_lr, clip_gradients, global_grad_norm, l1_l2_penalty

__all__ = ["Trainer", "Callback", "NonFiniteError", "classification_metrics"]


class NonFiniteError(RnnkitError, FloatingPointError):
    """The loss or a gradient became NaN or infinite."""


class Callback:
    """Hooks the trainer calls; override the ones you need (all default to doing nothing)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step."""

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """After backward and clipping, before the update: the gradients are still there."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """After each optimiser step, with the step's loss, accuracy, lr, grad_norm, speed."""

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each evaluation on the validation data."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """After each full pass over the training data."""

    def on_fit_end(self, trainer: Trainer, interrupted: bool) -> None:
        """After training ends, normally or by a stop request (signal, early stopping)."""


def classification_metrics(outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """Accuracy of logits (N, C) against class indices (N,) or one-hot/soft labels (N, C)."""
    if targets.dim() == outputs.dim():
        targets = targets.argmax(-1)
    return {"accuracy": (outputs.argmax(-1) == targets).float().mean().item()}


def bf16_autocast_pays(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively on ``device``: CUDA, or a CPU with bf16 instructions.

    oneDNN runs torch's CPU LSTM in bfloat16 on such processors (faster for the default recipe's
    batch of 256, not for a bare T28 B128 step: see BENCHMARKS.md); elsewhere it emulates
    bfloat16, slower than float32. x86 only: other processors' flags are not read.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return _cpu_flags() & {"avx512_bf16", "amx_bf16"} != set()


def _cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class Trainer:
    """Trains ``model`` with one optimiser and an optional schedule, clipping, penalties and EMA."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss: Callable[[Any, Tensor], Tensor] | None = None,
        metrics: Callable[[Any, Tensor], dict[str, float]] | None = classification_metrics,
        schedule: Callable[[int], float] | None = None,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        l1: float = 0.0,
        l2: float = 0.0,
        ema_decay: float = 0.0,
        accumulate: int = 1,
        bf16: bool = False,
        nonfinite: str = "stop",
        callbacks: Iterable[Callback] = (),
        device: torch.device | str = "cpu",
        tune_allocator: bool = True,
    ) -> None:
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.model, self.optimizer = model, optimizer
        # Under DistributedDataParallel, ``model`` runs the steps and ``module`` holds the state.
        self.module: nn.Module = getattr(model, "module", model)
        self.loss_fn = loss or getattr(self.module, "loss", None) or F.cross_entropy
        self.metrics_fn = metrics
        self.schedule, self.clip_norm, self.clip_value = schedule, clip_norm, clip_value
        self.l1, self.l2, self.accumulate = l1, l2, max(1, int(accumulate))
        self.ema = EMA(self.module, ema_decay) if ema_decay else None
        self.device = torch.device(device)
        self.bf16 = bf16 and bf16_autocast_pays(self.device)
        if bf16 and not self.bf16:
            warnings.warn(RnnkitWarning(
                f"bf16=True ignored on {self.device}: bfloat16 autocast pays only on CUDA or on an x86 CPU "
                "with bfloat16 instructions (AVX512_BF16 or AMX) and oneDNN; elsewhere it is emulated and "
                "slower than float32. Training in float32"
            ), stacklevel=2)
        # On the CPU, fit keeps glibc from unmapping and re-faulting each step's large buffers
        # (a torch.nn.LSTM step 1.8-2.4x faster at T784 or batch 256, measured; see rnnkit.allocator)
        # and undoes that when it ends.
        self.tune_allocator = tune_allocator and self.device.type == "cpu"
        self.nonfinite = nonfinite
        self.callbacks = list(callbacks)
        self.step = 0
        self.epoch = 0
        self.train_data: Batches | None = None
        self.stop_requested: str | None = None
        self.history: list[dict[str, float]] = []
        self.eval_seconds = 0.0  # wall time spent in fit's evaluations (and their callbacks)

    # -- training ---------------------------------------------------------------------------------
    def fit(
        self,
        train: Batches,
        val: tuple[Tensor, Tensor] | None = None,
        *,
        epochs: int | None = None,
        steps: int | None = None,
        eval_every: int | None = None,
        eval_batch_size: int = 1000,
    ) -> list[dict[str, float]]:
        """Train until ``epochs`` passes or ``steps`` optimiser steps (whichever is given) are done."""
        if (epochs is None) == (steps is None):
            raise ValueError("fit: give exactly one of epochs= or steps=")
        total = steps if steps is not None else epochs * len(train)
        self.train_data, self.total_steps, first = train, total, self.step
        self.stop_requested = None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        interrupted = False
        with self._stop_on_signals(), tuned_allocator(self.tune_allocator):
            while self.step < total and self.stop_requested is None:
                for x, y in train.epoch_batches():
                    self.train_step(x, y)
                    if val is not None and eval_every and self.step % eval_every == 0:
                        self._evaluate_val(val, eval_batch_size)
                    # at the epoch's last batch let the loop run out, so the epoch's end is handled too
                    if self.stop_requested is not None or (self.step >= total and train.position.batch < len(train)):
                        break
                else:
                    self.epoch = train.position.epoch
                    if val is not None and not eval_every:
                        self._evaluate_val(val, eval_batch_size)
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, self.epoch)
            interrupted = self.stop_requested is not None and self.stop_requested.startswith("signal")
            # (a resumed run with nothing left to train was evaluated at this step before it stopped)
            evaluated = bool(self.history) and self.history[-1].get("step") == self.step
            if val is not None and self.step != first and not evaluated:
                self._evaluate_val(val, eval_batch_size)
        for cb in self.callbacks:
            cb.on_fit_end(self, interrupted)
        return self.history

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One optimiser step on one batch (split into ``accumulate`` micro-batches).

        The whole step (forward, backward, optimiser) runs in one scope of flushed denormals on the
        CPU (see :mod:`rnnkit.fpmode`; ``rnnkit.set_flush_denormals(False)`` turns it off), so the
        layers inside need no per-call scopes; the caller's mode is restored when the step ends.
        """
        with denormals_flushed(self.device, covers_backward=True):
            return self._train_step(x, y)

    def _train_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        start = time.perf_counter()
        model = self.model
        model.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        total_loss, metric_sum, n = 0.0, {}, x.shape[0]
        for xs, ys in zip(x.chunk(self.accumulate), y.chunk(self.accumulate)):
            with self._autocast():
                out = model(xs)
                loss = self.loss_fn(out, ys)
                if self.l1 or self.l2:
                    loss = loss + l1_l2_penalty(self.module, l1=self.l1, l2=self.l2)
            (loss * (xs.shape[0] / n)).backward()
            total_loss += loss.item() * xs.shape[0] / n
            if self.metrics_fn is not None:
                for k, v in self.metrics_fn(out.detach() if isinstance(out, Tensor) else out, ys).items():
                    metric_sum[k] = metric_sum.get(k, 0.0) + v * xs.shape[0] / n
        params = [p for p in model.parameters() if p.grad is not None]
        total_norm = global_grad_norm([p.grad for p in params])
        grad_norm = float(total_norm)  # read once: on a GPU each read is a synchronisation
        bad = self._nonfinite(total_loss, grad_norm)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.nonfinite == "stop":
                raise NonFiniteError(
                    f"step {self.step}: {bad} became NaN or infinite; lower the learning rate, clip gradients "
                    f"(--set optim.clip_norm=1.0) or check the inputs for NaN (nonfinite='skip' skips such batches)"
                )
            return {"loss": total_loss, "skipped": 1.0}
        if self.clip_norm is not None or self.clip_value is not None:
            clip_gradients(params, max_norm=self.clip_norm, max_value=self.clip_value, total=total_norm)
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        lr = self.set_lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        elapsed = time.perf_counter() - start
        logs = {"step": self.step, "loss": total_loss, "lr": lr, "grad_norm": grad_norm, **metric_sum,
                "examples_per_s": n / elapsed if elapsed > 0 else 0.0}
        for cb in self.callbacks:
            cb.on_step_end(self, logs)
        return logs

    def set_lr(self) -> float:
        """Apply the schedule's learning rate for the current step (times each group's "lr_scale"); return it."""
        if self.schedule is None:
            return float(self.optimizer.param_groups[0]["lr"])
        return float(apply_lr(self.optimizer, self.schedule, self.step))

    def _nonfinite(self, loss: float, grad_norm: float) -> str | None:
        """The first thing that is not finite: the loss, or a parameter's gradient (by name)."""
        if not math.isfinite(loss):
            return "the loss"
        if math.isfinite(grad_norm):  # the global norm is finite only if every gradient is
            return None
        for name, p in self.module.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"the gradient of {name!r}"
        return None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _evaluate_val(self, val: tuple[Tensor, Tensor], batch_size: int) -> dict[str, float]:
        start = time.perf_counter()
        metrics = {"step": self.step, "epoch": self.epoch, **self.evaluate(*val, batch_size=batch_size)}
        self.history.append(metrics)
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        self.eval_seconds += time.perf_counter() - start
        return metrics

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, then stop (callbacks save a checkpoint)."""
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested is not None and self.stop_requested.startswith("signal"):
                raise KeyboardInterrupt  # a second Ctrl-C means now
            self.stop_requested = f"signal {signal.Signals(signum).name}"

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals stay with the caller
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self, meta: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything needed to resume exactly: weights, optimiser, EMA, RNGs, step and data position."""
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        if hasattr(self.module, "carried_state_dict"):  # a state carried across windows (truncated backprop)
            extra["carried"] = self.module.carried_state_dict()
        position = self.train_data.state_dict() if self.train_data is not None else None
        info = {"step": self.step, "epoch": self.epoch, "data_position": position, **(meta or {})}
        return pack_training_state(self.module, self.optimizer, extra=extra, meta=info)

    def restore(self, path: Any, train: Batches | None = None) -> dict[str, Any]:
        """Resume from a checkpoint written by :meth:`checkpoint_state`; returns its meta."""
        meta, extra = restore_training_state(path, self.module, self.optimizer)
        try:
            if self.ema is not None and "ema" in extra:
                self.ema.load_state_dict(extra["ema"])
            elif self.ema is not None:  # trained without EMA so far: average from the restored weights on,
                self.ema = EMA(self.module, self.ema.decay, warmup=self.ema.warmup)  # not from the initial ones
            if "carried" in extra and hasattr(self.module, "load_carried_state_dict"):
                self.module.load_carried_state_dict(extra["carried"])
                self._check_carried(path, train)
            step, epoch = int(meta.get("step", 0)), int(meta.get("epoch", 0))
            if step < 0 or epoch < 0:
                raise ValueError(f"step {step} and epoch {epoch} must not be negative")
            position = meta.get("data_position")
            if train is not None and position:
                if int(position["epoch"]) < 0 or int(position["batch"]) < 0:
                    raise ValueError(f"data_position {position} must not be negative")
                train.load_state_dict(position)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # edited or foreign metadata
            raise CheckpointError(f"{path}: its training state is damaged or foreign ({type(e).__name__}: {e}); "
                                  "resume from another checkpoint of the run, or start a new run") from e
        self.step, self.epoch = step, epoch
        return meta

    def _check_carried(self, path: Any, train: Batches | None) -> None:
        """A state carried across windows (truncated backprop) fits only batches of as many streams."""
        streams = self.module.carried_batch_size() if hasattr(self.module, "carried_batch_size") else None
        if train is not None and streams is not None and streams != train.batch_size:
            raise CheckpointError(
                f"{path}: it carries the state of {streams} streams from window to window but the batches have "
                f"{train.batch_size}; resume with the run's batch size, train.batch_size={streams} (--batch-size "
                f"{streams})"
            )

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, inputs: Tensor, targets: Tensor, *, batch_size: int = 1000) -> dict[str, float]:
        """Loss and metrics over a whole data set, in float32 (with the averaged weights when EMA is on)."""
        with self._averaged():
            self.model.eval()
            total, sums, n = 0.0, {}, 0
            per_class_hits = per_class_count = None
            for x, y in eval_batches(inputs, targets, batch_size):
                x, y = x.to(self.device), y.to(self.device)
                # float32 even when training autocasts: the figures match `rnnkit eval` and predict()
                out = self.model(x)
                loss = self.loss_fn(out, y)
                m = x.shape[0]
                total, n = total + loss.item() * m, n + m
                if self.metrics_fn is not None:
                    for k, v in self.metrics_fn(out, y).items():
                        sums[k] = sums.get(k, 0.0) + v * m
                if self.metrics_fn is classification_metrics and y.dim() == 1:
                    C = out.shape[-1]
                    hits = torch.bincount(y[out.argmax(-1) == y], minlength=C)
                    count = torch.bincount(y, minlength=C)
                    per_class_hits = hits if per_class_hits is None else per_class_hits + hits
                    per_class_count = count if per_class_count is None else per_class_count + count
        metrics = {"loss": total / n, **{k: v / n for k, v in sums.items()}}
        if "accuracy" not in metrics and "mse" not in metrics:  # token-level cross-entropy tasks
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        if per_class_hits is not None:
            for c, (h, k) in enumerate(zip(per_class_hits.tolist(), per_class_count.tolist())):
                metrics[f"accuracy_class_{c}"] = h / k if k else float("nan")
        return metrics

    @torch.no_grad()
    def predict(self, inputs: Tensor, *, batch_size: int = 1000) -> Tensor:
        """The model's outputs for ``inputs``, batched, on the CPU."""
        with self._averaged():
            self.model.eval()
            outs = [self.model(x.to(self.device)).float().cpu() for x, _ in eval_batches(inputs, inputs, batch_size)]
        return torch.cat(outs)

    def _averaged(self) -> contextlib.AbstractContextManager:
        return self.ema.averaged() if self.ema is not None else contextlib.nullcontext()
