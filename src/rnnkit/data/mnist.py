"""MNIST and other IDX datasets: checked loading, download, embedded fallback, sequence views.

``load_mnist`` finds MNIST in this order: an explicit ``data_dir``, then ``$RNNKIT_DATA_DIR``, then
the cache (``$RNNKIT_CACHE_DIR`` or ``~/.cache/rnnkit/mnist``), then a download into the cache, and
finally the mini-MNIST embedded in the package (5,000 train / 1,000 test images). A directory that
was named explicitly (argument or environment variable) must hold good data: rnnkit raises rather
than silently training on something else.

IDX is the format of the original MNIST files: a big-endian header (two zero bytes, a type code,
the number of dimensions, then one 32-bit size per dimension) followed by the raw values. Files may
be gzipped or not; gzip is recognised by its magic bytes, whatever the file is called.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from rnnkit.errors import ConfigError, DataError, ShapeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MNIST_MIRRORS",
    "MnistData",
    "download_mnist",
    "load_embedded_mnist",
    "load_mnist",
    "pixel_permutation",
    "read_idx",
    "to_sequences",
]

Log = Callable[[str], object]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# Size and SHA-256 of the *un-gzipped* files: gzip output differs between compressors and levels,
# so only the raw bytes identify the data.
MNIST_SHA256: dict[str, tuple[int, str]] = {
    TRAIN_IMAGES: (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    TRAIN_LABELS: (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    TEST_IMAGES: (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    TEST_LABELS: (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

DATA_DIR_ENV = "RNNKIT_DATA_DIR"
CACHE_DIR_ENV = "RNNKIT_CACHE_DIR"
_HOW_TO_POINT = f"pass --data-dir DIR (load_mnist(data_dir=DIR)) or set {DATA_DIR_ENV}=DIR"

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_DOWNLOAD_TIMEOUT_S = 5.0
# urlopen's timeout bounds each socket operation, not the whole transfer; a trickling server could
# otherwise keep us busy forever.
_DOWNLOAD_DEADLINE_S = 120.0

# (resolved path, size, mtime_ns) of files whose SHA-256 already matched in this process, so that a
# second load skips hashing 47 MB again.
_VERIFIED: set[tuple[str, int, int]] = set()

_EMBEDDED_FILE = "mini_mnist.npz"


@dataclass(frozen=True, repr=False)
class MnistData:
    """Train and test splits of an image-classification dataset, as uint8 images and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    source: str

    @property
    def image_shape(self) -> tuple[int, int]:
        """Return (rows, cols) of one image."""
        return (int(self.train_images.shape[1]), int(self.train_images.shape[2]))

    def __repr__(self) -> str:
        rows, cols = self.image_shape
        return (
            f"MnistData(train={len(self.train_images)}, test={len(self.test_images)}, "
            f"image={rows}x{cols}, num_classes={self.num_classes}, source={self.source!r})"
        )


# --------------------------------------------------------------------------------------------------
# IDX reading


def _decompress_gzip(data: bytes, path: Path) -> tuple[bytes, bool]:
    """Return the un-gzipped bytes and whether the gzip stream was complete."""
    chunks = []
    rest = data
    # A gzip file may hold several members one after another; gunzip concatenates them.
    while rest[:2] == _GZIP_MAGIC:
        decomp = zlib.decompressobj(wbits=31)
        try:
            chunks.append(decomp.decompress(rest))
        except zlib.error as exc:
            raise DataError(
                f"{path}: the gzip data is corrupt ({exc}). Delete the file and download it again."
            ) from exc
        if not decomp.eof:
            return b"".join(chunks), False
        rest = decomp.unused_data
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), True


