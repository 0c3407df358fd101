"""rnnkit.plots: every figure is a real PNG, missing metrics are skipped, wrong predictions are red."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnkit import ShapeError, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Check ``path`` is a non-trivial PNG and return its (width, height) from the IHDR chunk."""
    data = Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    assert len(data) > 3000, f"{path} is suspiciously small ({len(data)} bytes)"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 150
    return width, height


def red_pixels(path: Path) -> int:
    """How many pixels are close to the red that marks wrong predictions."""
    from matplotlib.image import imread

    rgb = (imread(path)[..., :3] * 255).astype(int)
    target = np.array([0xD6, 0x27, 0x28])
    return int((np.abs(rgb - target).max(axis=-1) < 40).sum())


def train_records(n: int, **metrics: float) -> list[dict]:
    """``n`` noisy train records with a falling loss plus any fixed extra metrics."""
    rng = np.random.default_rng(0)
    return [{"kind": "train", "step": 10 * i, "loss": 2.0 / (1 + i) + 0.1 * rng.random(), **metrics} for i in range(n)]


# --------------------------------------------------------------------------------------------------
# curves


def test_curves_train_and_eval_in_nested_dir(tmp_path):
    records = train_records(60, accuracy=0.5)
    records += [{"kind": "eval", "step": s, "loss": 1.0 / (1 + s), "accuracy": 0.9} for s in (0, 200, 400)]
    records.append({"kind": "meta", "config": {"lr": 1e-3}})  # no metrics: ignored
    out = plots.plot_curves(records, str(tmp_path / "a" / "b" / "curves.png"), title="run")
    assert isinstance(out, Path) and out == tmp_path / "a" / "b" / "curves.png"
    png_size(out)


def test_collect_curves_skips_absent_metrics_and_sorts_steps():
    records = [{"kind": "train", "step": 20, "loss": 1.0}, {"kind": "train", "step": 10, "loss": 2.0, "lr": 0.1},
               {"kind": "eval", "step": 20, "loss": 1.5, "accuracy": None}]
    curves = plots._collect_curves(records, plots.CURVE_METRICS)
    assert list(curves) == ["loss"]  # accuracy is None everywhere, mse absent
    assert list(curves["loss"]) == ["train", "eval"]
    steps, values = curves["loss"]["train"]
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_array_equal(values, [2.0, 1.0])


def test_curves_only_train_records(tmp_path):
    records = train_records(30)
    assert list(plots._collect_curves(records, plots.CURVE_METRICS)) == ["loss"]
    png_size(plots.plot_curves(records, tmp_path / "train_only.png"))


def test_curves_regression_plots_mse_instead_of_accuracy(tmp_path):
    records = [{"kind": "train", "step": i, "loss": 1 / (i + 1), "mse": 1 / (i + 1)} for i in range(40)]
    records.append({"kind": "eval", "step": 39, "mse": 0.03})
    curves = plots._collect_curves(records, plots.CURVE_METRICS)
    assert list(curves) == ["loss", "mse"]
    assert list(curves["mse"]) == ["train", "eval"]
    png_size(plots.plot_curves(records, tmp_path / "mse.png"))


def test_curves_with_nothing_to_plot_still_writes_a_png(tmp_path):
    png_size(plots.plot_curves([{"kind": "meta"}], tmp_path / "empty.png"))


