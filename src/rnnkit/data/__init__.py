"""Datasets: MNIST and other IDX image datasets, and their views as RNN input sequences."""

from __future__ import annotations

from rnnkit.data.mnist import (
    MnistData,
    download_mnist,
    load_embedded_mnist,
    load_mnist,
    pixel_permutation,
    read_idx,
    to_sequences,
)

__all__ = [
    "MnistData",
    "download_mnist",
    "load_embedded_mnist",
    "load_mnist",
    "pixel_permutation",
    "read_idx",
    "to_sequences",
]
