"""Regenerate src/rnnkit/data/embedded/mini_mnist.npz, the mini-MNIST shipped in the package.

Selection (documented here and stored in the file): for each digit 0..9 take the 500 training and
the 100 test images whose index ``i`` has the smallest SHA-256 of ``"rnnkit-mini-mnist:{split}:{i}"``,
then keep them in their original order. Hashing the index, rather than drawing from a seeded RNG,
makes the choice independent of numpy's and torch's generator algorithms, so any version picks the
same 5,000 + 1,000 images. The file also stores the original indices (``train_indices``,
``test_indices``) so tests can check every image against the full MNIST.

The zip is written with fixed timestamps, so rerunning the script gives a byte-identical file.

Usage: python scripts/make_mini_mnist.py [--data-dir ../shared/data/mnist] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from rnnkit.data.mnist import load_mnist

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
DEFAULT_OUT = ROOT / "src" / "rnnkit" / "data" / "embedded" / "mini_mnist.npz"
PER_CLASS = {"train": 500, "test": 100}


def select(labels: np.ndarray, split: str, per_class: int) -> np.ndarray:
    """Return the sorted indices of a class-balanced subset chosen by hashing each index."""

    def key(index: int) -> bytes:
        return hashlib.sha256(f"rnnkit-mini-mnist:{split}:{index}".encode()).digest()

    chosen: list[int] = []
    for digit in range(10):
        candidates = np.flatnonzero(labels == digit).tolist()
        chosen.extend(sorted(candidates, key=key)[:per_class])
    return np.array(sorted(chosen), dtype=np.int32)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays like np.savez_compressed, but with fixed zip timestamps (byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def main() -> None:
    """Build the mini-MNIST from the full, checksum-verified MNIST."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="directory with the MNIST files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .npz")
    args = parser.parse_args()

    mnist = load_mnist(args.data_dir, download=False)
    train_idx = select(mnist.train_labels, "train", PER_CLASS["train"])
    test_idx = select(mnist.test_labels, "test", PER_CLASS["test"])
    arrays = {
        "train_images": mnist.train_images[train_idx],
        "train_labels": mnist.train_labels[train_idx].astype(np.uint8),
        "test_images": mnist.test_images[test_idx],
        "test_labels": mnist.test_labels[test_idx].astype(np.uint8),
        "train_indices": train_idx,
        "test_indices": test_idx,
        "description": np.array(
            "Class-balanced subset of MNIST (500 train / 100 test images per digit), chosen by the "
            "smallest SHA-256 of 'rnnkit-mini-mnist:{split}:{index}'; see scripts/make_mini_mnist.py."
        ),
    }
    write_npz(args.out, arrays)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size:,} bytes, sha256 {digest[:16]}...) from {mnist.source}")


if __name__ == "__main__":
    main()
