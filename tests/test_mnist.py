"""Tests of rnnkit.data.mnist: IDX checks, resolution order, download path, embedded set, views."""

from __future__ import annotations

import gzip
import io
import struct
import threading
import time
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnkit.data import (
    MnistData,
    load_embedded_mnist,
    load_mnist,
    pixel_permutation,
    read_idx,
    to_sequences,
)
from rnnkit.data import mnist as mnist_module
from rnnkit.errors import ConfigError, DataError, ShapeError

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

needs_real = pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST not found at {REAL_MNIST}")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (header + payload)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_dir(
    directory: Path,
    *,
    n_train: int = 12,
    n_test: int = 5,
    rows: int = 28,
    cols: int = 28,
    classes: int = 10,
    gz: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny four-file IDX dataset and return its arrays by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        NAMES[0]: rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        NAMES[1]: (np.arange(n_train) % classes).astype(np.uint8),
        NAMES[2]: rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        NAMES[3]: (np.arange(n_test) % classes).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the user's environment and the network out of every test."""
    monkeypatch.delenv("RNNKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path / "default-cache"))

    def no_network(url: str, timeout: float) -> io.BytesIO:
        raise AssertionError(f"a test tried to reach the network: {url}")

    monkeypatch.setattr(mnist_module, "_urlopen", no_network)


@pytest.fixture(scope="module")
def real() -> MnistData:
    """The full MNIST from ../shared, loaded once."""
    if not REAL_MNIST.is_dir():
        pytest.skip(f"real MNIST not found at {REAL_MNIST}")
    return load_mnist(REAL_MNIST, download=False)


# --------------------------------------------------------------------------------------------------
# IDX reading and structural checks


@pytest.mark.parametrize("gz", [True, False])
def test_tiny_idx_dataset_loads(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_dir(tmp_path, rows=9, cols=7, classes=4, gz=gz)
    data = load_mnist(tmp_path, dataset="idx")
    assert data.train_images.shape == (12, 9, 7) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (5, 9, 7)
    assert data.train_labels.dtype == np.int64
    np.testing.assert_array_equal(data.train_images, arrays[NAMES[0]])
    np.testing.assert_array_equal(data.test_labels, arrays[NAMES[3]])
    assert data.num_classes == 4
    assert data.image_shape == (9, 7)
    assert str(tmp_path) in data.source and "checksums not checked" in data.source


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    gz_without_suffix = tmp_path / "images"
    gz_without_suffix.write_bytes(gzip.compress(idx_bytes(array)))
    raw_with_suffix = tmp_path / "images.gz"
    raw_with_suffix.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(gz_without_suffix), array)
    np.testing.assert_array_equal(read_idx(raw_with_suffix), array)


def test_truncated_raw_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    path = tmp_path / NAMES[0]
    path.write_bytes(path.read_bytes()[:-100])
    expected = 16 + 12 * 28 * 28
    with pytest.raises(DataError, match="truncated") as info:
        load_mnist(tmp_path, dataset="idx")
    message = str(info.value)
    assert str(path) in message
    assert f"expected {expected} bytes" in message and f"got {expected - 100}" in message


def test_truncated_gzip_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=True)
    path = tmp_path / f"{NAMES[0]}.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match="truncated") as info:
        load_mnist(tmp_path, dataset="idx")
    assert str(path) in str(info.value) and f"expected {16 + 12 * 28 * 28} bytes" in str(info.value)


