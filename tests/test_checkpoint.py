from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from rnnkit.errors import CheckpointError, ConfigError
from rnnkit.train.checkpoint import (
    CheckpointManager,
    latest_checkpoint,
    load_checkpoint,
    load_into,
    pack_training_state,
    read_meta,
    restore_training_state,
    save_checkpoint,
)
from rnnkit.train.optim import EMA


class Net(nn.Module):
    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.encoder = nn.LSTM(3, hidden, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.encoder(x)[0][:, -1]))


def _train(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA, steps: int, device: str = "cpu") -> None:
    """A few steps that draw from every RNG a trainer uses: torch (data, dropout), numpy and random."""
    for _ in range(steps):
        x = torch.randn(4, 5, 3, device=device) * (1.0 + float(np.random.rand()))
        order = list(range(4))
        random.shuffle(order)
        loss = model(x[order]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_round_trip_resumes_bit_for_bit(tmp_path):
    _seed_everything(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    ema = EMA(model, decay=0.9, warmup=True)
    _train(model, opt, ema, 3)
    tensors, meta = pack_training_state(model, opt, extra={"ema": ema.state_dict()}, meta={"step": 3})
    assert "optim/state/0/exp_avg" in tensors and "rng/torch" in tensors
    path = save_checkpoint(tmp_path / "ckpt-000003.safetensors", tensors, meta)
    saved_groups = opt.state_dict()["param_groups"]
    _train(model, opt, ema, 3)  # the run that never stopped

    _seed_everything(123)  # a fresh process: other weights, other RNG states
    model2 = Net()
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    ema2 = EMA(model2, decay=0.5)
    meta2, extra = restore_training_state(path, model2, opt2)
    assert meta2 == {"step": 3}
    assert opt2.state_dict()["param_groups"] == saved_groups
    assert isinstance(opt2.param_groups[0]["betas"], tuple)
    ema2.load_state_dict(extra["ema"])
    _train(model2, opt2, ema2, 3)

    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt2.state_dict()["state"][i][key]), (i, key)
    for name, value in ema.shadow.items():
        assert torch.equal(value, ema2.shadow[name]), name
    assert ema2.num_updates == ema.num_updates == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_round_trip_on_cuda_resumes_bit_for_bit(tmp_path):
    def build():
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 2)).cuda()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    _seed_everything(0)
    model, opt = build()
    ema = EMA(model, decay=0.9)
    _train(model, opt, ema, 2, device="cuda")
    tensors, meta = pack_training_state(model, opt, extra={"ema": ema.state_dict()})
    assert "rng/cuda/0" in tensors
    path = save_checkpoint(tmp_path / "gpu.safetensors", tensors, meta)
    _train(model, opt, ema, 2, device="cuda")

    _seed_everything(1)
    torch.cuda.manual_seed_all(1)
    model2, opt2 = build()
    ema2 = EMA(model2, decay=0.9)
    ema2.load_state_dict(restore_training_state(path, model2, opt2)[1]["ema"])
    _train(model2, opt2, ema2, 2, device="cuda")
    for a, b in zip(
        [*model.state_dict().values(), *ema.shadow.values()],
        [*model2.state_dict().values(), *ema2.shadow.values()],
    ):
        assert a.is_cuda and torch.equal(a, b)


