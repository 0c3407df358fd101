"""The ``rnnkit`` command, run in-process through ``rnnkit.cli.main``: train writes a complete run
directory that reproduces, evaluates and predicts on its own; bad input exits 2 with one line."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run

from rnnkit.config import dump_toml
from rnnkit.recipes import RECIPES, recipe_config
from rnnkit.train.checkpoint import load_checkpoint

# tiny settings on the embedded mini-MNIST: 8 steps per epoch
TINY = [
    "--set", "data.dataset=embedded", "--set", "data.train_limit=256", "--set", "data.test_limit=64",
    "--set", "train.min_steps=none", "--set", "train.eval_every=none",
    "--hidden", "8", "--batch-size", "32", "--no-progress", "--set", "train.threads=1",
]
FINAL = re.compile(r"^final test accuracy: ([\d.]+)% \(loss ([\d.]+)\) after ([\d,]+) steps, "
                   r"([\d.]+) s of training \(([\d.]+) s of it evaluating\); run: (.+)$")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Nothing lands in the working directory, no data directory leaks in, one thread is restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RNNKIT_DATA_DIR", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def final_line(out: str) -> re.Match:
    last = out.strip().splitlines()[-1]
    m = FINAL.match(last)
    assert m, f"the last line does not state the final accuracy: {last!r}"
    assert float(m.group(5)) <= float(m.group(4))  # evaluating is part of the training time
    return m


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, shared by the tests that use its directory."""
    out_dir = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:
        code, out, err = run(["train", *TINY, "--epochs", "2", "--seed", "3", "--name", "tiny",
                              "--out", str(out_dir)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    m = final_line(out)
    return {"out": out, "err": err, "dir": m.group(6), "accuracy": m.group(1), "loss": m.group(2)}


# ------------------------------------------------------------------------------------------- train


def test_train_writes_a_complete_run_directory(trained):
    from pathlib import Path

    run_dir = Path(trained["dir"])
    assert run_dir.is_dir() and run_dir.name.startswith("tiny-")
    for name in ("config.toml", "metrics.jsonl", "curves.png", "predictions.png", "model.safetensors"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*.safetensors"))
    assert ckpts and ckpts[-1].name == "ckpt-000016.safetensors"
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16] and [r["epoch"] for r in evals] == [1, 2]
    assert f"{100 * evals[-1]['accuracy']:.2f}" == trained["accuracy"]
    _, meta = load_checkpoint(run_dir / "model.safetensors")
    assert meta["kind"] == "rnnkit-model" and meta["step"] == 16
    config = (run_dir / "config.toml").read_text()
    assert "hidden = 8" in config and 'dataset = "embedded"' in config
    out = trained["out"]
    assert "run directory: " in out and "after 16 steps" in out.strip().splitlines()[-1]


def test_config_of_a_run_reproduces_it(trained, tmp_path):
    config = f"{trained['dir']}/config.toml"
    code, out, err = run(["train", "--config", config, "--out", str(tmp_path / "again")])
    assert code == 0, err
    m = final_line(out)
    assert (m.group(1), m.group(2)) == (trained["accuracy"], trained["loss"])
    first, _ = load_checkpoint(f"{trained['dir']}/model.safetensors")
    second, _ = load_checkpoint(f"{m.group(6)}/model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_eval_and_predict_work_from_the_run_directory_alone(trained, tmp_path):
    # a copy elsewhere, looked at from another working directory
    copy = tmp_path / "copied-run"
    shutil.copytree(trained["dir"], copy)
    code, out, err = run(["eval", str(copy)])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith(f"test accuracy: {trained['accuracy']}% (loss {trained['loss']})")
    assert any(line.startswith("weakest classes: ") for line in lines)

    code, out, err = run(["predict", str(copy), "--n", "5"])
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("#")]
    assert len(rows) == 5
    parsed = [re.match(r"#(\d+) +predicted (\d) \(([\d.]+)%\)  true (\d)", r) for r in rows]
    assert all(parsed), rows
    assert [int(p.group(1)) for p in parsed] == list(range(5))
    correct = sum(p.group(2) == p.group(4) for p in parsed)
    assert out.strip().splitlines()[-1] == f"{correct}/5 correct"


def test_an_ema_run_saves_the_averaged_weights_that_eval_reproduces(tmp_path):
    code, out, err = run(["train", *TINY, "--steps", "6", "--set", "optim.ema=0.9", "--lr", "0.05",
                          "--out", str(tmp_path)])
    assert code == 0, err
    m = final_line(out)
    code, got, err = run(["eval", m.group(6)])
    assert code == 0, err
    # the final figure is the averaged weights'; model.safetensors must hold those, not the raw ones
    assert got.strip().splitlines()[-1] == f"test accuracy: {m.group(1)}% (loss {m.group(2)})"


def test_recipes_lists_every_recipe():
    code, out, _ = run(["recipes"])
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()[2:]]
    assert names == list(RECIPES)


def test_cosine_schedule_spans_the_actual_run(tmp_path):
    """The cosine schedule's length comes from the data actually used, not from full MNIST's 60,000."""
    code, out, err = run(["train", *TINY, "--epochs", "2", "--lr", "0.01", "--set", "optim.schedule=cosine",
                          "--set", "train.log_every=1", "--out", str(tmp_path)])
    assert code == 0, err
    records = [json.loads(line) for line in open(f"{final_line(out).group(6)}/metrics.jsonl")]
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert sorted(lrs) == list(range(1, 17))
    for step, lr in lrs.items():  # the step logged as n used schedule(n - 1); 16 steps in all
        assert lr == pytest.approx(0.005 * (1 + math.cos(math.pi * (step - 1) / 16)), rel=1e-9)


_USER_CELL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TinyTanhCell(nn.Module):
        def __init__(self, input_size, hidden_size):
            super().__init__()
            self.hidden_size = hidden_size
            self.mix = nn.Linear(input_size + hidden_size, hidden_size)

        def init_state(self, batch_size, device=None, dtype=None):
            return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

        def forward(self, x, state=None):
            if state is None:
                state = self.init_state(x.shape[0], x.device, x.dtype)
            return torch.tanh(self.mix(torch.cat([x, state], dim=-1)))
    """
)


def test_user_cell_by_dotted_path_trains(tmp_path, monkeypatch):
    (tmp_path / "user_cells_for_cli_test.py").write_text(_USER_CELL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_cells_for_cli_test", raising=False)
    code, out, err = run(["train", *TINY, "--steps", "4", "--cell", "user_cells_for_cli_test.TinyTanhCell",
                          "--out", str(tmp_path / "runs")])
    assert code == 0, err
    m = final_line(out)
    assert "after 4 steps" in m.group(0)
    tensors, _ = load_checkpoint(f"{m.group(6)}/model.safetensors")
    assert any("mix" in k for k in tensors), sorted(tensors)
    code, out, err = run(["eval", m.group(6)])  # the run directory names the cell; it imports again
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith(f"test accuracy: {m.group(1)}%")
    monkeypatch.delitem(sys.modules, "user_cells_for_cli_test", raising=False)


def test_user_cell_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "cells_in_cwd_for_cli_test.py").write_text(_USER_CELL)  # the fixture made tmp_path the cwd
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cells_in_cwd_for_cli_test", raising=False)
    code, out, err = run(["train", *TINY, "--steps", "2", "--cell", "cells_in_cwd_for_cli_test.TinyTanhCell",
                          "--out", str(tmp_path / "runs")])
    assert code == 0, err
    assert sys.path[-1] == str(tmp_path)  # searched last: it shadows no installed package
    monkeypatch.delitem(sys.modules, "cells_in_cwd_for_cli_test", raising=False)


# ------------------------------------------------------------------------------------------ errors


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _data_dir_with_corrupt_images(path):
    path.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28))
    labels = rng.integers(0, 10, 6)
    (path / "train-images-idx3-ubyte").write_bytes(_idx(images)[:-100])  # cut short
    (path / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    (path / "t10k-images-idx3-ubyte").write_bytes(_idx(images))
    (path / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels))
    return path


def _dir_with_config_only(path):
    from rnnkit.recipes import recipe_config

    path.mkdir()
    (path / "config.toml").write_text(dump_toml(recipe_config("seed000")))
    return path


ERRORS = {
    "unknown recipe": (lambda p: ["train", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    "unknown --set key": (lambda p: ["train", *TINY, "--set", "model.hiden=3"], "unknown key 'hiden'"),
    "malformed --set": (lambda p: ["train", *TINY, "--set", "model.hidden"], "malformed override"),
    "bad value type": (lambda p: ["train", *TINY, "--hidden", "abc"], "model.hidden: expected int, got 'abc'"),
    "negative size": (lambda p: ["train", *TINY, "--hidden", "-3"], "model.hidden must be positive, got -3"),
    "huge size": (lambda p: ["train", *TINY, "--hidden", "99999999999999999999"], "model.hidden must be at most"),
    "huge seed": (lambda p: ["train", *TINY, "--seed", str(2**64)], "train.seed must be in [-2**63, 2**64)"),
    "huge permutation seed": (lambda p: ["train", *TINY, "--set", f"data.permutation_seed={2**64}"],
                              "data.permutation_seed must be in [-2**63, 2**64)"),
    "zero batch size": (lambda p: ["train", *TINY, "--batch-size", "0"], "train.batch_size must be positive"),
    "unknown cell": (lambda p: ["train", *TINY, "--cell", "lstmm"], "model.cell must be lstm, gru, rnn"),
    "unimportable cell": (lambda p: ["train", *TINY, "--cell", "no_such_module_zz.Cell"],
                          "--cell 'no_such_module_zz.Cell': cannot import"),
    "empty data dir": (lambda p: ["train", "--data-dir", str(p / "empty"), "--no-progress"], "has no IDX files"),
    "corrupt IDX file": (lambda p: ["train", "--data-dir", str(_data_dir_with_corrupt_images(p / "data")),
                                    "--no-progress"], "train-images-idx3-ubyte: the file is truncated"),
    "missing config file": (lambda p: ["train", "--config", str(p / "nope.toml")], "does not exist"),
    "eval on a non-run dir": (lambda p: ["eval", str(p / "empty")], "has no model.safetensors"),
    "eval on a missing dir": (lambda p: ["eval", str(p / "missing")], "is not a directory"),
    "predict on a non-run dir": (lambda p: ["predict", str(p / "empty")], "has no model.safetensors"),
    "resume without config": (lambda p: ["train", "--resume", str(p / "empty")], "no config.toml there"),
    "resume without checkpoints": (lambda p: ["train", "--resume", str(_dir_with_config_only(p / "run"))],
                                   "no checkpoints in"),
    "zero eval batch": (lambda p: ["train", *TINY, "--set", "train.eval_batch_size=0"],
                        "train.eval_batch_size must be positive"),
    "negative threads": (lambda p: ["train", *TINY, "--set", "train.threads=-1"], "train.threads must be positive"),
    "negative eval_every": (lambda p: ["train", *TINY, "--set", "train.eval_every=-1"],
                            "train.eval_every must be positive"),
    "target over 100%": (lambda p: ["train", *TINY, "--set", "train.target_accuracy=5"],
                         "train.target_accuracy is a fraction"),
    "zero clip_norm": (lambda p: ["train", *TINY, "--set", "optim.clip_norm=0"], "optim.clip_norm must be positive"),
    "infinite lr": (lambda p: ["train", *TINY, "--lr", "inf"], "optim.lr must be positive and finite"),
    "a name that climbs": (lambda p: ["train", *TINY, "--set", "train.name=../../x"],
                           "train.name is part of a directory"),
    "unknown device": (lambda p: ["train", *TINY, "--device", "mps"], "train.device must be auto, cpu, cuda"),
    "--out is a file": (lambda p: ["train", *TINY, "--out", str(p / "file.txt")], "give --out a"),
    "cell that is no class": (lambda p: ["train", *TINY, "--cell", "os.system"], "is a builtin_function_or_method"),
    "predict --n 0": (lambda p: ["predict", str(p / "empty"), "--n", "0"], "--n must be a positive number"),
    "lr-find on a task": (lambda p: ["lr-find", "sin-cos"], "lr-find runs MNIST classifiers"),
    "lr-find in a directory named none": (lambda p: ["lr-find", "--data-dir", "none"],
                                          "data directory none (given as data_dir) does not exist"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_exits_2_with_one_line(case, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not a directory")
    build, expected = ERRORS[case]
    argv = build(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    outdir = [] if "--out" in argv else ["--out", str(tmp_path / "runs")]
    code, out, err = run([*argv, *outdir] if argv[0] == "train" else argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rnnkit: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    # a failed command leaves no run directory or other files behind
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before



def test_a_failed_resume_leaves_the_run_as_it_was(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for change, says in ((["--hidden", "16"], "other settings (model.hidden: 8 -> 16)"),
                         (["--set", "optim.name=sgd"], 'optim.name: "adam" -> "sgd"'),
                         (["--lr", "0.01", "--set", "optim.ema=0.9", "--set", "optim.schedule=cosine"],
                          '(optim.lr: 0.006 -> 0.01, optim.schedule: "one_cycle" -> "cosine", optim.ema: 0.0 -> 0.9)'),
                         (["--set", "optim.clip_norm=0"], "clip_norm")):
        code, out, err = run(["train", "--resume", str(run_dir), *change])
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, err
        assert says in err, err
        assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    code, out, err = run(["eval", str(run_dir)])
    assert code == 0, err


def test_a_checkpoint_without_a_saved_configuration_still_resumes(trained, tmp_path):
    from rnnkit.train.checkpoint import save_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    for ckpt in (run_dir / "checkpoints").glob("ckpt-*.safetensors"):  # as older versions wrote them
        tensors, meta = load_checkpoint(ckpt)
        save_checkpoint(ckpt, tensors, {k: v for k, v in meta.items() if k != "config"})
    mismatch = "does not match the model (head.weight: model has [10, 16], checkpoint has [10, 8], and 4 more)"
    code, out, err = run(["train", "--resume", str(run_dir), "--hidden", "16"])
    assert code == 2 and mismatch in err, err  # the weights themselves are still checked
    code, out, err = run(["train", "--resume", str(run_dir), "--steps", "18"])
    assert code == 0, err
    assert "after 18 steps" in final_line(out).group(0)


def test_a_run_whose_weights_blow_up_still_ends_with_its_files(tmp_path):
    from rnnkit.errors import RnnkitWarning

    with pytest.warns(RnnkitWarning, match="histograms skipped"):
        code, out, err = run(["train", *TINY, "--steps", "6", "--lr", "1e30", "--set", "optim.name=sgd",
                              "--set", "optim.clip_norm=none", "--set", "optim.momentum=0", "--out", str(tmp_path)])
    assert code == 0, err
    run_dir = Path(final_line(out).group(6))
    for name in ("model.safetensors", "curves.png", "predictions.png", "config.toml", "metrics.jsonl"):
        assert (run_dir / name).exists(), name


@pytest.fixture
def resumed_after_a_kill(tmp_path) -> Path:
    """A 12-step run killed after its checkpoint at step 4 (the later ones gone), then resumed to its end."""
    code, out, err = run(["train", *TINY, "--steps", "12", "--set", "train.checkpoint_every=4",
                          "--set", "train.log_every=2", "--out", str(tmp_path)])
    assert code == 0, err
    run_dir = Path(final_line(out).group(6))
    for ckpt in sorted((run_dir / "checkpoints").glob("ckpt-*"))[-2:]:  # as if killed after step 4
        ckpt.unlink()
    code, out, err = run(["train", "--resume", str(run_dir)])
    assert code == 0, err
    return run_dir


def test_resume_after_a_kill_does_not_repeat_metrics(resumed_after_a_kill):
    steps = [json.loads(line)["step"] for line in (resumed_after_a_kill / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 12, steps


def test_resume_after_a_kill_does_not_repeat_tensorboard_events(resumed_after_a_kill):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed_after_a_kill / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 4, 6, 8, 10, 12], steps


@pytest.mark.parametrize("edit", [{"step": "abc"}, {"step": -50}, {"data_position": {"epoch": "x"}},
                                  {"data_position": {"epoch": -1, "batch": 3}}])
def test_resume_from_edited_checkpoint_metadata_is_one_line(trained, tmp_path, edit):
    from rnnkit.train.checkpoint import save_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    for ckpt in (run_dir / "checkpoints").glob("ckpt-*.safetensors"):
        tensors, meta = load_checkpoint(ckpt)
        save_checkpoint(ckpt, tensors, {**meta, **edit})
    code, out, err = run(["train", "--resume", str(run_dir)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, err
    assert "damaged or foreign" in err


def test_eval_reads_where_the_data_are_from_the_edited_config(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    config = run_dir / "config.toml"
    assert "test_limit = 64" in config.read_text()
    config.write_text(config.read_text().replace("test_limit = 64", "test_limit = 16"))
    code, out, err = run(["eval", str(run_dir)])
    assert code == 0, err
    assert "16 test images" in out
    # a setting the run left unset (listed in config.toml's unset), written in by hand
    assert '"data.data_dir"' in config.read_text().splitlines()[0]
    text = config.read_text().replace("[data]\n", f'[data]\ndata_dir = "{tmp_path / "nowhere"}"\n')
    text = text.replace('dataset = "embedded"', 'dataset = "mnist"')
    config.write_text(text)
    code, out, err = run(["eval", str(run_dir)])
    assert code == 2 and "nowhere" in err, (out, err)
    config.write_text("[data\n")  # an edit that does not load is reported, not skipped
    code, out, err = run(["eval", str(run_dir)])
    assert code == 2 and "config.toml is not valid TOML" in err, (out, err)


def test_resume_takes_an_older_torchs_optimizer_state(trained, tmp_path):
    from rnnkit.train.checkpoint import save_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    for ckpt in (run_dir / "checkpoints").glob("ckpt-*.safetensors"):
        tensors, meta = load_checkpoint(ckpt)
        text = json.dumps(meta["_optimizer"])
        assert "decoupled_weight_decay" in text
        meta["_optimizer"] = json.loads(text.replace('"decoupled_weight_decay": false, ', ""))
        assert "decoupled_weight_decay" not in json.dumps(meta["_optimizer"])  # a key torch added later
        save_checkpoint(ckpt, tensors, meta)
    code, out, err = run(["train", "--resume", str(run_dir), "--steps", "18"])
    assert code == 0, err


def test_a_run_trained_on_a_gpu_evaluates_on_a_cpu_and_old_settings_still_load(trained, tmp_path):
    from rnnkit.train.checkpoint import save_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    model = run_dir / "model.safetensors"
    tensors, meta = load_checkpoint(model)
    meta["config"] = meta["config"].replace('device = "auto"', 'device = "cuda"').replace(
        'name = "tiny"', 'name = "my run"').replace("threads = 1", "threads = 0")
    assert 'device = "cuda"' in meta["config"] and "threads = 0" in meta["config"]
    save_checkpoint(model, tensors, meta)
    code, out, err = run(["eval", str(run_dir)])
    assert code == 0, err


def test_eval_uses_the_configuration_saved_with_the_weights(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    code, want, err = run(["eval", str(run_dir)])
    config = run_dir / "config.toml"
    config.write_text(config.read_text().replace("hidden = 8", "hidden = 16"))
    code, got, err = run(["eval", str(run_dir)])
    assert code == 0, err
    assert got.strip().splitlines()[-1] == want.strip().splitlines()[-1]


def test_lr_find_plots_and_suggests_a_rate_it_tried(tmp_path):
    code, out, err = run(["lr-find", *TINY[:6], "--set", "train.threads=1", "--set", "model.hidden=8",
                          "--steps", "40", "--start", "1e-5", "--factor", "1.3", "--out", str(tmp_path)])
    assert code == 0, err
    png = tmp_path / "lr_find-mnist-rows.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tried = re.search(r"tried (\d+) rates from ([\d.e+-]+) to ([\d.e+-]+)", out)
    suggested = float(re.search(r"suggested learning rate \(steepest descent\): ([\d.e+-]+)", out).group(1))
    assert tried and float(tried.group(2)) <= suggested <= float(tried.group(3))


def test_version():
    from rnnkit import __version__

    assert run(["--version"]) == (0, f"rnnkit {__version__}\n", "")


def test_lr_find_rejects_a_bad_range():
    code, _, err = run(["lr-find", *TINY[:6], "--factor", "0.9"])
    assert code == 2 and "factor > 1" in err and "Traceback" not in err


def test_steepest_descent_is_where_the_loss_falls_fastest():
    from rnnkit.app import _steepest

    lrs = [10 ** (-6 + 0.1 * i) for i in range(50)]
    # a logistic drop centred at 1e-3.5, then divergence: the steepest point is the centre
    losses = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3.5))) for lr in lrs[:40]] + [5.0] * 10
    assert abs(math.log10(_steepest(lrs, losses)) + 3.5) < 0.15


MNIST_RECIPES = [name for name in RECIPES if recipe_config(name).task == "mnist"]


@pytest.mark.parametrize("recipe", MNIST_RECIPES)
def test_every_mnist_recipe_trains_end_to_end(recipe, tmp_path):
    """Each MNIST recipe as shipped (its model, view, initialisation and optimiser), for two steps
    on a slice of the embedded data: the smoke test of a recipe whose full run is in BENCHMARKS.md."""
    args = ["train", recipe, "--set", "data.dataset=embedded", "--set", "data.train_limit=64",
            "--set", "data.test_limit=32", "--set", "train.min_steps=none", "--set", "train.eval_every=none",
            "--steps", "2", "--batch-size", "16", "--no-progress", "--set", "train.threads=1",
            "--out", str(tmp_path)]
    code, out, err = run(args)
    assert code == 0, err
    m = final_line(out)
    assert "after 2 steps" in m.group(0)
    cfg = (Path(m.group(6)) / "config.toml").read_text()
    assert f'recipe = "{recipe}"' in cfg


def test_epochs_on_the_command_line_means_that_many_epochs(tmp_path):
    without_min_steps = TINY[:6] + TINY[8:]  # the recipe's minimum of 400 steps stays in the config
    assert "train.min_steps=none" not in without_min_steps
    code, out, err = run(["train", *without_min_steps, "--epochs", "1", "--out", str(tmp_path)])
    assert code == 0, err
    assert "after 8 steps" in final_line(out).group(0)  # 256 images in batches of 32, not 400 steps


def _idx_dir(path, labels_up_to: int):
    path.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        (path / f"{split}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
        (path / f"{split}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, labels_up_to + 1, n)))
    return path


def test_an_idx_run_evaluates_on_idx_data_and_refuses_labels_it_never_had(tmp_path):
    three = _idx_dir(tmp_path / "three", 2)
    code, out, err = run(["train", "--dataset", "idx", "--data-dir", str(three), "--steps", "2", "--hidden", "8",
                          "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "runs")])
    assert code == 0, err
    run_dir = final_line(out).group(6)
    code, out, err = run(["eval", run_dir, "--data-dir", str(three)])  # no MNIST checksums for an IDX run
    assert code == 0, err
    code, out, err = run(["eval", run_dir, "--data-dir", str(_idx_dir(tmp_path / "ten", 9))])
    assert code == 2 and "the run's model has 3 classes" in err and "Traceback" not in out + err, err


def test_resume_with_nothing_left_to_train_logs_no_second_evaluation(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["dir"], run_dir)
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    code, out, err = run(["train", "--resume", str(run_dir)])  # its checkpoint is at its last step
    assert code == 0, err
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == records


def test_kernels_command_builds_or_says_why(monkeypatch):
    from conftest import require_cpu_kernels

    from rnnkit.backends import cext

    require_cpu_kernels()
    code, out, _ = run(["kernels"])
    assert code == 0 and out.startswith("rnnkit: CPU kernels ready (") and str(cext.build()) in out
    monkeypatch.setenv("RNNKIT_CPU_KERNELS", "0")
    code, out, err = run(["kernels"])
    assert code == 1 and out == "" and "turned off (RNNKIT_CPU_KERNELS=0)" in err
    monkeypatch.setenv("RNNKIT_CPU_KERNELS", "1")
    monkeypatch.setattr(cext, "build", lambda **kw: (_ for _ in ()).throw(RuntimeError("c++ failed (exit 1): boom")))
    code, out, err = run(["kernels"])
    assert code == 1 and "not built, the Python loops will run instead: c++ failed (exit 1): boom" in err


def test_bench_passes_every_option_to_the_harness(monkeypatch, tmp_path):
    from rnnkit import cli

    code, out, _ = run(["bench", "--help"])
    assert code == 0 and "--shapes" in out and "--time-to-accuracy" in out  # the harness's own help
    monkeypatch.setattr(cli, "benchmark_script", lambda: tmp_path / "benchmarks" / "run.py")
    code, _, err = run(["bench", "--quick"])
    assert code == 2 and "benchmark harness is not here" in err and "make bench" in err