def test_curves_record_without_step_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="record 1 .* no numeric 'step'"):
        plots.plot_curves([{"kind": "train", "step": 0, "loss": 1.0}, {"kind": "train", "loss": 0.5}],
                          tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_running_mean_is_trailing_and_expands_at_the_start():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(plots._running_mean(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(plots._running_mean(values, 1), values)
    assert plots._smoothing_window(5) == 1 and 1 < plots._smoothing_window(200) <= 50


# --------------------------------------------------------------------------------------------------
# predictions


def test_wrong_indices():
    assert plots._wrong_indices([1, 2, 3, 4], [1, 0, 3, 5]) == [1, 3]
    assert plots._wrong_indices(np.array([7, 7]), torch.tensor([7, 7])) == []
    with pytest.raises(ValueError, match="predicted has 2 entries but true has 3"):
        plots._wrong_indices([1, 2], [1, 2, 3])


def test_predictions_mark_wrong_ones_in_red(tmp_path):
    images = (np.random.default_rng(0).random((6, 28, 28)) * 255).astype(np.uint8)
    labels = [0, 1, 2, 3, 4, 5]
    right = plots.plot_predictions(images, labels, labels, tmp_path / "right.png", ncols=3)
    wrong = plots.plot_predictions(images, [0, 9, 2, 3, 4, 1], labels, tmp_path / "wrong.png", ncols=3,
                                   class_names=[f"c{i}" for i in range(10)])
    assert png_size(right) == png_size(wrong)
    assert red_pixels(right) == 0
    assert red_pixels(wrong) > 500  # two thick red frames and red titles


def test_predictions_accept_float_and_channel_images(tmp_path):
    images = torch.rand(3, 1, 12, 12)
    png_size(plots.plot_predictions(images, [1, 2, 3], [1, 2, 3], tmp_path / "float.png"))


@pytest.mark.parametrize(
    ("images", "pred", "true", "match"),
    [
        (np.zeros((4, 8, 8)), [1, 2, 3], [1, 2, 3, 4], "images has 4 entries but predicted has 3"),
        (np.zeros((4, 8, 8)), [1, 2, 3, 4], [1, 2], "images has 4 entries but true has 2"),
        (np.zeros((4, 64)), [1, 2, 3, 4], [1, 2, 3, 4], r"images must be \(N, H, W\), got shape \(4, 64\)"),
        (np.zeros((0, 8, 8)), [], [], "empty"),
    ],
)
def test_predictions_shape_errors(tmp_path, images, pred, true, match):
    with pytest.raises(ShapeError, match=match):
        plots.plot_predictions(images, pred, true, tmp_path / "x.png")


def test_predictions_bad_ncols(tmp_path):
    with pytest.raises(ValueError, match="ncols"):
        plots.plot_predictions(np.zeros((2, 8, 8)), [1, 2], [1, 2], tmp_path / "x.png", ncols=0)


# --------------------------------------------------------------------------------------------------
# states and attention


def test_state_heatmaps_with_input_image(tmp_path):
    rng = np.random.default_rng(0)
    states = {"h": np.tanh(rng.standard_normal((28, 16))), "gate f": torch.rand(1, 28, 16)}
    out = plots.plot_state_heatmaps(states, tmp_path / "states.png", image=rng.random(784), title="index 7")
    png_size(out)


def test_state_heatmaps_without_image(tmp_path):
    png_size(plots.plot_state_heatmaps({"h": np.zeros((10, 4))}, tmp_path / "states.png"))


@pytest.mark.parametrize(
    ("states", "image", "match"),
    [
        ({}, None, "states is empty"),
        ({"h": np.zeros(10)}, None, r"states\['h'\] must be \(T, H\).*got shape \(10,\)"),
        ({"h": np.zeros((2, 10, 4))}, None, r"got shape \(2, 10, 4\)"),
        ({"h": np.zeros((10, 4))}, np.zeros(10), "flat square"),
    ],
)
def test_state_heatmaps_shape_errors(tmp_path, states, image, match):
    with pytest.raises(ValueError, match=match):
        plots.plot_state_heatmaps(states, tmp_path / "x.png", image=image)


def test_attention(tmp_path):
    weights = np.random.default_rng(0).random((4, 6))
    weights /= weights.sum(axis=1, keepdims=True)
    png_size(plots.plot_attention(weights, list("abcdef"), ["<s>", "x", "y", "</s>"], tmp_path / "attn.png"))


def test_attention_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"T_src\) has 6 entries but src_tokens has 5"):
        plots.plot_attention(np.zeros((4, 6)), list("abcde"), list("wxyz"), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"T_out\) has 4 entries but out_tokens has 3"):
        plots.plot_attention(np.zeros((4, 6)), list("abcdef"), list("xyz"), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"weights must be \(T_out, T_src\)"):
        plots.plot_attention(np.zeros(6), list("abcdef"), ["x"], tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------
# series, echo, lr finder


def test_series(tmp_path):
    t = np.linspace(0, 10, 100)
    series = {"input sin": np.sin(t), "target cos": np.cos(t)[:, None], "predicted": torch.cos(torch.tensor(t))}
    png_size(plots.plot_series(series, tmp_path / "series.png", title="sin -> cos", xlabel="t"))


def test_series_errors(tmp_path):
    with pytest.raises(ValueError, match="series is empty"):
        plots.plot_series({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"series\['a'\] must be 1-D"):
        plots.plot_series({"a": np.zeros((3, 4))}, tmp_path / "x.png")


def test_echo_with_accuracy_panel(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 2, (7, 15))
    targets = np.roll(inputs, 2, axis=1)
    predictions = np.clip(targets + 0.2 * rng.standard_normal(targets.shape), 0, 1)
    accuracy = ((predictions >= 0.5) == targets).mean(axis=0)
    png_size(plots.plot_echo(inputs[..., None], targets, predictions, tmp_path / "echo.png",
                             per_step_accuracy=accuracy))


def test_echo_single_sequence(tmp_path):
    bits = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    png_size(plots.plot_echo(bits, bits, bits, tmp_path / "echo1.png"))


def test_echo_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"share one shape.*\(2, 5\), \(2, 5\) and \(2, 4\)"):
        plots.plot_echo(np.zeros((2, 5)), np.zeros((2, 5)), np.zeros((2, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="per_step_accuracy has 4 entries but the sequences' steps"):
        plots.plot_echo(np.zeros((2, 5)), np.zeros((2, 5)), np.zeros((2, 5)), tmp_path / "x.png",
                        per_step_accuracy=np.ones(4))
    with pytest.raises(ValueError, match=r"inputs must be \(B, T\) bits"):
        plots.plot_echo(np.zeros((2, 5, 3)), np.zeros((2, 5)), np.zeros((2, 5)), tmp_path / "x.png")


def test_lr_find_with_suggestion_and_divergence(tmp_path):
    lrs = np.logspace(-6, 0, 60)
    losses = 2.3 - 1.5 / (1 + np.exp(-2 * (np.log10(lrs) + 4)))
    losses[50:] += np.linspace(0, 30, 10)
    losses[-1] = np.inf
    png_size(plots.plot_lr_find(lrs, losses, tmp_path / "lr.png", suggestion=3e-4))


def test_lr_find_errors(tmp_path):
    with pytest.raises(ValueError, match="lrs has 3 entries but losses has 2"):
        plots.plot_lr_find([1e-3, 1e-2, 1e-1], [1.0, 2.0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="positive"):
        plots.plot_lr_find([0.0, 1e-2], [1.0, 2.0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="suggestion must be a positive"):
        plots.plot_lr_find([1e-3, 1e-2], [1.0, 2.0], tmp_path / "x.png", suggestion=-1.0)


# --------------------------------------------------------------------------------------------------
# import hygiene


def test_matplotlib_is_imported_lazily_and_pyplot_never():
    # Checked on the source rather than in a fresh interpreter: importing torch there costs seconds.
    tree = ast.parse(Path(plots.__file__).read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("matplotlib")], names
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    every = [alias.name for node in imports for alias in node.names]
    every += [node.module or "" for node in imports if isinstance(node, ast.ImportFrom)]
    assert not [n for n in every if "pyplot" in n]