def test_bad_magic_number(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    path = tmp_path / NAMES[2]
    data = bytearray(path.read_bytes())
    data[2] = 0x0C  # an int32 IDX file: valid IDX, wrong kind for images
    path.write_bytes(bytes(data[:16]) + bytes(4 * 5 * 28 * 28))
    with pytest.raises(DataError, match="magic number 0x00000c03") as info:
        load_mnist(tmp_path, dataset="idx")
    assert "expected 0x00000803" in str(info.value) and str(path) in str(info.value)


def test_swapped_files_are_named_as_such(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    images, labels = tmp_path / NAMES[0], tmp_path / NAMES[1]
    images_bytes, labels_bytes = images.read_bytes(), labels.read_bytes()
    images.write_bytes(labels_bytes)
    labels.write_bytes(images_bytes)
    with pytest.raises(DataError, match="swapped"):
        load_mnist(tmp_path, dataset="idx")


def test_not_an_idx_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not IDX")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def test_count_mismatch(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    (tmp_path / NAMES[1]).write_bytes(idx_bytes(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        load_mnist(tmp_path, dataset="idx")


def test_missing_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    (tmp_path / f"{NAMES[3]}.gz").unlink()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert NAMES[3] in message and NAMES[0] not in message
    assert str(tmp_path) in message and "--data-dir" in message and "RNNKIT_DATA_DIR" in message


def test_empty_and_absent_directories(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no IDX files") as info:
        load_mnist(tmp_path)
    assert all(name in str(info.value) for name in NAMES)
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_standard_name_with_wrong_checksum(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    with pytest.raises(DataError, match="differs from the official MNIST") as info:
        load_mnist(tmp_path)
    assert "--dataset idx" in str(info.value) and "SHA-256" in str(info.value)
    # The same files load when the checks that cannot pass are switched off.
    assert "SHA-256 not checked" in load_mnist(tmp_path, verify=False).source
    assert load_mnist(tmp_path, dataset="idx").num_classes == 10


def test_mnist_label_range_checked_without_checksums(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, classes=12, gz=False)
    with pytest.raises(DataError, match="out of range"):
        load_mnist(tmp_path, verify=False)
    assert load_mnist(tmp_path, dataset="idx").num_classes == 12


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'mnist' or 'idx'"):
        load_mnist(tmp_path, dataset="cifar")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="RNNKIT_DATA_DIR"):
        load_mnist(dataset="idx")


# --------------------------------------------------------------------------------------------------
# Resolution order


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each directory gets a different number of training images, so the result tells which one won.
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "cache"
    write_idx_dir(explicit, n_train=3)
    write_idx_dir(env, n_train=4)
    write_idx_dir(cache, n_train=5)
    monkeypatch.setenv("RNNKIT_DATA_DIR", str(env))
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(cache))
    quiet = {"verify": False, "download": False, "log": None}
    assert len(load_mnist(explicit, **quiet).train_images) == 3
    assert len(load_mnist(**quiet).train_images) == 4
    monkeypatch.delenv("RNNKIT_DATA_DIR")
    loaded = load_mnist(**quiet)
    assert len(loaded.train_images) == 5 and f"cache {cache}" in loaded.source
    monkeypatch.delenv("RNNKIT_CACHE_DIR")
    assert len(load_mnist(cache_dir=cache, **quiet).train_images) == 5
    messages: list[str] = []
    fallback = load_mnist(cache_dir=tmp_path / "empty", verify=False, download=False, log=messages.append)
    assert fallback.source.startswith("embedded mini-MNIST") and len(fallback.train_images) == 5000
    assert len(messages) == 1 and "--data-dir" in messages[0]


def test_named_directories_never_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_idx_dir(good)
    bad.mkdir()
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(good))
    with pytest.raises(DataError, match="given as data_dir"):
        load_mnist(bad, verify=False, download=False)
    monkeypatch.setenv("RNNKIT_DATA_DIR", str(bad))
    with pytest.raises(DataError, match="RNNKIT_DATA_DIR"):
        load_mnist(verify=False, download=False)


def test_corrupt_cache_falls_back_to_embedded(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)  # standard names, wrong checksums
    messages: list[str] = []
    data = load_mnist(cache_dir=tmp_path, download=False, log=messages.append)
    assert data.source.startswith("embedded") and "differs" in messages[0]


# --------------------------------------------------------------------------------------------------
# Download (served from the local files: the network is never used)


def serve_from(directory: Path, calls: list[str], broken_prefix: str | None = None):
    """Return a fake _urlopen that serves ``directory``'s files and fails for URLs under broken_prefix."""

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        calls.append(url)
        if broken_prefix is not None and url.startswith(broken_prefix):
            raise urllib.error.URLError("connection refused")
        return io.BytesIO((directory / url.rsplit("/", 1)[-1]).read_bytes())

    return fake_urlopen


@needs_real
def test_download_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    first, second = mnist_module.MNIST_MIRRORS
    monkeypatch.setattr(mnist_module, "_urlopen", serve_from(REAL_MNIST, calls, broken_prefix=first))
    cache = tmp_path / "cache"
    data = load_mnist(cache_dir=cache, log=None)
    assert "downloaded" in data.source and "verified SHA-256" in data.source
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    # The first mirror fails, the second serves every file.
    assert sum(url.startswith(second) for url in calls) == 4
    calls.clear()
    again = load_mnist(cache_dir=cache, log=None)
    assert calls == [] and again.source.startswith(f"MNIST from cache {cache}")
    np.testing.assert_array_equal(np.bincount(again.test_labels), TEST_COUNTS)


def test_download_rejects_wrong_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake"
    write_idx_dir(fake)
    monkeypatch.setattr(mnist_module, "_urlopen", serve_from(fake, []))
    messages: list[str] = []
    data = load_mnist(cache_dir=tmp_path / "cache", log=messages.append)
    assert data.source.startswith("embedded")
    assert "does not match" in messages[-1]
    assert not list((tmp_path / "cache").iterdir())


def test_offline_download_falls_back_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(mnist_module, "_urlopen", serve_from(tmp_path, calls, broken_prefix="https://"))
    messages: list[str] = []
    data = load_mnist(cache_dir=tmp_path / "cache", log=messages.append)
    assert data.source.startswith("embedded mini-MNIST")
    # One attempt per mirror for the first file, then it gives up: no long retry loop offline.
    assert len(calls) == len(mnist_module.MNIST_MIRRORS)
    assert len(messages) == 1
    final = messages[0]
    assert "\n" not in final and "download failed" in final and "connection refused" in final
    assert "--data-dir" in final


def test_stuck_name_lookup_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck_getaddrinfo(*args: object) -> None:
        release.wait(10)
        raise OSError("released")

    monkeypatch.setattr(mnist_module.socket, "getaddrinfo", stuck_getaddrinfo)
    start = time.monotonic()
    try:
        with pytest.raises(urllib.error.URLError, match="no answer resolving"):
            mnist_module._check_host_resolves("mirror.invalid", timeout=0.2)
    finally:
        release.set()
    assert time.monotonic() - start < 2


# --------------------------------------------------------------------------------------------------
# Real data and the embedded subset


def test_real_mnist(real: MnistData) -> None:
    assert real.source == f"MNIST from {REAL_MNIST} (verified SHA-256)"
    assert real.train_images.shape == (60000, 28, 28) and real.test_images.shape == (10000, 28, 28)
    assert real.num_classes == 10
    np.testing.assert_array_equal(np.bincount(real.train_labels, minlength=10), TRAIN_COUNTS)
    np.testing.assert_array_equal(np.bincount(real.test_labels, minlength=10), TEST_COUNTS)


def test_second_load_skips_hashing(real: MnistData, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("hashed a file that was already verified in this process")

    monkeypatch.setattr(mnist_module, "hashlib", types.SimpleNamespace(sha256=refuse))
    again = load_mnist(REAL_MNIST, download=False)
    np.testing.assert_array_equal(again.test_labels, real.test_labels)


def test_embedded_is_a_balanced_subset_of_real(real: MnistData) -> None:
    mini = load_embedded_mnist()
    assert mini.source == "embedded mini-MNIST (5,000 train / 1,000 test images)"
    assert mini.train_images.shape == (5000, 28, 28) and mini.test_images.shape == (1000, 28, 28)
    assert mini.num_classes == 10 and mini.train_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(mini.train_labels), [500] * 10)
    np.testing.assert_array_equal(np.bincount(mini.test_labels), [100] * 10)
    resource = Path(mnist_module.__file__).parent / "embedded" / "mini_mnist.npz"
    assert resource.stat().st_size < 5_000_000
    with np.load(resource) as npz:
        train_idx, test_idx = npz["train_indices"], npz["test_indices"]
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)
    np.testing.assert_array_equal(mini.train_images, real.train_images[train_idx])
    np.testing.assert_array_equal(mini.train_labels, real.train_labels[train_idx])
    np.testing.assert_array_equal(mini.test_images, real.test_images[test_idx])
    np.testing.assert_array_equal(mini.test_labels, real.test_labels[test_idx])