def _expected_size(raw: bytes) -> tuple[int, tuple[int, ...]] | None:
    """Return the total size and shape an IDX header announces, or None if there is no valid header."""
    if len(raw) < 4:
        return None
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    header_len = 4 + 4 * ndim
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0 or len(raw) < header_len:
        return None
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    count = int(np.prod(shape, dtype=np.int64))
    return header_len + count * np.dtype(_IDX_DTYPES[type_code]).itemsize, shape


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """Return the (un-gzipped) content of ``path`` and whether it was gzipped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc}). Check the path.") from exc
    if data[:2] != _GZIP_MAGIC:
        return data, False
    raw, complete = _decompress_gzip(data, path)
    if not complete:
        expected = _expected_size(raw)
        announced = f"expected {expected[0]} bytes (un-gzipped) for shape {expected[1]}" if expected else ""
        raise DataError(
            f"{path}: the file is truncated: the gzip stream ends early; "
            f"{announced or 'expected more data'}, got {len(raw)}. Delete the file and download it again."
        )
    return raw, True


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4:
        raise DataError(
            f"{path}: the file is truncated: expected at least 4 bytes of IDX header, got {len(raw)}. "
            "Download it again."
        )
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}; IDX files start with 0x0000 then a "
            f"type code and the number of dimensions, e.g. 0x{IMAGES_MAGIC:08x} for images, "
            f"0x{LABELS_MAGIC:08x} for labels). Check that this is the right file."
        )
    header_len = 4 + 4 * ndim
    announced = _expected_size(raw)
    if announced is None:
        raise DataError(
            f"{path}: the file is truncated: expected {header_len} bytes of IDX header, got {len(raw)}. "
            "Download it again."
        )
    expected, shape = announced
    if len(raw) < expected:
        raise DataError(
            f"{path}: the file is truncated: expected {expected} bytes for shape {shape}, "
            f"got {len(raw)}. Download it again."
        )
    if len(raw) > expected:
        raise DataError(
            f"{path}: {len(raw) - expected} unexpected bytes after the data: expected {expected} bytes for "
            f"shape {shape}, got {len(raw)}. The file is corrupt or not an IDX file; download it again."
        )
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(shape)
    # frombuffer over bytes is read-only; a private, native-endian copy is cheap (one memcpy) and
    # spares users surprises when they normalise in place or call torch.from_numpy.
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped or raw, detected by content) into a native-endian numpy array."""
    path = Path(path)
    raw, _ = _read_bytes(path)
    return _parse_idx(raw, path)


def _check_magic(raw: bytes, path: Path, magic: int, what: str) -> None:
    if len(raw) < 4:
        raise DataError(
            f"{path}: the file is truncated: expected at least 4 bytes of IDX header, got {len(raw)}. "
            "Download it again."
        )
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        other = {IMAGES_MAGIC: "an images file", LABELS_MAGIC: "a labels file"}.get(found)
        hint = f" (that is the magic of {other}: are the files swapped or misnamed?)" if other else ""
        raise DataError(
            f"{path}: bad magic number 0x{found:08x}{hint}; expected 0x{magic:08x} for {what}. "
            "Check that this is the right file, or download it again."
        )


def _load_idx_file(path: Path, name: str, magic: int, what: str, verify: bool) -> np.ndarray:
    raw, _ = _read_bytes(path)
    _check_magic(raw, path, magic, what)
    array = _parse_idx(raw, path)
    if verify:
        _verify_sha256(path, name, raw)
    return array


def _verify_sha256(path: Path, name: str, raw: bytes) -> None:
    size, want = MNIST_SHA256[name]
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    got = hashlib.sha256(raw).hexdigest()
    if got != want:
        raise DataError(
            f"{path}: the file differs from the official MNIST {name}: SHA-256 of the un-gzipped bytes is "
            f"{got[:16]}... ({len(raw)} bytes), expected {want[:16]}... ({size} bytes). If it is corrupt, "
            "delete it and download it again; if it is another dataset in the same IDX layout "
            "(Fashion-MNIST, KMNIST, your own), use --dataset idx (load_mnist(dataset='idx')), which "
            "skips the checksums."
        )
    _VERIFIED.add(key)


def _find(directory: Path, name: str) -> Path | None:
    # The raw file wins over the .gz: it needs no decompression.
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path) -> list[str]:
    return [name for name in IDX_FILES if _find(directory, name) is None]


def _require_files(directory: Path, origin: str) -> dict[str, Path]:
    if not directory.exists():
        raise DataError(
            f"data directory {directory} ({origin}) does not exist. Check the path, or {_HOW_TO_POINT}."
        )
    if not directory.is_dir():
        raise DataError(f"data directory {directory} ({origin}) is a file, not a directory. {_HOW_TO_POINT}.")
    missing = _missing(directory)
    if missing:
        listed = ", ".join(f"{name}[.gz]" for name in missing)
        what = "no IDX files" if len(missing) == len(IDX_FILES) else f"{len(missing)} of the 4 IDX files"
        raise DataError(
            f"data directory {directory} ({origin}) has {what}: missing {listed}. Put the four files "
            f"(gzipped or not) in one directory and {_HOW_TO_POINT}."
        )
    return {name: path for name in IDX_FILES if (path := _find(directory, name)) is not None}


