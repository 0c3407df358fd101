"""Callbacks: everything around the training loop that is not the loop itself."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from rnnkit.errors import RnnkitWarning
from rnnkit.train.checkpoint import CheckpointManager
from rnnkit.train.trainer import Callback, Trainer

__all__ = ["ProgressBar", "MetricsLogger", "TensorBoardLogger", "Checkpointer", "EarlyStopping", "TimeToTarget"]


class ProgressBar(Callback):
    """A tqdm bar with loss, accuracy, learning rate and speed; one line per evaluation."""

    def __init__(self, total: int | None = None, *, enabled: bool = True, out: TextIO | None = None) -> None:
        self.total, self.enabled, self.out, self.bar = total, enabled, out, None
        self._loss = self._acc = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total or trainer.total_steps, initial=trainer.step, unit="step",
                            dynamic_ncols=True, file=self.out, leave=True)

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        # Exponential moving averages make the bar readable; single batches are noisy.
        self._loss = logs["loss"] if self._loss is None else 0.9 * self._loss + 0.1 * logs["loss"]
        if "accuracy" in logs:
            self._acc = logs["accuracy"] if self._acc is None else 0.9 * self._acc + 0.1 * logs["accuracy"]
        if self.bar is not None:
            post = {"loss": f"{self._loss:.4f}"}
            if self._acc is not None:
                post["acc"] = f"{self._acc:.3f}"
            post["lr"] = f"{logs['lr']:.2e}"
            post["ex/s"] = f"{logs.get('examples_per_s', 0):.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        line = f"step {trainer.step:>6}  epoch {trainer.epoch:>3}  test loss {metrics['loss']:.4f}"
        for key in ("accuracy", "exact_match"):
            if key in metrics:
                line += f"  test {key.replace('_', ' ')} {100 * metrics[key]:.2f}%"
        if "mse" in metrics:
            line += f"  test mse {metrics['mse']:.4f}"
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:  # without a bar, evaluations are still worth a line each
            print(line, file=self.out, flush=True)

    def on_fit_end(self, trainer: Trainer, interrupted: bool) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLogger(Callback):
    """Metrics as JSON lines: ``{"kind": "train"|"eval", "step": ..., "time": ..., ...}``."""

    def __init__(self, path: str | Path, every: int = 50, *, after: int | None = None) -> None:
        """``after``: a resumed run's step; records the file holds from later steps (written after
        the checkpoint it resumes from, by a run that was killed) are dropped, not repeated."""
        self.path, self.every = Path(path), max(1, every)
        self.start = time.perf_counter()
        self.file: TextIO | None = None
        if after is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    step = json.loads(line).get("step")
                except (ValueError, AttributeError):
                    continue  # a line cut short by the kill
                if not isinstance(step, int) or step <= after:
                    kept.append(line + "\n")
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(self.path)

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def on_fit_start(self, trainer: Trainer) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.step % self.every == 0 or trainer.step == 1:
            self._write({"kind": "train", **logs, "time": time.perf_counter() - self.start})

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._write({"kind": "eval", **metrics, "time": time.perf_counter() - self.start})

    def on_fit_end(self, trainer: Trainer, interrupted: bool) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorBoardLogger(Callback):
    """TensorBoard events: scalars each logged step, weight and gradient histograms, config text."""

    def __init__(self, log_dir: str | Path, every: int = 50, *, histograms_every: int = 500,
                 config_text: str | None = None, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first new step; events the directory holds from that step on
        (written after the checkpoint by a run that was killed) are dropped, not shown twice."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.every, self.histograms_every, self.config_text = max(1, every), histograms_every, config_text

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.config_text:
            # Markdown code block keeps TOML's layout in TensorBoard's text tab.
            self.writer.add_text("config", "```\n" + self.config_text + "\n```", trainer.step)

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        step = trainer.step
        if step % self.every == 0 or step == 1:
            for key in ("loss", "accuracy", "lr", "grad_norm", "examples_per_s"):
                if key in logs and math.isfinite(logs[key]):
                    self.writer.add_scalar(f"train/{key}", logs[key], step)

    def histograms(self, trainer: Trainer, step: int | None = None) -> None:
        """Histograms of every parameter, and of its gradient when one is held."""
        step = trainer.step if step is None else step
        for name, p in trainer.module.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", p.grad.detach().float().cpu(), step)

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        # Gradients exist only between backward and zero_grad: log them here, under the step they make.
        step = trainer.step + 1
        if self.histograms_every and step % self.histograms_every == 0:
            self.histograms(trainer, step)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key in ("step", "epoch") or key.startswith("accuracy_class_"):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"test/{key}", value, trainer.step)
        self.writer.flush()

    def add_image(self, tag: str, png_path: str | Path, step: int) -> None:
        """Log a PNG written elsewhere (e.g. the predictions grid) as an image."""
        import matplotlib.image

        img = matplotlib.image.imread(str(png_path))
        self.writer.add_image(tag, img[..., :3], step, dataformats="HWC")

    def on_fit_end(self, trainer: Trainer, interrupted: bool) -> None:
        try:
            self.histograms(trainer)
        except ValueError as e:  # weights too large or not finite for a histogram: the run's end goes on
            warnings.warn(RnnkitWarning(f"TensorBoard histograms skipped: {e}"), stacklevel=2)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class Checkpointer(Callback):
    """Checkpoints each epoch, every ``every`` steps and at the end (also after SIGINT/SIGTERM)."""

    def __init__(self, directory: str | Path, *, every: int | None = None, keep_last: int = 3,
                 metric: str = "accuracy", mode: str = "max", meta: dict[str, Any] | None = None) -> None:
        self.manager = CheckpointManager(directory, keep_last=keep_last, keep_best=True, mode=mode)
        self.every, self.metric, self.meta = every, metric, meta or {}
        self.last_metric: float | None = None
        self.last_saved: int | None = None

    def save(self, trainer: Trainer) -> Path:
        """Write a checkpoint of the trainer's current state."""
        tensors, meta = trainer.checkpoint_state(self.meta)
        path = self.manager.save(trainer.step, tensors, meta, metric=self.last_metric)
        self.last_saved = trainer.step
        return path

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if self.every and trainer.step % self.every == 0:
            self.save(trainer)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.last_metric = metrics.get(self.metric, metrics.get("loss"))
        if self.last_saved == trainer.step:
            # this step's checkpoint was written before its evaluation (step-end callbacks come first)
            # and carries the previous metric: rewrite it with its own, or "best" keeps the wrong file
            self.save(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        self.save(trainer)

    def on_fit_end(self, trainer: Trainer, interrupted: bool) -> None:
        if self.last_saved != trainer.step:
            self.save(trainer)


class EarlyStopping(Callback):
    """Stop when the validation metric has not improved for ``patience`` evaluations."""

    def __init__(self, metric: str = "loss", patience: int = 5, mode: str = "min", min_delta: float = 0.0) -> None:
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, min_delta
        self.best: float | None = None
        self.bad = 0

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                trainer.stop_requested = (
                    f"early stopping: {self.metric} did not improve for {self.patience} evaluations"
                )


class TimeToTarget(Callback):
    """Record the wall time (from ``start``) when the test accuracy first reaches ``target``."""

    def __init__(self, target: float, start: float | None = None) -> None:
        self.target, self.start = target, start if start is not None else time.perf_counter()
        self.seconds: float | None = None
        self.step: int | None = None

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.seconds is None and metrics.get("accuracy", 0.0) >= self.target:
            self.seconds, self.step = time.perf_counter() - self.start, trainer.step
