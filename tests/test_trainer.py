"""The trainer, its callbacks and the batch iterator: fit/evaluate/predict, exact resume (also after
SIGKILL), signals, the non-finite guard, clipping, penalties, EMA, accumulation, schedules."""

from __future__ import annotations

import copy
import json
import math
import os
import queue
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models import SequenceClassifier
from rnnkit.train.batching import Batches
from rnnkit.train.callbacks import (
    Checkpointer,
    EarlyStopping,
    MetricsLogger,
    TensorBoardLogger,
    TimeToTarget,
)
from rnnkit.train.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from rnnkit.train.trainer import Callback, NonFiniteError, Trainer

I, C, T = 3, 4, 5  # input features, classes, time steps


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster and makes CPU results reproducible. Checkpoints hold
    Python's and NumPy's RNG states too, so those are seeded: each test writes the same files whatever
    ran before it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    yield
    torch.set_num_threads(threads)


def make_data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, I, generator=g), torch.randint(0, C, (n,), generator=g)


def make_model(seed: int = 0, dropout: float = 0.0, hidden: int = 6) -> SequenceClassifier:
    torch.manual_seed(seed)
    return SequenceClassifier(I, C, hidden_size=hidden, dropout=dropout)


class Recorder(Callback):
    """Remembers everything the trainer told its callbacks."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.epochs: list[int] = []
        self.fit_end: list[bool] = []

    def on_step_end(self, trainer, logs):
        self.steps.append(dict(logs))

    def on_eval_end(self, trainer, metrics):
        self.evals.append(dict(metrics))

    def on_epoch_end(self, trainer, epoch):
        self.epochs.append(epoch)

    def on_fit_end(self, trainer, interrupted):
        self.fit_end.append(interrupted)


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ fit / evaluate / predict


def test_fit_by_epochs_evaluates_each_epoch():
    x, y = make_data(40)
    xv, yv = make_data(24, seed=1)
    model = make_model()
    rec = Recorder()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), callbacks=[rec])
    batches = Batches(x, y, 16, seed=0)  # 3 batches per epoch, the last one of 8
    history = trainer.fit(batches, (xv, yv), epochs=2)
    assert trainer.step == 6 and trainer.epoch == 2
    assert [h["step"] for h in history] == [3, 6]
    assert [h["epoch"] for h in history] == [1, 2]
    assert rec.epochs == [1, 2] and rec.fit_end == [False]
    assert [s["step"] for s in rec.steps] == list(range(1, 7))
    for h in history:
        assert {"loss", "accuracy"} <= set(h)
        assert all(f"accuracy_class_{c}" in h for c in range(C))
    for key in ("loss", "accuracy", "lr", "grad_norm", "examples_per_s"):
        assert math.isfinite(rec.steps[-1][key])
    # training continues where it stopped: two more epochs
    trainer.fit(batches, (xv, yv), epochs=4)
    assert trainer.step == 12 and trainer.epoch == 4
    with pytest.raises(ValueError, match="exactly one"):
        trainer.fit(batches, epochs=1, steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        trainer.fit(batches)


def test_fit_by_steps_with_eval_every():
    x, y = make_data(40)
    xv, yv = make_data(24, seed=1)
    model = make_model()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01))
    history = trainer.fit(Batches(x, y, 8), (xv, yv), steps=7, eval_every=3)
    assert trainer.step == 7
    # every 3 steps, and once more at the end
    assert [h["step"] for h in history] == [3, 6, 7]
    assert history[-1] == {"step": 7, "epoch": 1, **trainer.evaluate(xv, yv)}
    # no validation data: no eval records
    model2 = make_model()
    t2 = Trainer(model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    assert t2.fit(Batches(x, y, 8), steps=3) == [] and t2.step == 3


def test_evaluate_and_predict_match_a_manual_computation():
    x, y = make_data(37)
    model = make_model(dropout=0.5)  # evaluate must switch dropout off
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    metrics = trainer.evaluate(x, y, batch_size=10)  # 4 batches, the last of 7
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    hits = logits.argmax(-1) == y
    assert metrics["accuracy"] == pytest.approx(hits.float().mean().item())
    for c in range(C):
        expected = hits[y == c].float().mean().item() if (y == c).any() else float("nan")
        assert metrics[f"accuracy_class_{c}"] == pytest.approx(expected, nan_ok=True)
    pred = trainer.predict(x, batch_size=10)
    assert pred.shape == (37, C)
    torch.testing.assert_close(pred, logits)


# ------------------------------------------------------------------------------------ exact resume


def _resumable(model_seed: int, x, y):
    model = make_model(model_seed, dropout=0.4)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    trainer = Trainer(model, opt, schedule=lambda s: 0.02 * 0.9**s, ema_decay=0.8, clip_norm=1.0)
    return trainer, Batches(x, y, 7, seed=3)  # 6 batches per epoch, the last of 5


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    x, y = make_data(40)
    val = make_data(16, seed=1)
    total, k = 13, 8  # k lies in the middle of the second epoch

    ref, ref_batches = _resumable(0, x, y)
    ref.fit(ref_batches, val, steps=total, eval_every=4)

    first, first_batches = _resumable(0, x, y)
    first.fit(first_batches, val, steps=k, eval_every=4)
    assert first_batches.state_dict()["epoch"] == 1 and first_batches.state_dict()["batch"] == 2
    path = save_checkpoint(tmp_path / "ckpt.safetensors", *first.checkpoint_state({"note": "mid-epoch"}))

    def resume(*, restore_data: bool = True, reseed: bool = False) -> Trainer:
        torch.manual_seed(1234)  # a different RNG state and different initial weights: all must be restored
        torch.rand(11)
        trainer, batches = _resumable(5, x, y)
        meta = trainer.restore(path, batches if restore_data else None)
        assert meta["step"] == k and meta["note"] == "mid-epoch"
        assert trainer.step == k and trainer.epoch == 1
        if reseed:
            torch.manual_seed(99)
        trainer.fit(batches, val, steps=total, eval_every=4)
        return trainer

    resumed = resume()
    assert resumed.step == total
    assert params_equal(ref.model, resumed.model)
    for name, t in ref.ema.shadow.items():
        assert torch.equal(t, resumed.ema.shadow[name]), name
    assert ref.ema.num_updates == resumed.ema.num_updates == total
    opt_ref, opt_res = ref.optimizer.state_dict(), resumed.optimizer.state_dict()
    for i, state in opt_ref["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_res["state"][i][key]), (i, key)
    assert opt_ref["param_groups"][0]["lr"] == opt_res["param_groups"][0]["lr"]
    # the evaluations after the checkpoint are the same too
    assert ref.history[-2:] == resumed.history

    # the test can see the difference: the dropout RNG and the data position both matter
    assert not params_equal(ref.model, resume(reseed=True).model)
    assert not params_equal(ref.model, resume(restore_data=False).model)


class _Lines:
    """Reads a process's output lines in a thread, so the test can wait for one with a deadline."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout} s; got:\n{''.join(self.seen)}"
                ) from None
            if line is None:
                raise AssertionError(f"output ended without a line matching {pattern!r}; got:\n{''.join(self.seen)}")
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def rest(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                return "".join(self.seen)
            self.seen.append(line)


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RNNKIT_DATA_DIR", None)
    return env


TINY = [
    "--set", "data.dataset=embedded", "--set", "data.train_limit=256", "--set", "data.test_limit=64",
    "--set", "train.min_steps=none", "--set", "train.eval_every=none",
    "--hidden", "8", "--batch-size", "32", "--set", "train.threads=1",
]

# Runs `rnnkit train`, reporting each checkpoint on stdout; before writing the checkpoint of step
# KILL_AT it says so and waits on stdin, so the test kills it at a known point in the middle of the
# run: step KILL_AT is done in memory, its checkpoint is not written.
_KILLABLE = textwrap.dedent(
    """
    import sys
    import rnnkit.train.callbacks as callbacks
    from rnnkit import cli

    KILL_AT = int(sys.argv[1])
    _save = callbacks.Checkpointer.save

    def save(self, trainer):
        if trainer.step == KILL_AT:
            print(f"about to save {trainer.step}", flush=True)
            sys.stdin.readline()
        path = _save(self, trainer)
        print(f"checkpoint {trainer.step} {path}", flush=True)
        return path

    callbacks.Checkpointer.save = save
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def _final_line(out: str) -> str:
    last = out.strip().splitlines()[-1]
    m = re.match(r"final test accuracy: \S+ \(loss \S+\) after [\d,]+ steps", last)
    assert m, last
    return m.group(0)


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    from rnnkit import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RNNKIT_DATA_DIR", raising=False)
    args = ["train", *TINY, "--epochs", "2", "--no-progress", "--seed", "7", "--name", "kill",
            "--set", "model.dropout=0.3", "--set", "optim.ema=0.5", "--set", "train.checkpoint_every=1"]
    kill_at = 11  # 8 steps per epoch: in the middle of the second epoch
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(kill_at), *args, "--out", str(tmp_path / "killed")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env(),
    )
    try:
        lines = _Lines(proc.stdout)
        run_dir = lines.wait_for(r"^run directory: (.*)$").group(1).strip()
        lines.wait_for(rf"^checkpoint {kill_at - 1} ")
        lines.wait_for(rf"^about to save {kill_at}$")
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    latest = latest_checkpoint(f"{run_dir}/checkpoints")
    assert latest is not None and read_meta(latest)["step"] == kill_at - 1
    assert not os.path.exists(f"{run_dir}/model.safetensors")

    capsys.readouterr()
    assert cli.main(["train", "--resume", run_dir]) == 0
    resumed_out = capsys.readouterr().out
    assert f"at step {kill_at - 1}" in resumed_out

    assert cli.main([*args, "--out", str(tmp_path / "reference")]) == 0
    reference_out = capsys.readouterr().out
    ref_dir = re.search(r"^run directory: (.*)$", reference_out, re.M).group(1).strip()

    assert _final_line(resumed_out) == _final_line(reference_out)
    for name in ("model.safetensors", "checkpoints/ckpt-000016.safetensors"):
        got, _ = load_checkpoint(f"{run_dir}/{name}")
        want, _ = load_checkpoint(f"{ref_dir}/{name}")
        assert got.keys() == want.keys()
        for key in want:
            if not key.startswith("rng/"):
                assert torch.equal(got[key], want[key]), (name, key)


@pytest.mark.skipif(os.name != "posix", reason="needs SIGTERM")
def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    from rnnkit import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RNNKIT_DATA_DIR", raising=False)
    # far more steps than it will run; with the progress bar on, each evaluation prints a line
    args = [*TINY, "--steps", "100000", "--set", "train.eval_every=2", "--out", str(tmp_path / "runs")]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "rnnkit", "train", *args], stdout=subprocess.PIPE,
                                stderr=stderr, text=True, env=_child_env())
        try:
            lines = _Lines(proc.stdout)
            run_dir = lines.wait_for(r"^run directory: (.*)$").group(1).strip()
            lines.wait_for(r"^step +2 +epoch")  # training is under way
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 130, (tmp_path / "stderr.txt").read_text()[-2000:]
            out = lines.rest()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
    assert "interrupted (signal SIGTERM)" in out
    assert f"Continue with: rnnkit train --resume {run_dir}" in out
    steps = int(re.search(r"after ([\d,]+) steps", out.strip().splitlines()[-1]).group(1).replace(",", ""))
    assert 2 <= steps < 100000
    latest = latest_checkpoint(f"{run_dir}/checkpoints")
    assert latest is not None and latest.name == f"ckpt-{steps:06d}.safetensors"
    tensors, meta = load_checkpoint(latest)
    assert meta["step"] == steps and any(k.startswith("model/") for k in tensors)
    # and it resumes
    capsys.readouterr()
    assert cli.main(["train", "--resume", run_dir, "--steps", str(steps + 2), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {latest} at step {steps}" in out
    assert f"after {steps + 2:,} steps" in out.strip().splitlines()[-1]


def test_sigint_stops_after_the_current_step_and_checkpoints(tmp_path):
    x, y = make_data(40)
    model = make_model()
    rec = Recorder()

    class Interrupt(Callback):
        def __init__(self, times: int) -> None:
            self.times = times

        def on_step_end(self, trainer, logs):
            if trainer.step == 3:
                for _ in range(self.times):
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    ckpt = Checkpointer(tmp_path / "ckpts")
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Interrupt(1), rec, ckpt])
    trainer.fit(Batches(x, y, 4), steps=50)
    assert trainer.step == 3 and trainer.stop_requested == "signal SIGINT"
    assert rec.fit_end == [True]
    assert latest_checkpoint(tmp_path / "ckpts").name == "ckpt-000003.safetensors"
    assert signal.getsignal(signal.SIGINT) is before
    # a second signal means "now"
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Interrupt(2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(Batches(x, y, 4), steps=50)
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------ non-finite guard


class NaNAt(nn.Module):
    """A classifier whose output (or gradients) turn NaN on the ``at``-th training forward pass."""

    def __init__(self, at: int, where: str = "loss") -> None:
        super().__init__()
        self.inner = make_model()
        self.at, self.where, self.calls = at, where, 0
        if where == "grad":
            for p in self.inner.parameters():
                p.register_hook(lambda g: g * float("nan") if self.calls - 1 == self.at else g)

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.at and self.where == "loss":
                out = out * float("nan")
        return out


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_stops_naming_the_step_and_culprit(where):
    x, y = make_data(40)
    model = NaNAt(3, where)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(Batches(x, y, 4), steps=10)
    message = str(info.value)
    assert message.startswith("step 3: ")
    if where == "loss":
        assert "the loss" in message
    else:
        first = next(iter(model.named_parameters()))[0]
        assert f"the gradient of {first!r}" in message
    assert trainer.step == 3
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert isinstance(info.value, FloatingPointError)


def test_nonfinite_skip_skips_the_batch_and_continues():
    x, y = make_data(40)
    model = NaNAt(3)
    rec = Recorder()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip", callbacks=[rec])
    batches = Batches(x, y, 4)
    trainer.fit(batches, steps=3)
    before = copy.deepcopy(model.state_dict())
    xb, yb = x[:4], y[:4]
    logs = trainer.train_step(xb, yb)  # the 4th forward: NaN
    assert logs["skipped"] == 1.0 and math.isnan(logs["loss"])
    assert trainer.step == 3 and len(rec.steps) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.fit(batches, steps=6)
    assert trainer.step == 6 and model.calls == 7
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="nonfinite"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="ignore")


# ------------------------------------------------------------------------- clipping, penalties, EMA, ...


def _grad_norm(model: nn.Module, x, y) -> float:
    model = copy.deepcopy(model)
    model.train()
    F.cross_entropy(model(x), y).backward()
    return torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()


def _norm_of_grads(opt: torch.optim.Optimizer) -> float:
    """The global L2 norm of the gradients the optimiser is about to apply."""
    return math.sqrt(sum(p.grad.double().pow(2).sum().item() for g in opt.param_groups for p in g["params"]))


def test_clipping_logs_the_pre_clip_norm_and_clips():
    x, y = make_data(8)
    for clip in (None, 0.05):
        model = make_model()
        expected = _grad_norm(model, x, y)
        seen: list[float] = []
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.register_step_pre_hook(lambda o, a, k, seen=seen: seen.append(_norm_of_grads(o)))
        logs = Trainer(model, opt, clip_norm=clip).train_step(x, y)
        assert logs["grad_norm"] == pytest.approx(expected, rel=1e-5)
        if clip is None:
            assert seen[0] == pytest.approx(expected, rel=1e-5)
        else:
            assert expected > clip and seen[0] <= clip * (1 + 1e-5)
            assert seen[0] == pytest.approx(clip, rel=1e-4)
    # clipping by value bounds every element
    model = make_model()
    maxima = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_pre_hook(
        lambda o, a, k: maxima.append(max(p.grad.abs().max().item() for p in o.param_groups[0]["params"]))
    )
    Trainer(model, opt, clip_value=1e-3).train_step(x, y)
    assert maxima[0] <= torch.tensor(1e-3).item()  # the bound in float32


def test_l1_l2_penalties_add_the_expected_amount():
    x, y = make_data(8)
    weights = [p for p in make_model().parameters() if p.dim() >= 2]  # biases are not penalised
    l2_term = sum(p.detach().double().pow(2).sum().item() for p in weights)
    l1_term = sum(p.detach().double().abs().sum().item() for p in weights)

    def step(**kw):
        model = make_model()
        logs = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw).train_step(x, y)
        return logs["loss"], model

    plain, plain_model = step()
    with_l2, l2_model = step(l2=0.01)
    with_l1, _ = step(l1=0.003)
    assert with_l2 - plain == pytest.approx(0.01 * l2_term, rel=1e-4)
    assert with_l1 - plain == pytest.approx(0.003 * l1_term, rel=1e-4)
    # and its gradient 2 * l2 * w moves the weights: SGD's extra step is -lr * 2 * l2 * w
    for (name, p0), p_plain, p_l2 in zip(make_model().named_parameters(), plain_model.parameters(),
                                         l2_model.parameters()):
        extra = -0.1 * 2 * 0.01 * p0.detach() if p0.dim() >= 2 else torch.zeros_like(p0)
        torch.testing.assert_close(p_l2 - p_plain, extra, atol=1e-6, rtol=1e-4, msg=name)


def test_ema_is_used_for_evaluation_and_the_live_weights_come_back():
    x, y = make_data(24)
    model = make_model()
    decay = 0.7
    shadow = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05), ema_decay=decay)
    batches = Batches(x, y, 8)
    for _ in range(4):
        trainer.fit(batches, steps=trainer.step + 1)
        for k, v in model.named_parameters():
            shadow[k] = decay * shadow[k] + (1 - decay) * v.detach()
    live = copy.deepcopy(model.state_dict())
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(shadow)
    averaged.eval()
    with torch.no_grad():
        logits = averaged(x)
    metrics = trainer.evaluate(x, y)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    with torch.no_grad():
        live_loss = F.cross_entropy(model.eval()(x), y).item()
    assert metrics["loss"] != pytest.approx(live_loss, rel=1e-4)  # the test can tell the two apart
    torch.testing.assert_close(trainer.predict(x), logits)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())


def test_ema_switched_on_at_a_resume_averages_from_the_restored_weights(tmp_path):
    x, y = make_data(24)
    model = make_model()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05))
    trainer.fit(Batches(x, y, 8), steps=3)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", *trainer.checkpoint_state())
    resumed_model = make_model(seed=1)  # other initial weights, which the average must not start from
    resumed = Trainer(resumed_model, torch.optim.Adam(resumed_model.parameters(), lr=0.05), ema_decay=0.9)
    resumed.restore(path)
    assert resumed.ema.num_updates == 0
    for name, p in model.named_parameters():
        assert torch.equal(resumed.ema.shadow[name], p.detach()), name


def test_a_negative_data_position_in_a_checkpoint_is_a_checkpoint_error(tmp_path):
    from rnnkit.errors import CheckpointError

    x, y = make_data(24)
    model = make_model()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05))
    batches = Batches(x, y, 8)
    trainer.fit(batches, steps=2)
    tensors, meta = trainer.checkpoint_state()
    path = save_checkpoint(tmp_path / "ckpt.safetensors", tensors, {**meta, "data_position": {"epoch": -1, "batch": 1}})
    with pytest.raises(CheckpointError, match="damaged or foreign .*data_position"):
        Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05)).restore(path, Batches(x, y, 8))


@pytest.mark.parametrize("batch", [8, 7])  # 7: micro-batches of 4 and 3 are weighted by their size
def test_accumulation_matches_one_full_batch(batch):
    x, y = make_data(batch)
    results = []
    for accumulate in (1, 2):
        model = make_model()
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), accumulate=accumulate, l2=1e-3)
        logs = trainer.train_step(x, y)
        results.append((logs, model))
    (logs1, m1), (logs2, m2) = results
    assert logs2["loss"] == pytest.approx(logs1["loss"], rel=1e-5)
    assert logs2["accuracy"] == pytest.approx(logs1["accuracy"])
    assert logs2["grad_norm"] == pytest.approx(logs1["grad_norm"], rel=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, atol=1e-6, rtol=1e-5)
    assert not params_equal(m1, make_model())  # a real step was taken


def test_learning_rate_follows_the_schedule():
    x, y = make_data(40)
    model = make_model()
    rec = Recorder()

    def schedule(step: int) -> float:
        return 0.1 / (1 + step) if step < 3 else 0.001 * step

    opt = torch.optim.SGD(model.parameters(), lr=123.0)
    trainer = Trainer(model, opt, schedule=schedule, callbacks=[rec])
    trainer.fit(Batches(x, y, 8), steps=7)
    # the step logged as n (1-based) was taken with schedule(n - 1)
    assert [s["lr"] for s in rec.steps] == [schedule(n) for n in range(7)]
    assert opt.param_groups[0]["lr"] == schedule(6)
    # without a schedule the optimiser's own lr is logged
    rec2 = Recorder()
    m2 = make_model()
    Trainer(m2, torch.optim.SGD(m2.parameters(), lr=0.07), callbacks=[rec2]).fit(Batches(x, y, 8), steps=2)
    assert [s["lr"] for s in rec2.steps] == [0.07, 0.07]


def test_the_schedule_keeps_each_groups_lr_scale():
    x, y = make_data(40)
    model = make_model()
    rest = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    opt = torch.optim.SGD([{"params": rest}, {"params": model.head.parameters(), "lr_scale": 0.1}], lr=1.0)
    Trainer(model, opt, schedule=lambda step: 0.5 / (1 + step)).fit(Batches(x, y, 8), steps=3)
    # as optim.apply_lr documents: the group's rate is the schedule's times its lr_scale
    assert [g["lr"] for g in opt.param_groups] == [0.5 / 3, 0.1 * 0.5 / 3]


# ------------------------------------------------------------------------------------------ callbacks


def test_metrics_logger_writes_train_and_eval_json_lines(tmp_path):
    x, y = make_data(40)
    xv, yv = make_data(6, seed=2)  # too few for every class: per-class NaN must become null
    model = make_model()
    path = tmp_path / "logs" / "metrics.jsonl"
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), callbacks=[MetricsLogger(path, every=2)])
    trainer.fit(Batches(x, y, 8), (xv, yv), steps=5, eval_every=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(train) + len(evals) == len(records)
    assert [r["step"] for r in train] == [1, 2, 4]
    assert [r["step"] for r in evals] == [2, 4, 5]
    for r in train:
        assert {"loss", "accuracy", "lr", "grad_norm", "examples_per_s", "time"} <= set(r)
    for r, h in zip(evals, trainer.history):
        assert r["loss"] == h["loss"] and r["accuracy"] == h["accuracy"] and r["time"] >= 0
    assert None in [evals[0][f"accuracy_class_{c}"] for c in range(C)] or len(set(yv.tolist())) == C
    assert "NaN" not in path.read_text()


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = make_data(40)
    xv, yv = make_data(16, seed=1)
    model = make_model()
    rec = Recorder()
    tb = TensorBoardLogger(tmp_path / "tb", every=1, histograms_every=2, config_text="[model]\nhidden = 6")
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), callbacks=[rec, tb])
    trainer.fit(Batches(x, y, 8), (xv, yv), steps=4, eval_every=2)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})  # 0: keep every event
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/accuracy", "train/lr", "train/grad_norm", "test/loss", "test/accuracy"} <= set(
        tags["scalars"]
    )
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in rec.steps], rel=1e-6)
    test_acc = acc.Scalars("test/accuracy")
    assert [e.step for e in test_acc] == [2, 4]
    assert [e.value for e in test_acc] == pytest.approx([h["accuracy"] for h in trainer.history], rel=1e-6)
    assert not any(t.startswith("test/accuracy_class_") for t in tags["scalars"])
    assert any(t.startswith("weights/") for t in tags["histograms"])
    grads = [t for t in tags["histograms"] if t.startswith("gradients/")]
    assert {t.removeprefix("gradients/") for t in grads} == {n for n, _ in model.named_parameters()}
    assert [e.step for e in acc.Histograms(grads[0])] == [2, 4]  # logged before zero_grad, under their step
    assert tags["tensors"] or tags.get("text")  # the config text


def test_checkpointer_keeps_the_last_k_and_the_best(tmp_path):
    x, y = make_data(40)
    xv, yv = make_data(16, seed=1)
    model = make_model()
    ckpt = Checkpointer(tmp_path, every=1, keep_last=2, metric="loss", mode="min", meta={"run": "keep-best"})
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.2), callbacks=[ckpt])
    # a large lr makes the validation loss go up and down
    trainer.fit(Batches(x, y, 8), (xv, yv), steps=10, eval_every=1)
    losses = {h["step"]: h["loss"] for h in trainer.history}
    best = min(losses, key=losses.get)
    kept = sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("ckpt-*.safetensors"))
    assert kept == sorted({9, 10, best})
    assert ckpt.manager.best == tmp_path / f"ckpt-{best:06d}.safetensors"
    # the metric stored with each checkpoint is the one measured on the weights it holds
    for step in kept:
        tensors, meta = load_checkpoint(tmp_path / f"ckpt-{step:06d}.safetensors")
        assert meta["_metric"] == losses[step], step
        probe = make_model()
        probe.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
        assert Trainer(probe, torch.optim.SGD(probe.parameters(), lr=1.0)).evaluate(xv, yv)["loss"] == losses[step]


def test_checkpointer_saves_each_epoch_and_at_the_end(tmp_path):
    x, y = make_data(40)
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      callbacks=[Checkpointer(tmp_path, keep_last=10)])
    trainer.fit(Batches(x, y, 16), epochs=2)  # 3 steps per epoch
    trainer.fit(Batches(x, y, 16), steps=7)
    kept = sorted(p.name for p in tmp_path.glob("ckpt-*.safetensors"))
    assert kept == ["ckpt-000003.safetensors", "ckpt-000006.safetensors", "ckpt-000007.safetensors"]
    assert read_meta(tmp_path / kept[1])["data_position"] == {"epoch": 2, "batch": 0, "seed": 0}


def test_early_stopping_stops(tmp_path):
    x, y = make_data(40)
    xv, yv = make_data(16, seed=1)
    model = make_model()
    rec = Recorder()
    # min_delta so large that nothing after the first evaluation counts as an improvement
    stopper = EarlyStopping("loss", patience=2, min_delta=100.0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[stopper, rec])
    batches = Batches(x, y, 8)  # 5 steps per epoch
    trainer.fit(batches, (xv, yv), epochs=50)
    assert trainer.epoch == 3 and trainer.step == 15 and len(trainer.history) == 3
    assert trainer.stop_requested.startswith("early stopping: loss did not improve for 2")
    assert rec.fit_end == [False]  # not an interruption
    # with eval_every it stops right after the evaluation
    model = make_model()
    stopper = EarlyStopping("accuracy", patience=2, mode="max", min_delta=100.0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[stopper])
    trainer.fit(Batches(x, y, 8), (xv, yv), steps=100, eval_every=2)
    assert trainer.step == 6 and [h["step"] for h in trainer.history] == [2, 4, 6]


def test_time_to_target_records_the_first_hit():
    x, y = make_data(40)
    xv, yv = make_data(16, seed=1)
    model = make_model()
    reached, never = TimeToTarget(0.0), TimeToTarget(1.01)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[reached, never])
    trainer.fit(Batches(x, y, 8), (xv, yv), steps=6, eval_every=3)
    assert reached.step == 3 and reached.seconds is not None and reached.seconds >= 0
    assert never.step is None and never.seconds is None


# ------------------------------------------------------------------------------------------ batches


def _indexed(n: int = 23):
    return torch.arange(n), torch.arange(n) * 10


def _epoch(b: Batches) -> list[torch.Tensor]:
    return [xb for xb, _ in b.epoch_batches()]


def test_batches_each_epoch_is_a_permutation_with_a_partial_last_batch():
    x, y = _indexed()
    b = Batches(x, y, 5, seed=1)
    assert len(b) == 5
    epochs = []
    for e in range(3):
        xs, ys = zip(*b.epoch_batches())
        assert [len(t) for t in xs] == [5, 5, 5, 5, 3]
        assert all(torch.equal(yb, xb * 10) for xb, yb in zip(xs, ys))
        order = torch.cat(xs)
        assert sorted(order.tolist()) == list(range(23))
        epochs.append(order)
        assert b.position.epoch == e + 1 and b.position.batch == 0
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    dropped = Batches(x, y, 5, drop_last=True)
    assert len(dropped) == 4 and [len(t) for t in _epoch(dropped)] == [5] * 4
    assert torch.equal(torch.cat(_epoch(Batches(x, y, 5, shuffle=False))), x)


def test_batches_order_is_a_pure_function_of_seed_and_epoch():
    x, y = _indexed()
    a = Batches(x, y, 5, seed=4)
    for _ in range(2):
        _epoch(a)
    torch.manual_seed(77)  # the global RNG plays no part
    b = Batches(x, y, 5, seed=4)
    for e in (0, 1, 2, 5):
        assert torch.equal(a.order(e), b.order(e))
    assert torch.equal(torch.cat(_epoch(a)), b.order(2))
    assert not torch.equal(Batches(x, y, 5, seed=5).order(0), b.order(0))


def test_batches_resume_mid_epoch():
    x, y = _indexed()
    a = Batches(x, y, 5, seed=2)
    _epoch(a)
    it = a.epoch_batches()
    taken = [next(it)[0] for _ in range(2)]
    state = a.state_dict()
    assert state == {"epoch": 1, "batch": 2, "seed": 2}
    rest_a = [xb for xb, _ in it] + _epoch(a)
    b = Batches(x, y, 5, seed=0)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives the JSON of a checkpoint
    rest_b = _epoch(b) + _epoch(b)
    assert len(rest_a) == len(rest_b) == 3 + 5
    assert all(torch.equal(u, v) for u, v in zip(rest_a, rest_b))
    assert torch.equal(torch.cat(taken + rest_b[:3]), a.order(1))


def test_batches_distributed_shares_are_disjoint():
    x, y = _indexed(23)
    shares = [Batches(x, y, 3, seed=6, rank=r, world_size=3) for r in range(3)]
    for epoch in range(2):
        seen = [torch.cat(_epoch(s)).tolist() for s in shares]
        assert all(len(s) == 23 // 3 for s in seen)
        flat = [i for s in seen for i in s]
        assert len(set(flat)) == len(flat)  # disjoint
        assert set(flat) <= set(range(23))
        assert all(len(s) == 3 for s in shares)  # batches per epoch, per rank
        # together they are the shuffled order of the whole set, dealt round-robin
        whole = Batches(x, y, 3, seed=6).order(epoch)
        assert sorted(flat) == sorted(whole[: 21].tolist())


def test_batches_reject_bad_arguments():
    from rnnkit.errors import ConfigError, ShapeError

    x, y = _indexed()
    with pytest.raises(ShapeError, match="23 examples but targets have 22"):
        Batches(x, y[:22], 4)
    with pytest.raises(ConfigError, match="batch_size"):
        Batches(x, y, 0)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "step", "cosine", "one_cycle"])
def test_every_configured_schedule_builds_and_gives_a_positive_rate(schedule):
    from rnnkit import app
    from rnnkit.config import apply_overrides
    from rnnkit.recipes import recipe_config

    cfg = apply_overrides(recipe_config("mnist-rows"), [f"optim.schedule={schedule}", "optim.warmup_steps=3"])
    model = torch.nn.Linear(4, 2)
    trainer = app.build_trainer(cfg, model, torch.device("cpu"), [], train_size=1000)
    rates = [trainer.schedule(s) for s in (0, 5, 20)]
    assert all(r > 0 and math.isfinite(r) for r in rates), rates
    assert max(rates) <= cfg.optim.lr * (1 + 1e-9)


# ------------------------------------------------------------------------------ bfloat16 autocast


def test_bf16_on_the_cpu_only_where_it_has_bf16_instructions(monkeypatch):
    from rnnkit.errors import RnnkitWarning
    from rnnkit.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert trainer_module.bf16_autocast_pays(torch.device("cpu"))
    assert trainer_module.bf16_autocast_pays(torch.device("cuda"))
    model = make_model()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), bf16=True)
    assert trainer.bf16
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x, y = make_data(16)
    trainer.fit(Batches(x, y, 8), steps=2)
    assert seen == [torch.bfloat16, torch.bfloat16]  # the forward ran under bfloat16 autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())

    # evaluation stays in float32: the same figures as a float32 trainer's (and `rnnkit eval`'s)
    plain = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01))
    assert trainer.evaluate(x, y) == plain.evaluate(x, y)

    # stacked layers and an input projection: the second layer gets the first one's bfloat16 output
    for options in ({"num_layers": 2}, {"input_projection": 5}, {"num_layers": 2, "bidirectional": True}):
        torch.manual_seed(0)
        deep = SequenceClassifier(I, C, hidden_size=6, **options)
        t = Trainer(deep, torch.optim.Adam(deep.parameters(), lr=0.01), bf16=True)
        history = t.fit(Batches(x, y, 8), (x, y), steps=2)
        assert math.isfinite(history[-1]["loss"])

    monkeypatch.setattr(trainer_module, "_cpu_flags", lambda: {"avx512f"})
    assert not trainer_module.bf16_autocast_pays(torch.device("cpu"))
    with pytest.warns(RnnkitWarning, match="bfloat16 instructions"):
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), bf16=True)
    assert not trainer.bf16


def test_layers_under_cpu_autocast_take_their_own_lower_precision_outputs_back():
    """A stream carries the kernel's bfloat16 state into the next window; a stack feeds bfloat16 on."""
    import rnnkit

    torch.manual_seed(0)
    for layer in (rnnkit.LSTM(3, 4, num_layers=2, batch_first=True), rnnkit.GRU(3, 4, batch_first=True)):
        x = torch.randn(2, 5, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, hidden = layer(x)
            out2, _ = layer(x, hidden)  # the next window starts from the bfloat16 state
            out3, _ = layer(out[..., :3].float().to(torch.bfloat16))  # bfloat16 input
        assert out2.shape == out.shape == out3.shape
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(rnnkit.ShapeError, match="float64"):
            layer(x.double())  # not autocast's dtype: still a clear error


def test_a_seed_too_large_for_torch_after_mixing_still_orders_the_data():
    x, y = make_data(40)
    big = Batches(x, y, 7, seed=20_000_000_000_000)  # times the mixing constant, past torch's seeds
    assert sorted(big.order(0).tolist()) == list(range(40))
    g = torch.Generator().manual_seed(3 * 1_000_003 + 1)  # seeds in range keep their orders
    assert torch.equal(Batches(x, y, 7, seed=3).order(1), torch.randperm(40, generator=g))