def _load_split(
    files: dict[str, Path], images_name: str, labels_name: str, verify: bool
) -> tuple[np.ndarray, np.ndarray]:
    images = _load_idx_file(
        files[images_name], images_name, IMAGES_MAGIC, "images (count, rows, cols)", verify
    )
    labels = _load_idx_file(files[labels_name], labels_name, LABELS_MAGIC, "labels (count)", verify)
    if len(images) != len(labels):
        raise DataError(
            f"{files[images_name]} holds {len(images)} images but {files[labels_name]} holds {len(labels)} "
            "labels; they must match. One of the two files is from another dataset or split."
        )
    if len(images) == 0:
        raise DataError(f"{files[images_name]} holds no images. Check that this is the right file.")
    return images, labels.astype(np.int64)


def _load_dir(directory: Path, origin: str, *, dataset: str, verify: bool) -> tuple[MnistData, bool]:
    """Load the four IDX files from ``directory``; returns the data and whether SHA-256 was checked."""
    files = _require_files(directory, origin)
    checked = verify and dataset == "mnist"
    train_images, train_labels = _load_split(files, TRAIN_IMAGES, TRAIN_LABELS, checked)
    test_images, test_labels = _load_split(files, TEST_IMAGES, TEST_LABELS, checked)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{directory}: training images are {train_images.shape[1]}x{train_images.shape[2]} but test "
            f"images are {test_images.shape[1]}x{test_images.shape[2]}; both splits must have one size."
        )
    if dataset == "mnist":
        num_classes = 10
        if train_images.shape[1:] != (28, 28):
            raise DataError(
                f"{files[TRAIN_IMAGES]}: images are {train_images.shape[1]}x{train_images.shape[2]}, MNIST's "
                "are 28x28. For another IDX dataset use --dataset idx (load_mnist(dataset='idx'))."
            )
    else:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    for name, labels in ((TRAIN_LABELS, train_labels), (TEST_LABELS, test_labels)):
        bad = labels[labels >= num_classes]
        if bad.size:
            raise DataError(
                f"{files[name]}: {bad.size} labels are out of range (largest {int(bad.max())}), MNIST labels "
                "are 0..9. For another IDX dataset use --dataset idx (load_mnist(dataset='idx'))."
            )
    data = MnistData(train_images, train_labels, test_images, test_labels, num_classes, source="")
    return data, checked


# --------------------------------------------------------------------------------------------------
# Download


class _DownloadFailed(DataError):
    """No mirror delivered a file; ``short`` is a one-line reason fit for a fallback message."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


def _check_host_resolves(host: str, timeout: float) -> None:
    # getaddrinfo ignores socket time-outs and can block for tens of seconds on a machine without
    # network; resolve in a daemon thread so an offline run fails within ``timeout``.
    outcome: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=resolve, name="rnnkit-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise urllib.error.URLError(f"no answer resolving {host} within {timeout:.0f} s (offline?)")
    if not outcome[0]:
        raise urllib.error.URLError(f"cannot resolve {host} (offline?)")


def _urlopen(url: str, timeout: float) -> io.BufferedIOBase:
    """Open ``url`` for reading; tests replace this function to serve local bytes."""
    # Behind a proxy the proxy resolves names, so a local lookup failure would mean nothing.
    if not urllib.request.getproxies():
        _check_host_resolves(urllib.parse.urlsplit(url).hostname or "", timeout)
    return urllib.request.urlopen(url, timeout=timeout)


def _fetch(url: str, timeout: float, log: Log | None) -> bytes:
    deadline = time.monotonic() + _DOWNLOAD_DEADLINE_S
    chunks = []
    with _urlopen(url, timeout) as response:
        # Announced only once connected, so an offline run prints a single line, not one per mirror.
        if log:
            log(f"rnnkit: downloading {url}")
        while chunk := response.read(1 << 20):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"download took longer than {_DOWNLOAD_DEADLINE_S:.0f} s")
    return b"".join(chunks)


def _file_is_good(path: Path, name: str) -> bool:
    try:
        raw, _ = _read_bytes(path)
        _verify_sha256(path, name, raw)
    except DataError:
        return False
    return True


def _default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rnnkit" / "mnist"


def download_mnist(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = _DOWNLOAD_TIMEOUT_S,
    log: Log | None = print,
) -> Path:
    """Download the four MNIST files into ``cache_dir`` (SHA-256 checked) and return the directory."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    if not mirrors:
        raise ConfigError("download_mnist: mirrors is empty; pass at least one base URL.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the MNIST cache directory {directory} ({exc.strerror or exc}); set "
            f"{CACHE_DIR_ENV} to a writable directory, or {_HOW_TO_POINT}."
        ) from exc
    for name in IDX_FILES:
        existing = _find(directory, name)
        if existing is not None:
            if _file_is_good(existing, name):
                continue
            if log:
                log(f"rnnkit: {existing} is corrupt; replacing it")
            existing.unlink()
        _download_one(directory, name, mirrors, timeout, log)
    return directory


