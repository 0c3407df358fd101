"""Two processes under torchrun (gloo, CPU) take the same steps as one process with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cli_runner import run

from rnnkit.train.checkpoint import load_checkpoint
from rnnkit.train.distributed import Dist, split_batch

TINY = [
    "--set", "data.dataset=embedded", "--set", "data.train_limit=256", "--set", "data.test_limit=64",
    "--set", "train.min_steps=none", "--set", "train.eval_every=none", "--hidden", "8", "--batch-size", "32",
    "--no-progress", "--set", "train.threads=1", "--epochs", "2", "--seed", "3",
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RNNKIT_DATA_DIR", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _model_of(out_dir) -> dict[str, torch.Tensor]:
    (path,) = list(out_dir.glob("*/model.safetensors"))
    return load_checkpoint(path)[0]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rnnkit", "train", *TINY, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed: 2 processes, 16 examples each per step" in done.stdout
    assert len(list((tmp_path / "ddp").iterdir())) == 1  # only rank 0 wrote a run directory
    finals = [line for line in done.stdout.splitlines() if line.startswith("final test accuracy")]
    assert len(finals) == 1 and not finals[0].endswith("run: ."), done.stdout  # only rank 0 reports
    # a resume with nothing left to train: every rank ends as rank 0 does (rank 1 had no history to report)
    (run_dir,) = list((tmp_path / "ddp").iterdir())
    again = subprocess.run([*cmd[:cmd.index("train") + 1], "--resume", str(run_dir), "--no-progress"],
                           capture_output=True, text=True, env=env, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    (final,) = [line for line in again.stdout.splitlines() if line.startswith("final test accuracy")]
    assert final.split(" steps, ")[0] == finals[0].split(" steps, ")[0]  # the same figure, after 16 steps

    code, _, err = run(["train", *TINY, "--out", str(tmp_path / "single")])
    assert code == 0, err
    two, one = _model_of(tmp_path / "ddp"), _model_of(tmp_path / "single")
    assert two.keys() == one.keys() and not any(k.startswith("module.") for k in two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one)


def test_global_batch_must_split_evenly():
    assert split_batch(32, Dist(0, 2, 0)) == 16 and split_batch(32, None) == 32
    with pytest.raises(ValueError, match="multiple of 3"):
        split_batch(32, Dist(0, 3, 0))


def test_a_task_under_torchrun_is_refused_instead_of_trained_once_per_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, out, err = run(["train", "echo", "--steps", "2", "--no-progress", "--out", str(tmp_path / "runs")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "task echo does not train data-parallel" in err
    assert not (tmp_path / "runs").exists()
