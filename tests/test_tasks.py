"""The synthetic-task recipes end to end through ``rnnkit.cli.main`` (train, eval, predict, inspect), and the
pieces they rest on: word packing, exact match, gates recomputed from the states."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run

from rnnkit import tasks
from rnnkit.config import apply_overrides
from rnnkit.data.text import PAD, Vocab, make_seq2seq_batch
from rnnkit.layers import LSTM
from rnnkit.models.seq2seq import Seq2Seq
from rnnkit.recipes import RECIPES, recipe_config
from rnnkit.train.checkpoint import load_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"
COMMON = ["--steps", "5", "--no-progress", "--set", "train.threads=1", "--set", "train.log_every=1"]
# small test sets keep each smoke run around a second
SMALL = {
    "sin-cos": ["--set", "synthetic.test_streams=8", "--set", "synthetic.test_length=60"],
    "echo": ["--set", "synthetic.test_streams=8", "--set", "synthetic.test_length=40"],
    "sort-letters": ["--set", "synthetic.train_words=600", "--set", "synthetic.test_words=64"],
}
FIGURE = {"sin-cos": "series.png", "echo": "echo.png", "sort-letters": "attention.png"}
HEADLINE = re.compile(r"^final (test mse|test accuracy|exact match): .* after 5 steps, .* run: (.+)$")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Nothing lands in the working directory; one thread, restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 5-step run of each synthetic recipe (sort-letters with Luong attention, so it draws attention.png)."""
    out_dir = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    made = {}
    try:
        for recipe in FIGURE:
            extra = ["--attention", "luong"] if recipe == "sort-letters" else []
            code, out, err = run(["train", recipe, *COMMON, *SMALL[recipe], *extra, "--out", str(out_dir)])
            assert code == 0, err
            m = HEADLINE.match(out.strip().splitlines()[-1])
            assert m, out
            made[recipe] = {"dir": Path(m.group(2)), "out": out}
    finally:
        torch.set_num_threads(threads)
    return made


# ------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize("recipe", list(FIGURE))
def test_recipe_smoke_run_writes_a_complete_run_directory(runs, recipe):
    run_dir = runs[recipe]["dir"]
    assert run_dir.name.startswith(recipe + "-")
    for name in ("config.toml", "metrics.jsonl", "curves.png", "model.safetensors", "results.json", FIGURE[recipe]):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    for name in ("curves.png", FIGURE[recipe]):
        assert (run_dir / name).read_bytes()[:8] == PNG
    assert f'task = "{recipe}"' in (run_dir / "config.toml").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert records[-1]["kind"] == "eval" and records[-1]["step"] == 5
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == recipe and results["step"] == 5
    _, meta = load_checkpoint(run_dir / "model.safetensors")
    assert meta["kind"] == "rnnkit-model" and meta["task"] == recipe and meta["step"] == 5
    assert list((run_dir / "checkpoints").glob("ckpt-*.safetensors"))


def test_smoke_runs_report_the_task_figures(runs):
    sin = json.loads((runs["sin-cos"]["dir"] / "results.json").read_text())
    assert sin["mse"] > 0 and "mse" in runs["sin-cos"]["out"].splitlines()[-1]
    echo = json.loads((runs["echo"]["dir"] / "results.json").read_text())
    assert len(echo["per_step_accuracy"]) == 40 and 0 <= echo["accuracy_after_echo"] <= 1
    assert "per-step accuracy (%)" in runs["echo"]["out"]
    sort = json.loads((runs["sort-letters"]["dir"] / "results.json").read_text())
    assert sort["test_words"] == 64
    assert sum(n for _, n in sort["exact_match_by_length"].values()) == 64
    assert "exact match by word length" in runs["sort-letters"]["out"]


