"""PNG figures of training runs: metric curves, predictions, recurrent states, attention, series.

Every function draws onto its own ``matplotlib.figure.Figure`` with the Agg canvas and writes a
PNG to ``path`` (creating parent folders), then returns that path as a ``Path``. pyplot is never
imported, so nothing here touches pyplot's global figure registry or the user's chosen backend,
and no figure is left open. matplotlib itself is imported lazily so ``import rnnkit`` stays fast.

Shape mistakes raise ``rnnkit.ShapeError`` (a ``ValueError``) naming what was expected.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rnnkit.errors import ShapeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_curves",
    "plot_predictions",
    "plot_state_heatmaps",
    "plot_attention",
    "plot_series",
    "plot_echo",
    "plot_lr_find",
]

DPI = 110
#: panels of ``plot_curves`` in order; a metric no record carries gets no panel
CURVE_METRICS = ("loss", "accuracy", "mse")
_WRONG = "#d62728"  # matplotlib's tab:red; tests look for it in the PNG
_RIGHT_FRAME = "#9a9a9a"
_MAX_ECHO_ROWS = 5

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# shared helpers


def _figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas attached and constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Constrained layout rather than tight_layout: it also makes room for colorbars and suptitles.
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created), release it, and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, format="png", dpi=DPI)
    finally:
        # Without pyplot nothing else holds the figure; clearing drops the artists' memory at once.
        fig.clear()
    return out


def _array(value: Any, name: str) -> np.ndarray:
    """``value`` (array, list or CPU tensor) as a float numpy array."""
    if hasattr(value, "detach"):  # torch tensors, possibly on an accelerator or requiring grad
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{name} must be numeric array-like, got {type(value).__name__}: {exc}") from exc


def _vector(value: Any, name: str) -> np.ndarray:
    """``value`` as a 1-D float array; trailing/leading singleton axes are squeezed away."""
    arr = _array(value, name)
    if arr.ndim > 1:
        arr = arr.squeeze()
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ShapeError(f"{name} must be 1-D (T,), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ShapeError(f"{name} is empty")
    return arr


def _same_length(name_a: str, len_a: int, name_b: str, len_b: int) -> None:
    """Raise ShapeError when two things that pair up element-wise differ in length."""
    if len_a != len_b:
        raise ShapeError(f"{name_a} has {len_a} entries but {name_b} has {len_b}; they must match one to one")


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean; the first points average over what is available so far."""
    if window <= 1 or values.size == 0:
        return values.astype(np.float64, copy=True)
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (csum[ends] - csum[starts]) / (ends - starts)


def _smoothing_window(n: int) -> int:
    """A light window: about 1/20 of the series, at most 50 points, none for short series."""
    return 1 if n < 20 else min(50, max(2, n // 20))


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for missing, non-numeric and non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.generic)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# --------------------------------------------------------------------------------------------------
# 1. training curves


_Curves = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def _collect_curves(records: Sequence[Mapping[str, Any]], wanted: Sequence[str]) -> _Curves:
    """``{metric: {kind: (steps, values)}}`` sorted by step, for the metrics that some record carries."""
    found: dict[str, dict[str, tuple[list[float], list[float]]]] = {m: {} for m in wanted}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {i} must be a dict of metrics, got {type(rec).__name__}")
        kind = str(rec.get("kind", "train"))
        present = [m for m in wanted if _number(rec.get(m)) is not None]
        if not present:
            continue  # meta or config lines, or metrics this plot does not show
        step = _number(rec.get("step"))
        if step is None:
            raise ValueError(f"record {i} (kind {kind!r}) has {present[0]!r} but no numeric 'step': {dict(rec)!r}")
        for m in present:
            steps, values = found[m].setdefault(kind, ([], []))
            steps.append(step)
            values.append(_number(rec[m]))
    curves: _Curves = {}
    for metric, by_kind in found.items():
        if not by_kind:
            continue
        # "train" first so it is drawn underneath the sparser eval markers and leads the legend.
        curves[metric] = {}
        for kind in sorted(by_kind, key=lambda k: k != "train"):
            steps, values = (np.asarray(v, dtype=np.float64) for v in by_kind[kind])
            order = np.argsort(steps, kind="stable")
            curves[metric][kind] = (steps[order], values[order])
    return curves


def plot_curves(records: Sequence[Mapping[str, Any]], path: PathLike, *, metrics: Sequence[str] | None = None,
                title: str = "") -> Path:
    """Loss and accuracy (or mse) against step from metrics records, train smoothed, eval as markers."""
    wanted = tuple(metrics) if metrics is not None else CURVE_METRICS
    curves = _collect_curves(records, wanted)
    panels = list(curves)
    kinds = sorted({k for by_kind in curves.values() for k in by_kind}, key=lambda k: (k != "train", k))
    colors = {k: f"C{j}" for j, k in enumerate(kinds)}

    fig = _figure(max(5.0, 4.6 * max(1, len(panels))), 3.8)
    if not panels:
        # Still write a figure: callers plot early in a run, before anything has been logged.
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"no {' / '.join(wanted)} recorded yet", ha="center", va="center", fontsize=12)
        return _save(fig, path)

    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        for kind, (steps, values) in curves[metric].items():
            color = colors[kind]
            window = _smoothing_window(values.size) if kind == "train" else 1
            if window > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _running_mean(values, window), color=color, linewidth=1.8,
                        label=f"{kind} (mean of {window})")
            elif kind == "train":
                ax.plot(steps, values, color=color, linewidth=1.5, label=kind)
            else:
                ax.plot(steps, values, color=color, marker="o", markersize=4, linewidth=1.5, label=kind)
        every = np.concatenate([values for _, values in curves[metric].values()])
        # Losses falling over decades read better on a log axis; bounded metrics stay linear.
        if metric != "accuracy" and every.min() > 0 and every.max() / every.min() > 100:
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# 2. predictions grid


