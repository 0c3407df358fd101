"""The ``rnnkit`` command: train, eval, predict, inspect, recipes.

    rnnkit train [RECIPE] [--config FILE] [--set key=value ...] [--hidden 256 --lr 3e-3 ...]
    rnnkit eval RUN_DIR
    rnnkit predict RUN_DIR --n 10                       (MNIST, sin-cos, echo)
    rnnkit predict RUN_DIR hello machine common [--beam 4]   (sort-letters)
    rnnkit inspect RUN_DIR --index 7                    (state and gate heatmaps of one test input)
    rnnkit recipes

Bad input (unknown recipe or option, bad value, missing or corrupt data) prints one line that
names the problem and the fix, and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_START = time.perf_counter()  # "wall time from the command's start" includes importing torch

# flag -> dotted config key; each flag is a typed shortcut for --set key=value
FLAGS: dict[str, tuple[str, str]] = {
    "--cell": ("model.cell", "lstm, gru, rnn, or a dotted path to your cell class (pkg.module.Class)"),
    "--hidden": ("model.hidden", "hidden units per layer"),
    "--layers": ("model.layers", "number of stacked layers"),
    "--backend": ("model.backend", "auto, reference, native, fused, traced (a custom cell in rnnkit's C++ loops) "
                  "or compiled (a custom cell compiled)"),
    "--batch-size": ("train.batch_size", "training batch size"),
    "--epochs": ("train.epochs", "passes over the training data"),
    "--steps": ("train.steps", "optimiser steps (overrides --epochs)"),
    "--lr": ("optim.lr", "learning rate"),
    "--seed": ("train.seed", "random seed (Python, NumPy, torch)"),
    "--data-dir": ("data.data_dir", "directory with the IDX files (else $RNNKIT_DATA_DIR, cache, embedded)"),
    "--dataset": ("data.dataset", "mnist (checksummed), idx (any IDX data set) or embedded (mini-MNIST)"),
    "--view": ("data.view", "rows (28x28), pixels (784x1) or permuted (784x1, fixed permutation)"),
    "--device": ("train.device", "auto (CUDA when present), cpu, cuda, cuda:N"),
    "--out": ("train.out", "where run directories go"),
    "--name": ("train.name", "run name (default: the recipe's)"),
    "--attention": ("synthetic.attention", "sort-letters: none, bahdanau or luong"),
}


def _parser() -> argparse.ArgumentParser:
    from rnnkit import __version__

    p = argparse.ArgumentParser(prog="rnnkit", description="Train and use recurrent networks on sequence data.")
    p.add_argument("--version", action="version", version=f"rnnkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a recipe (default: mnist-rows) and write a run directory")
    t.add_argument("recipe", nargs="?", default=None, help="recipe name (see `rnnkit recipes`)")
    t.add_argument("--config", metavar="FILE", help="a TOML config (e.g. a run's config.toml)")
    t.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override any config key, e.g. --set optim.clip_norm=1.0 (repeatable)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint")
    for flag, (key, help_text) in FLAGS.items():
        t.add_argument(flag, metavar="VALUE", help=f"{help_text} [{key}]")
    t.add_argument("--bidirectional", action="store_true", help="read each sequence both ways [model.bidirectional]")
    t.add_argument("--no-progress", action="store_true", help="no progress bar [train.progress=false]")

    e = sub.add_parser("eval", help="evaluate a run's final model on its test set")
    e.add_argument("run_dir")
    e.add_argument("--data-dir", help="evaluate on data from this directory instead")

    pr = sub.add_parser("predict", help="predict with a run's model: the first N test inputs, or sort WORDS")
    pr.add_argument("run_dir")
    pr.add_argument("words", nargs="*", help="sort-letters runs: the words to sort")
    pr.add_argument("--n", type=int, default=10, help="how many test images or stream steps (default 10)")
    pr.add_argument("--beam", type=int, default=1, help="sort-letters: beam width (default 1: greedy)")

    ins = sub.add_parser("inspect", help="heatmaps of the states (and LSTM gates) over time for one test input")
    ins.add_argument("run_dir")
    ins.add_argument("--index", type=int, default=0, help="which test input (default 0)")

    sub.add_parser("recipes", help="list the recipes with their reported and measured figures")
    sub.add_parser("kernels", help="build rnnkit's C++ CPU kernels for this machine (or retry a failed build)")
    b = sub.add_parser("bench", add_help=False,
                       help="side-by-side speed benchmark: benchmarks/run.py of a source checkout (--help: options)")
    b.add_argument("args", nargs=argparse.REMAINDER)

    lf = sub.add_parser("lr-find", help="learning-rate range test: loss against an exponentially rising rate")
    lf.add_argument("recipe", nargs="?", default="mnist-rows", help="recipe whose model and data to use")
    lf.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    lf.add_argument("--data-dir", help="directory with the IDX files")
    lf.add_argument("--start", type=float, default=1e-7, help="first rate (default 1e-7)")
    lf.add_argument("--factor", type=float, default=1.05, help="rate multiplier per step (default 1.05)")
    lf.add_argument("--steps", type=int, default=400, help="at most this many steps (default 400)")
    lf.add_argument("--out", default=".", help="where lr_find-RECIPE.png goes (default: here)")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    items = []
    for flag, (key, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:  # a directory named "none" is a directory: quoted, it is not unset
            items.append(f'{key}="{value}"' if flag in ("--data-dir", "--out") and value else f"{key}={value}")
    if args.bidirectional:
        items.append("model.bidirectional=true")
    if args.no_progress:
        items.append("train.progress=false")
    if args.steps is not None:
        items.append("train.epochs=none")
    if args.epochs is not None:  # asked for in epochs: no recipe's minimum number of steps on top
        items.append("train.min_steps=none")
    return items + list(args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rnnkit import app
    from rnnkit.config import apply_overrides, covers, from_dict, load_toml
    from rnnkit.errors import ConfigError
    from rnnkit.recipes import RunConfig, recipe_config

    if args.resume:
        cfg_path = Path(args.resume) / "config.toml"
        if not cfg_path.exists():
            raise ConfigError(f"--resume {args.resume}: no config.toml there; give a run directory of `rnnkit train`")
        cfg = from_dict(RunConfig, load_toml(cfg_path))
    elif args.config:
        if args.recipe:
            raise ConfigError("give either a recipe name or --config FILE, not both")
        data = load_toml(args.config)
        # a run's config.toml is whole (its recipe may be any label); a file of one's own holds the
        # settings to change in the recipe it names
        cfg = from_dict(RunConfig, data) if covers(RunConfig, data) else recipe_config(
            data.pop("recipe", "mnist-rows"), data)
    else:
        cfg = recipe_config(args.recipe or "mnist-rows")
    cfg = apply_overrides(cfg, _overrides(args))
    summary = app.train(cfg, resume_dir=args.resume, start_time=_START)
    if not summary.main:  # under torchrun only rank 0 speaks
        return 130 if summary.interrupted else 0
    if summary.headline:
        print(summary.headline, flush=True)
        return 130 if summary.interrupted else 0
    acc = summary.test_accuracy
    print(f"final test accuracy: {100 * acc:.2f}% (loss {summary.test_loss:.4f}) after {summary.steps:,} steps, "
          f"{summary.train_seconds:.1f} s of training ({summary.eval_seconds:.1f} s of it evaluating); "
          f"run: {summary.run_dir}", flush=True)
    return 130 if summary.interrupted else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from rnnkit import app

    m = app.evaluate_run(args.run_dir, data_dir=args.data_dir)
    if "task" in m:
        from rnnkit.tasks import describe

        for line in describe(m["task"], m):
            print(line)
        return 0
    worst = sorted((v, k) for k, v in m.items() if k.startswith("accuracy_class_"))[:3]
    if worst:
        print("weakest classes: " + ", ".join(f"{k.rsplit('_', 1)[1]}: {100 * v:.1f}%" for v, k in worst))
    print(f"test accuracy: {100 * m['accuracy']:.2f}% (loss {m['loss']:.4f})")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from rnnkit import app

    result = app.predict_run(args.run_dir, args.n, words=args.words, beam=args.beam)
    if isinstance(result, list):  # the synthetic tasks print their own lines
        print("\n".join(result))
        return 0
    pred, true, probs = result
    for i, (p, t) in enumerate(zip(pred, true)):
        mark = "" if p == t else "   <- wrong"
        print(f"#{i:<4} predicted {p} ({100 * probs[i, p].item():.1f}%)  true {t}{mark}")
    print(f"{sum(p == t for p, t in zip(pred, true))}/{len(true)} correct")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rnnkit.tasks import inspect_run

    for path in inspect_run(args.run_dir, args.index):
        print(f"wrote {path}")
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from rnnkit import app
    from rnnkit.config import apply_overrides
    from rnnkit.recipes import recipe_config

    # quoted: a directory named "none" is a directory
    sets = list(args.overrides) + ([f'data.data_dir="{args.data_dir}"'] if args.data_dir else [])
    cfg = apply_overrides(recipe_config(args.recipe), sets)
    r = app.lr_find(cfg, start=args.start, factor=args.factor, max_steps=args.steps, out=args.out)
    print(f"tried {len(r.lrs)} rates from {r.lrs[0]:.2e} to {r.lrs[-1]:.2e}; plot: {r.plot}")
    print(f"suggested learning rate (steepest descent): {r.suggestion:.2e}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from rnnkit.recipes import RECIPES

    rows = [("recipe", "source", "reported", "ours (measured)")]
    rows += [(r.name, r.source, r.reported, r.measured) for r in RECIPES.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def benchmark_script() -> Path:
    """Where a source checkout keeps the benchmark harness (it is not part of an installed package)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    script = benchmark_script()
    if not script.is_file():
        print(f"rnnkit bench: the benchmark harness is not here ({script}); it ships with the source "
              "checkout: run `make bench` or `python benchmarks/run.py` there", file=sys.stderr)
        return 2
    sys.path.insert(0, str(script.parent))  # run.py imports competitors.py beside it
    try:
        spec = importlib.util.spec_from_file_location("rnnkit_benchmarks_run", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        module.main(args.args)
    finally:
        sys.path.remove(str(script.parent))
        sys.modules.pop("rnnkit_benchmarks_run", None)
    return 0


def _cmd_kernels(args: argparse.Namespace) -> int:
    from rnnkit.backends import cext

    return cext.main()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rnnkit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option after it is the harness's (argparse would claim --help)
        argv = ["bench", "--", *argv[1:]]
    args = _parser().parse_args(argv)
    if args.command == "bench" and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    command = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "inspect": _cmd_inspect,
               "recipes": _cmd_recipes, "lr-find": _cmd_lr_find, "kernels": _cmd_kernels, "bench": _cmd_bench}
    try:
        return command[args.command](args)
    except KeyboardInterrupt:
        print("rnnkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # only rnnkit's own errors are turned into one line; the rest are bugs
        from rnnkit.errors import RnnkitError

        if isinstance(e, RnnkitError):
            print(f"rnnkit: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