def _download_one(
    directory: Path, name: str, mirrors: Sequence[str], timeout: float, log: Log | None
) -> None:
    size, want = MNIST_SHA256[name]
    errors: list[tuple[str, str]] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        try:
            data = _fetch(url, timeout, log)
        # URLError, HTTPError and socket time-outs are OSErrors; a cut connection is an HTTPException.
        except (OSError, ValueError, http.client.HTTPException) as exc:
            errors.append((url, str(getattr(exc, "reason", None) or exc)))
            continue
        target = directory / f"{name}.gz"
        try:
            raw, complete = _decompress_gzip(data, target) if data[:2] == _GZIP_MAGIC else (data, True)
        except DataError:
            errors.append((url, "the download is not valid gzip"))
            continue
        if not complete:
            errors.append((url, f"the download is truncated ({len(data)} bytes)"))
            continue
        got = hashlib.sha256(raw).hexdigest()
        if got != want or len(raw) != size:
            errors.append((url, f"SHA-256 {got[:16]}... does not match the official {want[:16]}..."))
            continue
        if data[:2] != _GZIP_MAGIC:
            target = directory / name
        # Write then rename, so an interrupted download never leaves a half file under the real name.
        partial = target.with_name(f"{target.name}.part{os.getpid()}")
        try:
            partial.write_bytes(data)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise DataError(
                f"cannot write {target} ({exc.strerror or exc}); set {CACHE_DIR_ENV} to a writable directory."
            ) from exc
        return
    hosts = [(urllib.parse.urlsplit(url).hostname or url, reason) for url, reason in errors]
    short = "; ".join(reason if host in reason else f"{host}: {reason}" for host, reason in hosts)
    raise _DownloadFailed(
        f"could not download {name}.gz ({'; '.join(f'{url}: {reason}' for url, reason in errors)}). "
        f"If this machine is offline, copy the four MNIST files to a directory and {_HOW_TO_POINT}.",
        short=f"download failed: {short}",
    )


# --------------------------------------------------------------------------------------------------
# Embedded mini-MNIST


def load_embedded_mnist() -> MnistData:
    """Load the mini-MNIST shipped in the package (5,000 train / 1,000 test real MNIST images)."""
    resource = resources.files("rnnkit.data") / "embedded" / _EMBEDDED_FILE
    try:
        with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("train_images", "train_labels", "test_images", "test_labels")}
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"the embedded mini-MNIST ({resource}) is missing or corrupt ({exc}); reinstall rnnkit, or "
            f"{_HOW_TO_POINT} to use the full MNIST."
        ) from exc
    n_train, n_test = len(arrays["train_images"]), len(arrays["test_images"])
    return MnistData(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        num_classes=10,
        source=f"embedded mini-MNIST ({n_train:,} train / {n_test:,} test images)",
    )


# --------------------------------------------------------------------------------------------------
# Resolution