def _wrong_indices(predicted: Sequence[int], true: Sequence[int]) -> list[int]:
    """Positions where the prediction differs from the true label."""
    _same_length("predicted", len(predicted), "true", len(true))
    return [i for i, (p, t) in enumerate(zip(predicted, true)) if int(p) != int(t)]


def _image_stack(images: Any) -> np.ndarray:
    """``images`` as (N, H, W); a singleton channel axis (N, 1, H, W) or (N, H, W, 1) is dropped."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ShapeError(f"images must be (N, H, W), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ShapeError("images is empty: nothing to plot")
    return arr


def _label(index: int, class_names: Sequence[str] | None) -> str:
    """Class ``index`` by name when names are given and cover it."""
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def plot_predictions(images: Any, predicted: Sequence[int], true: Sequence[int], path: PathLike, *, ncols: int = 5,
                     class_names: Sequence[str] | None = None) -> Path:
    """Grid of images titled "pred P / true T"; wrong predictions get a red title and red frame."""
    stack = _image_stack(images)
    n = stack.shape[0]
    _same_length("images", n, "predicted", len(predicted))
    _same_length("images", n, "true", len(true))
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    wrong = set(_wrong_indices(predicted, true))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    # uint8 digits share one fixed scale; float images are scaled each on its own range.
    scale = {"vmin": 0, "vmax": 255} if stack.dtype == np.uint8 else {}

    fig = _figure(1.7 * ncols + 0.2, 1.85 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        ax.imshow(stack[i], cmap="gray", interpolation="nearest", **scale)
        # Ticks off but spines kept: the spines are the frame that flags a wrong prediction.
        ax.set_xticks([])
        ax.set_yticks([])
        is_wrong = i in wrong
        for spine in ax.spines.values():
            spine.set_color(_WRONG if is_wrong else _RIGHT_FRAME)
            spine.set_linewidth(3.0 if is_wrong else 0.8)
        text = f"pred {_label(int(predicted[i]), class_names)} / true {_label(int(true[i]), class_names)}"
        ax.set_title(text, fontsize=9, color=_WRONG if is_wrong else "black",
                     fontweight="bold" if is_wrong else "normal")
    fig.suptitle(f"{n - len(wrong)}/{n} correct" + (f" ({len(wrong)} wrong, in red)" if wrong else ""))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# 3. recurrent state heatmaps


def _state_matrix(value: Any, name: str) -> np.ndarray:
    """One state trace as (T, H); a lone batch axis (1, T, H) is dropped."""
    arr = _array(value, f"states[{name!r}]")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ShapeError(f"states[{name!r}] must be (T, H) for one sequence, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ShapeError(f"states[{name!r}] is empty, shape {tuple(arr.shape)}")
    return arr


def _input_image(image: Any) -> np.ndarray:
    """The input shown beside the heatmaps as 2-D; a flat square (e.g. 784 pixels) is folded."""
    arr = _array(image, "image").squeeze()
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        if side * side != arr.size:
            raise ShapeError(f"image must be (H, W) or a flat square, got {arr.size} values")
        arr = arr.reshape(side, side)
    if arr.ndim != 2:
        raise ShapeError(f"image must be (H, W), got shape {tuple(arr.shape)}")
    return arr


def plot_state_heatmaps(states: Mapping[str, Any], path: PathLike, *, image: Any | None = None,
                        title: str = "") -> Path:
    """One heatmap per state trace (time on x, units on y), each with its colorbar; input optional."""
    if not states:
        raise ValueError("states is empty: pass e.g. {'h': array of shape (T, H)}")
    mats = {str(name): _state_matrix(value, str(name)) for name, value in states.items()}
    picture = _input_image(image) if image is not None else None

    rows = len(mats)
    fig = _figure(9.5 if picture is not None else 7.5, max(3.0, 1.9 * rows + 0.6))
    if picture is not None:
        grid = fig.add_gridspec(rows, 2, width_ratios=[1, 3.2])
        img_ax = fig.add_subplot(grid[:, 0])
        img_ax.imshow(picture, cmap="gray", interpolation="nearest")
        img_ax.set_title("input")
        img_ax.set_xticks([])
        img_ax.set_yticks([])
        axes = [fig.add_subplot(grid[r, 1]) for r in range(rows)]
    else:
        axes = list(fig.subplots(rows, 1, squeeze=False)[:, 0])

    for ax, (name, mat) in zip(axes, mats.items()):
        lo, hi = float(mat.min()), float(mat.max())
        if lo < 0:
            # Signed traces (h, c, candidate) get a diverging map centred on zero, so sign reads at a glance.
            bound = max(abs(lo), abs(hi)) or 1.0
            cmap, vmin, vmax = "RdBu_r", -bound, bound
        elif hi <= 1.0:
            # Gates live in [0, 1]: a fixed scale keeps saturation comparable across gates and runs.
            cmap, vmin, vmax = "viridis", 0.0, 1.0
        else:
            cmap, vmin, vmax = "viridis", lo, hi
        im = ax.imshow(mat.T, aspect="auto", interpolation="nearest", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(f"{name}  ({mat.shape[0]} steps x {mat.shape[1]} units)", fontsize=10)
        ax.set_ylabel("unit")
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.05)
    axes[-1].set_xlabel("time step")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# 4. attention


def plot_attention(weights: Any, src_tokens: Sequence[str], out_tokens: Sequence[str], path: PathLike) -> Path:
    """Attention weights (T_out, T_src) as a heatmap with source and output tokens as tick labels."""
    mat = _array(weights, "weights")
    if mat.ndim == 3 and mat.shape[0] == 1:
        mat = mat[0]
    if mat.ndim != 2 or mat.size == 0:
        raise ShapeError(f"weights must be (T_out, T_src), got shape {tuple(mat.shape)}")
    t_out, t_src = mat.shape
    _same_length("weights' columns (T_src)", t_src, "src_tokens", len(src_tokens))
    _same_length("weights' rows (T_out)", t_out, "out_tokens", len(out_tokens))

    fig = _figure(min(14.0, max(4.5, 0.42 * t_src + 2.2)), min(12.0, max(3.5, 0.38 * t_out + 1.6)))
    ax = fig.add_subplot()
    top = float(mat.max()) if mat.max() > 0 else 1.0
    im = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(t_src), [str(t) for t in src_tokens], rotation=90 if t_src > 8 else 0, fontsize=9)
    ax.set_yticks(range(t_out), [str(t) for t in out_tokens], fontsize=9)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title("attention")
    if t_src <= 16 and t_out <= 16:
        for r in range(t_out):
            for c in range(t_src):
                ax.text(c, r, f"{mat[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if mat[r, c] > 0.6 * top else "white")
    fig.colorbar(im, ax=ax, pad=0.01)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# 5. series and the echo task


def plot_series(series: Mapping[str, Any], path: PathLike, *, title: str = "", xlabel: str = "step") -> Path:
    """Several named 1-D curves on one axis (e.g. input sin, target cos, predicted)."""
    if not series:
        raise ValueError("series is empty: pass e.g. {'target': array of shape (T,)}")
    curves = {str(name): _vector(values, f"series[{name!r}]") for name, values in series.items()}
    fig = _figure(8.0, 3.8)
    ax = fig.add_subplot()
    for j, (name, values) in enumerate(curves.items()):
        # Predictions drawn dashed so they stay visible on top of a matching target.
        style = "--" if "pred" in name.lower() else "-"
        ax.plot(np.arange(values.size), values, style, color=f"C{j}", linewidth=1.6, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("value")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def _bit_rows(value: Any, name: str) -> np.ndarray:
    """Echo inputs/targets/predictions as (B, T); (T,) is one row and (B, T, 1) drops the last axis."""
    arr = _array(value, name)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ShapeError(f"{name} must be (B, T) bits, (B, T, 1) or (T,), got shape {tuple(np.shape(value))}")
    return arr


def plot_echo(inputs: Any, targets: Any, predictions: Any, path: PathLike, *,
              per_step_accuracy: Any | None = None) -> Path:
    """Echo task: per sequence (up to 5) input bits as bars, target and predicted bits; optional accuracy."""
    from matplotlib.ticker import MaxNLocator

    x = _bit_rows(inputs, "inputs")
    y = _bit_rows(targets, "targets")
    p = _bit_rows(predictions, "predictions")
    if not (x.shape == y.shape == p.shape):
        raise ShapeError(f"inputs, targets and predictions must share one shape (B, T), got {tuple(x.shape)}, "
                         f"{tuple(y.shape)} and {tuple(p.shape)}")
    acc = None
    if per_step_accuracy is not None:
        acc = _vector(per_step_accuracy, "per_step_accuracy")
        _same_length("per_step_accuracy", acc.size, "the sequences' steps (T)", x.shape[1])
    rows = min(x.shape[0], _MAX_ECHO_ROWS)
    steps = np.arange(x.shape[1])
    # Predictions may be probabilities; a bit counts as right once rounded at 0.5.
    hits = (p >= 0.5) == (y >= 0.5)

    panels = rows + (acc is not None)
    fig = _figure(max(7.0, min(14.0, 0.18 * x.shape[1] + 3.0)), 1.7 * panels + 0.6)
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]
    for r in range(rows):
        ax = axes[r]
        ax.bar(steps, x[r], width=0.8, color="0.78", label="input")
        for k, t in enumerate(np.flatnonzero(~hits[r])):
            ax.axvspan(t - 0.5, t + 0.5, color=_WRONG, alpha=0.15, linewidth=0, label="wrong" if k == 0 else None)
        ax.step(steps, y[r], where="mid", color="C0", linewidth=1.8, label="target")
        ax.plot(steps, p[r], linestyle="none", marker="o", markersize=4, color="C1", label="predicted")
        ax.set_ylim(-0.15, 1.25)
        ax.set_yticks([0, 1])
        ax.set_ylabel("bit")
        ax.set_title(f"sequence {r}: {int(hits[r].sum())}/{hits.shape[1]} steps right", fontsize=10)
    # A figure-level legend outside the panels never hides a bit.
    legend: dict[str, Any] = {}
    for ax in axes[:rows]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend), fontsize=8)
    if acc is not None:
        ax = axes[-1]
        ax.plot(steps, acc, color="C2", marker=".", linewidth=1.5)
        ax.set_ylim(min(0.0, float(acc.min())), max(1.0, float(acc.max())) * 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title("per-step accuracy over the batch", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("time step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"echo: {rows} of {x.shape[0]} sequences" if x.shape[0] > rows else "echo")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# 6. learning-rate finder


def plot_lr_find(lrs: Any, losses: Any, path: PathLike, *, suggestion: float | None = None) -> Path:
    """Loss against learning rate on a log axis, with the suggested rate marked."""
    lr = _vector(lrs, "lrs")
    loss = _vector(losses, "losses")
    _same_length("lrs", lr.size, "losses", loss.size)
    if np.any(~np.isfinite(lr)) or np.any(lr <= 0):
        raise ValueError("lrs must all be positive and finite to plot on a log axis")
    if suggestion is not None and not (math.isfinite(suggestion) and suggestion > 0):
        raise ValueError(f"suggestion must be a positive learning rate, got {suggestion!r}")
    # The finder runs until the loss blows up: drop inf/nan and keep the axis on the useful range.
    keep = np.isfinite(loss)
    lr, loss = lr[keep], loss[keep]

    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("learning-rate finder")
    ax.grid(True, which="both", alpha=0.3)
    if loss.size == 0:
        ax.text(0.5, 0.5, "every loss was non-finite", transform=ax.transAxes, ha="center", va="center")
        return _save(fig, path)
    ax.plot(lr, loss, color="C0", linewidth=1.6, label="loss")
    first, low, high = float(loss[0]), float(loss.min()), float(loss.max())
    if first > low:
        top = min(high, first + 1.0 * (first - low))
        margin = 0.05 * (top - low)
        ax.set_ylim(low - margin, top + margin)
    if suggestion is not None:
        order = np.argsort(lr)
        at = float(np.interp(np.log(suggestion), np.log(lr[order]), loss[order]))
        ax.axvline(suggestion, color=_WRONG, linestyle="--", linewidth=1.2)
        ax.plot([suggestion], [at], marker="o", markersize=8, color=_WRONG, linestyle="none",
                label=f"suggested lr = {suggestion:.2e}")
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)