# --------------------------------------------------------------------------------------------------
# Sequence views


def test_views_shapes_and_values() -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    rows = to_sequences(images, "rows")
    pixels = to_sequences(images, "pixels")
    permuted = to_sequences(images, "permuted")
    assert rows.shape == (3, 28, 28) and pixels.shape == (3, 784, 1) and permuted.shape == (3, 784, 1)
    assert rows.dtype == pixels.dtype == permuted.dtype == torch.float32
    assert 0.0 <= float(rows.min()) and float(rows.max()) <= 1.0
    torch.testing.assert_close(rows.reshape(3, 784, 1), pixels)
    torch.testing.assert_close(permuted[:, :, 0], pixels[:, pixel_permutation(784, 0), 0])
    raw = to_sequences(torch.from_numpy(images), "rows", normalize=False)
    assert float(raw.max()) == 255.0
    standard = to_sequences(images, "rows", normalize="standard")
    torch.testing.assert_close(standard, (rows - 0.1307) / 0.3081)


def test_permutation_fixed_by_seed() -> None:
    first = pixel_permutation(784, 0)
    torch.manual_seed(1234)  # the global RNG must not matter
    assert torch.equal(first, pixel_permutation(784, 0))
    assert not torch.equal(first, pixel_permutation(784, 1))
    assert torch.equal(torch.sort(first).values, torch.arange(784))
    # Pinned so a change in torch's randperm (which would silently change the task) is noticed.
    assert first[:8].tolist() == [60, 361, 167, 578, 107, 772, 313, 626]
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    a = to_sequences(images, "permuted", permutation_seed=7)
    assert torch.equal(a, to_sequences(images, "permuted", permutation_seed=7))
    assert not torch.equal(a, to_sequences(images, "permuted", permutation_seed=8))


def test_view_errors() -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    with pytest.raises(ConfigError, match="'rows', 'pixels', 'permuted'"):
        to_sequences(images, "columns")
    with pytest.raises(ConfigError, match="standard"):
        to_sequences(images, normalize="zscore")
    with pytest.raises(ShapeError, match="uint8"):
        to_sequences(images.astype(np.float32))
    with pytest.raises(ShapeError, match=r"\(N, H, W\)"):
        to_sequences(images[0])