def _describe(data: MnistData, where: str, checked: bool, dataset: str) -> MnistData:
    if dataset == "idx":
        rows, cols = data.image_shape
        source = (
            f"IDX dataset from {where} ({len(data.train_images):,} train / {len(data.test_images):,} test "
            f"{rows}x{cols} images, {data.num_classes} classes; checksums not checked)"
        )
    else:
        source = f"MNIST from {where} ({'verified SHA-256' if checked else 'SHA-256 not checked'})"
    return MnistData(
        data.train_images, data.train_labels, data.test_images, data.test_labels, data.num_classes, source
    )


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    dataset: Literal["mnist", "idx"] = "mnist",
    verify: bool = True,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Log | None = print,
) -> MnistData:
    """Load MNIST from data_dir, $RNNKIT_DATA_DIR, the cache, a download or the embedded set, in order."""
    if dataset not in ("mnist", "idx"):
        raise ConfigError(f"dataset={dataset!r} is not known; use 'mnist' or 'idx' (any IDX dataset).")
    env_dir = os.environ.get(DATA_DIR_ENV) or None
    explicit: tuple[Path, str] | None = None
    if data_dir is not None:
        explicit = (Path(data_dir).expanduser(), "given as data_dir")
    elif env_dir is not None:
        explicit = (Path(env_dir).expanduser(), f"from ${DATA_DIR_ENV}")

    if dataset == "idx":
        if explicit is None:
            raise ConfigError(
                f"dataset='idx' needs the directory holding the four IDX files: {_HOW_TO_POINT}."
            )
        data, _ = _load_dir(explicit[0], explicit[1], dataset="idx", verify=False)
        return _describe(data, str(explicit[0]), False, "idx")

    if explicit is not None:
        # A directory the user named must work: falling back would hide their mistake.
        data, checked = _load_dir(explicit[0], explicit[1], dataset="mnist", verify=verify)
        return _describe(data, str(explicit[0]), checked, "mnist")

    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    problem = ""
    if cache.is_dir() and not _missing(cache):
        try:
            data, checked = _load_dir(cache, "the rnnkit cache", dataset="mnist", verify=verify)
            return _describe(data, f"cache {cache}", checked, "mnist")
        except DataError as exc:
            problem = f"the cached copy is unusable ({exc})"
            if log and download:
                log(f"rnnkit: {problem}; downloading again")
    if download:
        try:
            download_mnist(cache, log=log)
            data, checked = _load_dir(cache, "the rnnkit cache", dataset="mnist", verify=verify)
            return _describe(data, f"cache {cache} (downloaded)", checked, "mnist")
        except _DownloadFailed as exc:
            problem = exc.short
        except DataError as exc:
            problem = f"download failed: {exc}"
    elif not problem:
        problem = f"not in the cache {cache} and download=False"
    embedded = load_embedded_mnist()
    if log:
        log(
            f"rnnkit: full MNIST unavailable ({problem}); using the {embedded.source}. For the full set, "
            f"{_HOW_TO_POINT}."
        )
    return embedded


# --------------------------------------------------------------------------------------------------
# Sequence views

_VIEWS = ("rows", "pixels", "permuted")


def pixel_permutation(num_pixels: int, seed: int = 0) -> torch.Tensor:
    """Return the fixed permutation of ``num_pixels`` pixel positions used by the 'permuted' view."""
    import torch

    # An explicit CPU generator makes the permutation depend only on the seed, not on the global RNG
    # state or the device.
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(int(num_pixels), generator=generator)


def to_sequences(
    images: np.ndarray | torch.Tensor,
    view: str = "rows",
    *,
    normalize: bool | str = True,
    permutation_seed: int = 0,
) -> torch.Tensor:
    """Turn uint8 images (N, H, W) into a float32 sequence batch (N, T, F) for an RNN."""
    # torch is imported here, not at module level, so the IDX reader and download stay cheap to import.
    import torch

    if view not in _VIEWS:
        raise ConfigError(f"view={view!r} is not known; valid views: {', '.join(map(repr, _VIEWS))}.")
    if not (isinstance(normalize, bool) or normalize in ("unit", "standard")):
        raise ConfigError(
            f"normalize={normalize!r} is not known; use True or 'unit' (x/255 in [0, 1]), 'standard' "
            f"((x/255 - {MNIST_MEAN}) / {MNIST_STD}, MNIST's train statistics) or False (raw 0..255)."
        )
    tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if tensor.dtype != torch.uint8 or tensor.dim() != 3:
        raise ShapeError(
            f"to_sequences expects uint8 images of shape (N, H, W), got {tuple(tensor.shape)} "
            f"{tensor.dtype}; pass MnistData.train_images (or test_images) as loaded."
        )
    x = tensor.to(torch.float32)
    if normalize in (True, "unit", "standard"):
        x = x.div_(255.0)
    if normalize == "standard":
        x = x.sub_(MNIST_MEAN).div_(MNIST_STD)
    n, rows, cols = x.shape
    if view == "rows":
        return x.contiguous()
    x = x.reshape(n, rows * cols)
    if view == "permuted":
        x = x[:, pixel_permutation(rows * cols, permutation_seed).to(x.device)]
    return x.reshape(n, rows * cols, 1).contiguous()