def test_rng_states_are_restored():
    _seed_everything(1)
    tensors, meta = pack_training_state(nn.Linear(1, 1))
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    _seed_everything(2)
    restore_training_state((tensors, meta), nn.Linear(1, 1))
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_save_load_plain_tensors_and_meta(tmp_path):
    shared = torch.arange(6.0)
    tensors = {"a": shared, "b": shared, "c": torch.zeros(2, 0), "d": torch.tensor(True)}
    meta = {"config": {"lr": 0.1 + 0.2, "layers": [1, 2]}, "step": np.int64(7), "pos": None}
    path = save_checkpoint(tmp_path / "sub" / "x.safetensors", tensors, meta)
    loaded, meta2 = load_checkpoint(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert meta2 == {"config": {"lr": 0.1 + 0.2, "layers": [1, 2]}, "step": 7, "pos": None}
    assert read_meta(path) == meta2
    assert os.listdir(path.parent) == ["x.safetensors"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match="meta is not JSON-serialisable"):
        save_checkpoint(tmp_path / "y.safetensors", {}, {"bad": object()})
    with pytest.raises(CheckpointError, match="meta keys \\['_rng'\\] are reserved"):
        pack_training_state(nn.Linear(1, 1), meta={"_rng": 1})


# ---------------------------------------------------------------------------------------- atomicity

# Imports torch once, then forks one writer per request line "<path> <first version>". Each writer
# saves versions 0, 1, 2... until killed and prints each version once its save has returned; the
# parent then reports "ended <wait status>", so everything the writer printed comes before it.
_WRITERS = textwrap.dedent(
    """
    import os, sys, torch
    from rnnkit.train.checkpoint import save_checkpoint

    def write_forever(path, version):
        os.write(1, f"pid {os.getpid()}\\n".encode())
        while True:
            x = torch.full((1 << 18,), float(version))
            save_checkpoint(path, {"x": x, "v": torch.tensor(version)}, {"version": version})
            os.write(1, f"{version}\\n".encode())  # one write: a kill never splits a line
            version += 1

    for request in sys.stdin:
        path, version = request.split()
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(path, int(version))
            finally:
                os._exit(1)
        os.write(1, f"ended {os.waitpid(pid, 0)[1]}\\n".encode())
    """
)


def _kill_writer(writers: subprocess.Popen, path, version: int, kind: str, rng: random.Random) -> list[int]:
    """Start a writer on ``path``, SIGKILL it, return the versions it reported as saved."""
    writers.stdin.write(f"{path} {version}\n".encode())
    writers.stdin.flush()
    pid = int(writers.stdout.readline().split()[1])
    if kind == "line":
        text = b"".join(writers.stdout.readline() for _ in range(rng.randint(1, 4)))
        # not synchronisation: a random pause spreads the kills over every phase of the next save
        time.sleep(rng.uniform(0.0, 0.05))
    else:  # at an arbitrary point of the output
        text = writers.stdout.read(rng.randint(1, 30))
    os.kill(pid, signal.SIGKILL)
    out = text.decode()
    while not out.endswith("\n") or not out.splitlines()[-1].startswith("ended"):
        line = writers.stdout.readline()
        assert line, writers.stderr.read().decode()
        out += line.decode()
    *done, ended = out.splitlines()
    status = int(ended.split()[1])
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return [int(v) for v in done]


@pytest.mark.skipif(os.name != "posix", reason="needs fork and SIGKILL")
def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    rng = random.Random(0)
    writers = subprocess.Popen(
        [sys.executable, "-c", _WRITERS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        version = 0
        for kind in ["line", "bytes"] * 4:
            done = _kill_writer(writers, path, version, kind, rng)
            assert done and done[0] == version, done
            tensors, meta = load_checkpoint(path)
            got = meta["version"]
            # the file holds the last save reported, or the next one if it completed before the kill
            assert got in (done[-1], done[-1] + 1), (got, done)
            assert tensors["v"].item() == got
            assert torch.equal(tensors["x"], torch.full((1 << 18,), float(got)))
            version = done[-1] + 2
    finally:
        writers.kill()
        writers.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(n.startswith(".ckpt.safetensors.") and n.endswith(".tmp") for n in leftovers), leftovers


# ------------------------------------------------------------------------------------ unsafe files


class _Payload:
    """Unpickling this object creates a directory: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_files_are_refused_without_running_code(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(str(control))))
    assert control.is_dir(), "the payload must be live for this test to mean anything"

    marker = tmp_path / "marker"
    files = {
        "raw.safetensors": pickle.dumps({"w": _Payload(str(marker))}),
    }
    torch.save({"w": _Payload(str(marker))}, tmp_path / "zip.safetensors")
    torch.save({"w": _Payload(str(marker))}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in ["raw.safetensors", "zip.safetensors", "legacy.pt"]:
        path = tmp_path / name
        for load in (load_checkpoint, read_meta, lambda p: load_into(nn.Linear(1, 1), p)):
            with pytest.raises(CheckpointError) as e:
                load(path)
            msg = str(e.value)
            assert name in msg and "pickle-based" in msg and "run arbitrary code" in msg
            assert "weights_only=True" in msg
        assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.safetensors", {"w": torch.randn(50)}, {"step": 1})
    data = good.read_bytes()
    cases = {
        "cut.safetensors": (data[:-17], "is truncated: it should be"),
        "cut-header.safetensors": (data[:40], "is truncated or not a safetensors checkpoint"),
        "tiny.safetensors": (data[:5], "is truncated or not a checkpoint: it is only 5 bytes"),
        "empty.safetensors": (b"", "only 0 bytes"),
        "random.safetensors": (
            b"\x07" + random.Random(0).randbytes(4095),
            "is truncated or not a safetensors",
        ),
        "text.safetensors": (b"[model]\nhidden = 3\n" * 10, "is truncated or not a safetensors"),
        "badjson.safetensors": ((8).to_bytes(8, "little") + b"{not js}", "header is unreadable"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value) and fragment in str(e.value), str(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------ loading into models


def test_strict_load_lists_every_mismatch(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", *pack_training_state(Net(hidden=6), rng=False))
    other = nn.ModuleDict({"encoder": nn.LSTM(3, 4, batch_first=True), "extra": nn.Linear(1, 1)})
    with pytest.raises(CheckpointError) as e:
        load_into(other, path)
    msg = str(e.value)
    assert "missing from the checkpoint (2): extra.weight, extra.bias" in msg
    assert "in the checkpoint but not in the model (2): head.bias, head.weight" in msg
    assert "shape mismatches (4):" in msg
    for line in [
        "encoder.weight_ih_l0: model has [16, 3], checkpoint has [24, 3]",
        "encoder.weight_hh_l0: model has [16, 4], checkpoint has [24, 6]",
        "encoder.bias_ih_l0: model has [16], checkpoint has [24]",
        "encoder.bias_hh_l0: model has [16], checkpoint has [24]",
    ]:
        assert line in msg
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items()), "nothing loaded on error"

    report = load_into(other, path, strict=False)
    assert report.loaded == [] and len(report.mismatched) == 4
    assert report.unexpected == ["head.bias", "head.weight"] and report.missing == [
        "extra.weight",
        "extra.bias",
    ]


def test_partial_restore_with_include_and_rename(tmp_path):
    source = Net(hidden=6)
    path = save_checkpoint(tmp_path / "a.safetensors", *pack_training_state(source, rng=False))
    target = nn.ModuleDict({"rnn": nn.LSTM(3, 6, batch_first=True), "classifier": nn.Linear(6, 5)})

    report = load_into(target, path, include=["encoder.*"], rename=lambda n: n.replace("encoder.", "rnn."))
    assert report.loaded == sorted(f"rnn.{k}" for k in source.encoder.state_dict())
    assert report.missing == ["classifier.weight", "classifier.bias"]
    assert report.excluded == ["head.bias", "head.weight"]
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(target["rnn"].state_dict()[k], v)

    plain = save_checkpoint(tmp_path / "plain.safetensors", source.state_dict())  # no "model/" prefix
    assert load_into(Net(hidden=6), plain).missing == []
    assert load_into(target["rnn"], plain, include="encoder.*", rename=lambda n: n[8:]).missing == []

    small = nn.ModuleDict({"out": nn.Linear(6, 2)})
    report = load_into(small, path, include="head.weight", rename={"head.weight": "out.weight"})
    assert report.loaded == ["out.weight"] and report.missing == ["out.bias"]
    assert torch.equal(small["out"].weight, source.head.weight)

    with pytest.raises(CheckpointError, match=r"include patterns \['decoder\.\*'\] match no tensor"):
        load_into(target, path, include=["decoder.*"])
    with pytest.raises(CheckpointError, match=r"rename refers to \['heads.weight'\]"):
        load_into(small, path, include="head.weight", rename={"heads.weight": "out.weight"})
    with pytest.raises(
        CheckpointError, match="classifier.weight: model has \\[5, 6\\], checkpoint has \\[2, 6\\]"
    ):
        load_into(target, path, include="head.*", rename=lambda n: n.replace("head.", "classifier."))


def test_restore_checks_optimizer(tmp_path):
    model = nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "m.safetensors", *pack_training_state(model))
    with pytest.raises(CheckpointError, match="holds no optimizer state; pass optimizer=None"):
        restore_training_state(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    path = save_checkpoint(tmp_path / "o.safetensors", *pack_training_state(model, opt))
    with pytest.raises(CheckpointError, match="optimizer state does not fit this optimizer"):
        restore_training_state(path, model, torch.optim.SGD(model.parameters(), lr=0.1))


# ------------------------------------------------------------------------------- directories


def test_latest_checkpoint_uses_step_not_mtime(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step, mtime in [(2, 3000), (10, 1000), (9, 2000)]:
        p = save_checkpoint(tmp_path / f"ckpt-{step:06d}.safetensors", {}, {"step": step})
        os.utime(p, (mtime, mtime))
    for junk in ["ckpt-000099.safetensors.bak", ".ckpt-000100.safetensors.1.ab.tmp", "ckpt-x.safetensors"]:
        (tmp_path / junk).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000010.safetensors"
    (tmp_path / "ckpt-1000000.safetensors").write_bytes(b"")  # wider than 6 digits still sorts by number
    assert latest_checkpoint(tmp_path).name == "ckpt-1000000.safetensors"


def _steps(directory):
    return sorted(int(p.name[5:11]) for p in directory.glob("ckpt-*.safetensors"))


def test_manager_keeps_last_k_and_best(tmp_path):
    metrics = [0.1, 0.9, 0.3, 0.2, 0.4, 0.5]
    manager = CheckpointManager(tmp_path / "max", keep_last=2, mode="max")
    for step, m in enumerate(metrics, 1):
        path = manager.save(step, {"w": torch.tensor(float(step))}, {"step": step}, metric=m)
        assert path.name == f"ckpt-{step:06d}.safetensors"
    assert _steps(tmp_path / "max") == [2, 5, 6]
    assert manager.best == tmp_path / "max" / "ckpt-000002.safetensors"
    assert manager.latest == tmp_path / "max" / "ckpt-000006.safetensors"
    assert load_checkpoint(manager.best)[1] == {"step": 2, "_metric": 0.9}

    # a new manager on the same directory learns the metrics from the files
    (tmp_path / "max" / ".ckpt-000007.safetensors.99.ab.tmp").write_bytes(b"torn")
    again = CheckpointManager(tmp_path / "max", keep_last=2, mode="max")
    assert not list((tmp_path / "max").glob(".*.tmp"))
    again.save(7, {}, metric=0.0)
    assert _steps(tmp_path / "max") == [2, 6, 7]

    low = CheckpointManager(tmp_path / "min", keep_last=2, mode="min")
    for step, m in enumerate(metrics, 1):
        low.save(step, {}, metric=m)
    assert _steps(tmp_path / "min") == [1, 5, 6]

    plain = CheckpointManager(tmp_path / "plain", keep_last=3, keep_best=False)
    for step in range(0, 100, 10):
        plain.save(step, {}, metric=float(step == 0))
    assert _steps(tmp_path / "plain") == [70, 80, 90]

    with pytest.raises(ConfigError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ConfigError, match="mode must be 'max' or 'min'"):
        CheckpointManager(tmp_path, mode="best")


def test_header_lengths_that_look_like_pickle_or_zip_still_load(tmp_path):
    # The 8-byte header length can start with 0x80 (pickle's opcode) or "PK" (zip): still a valid file.
    path = tmp_path / "c.safetensors"
    firsts = set()
    for pad in range(80):
        save_checkpoint(path, {"x": torch.zeros(1)}, {"pad": "a" * pad})
        firsts.add(path.read_bytes()[:1])
        tensors, meta = load_checkpoint(path)
        assert meta["pad"] == "a" * pad and torch.equal(tensors["x"], torch.zeros(1))
    assert b"\x80" in firsts