def test_config_of_a_task_run_reproduces_it(runs, tmp_path):
    first = runs["echo"]["dir"]
    code, out, err = run(["train", "--config", str(first / "config.toml"), "--out", str(tmp_path)])
    assert code == 0, err
    again = Path(HEADLINE.match(out.strip().splitlines()[-1]).group(2))
    a, _ = load_checkpoint(first / "model.safetensors")
    b, _ = load_checkpoint(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_new_recipes_follow_the_seeds():
    sin, echo, sort = (recipe_config(n) for n in ("sin-cos", "echo", "sort-letters"))
    assert (sin.task, sin.model.hidden, sin.train.batch_size, sin.synthetic.window, sin.optim.lr) == (
        "sin-cos", 10, 50, 20, 0.006)
    assert (echo.model.cell, echo.model.hidden, echo.train.batch_size, echo.synthetic.window) == ("rnn", 4, 5, 15)
    assert (echo.optim.name, echo.optim.lr, echo.synthetic.echo_step) == ("adagrad", 0.3, 3)
    assert (sort.model.hidden, sort.model.layers, sort.synthetic.embed, sort.train.batch_size) == (50, 2, 15, 128)
    assert (sort.optim.lr, sort.optim.clip_norm, sort.train.epochs) == (1e-3, 5.0, 60)
    assert {"sin-cos", "echo", "sort-letters"} <= set(RECIPES)
    assert recipe_config("mnist-rows").task == "mnist"


# ------------------------------------------------------------------------------- eval and predict


def test_eval_reports_the_task_figures(runs):
    code, out, err = run(["eval", str(runs["sin-cos"]["dir"])])
    assert code == 0, err
    results = json.loads((runs["sin-cos"]["dir"] / "results.json").read_text())
    assert f"test mse: {results['mse']:.5f}" in out
    code, out, err = run(["eval", str(runs["sort-letters"]["dir"])])
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("exact match: ")


def test_an_ema_task_run_saves_the_averaged_weights_that_eval_reproduces(tmp_path):
    code, out, err = run(["train", "sin-cos", *COMMON, *SMALL["sin-cos"], "--set", "optim.ema=0.9",
                          "--out", str(tmp_path)])
    assert code == 0, err
    run_dir = Path(HEADLINE.match(out.strip().splitlines()[-1]).group(2))
    results = json.loads((run_dir / "results.json").read_text())
    code, out, err = run(["eval", str(run_dir)])
    assert code == 0, err
    assert f"test mse: {results['mse']:.5f} over held-out streams" in out
    assert f"; {results['mse_after_first_window']:.5f} from step" in out


@pytest.mark.parametrize("beam", [1, 4])
def test_predict_sorts_the_given_words(runs, beam):
    code, out, err = run(["predict", str(runs["sort-letters"]["dir"]), "hello", "machine", "common",
                          "--beam", str(beam)])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["hello", "machine", "common"]
    assert all(" -> " in line for line in lines[:3])
    assert re.match(r"^\d/3 sorted correctly \((greedy|beam search, beam 4)\)$", lines[3])


def test_predict_prints_stream_steps(runs):
    code, out, err = run(["predict", str(runs["sin-cos"]["dir"]), "--n", "6"])
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 + 6 + 1
    code, out, err = run(["predict", str(runs["echo"]["dir"]), "--n", "6"])
    assert code == 0, err
    assert out.strip().splitlines()[-1].endswith("/6 steps right")


BAD = {
    "sort without words": (lambda r: ["predict", str(r["sort-letters"]["dir"])], "give words to sort"),
    "words for a stream": (lambda r: ["predict", str(r["echo"]["dir"]), "hello"], "takes no words"),
    "index out of range": (lambda r: ["inspect", str(r["sin-cos"]["dir"]), "--index", "99"], "out of range"),
    "bidirectional stream": (lambda r: ["train", "echo", *COMMON, "--bidirectional"], "cannot carry its state"),
    "bad attention": (lambda r: ["train", "sort-letters", *COMMON, "--attention", "dot"], "synthetic.attention"),
    "bidirectional sorter": (lambda r: ["train", "sort-letters", *COMMON, "--bidirectional", "--set",
                                        "model.input_projection=8"],
                             "task sort-letters: its model does not use model.bidirectional, model.input_projection"),
    "readout of a stream": (lambda r: ["train", "sin-cos", *COMMON, "--set", "model.readout=mean"],
                            "does not use model.readout"),
    "init of a sorter": (lambda r: ["train", "sort-letters", *COMMON, "--set", "model.init=torch", "--set",
                                    "model.k=7"], "does not use model.k, model.init"),
    "chrono length of a stream": (lambda r: ["train", "echo", *COMMON, "--set", "model.chrono_t_max=50"],
                                  "does not use model.chrono_t_max"),
    "words outside a-z": (lambda r: ["predict", str(r["sort-letters"]["dir"]), "hello", "abc123"],
                          "'abc123'"),
}


@pytest.mark.parametrize("recipe", list(FIGURE))
def test_a_saved_run_with_a_setting_its_model_ignores_still_loads(recipe):
    # runs trained before unused settings were refused hold them in their saved configuration
    cfg = apply_overrides(recipe_config(recipe), ['model.readout="mean"', "model.k=7"])
    assert isinstance(tasks.build_model(cfg), torch.nn.Module)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_task_input_exits_2_with_one_line(runs, case, tmp_path):
    build, expected = BAD[case]
    argv = build(runs)
    code, out, err = run([*argv, "--out", str(tmp_path / "runs")] if argv[0] == "train" else argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err


@pytest.mark.parametrize("recipe", list(FIGURE))
def test_the_task_models_run_on_the_configured_backend(recipe):
    model = tasks.build_model(apply_overrides(recipe_config(recipe), ['model.backend="reference"']))
    rnn = model.seq2seq.encoder if recipe == "sort-letters" else model.net.rnn
    assert rnn.backend == "reference"


# ---------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("bidirectional", [False, True])
def test_inspect_writes_state_heatmaps_for_an_mnist_run(tmp_path, bidirectional):
    tiny = ["--set", "data.dataset=embedded", "--set", "data.train_limit=64", "--set", "data.test_limit=16",
            "--hidden", "8", "--batch-size", "32", "--steps", "2", "--no-progress", "--set", "train.threads=1"]
    code, out, err = run(["train", *tiny, *(["--bidirectional"] if bidirectional else []), "--out", str(tmp_path)])
    assert code == 0, err
    run_dir = out.strip().splitlines()[-1].split("run: ")[1]
    code, out, err = run(["inspect", run_dir, "--index", "7"])
    assert code == 0, err
    names = ["states-7-layer0.png", "states-7-layer0-reverse.png"] if bidirectional else ["states-7.png"]
    paths = [Path(run_dir) / n for n in names]
    assert out.strip().splitlines() == [f"wrote {p}" for p in paths]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def test_inspect_works_for_stream_and_seq2seq_runs(runs):
    code, out, err = run(["inspect", str(runs["sin-cos"]["dir"]), "--index", "2"])
    assert code == 0, err
    assert (runs["sin-cos"]["dir"] / "states-2.png").is_file()
    code, out, err = run(["inspect", str(runs["sort-letters"]["dir"])])  # 2 layers: one figure each
    assert code == 0, err
    assert {p.name for p in runs["sort-letters"]["dir"].glob("states-0-layer*.png")} == {
        "states-0-layer0.png", "states-0-layer1.png"}


@pytest.mark.parametrize("options", [{}, {"forget_bias": 1.0, "peepholes": True}, {"proj_size": 3}])
def test_recomputed_gates_reproduce_the_recorded_states(options):
    torch.manual_seed(0)
    rnn = LSTM(3, 5, num_layers=2, batch_first=True, **options)
    x = torch.randn(1, 9, 3)
    traces = tasks.state_traces(rnn, x)
    assert len(traces) == 2
    for layer, trace in enumerate(traces):
        c, h = trace["c (cell)"], trace["h (hidden)"]
        i, f, g, o = (trace[k] for k in ("input gate i", "forget gate f", "candidate g", "output gate o"))
        c_prev = torch.cat([torch.zeros_like(c[:1]), c[:-1]])
        torch.testing.assert_close(f * c_prev + i * g, c)
        h_full = o * torch.tanh(c)
        if options.get("proj_size"):
            h_full = h_full @ rnn.cell(layer).weight_hr.t()
        torch.testing.assert_close(h_full, h)
        assert all(0 <= float(v.min()) and float(v.max()) <= 1 for v in (i, f, o))
    # the last layer's h is the layer's output
    torch.testing.assert_close(traces[-1]["h (hidden)"], rnn(x)[0][0])


# -------------------------------------------------------------------------------------- seq2seq bits


def test_word_sorter_packs_words_and_scores_exact_matches():
    vocab = Vocab.characters()
    b = make_seq2seq_batch([("hello", "ehllo"), ("ab", "ab")], vocab)
    x = tasks.pack_words(b.src, b.tgt_in, 8, 9)
    assert x.shape == (2, 17) and int((x[1, :8] != PAD).sum()) == 2
    sorter = tasks.WordSorter(Seq2Seq(vocab, vocab, hidden_size=8, num_layers=1), 8)
    sorter.eval()
    y = torch.nn.functional.pad(b.tgt_out, (0, 9 - b.tgt_out.shape[1]), value=PAD)
    out = sorter(x)
    assert isinstance(out, tasks.SortOutput) and out.logits.shape == (2, 6, len(vocab))
    perfect = tasks.SortOutput(torch.nn.functional.one_hot(b.tgt_out, len(vocab)).float(), b.tgt_out)
    assert tasks.sort_metrics(perfect, y) == {"token_accuracy": 1.0, "exact_match": 1.0}
    wrong = b.tgt_out.clone()
    wrong[0, 1] = vocab.stoi["z"]
    m = tasks.sort_metrics(tasks.SortOutput(perfect.logits, wrong), y)
    assert m["exact_match"] == 0.5
    assert torch.isfinite(sorter.loss(out, y))


def test_held_out_words_never_occur_in_training():
    cfg = apply_overrides(recipe_config("sort-letters"), ["synthetic.train_words=3000", "synthetic.test_words=300"])
    train, test = tasks.word_pairs(cfg)
    assert len(train) == 3000 and len(test) == 300
    assert not {w for w, _ in test} & {w for w, _ in train}
    assert all(t == "".join(sorted(w)) for w, t in test)


# ----------------------------------------------------------------------------------- do they learn?


def test_echo_and_sin_cos_learn_in_a_few_hundred_steps(tmp_path):
    code, out, err = run(["train", "echo", "--steps", "700", "--no-progress", "--set", "train.threads=1",
                          *SMALL["echo"], "--set", "train.log_every=100", "--out", str(tmp_path)])
    assert code == 0, err
    echo = json.loads((Path(out.strip().split("run: ")[-1]) / "results.json").read_text())
    assert echo["accuracy_after_echo"] > 0.95, echo
    code, out, err = run(["train", "sin-cos", "--no-progress", "--set", "train.threads=1",
                          "--set", "synthetic.test_streams=8", "--out", str(tmp_path)])
    assert code == 0, err
    sin = json.loads((Path(out.strip().split("run: ")[-1]) / "results.json").read_text())
    assert sin["mse_after_first_window"] < 0.05, sin


@pytest.mark.parametrize("merge_mode", ["concat", "sum"])
def test_bidirectional_traces_run_each_direction_its_own_way(merge_mode):
    """The reverse direction's previous step is the next one in time; layer 1 reads both directions."""
    torch.manual_seed(0)
    rnn = LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True, merge_mode=merge_mode)
    x = torch.randn(1, 7, 3)
    traces = tasks.state_traces(rnn, x)
    assert len(traces) == 4  # (layer 0, layer 1) x (forward, reverse)
    for k, trace in enumerate(traces):
        tag = " (reverse)" if k % 2 else ""
        c, h = trace["c (cell)" + tag], trace["h (hidden)" + tag]
        i, f, g, o = (trace[n + tag] for n in ("input gate i", "forget gate f", "candidate g", "output gate o"))
        zero = torch.zeros_like(c[:1])
        c_prev = torch.cat([c[1:], zero]) if k % 2 else torch.cat([zero, c[:-1]])
        torch.testing.assert_close(f * c_prev + i * g, c)
        torch.testing.assert_close(o * torch.tanh(c), h)
    out = rnn(x)[0][0]
    fwd, rev = traces[2]["h (hidden)"], traces[3]["h (hidden) (reverse)"]
    torch.testing.assert_close(torch.cat([fwd, rev], -1) if merge_mode == "concat" else fwd + rev, out)


@pytest.mark.parametrize("task", ["echo", "sin-cos"])
def test_a_resumed_stream_run_carries_its_state_on(task, tmp_path):
    code, out, err = run(["train", task, "--steps", "12", "--no-progress", "--set", "train.threads=1",
                          *SMALL[task], "--set", "train.checkpoint_every=4", "--set", "train.keep_last=5",
                          "--set", "train.eval_every=none", "--out", str(tmp_path)])
    assert code == 0, err
    run_dir = Path(out.strip().split("run: ")[-1])
    whole, _ = load_checkpoint(run_dir / "model.safetensors")
    for ckpt in sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1:]:  # as if killed after step 8, mid-stream
        ckpt.unlink()
    code, out, err = run(["train", "--resume", str(run_dir)])
    assert code == 0, err
    resumed, _ = load_checkpoint(run_dir / "model.safetensors")
    # the windows after the checkpoint start from the state the stream had reached, as without the kill
    assert whole.keys() == resumed.keys()
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_a_stream_run_resumed_with_another_batch_size_fails_before_writing(tmp_path):
    code, out, err = run(["train", "sin-cos", "--steps", "8", "--no-progress", "--set", "train.threads=1",
                          *SMALL["sin-cos"], "--set", "train.checkpoint_every=4", "--set", "train.eval_every=none",
                          "--out", str(tmp_path)])
    assert code == 0, err
    run_dir = Path(out.strip().split("run: ")[-1])
    sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1].unlink()  # as if killed after step 4, mid-stream
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, out, err = run(["train", "--resume", str(run_dir), "--batch-size", "10"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, err
    assert "the state of 50 streams" in err and "train.batch_size=50" in err, err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    code, out, err = run(["train", "--resume", str(run_dir)])  # the run is still resumable as it was
    assert code == 0, err


@pytest.mark.parametrize("task", ["echo", "sin-cos"])
def test_a_stream_task_takes_a_negative_seed(task, tmp_path):
    code, out, err = run(["train", task, "--seed=-3", *COMMON, *SMALL[task], "--out", str(tmp_path)])
    assert code == 0, err


def test_a_recipe_label_cannot_leave_the_runs_directory():
    from rnnkit.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe is part of a directory name"):  # it names the run's directory
        apply_overrides(recipe_config("echo"), ['recipe="../../escaped"'])
