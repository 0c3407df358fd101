"""Checkpoints: one safetensors file per checkpoint, written atomically, read without pickle.

On-disk layout (format 1). A checkpoint is a single ``.safetensors`` file. Its tensors are ordinary
safetensors entries; everything else (config, step, optimiser scalars, RNG states, data position...)
is one JSON document stored as a string under the key ``"rnnkit"`` of the safetensors header's
``__metadata__``, next to ``"rnnkit_format": "1"``. Any safetensors reader can open the file, and one
file means one atomic rename: ``save_checkpoint`` writes a temporary file in the same directory,
fsyncs it, ``os.replace``-s it onto the final name and fsyncs the directory, so killing the process
at any moment leaves either the old or the new checkpoint, never a torn one.

``load_checkpoint`` parses the header itself and lets safetensors copy the raw tensor bytes; no code
from the file is ever run. Pickle-based files (``torch.save``, ``pickle``) are refused. A plain
safetensors file without rnnkit metadata loads with ``meta == {}``. ``read_meta`` reads only the header.

Training state. ``pack_training_state`` flattens what a trainer needs into ``(tensors, meta)``:

    model/<state_dict key>          model parameters and buffers
    optim/state/<i>/<name>          optimiser per-parameter tensors (Adam's exp_avg, step, ...)
    rng/torch, rng/cuda/<i>         torch RNG states (uint8 tensors)
    extra/<name>/...                tensors inside ``extra`` states, e.g. ``extra={"ema": ema.state_dict()}``

and ``meta`` holds the caller's ``meta`` keys plus reserved ones: ``_optimizer`` and ``_extra``
(the non-tensor parts of those state dicts, with ``{"__tensor__": name}`` where a tensor was),
``_rng`` (Python's and NumPy's RNG states as lists) and ``_metric`` (written by CheckpointManager).
``restore_training_state`` reverses it and returns ``(meta, extra)``; floats go through JSON exactly,
so a resumed run continues bit for bit.

    tensors, meta = pack_training_state(model, opt, extra={"ema": ema.state_dict()}, meta={"step": step})
    manager.save(step, tensors, meta, metric=val_loss)
    ...
    meta, extra = restore_training_state(latest_checkpoint(run_dir), model, opt)
    ema.load_state_dict(extra["ema"])

``load_into`` loads model weights, strictly by default, or partially with ``include`` (names or glob
patterns) and ``rename`` (checkpoint name -> model name, as TensorFlow's ``Saver({...})``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import random
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from rnnkit.errors import CheckpointError, ConfigError

FORMAT = 1
SUFFIX = ".safetensors"
RESERVED = ("_optimizer", "_extra", "_rng", "_metric")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit; a larger "length" means a foreign file


# --------------------------------------------------------------------------------------------------
# files


def save_checkpoint(
    path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None
) -> Path:
    """Atomically write ``tensors`` and the JSON-serialisable ``meta`` to one safetensors file."""
    path = Path(path)
    try:
        text = json.dumps(dict(meta or {}), default=_json_default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot save {path}: meta is not JSON-serialisable ({e}); keep meta to dicts, lists, "
            "strings, numbers, booleans and None, and put tensors in `tensors`"
        ) from e
    try:
        data = safetensors.torch.save(
            _prepare(tensors), metadata={"rnnkit": text, "rnnkit_format": str(FORMAT)}
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot save {path}: safetensors rejected the tensors: {e}") from e
    _atomic_write(path, data)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint into CPU ``(tensors, meta)``; never unpickles, so never runs code from the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint at {path}; check the path (latest_checkpoint(dir) finds one)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    header = _parse_header(data, len(data), path)
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupted: safetensors cannot read it ({e})") from e
    return tensors, _meta_from_header(header, path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read only the JSON metadata of a checkpoint (cheap: the tensor data is not read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                head += f.read(min(n, _MAX_HEADER))
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}; check the path") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return _meta_from_header(_parse_header(head, size, path), path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):  # numpy scalars turn up in metrics and data positions
        return obj.item()
    raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON-serialisable")


def _prepare(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(
                f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor; put it in meta"
            )
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights): give each its own copy
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen and t.numel():
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable; Windows cannot open directories
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _parse_header(head: bytes, size: int, path: Path) -> dict[str, Any]:
    """Check that ``head`` (the file's first bytes) opens a complete safetensors file of ``size`` bytes."""
    # A safetensors file starts with an 8-byte length whose low byte can be 0x80 or spell "PK";
    # its JSON header then starts with "{", which neither pickle nor a torch.save zip does.
    if (head[:1] == b"\x80" or head[:2] == b"PK") and head[8:9] != b"{":
        raise CheckpointError(
            f"{path} is a pickle-based file (torch.save or pickle); rnnkit refuses to load it because "
            "unpickling can run arbitrary code. If you trust where it came from, convert it once:\n"
            "    import torch, safetensors.torch\n"
            f"    state = torch.load({str(path)!r}, weights_only=True)  # a plain state_dict of tensors\n"
            "    safetensors.torch.save_file(state, 'model.safetensors')\n"
            "then load it with rnnkit.train.checkpoint.load_into(model, 'model.safetensors')."
        )
    if size < 8:
        raise CheckpointError(f"{path} is truncated or not a checkpoint: it is only {size} bytes long")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(
            f"{path} is truncated or not a safetensors checkpoint: its header claims {n} bytes "
            f"but the file has {size}"
        )
    try:
        header = json.loads(head[8 : 8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"{path} is not a safetensors checkpoint: its header is unreadable ({e})"
        ) from e
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: it should be {8 + n + end} bytes but has {size}; the write was "
            "interrupted or the copy is incomplete. Use an earlier checkpoint or copy it again."
        )
    return header


def _meta_from_header(header: dict[str, Any], path: Path) -> dict[str, Any]:
    info = header.get("__metadata__") or {}
    fmt = str(info.get("rnnkit_format", FORMAT))
    if not fmt.isdigit() or int(fmt) > FORMAT:
        raise CheckpointError(
            f"{path} uses checkpoint format {fmt!r}, newer than this rnnkit; upgrade rnnkit"
        )
    if "rnnkit" not in info:
        return {}
    try:
        meta = json.loads(info["rnnkit"])
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupted: its rnnkit metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupted: its rnnkit metadata is not a JSON object")
    return meta


# --------------------------------------------------------------------------------------------------
# nested state dicts <-> (tensors, JSON)


def _encode(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """Move the tensors of a nested state into ``tensors`` (keyed by path) and return the JSON rest."""
    if isinstance(value, Tensor):
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, tuple):  # tuples (Adam's betas) must come back as tuples for exact round trips
        return {"__tuple__": [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = {_key(k, name): _encode(v, f"{name}/{k}", tensors) for k, v in value.items()}
        if value and all(isinstance(k, int) for k in value):  # optimiser state is keyed by int
            return {"__intkeys__": items}
        return items
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"cannot store {name}: a {type(value).__name__} is neither a tensor nor JSON data")


def _key(k: Any, name: str) -> str:
    if isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool)):
        return str(k)
    raise CheckpointError(f"cannot store {name}: dict key {k!r} is not a str or int")


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        try:
            return tensors[value["__tensor__"]]
        except KeyError:
            raise CheckpointError(
                f"checkpoint is corrupted: tensor {value['__tensor__']!r} is missing"
            ) from None
    if set(value) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if set(value) == {"__intkeys__"}:
        return {int(k): _decode(v, tensors) for k, v in value["__intkeys__"].items()}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _pack_rng(tensors: dict[str, Tensor]) -> dict[str, Any]:
    tensors["rng/torch"] = torch.get_rng_state()
    # only when CUDA is in use: querying it would otherwise create a context on every GPU
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(state: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng/cuda/{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng/cuda/{i}"], device=i)
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def pack_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten model, optimiser, ``extra`` states (e.g. EMA) and RNG states into ``(tensors, meta)``."""
    out_meta = dict(meta or {})
    clash = [k for k in RESERVED if k in out_meta]
    if clash:
        raise CheckpointError(f"meta keys {clash} are reserved by rnnkit checkpoints; rename them")
    tensors: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"model state {name!r} is a {type(value).__name__}; only tensors can be stored"
            )
        tensors[f"model/{name}"] = value
    if optimizer is not None:
        out_meta["_optimizer"] = _encode(optimizer.state_dict(), "optim", tensors)
    if extra:
        out_meta["_extra"] = _encode(dict(extra), "extra", tensors)
    if rng:
        out_meta["_rng"] = _pack_rng(tensors)
    return tensors, out_meta


def restore_training_state(
    source: str | Path | tuple[Mapping[str, Tensor], Mapping[str, Any]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
    rng: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a ``pack_training_state`` checkpoint into model/optimiser/RNGs; return ``(meta, extra)``."""
    tensors, meta = load_checkpoint(source) if isinstance(source, str | Path) else source
    name = str(source) if isinstance(source, str | Path) else "checkpoint"
    load_into(model, tensors, strict=strict, name=name)
    if optimizer is not None:
        if "_optimizer" not in meta:
            raise CheckpointError(
                f"{name} holds no optimizer state; pass optimizer=None to restore the model only",
                brief=f"{name} holds no optimizer state",
            )
        try:
            state = _decode(meta["_optimizer"], tensors)
            # torch loads another optimizer's state without a word and fails at its first step
            # (settings the saving optimizer had and this one does not know: keys torch adds in later
            # versions go the other way, and torch fills those in itself)
            groups = state.get("param_groups", []) if isinstance(state, dict) else []
            known = set(optimizer.defaults) | {"params", "initial_lr", "lr_scale"}
            foreign = sorted({k for g in groups if isinstance(g, dict) for k in g} - known)
            if foreign:
                raise ValueError(f"its parameter groups hold {', '.join(foreign)}: it was saved by another "
                                 f"optimizer than {type(optimizer).__name__}")
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
            brief = f"{name}: the optimizer state does not fit this optimizer ({e})"
            raise CheckpointError(f"{brief}; build the optimizer the run used, with the same parameter groups, "
                                  "or pass optimizer=None", brief=brief) from e
    try:
        if rng:
            _restore_rng(meta.get("_rng", {}), tensors)
        extra = _decode(meta.get("_extra", {}), tensors)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{name}: its random-number or extra state is damaged ({type(e).__name__}: {e}); "
                              "resume from another checkpoint of the run, or start a new run") from e
    return {k: v for k, v in meta.items() if k not in RESERVED}, extra


# --------------------------------------------------------------------------------------------------
# loading weights into a model


@dataclasses.dataclass
class LoadReport:
    """What ``load_into`` did: model names loaded/missing, checkpoint names unexpected/excluded."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[
        tuple[str, tuple[int, ...], tuple[int, ...]]
    ]  # (model name, model shape, checkpoint shape)
    excluded: list[str]


def load_into(
    model: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    *,
    include: str | Iterable[str] | None = None,
    rename: Mapping[str, str] | Callable[[str], str | None] | None = None,
    strict: bool = True,
    prefix: str | None = None,
    name: str | None = None,
) -> LoadReport:
    """Copy checkpoint tensors into ``model``'s parameters and buffers; return what was (not) loaded.

    ``include``: names or glob patterns of checkpoint names to load (default all). ``rename`` maps a
    checkpoint name to a model name, as a dict (unlisted names are kept) or a function (None drops
    the tensor). ``strict``: raise CheckpointError listing every missing, unexpected and mismatched
    tensor, with nothing loaded; with ``include`` model tensors left untouched are not errors.
    Otherwise load what fits and report the rest. Names are read under ``prefix``; by default
    "model/" when the checkpoint has such names (a ``pack_training_state`` checkpoint), else ""
    (a plain state_dict file). ``name`` is how error messages call the source.
    """
    if isinstance(source, str | Path):
        name = name or str(source)
        source = load_checkpoint(source)[0]
    name = name or "checkpoint"
    if prefix is None:
        prefix = "model/" if any(k.startswith("model/") for k in source) else ""
    available = {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}
    selected, excluded = dict(available), []
    if include is not None:
        patterns = [include] if isinstance(include, str) else list(include)
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in available)]
        if unmatched:
            raise CheckpointError(
                f"include patterns {unmatched} match no tensor in {name}; its names are: "
                f"{', '.join(sorted(available)) or '(none under prefix ' + repr(prefix) + ')'}"
            )
        selected = {k: v for k, v in available.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        excluded = sorted(set(available) - set(selected))
    if isinstance(rename, Mapping):
        unknown = sorted(set(rename) - set(available))
        if unknown:
            raise CheckpointError(f"rename refers to {unknown}, which {name} does not contain")
    targets: dict[str, tuple[str, Tensor]] = {}
    for ck_name, t in selected.items():
        new = _renamed(ck_name, rename)
        if new is None:
            excluded.append(ck_name)
            continue
        if new in targets:
            raise CheckpointError(f"rename maps both {targets[new][0]!r} and {ck_name!r} to {new!r}")
        targets[new] = (ck_name, t)

    state = model.state_dict()
    to_load, unexpected, mismatched = {}, [], []
    for model_name, (ck_name, t) in targets.items():
        if model_name not in state:
            unexpected.append(ck_name)
        elif tuple(state[model_name].shape) != tuple(t.shape):
            mismatched.append((model_name, tuple(state[model_name].shape), tuple(t.shape)))
        else:
            to_load[model_name] = t
    wrong_shape = {m[0] for m in mismatched}
    missing = [k for k in state if k not in to_load and k not in wrong_shape]
    report = LoadReport(sorted(to_load), missing, sorted(unexpected), mismatched, sorted(excluded))
    if include is not None:
        missing = []  # a partial restore leaves the rest of the model alone on purpose
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message(name, missing, report), brief=_mismatch_brief(name, missing, report))
    try:
        model.load_state_dict(to_load, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"cannot load {name} into the model: {e}") from e
    return report


def _renamed(name: str, rename: Mapping[str, str] | Callable[[str], str | None] | None) -> str | None:
    if rename is None:
        return name
    if isinstance(rename, Mapping):
        return rename.get(name, name)
    return rename(name)


def _mismatch_brief(name: str, missing: list[str], report: LoadReport) -> str:
    """The first way ``name`` does not match the model, in one line."""
    if report.mismatched:
        key, want, got = min(report.mismatched)
        what = f"{key}: model has {list(want)}, checkpoint has {list(got)}"
    elif missing:
        what = f"{missing[0]} is missing from the checkpoint"
    else:
        what = f"{report.unexpected[0]} is in the checkpoint but not in the model"
    others = len(report.mismatched) + len(missing) + len(report.unexpected) - 1
    return f"{name} does not match the model ({what}{f', and {others} more' if others else ''})"


def _mismatch_message(name: str, missing: list[str], report: LoadReport) -> str:
    lines = [f"{name} does not match the model:"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(missing)}")
    if report.unexpected:
        unexpected = ", ".join(report.unexpected)
        lines.append(f"  in the checkpoint but not in the model ({len(report.unexpected)}): {unexpected}")
    if report.mismatched:
        lines.append(f"  shape mismatches ({len(report.mismatched)}):")
        for key, want, got in report.mismatched:
            lines.append(f"    {key}: model has {list(want)}, checkpoint has {list(got)}")
    lines.append(
        "Build the model with the configuration the checkpoint was saved with, or load part of it with "
        "include=[...] / rename={...}, or pass strict=False to load only what matches."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# checkpoint directories


def _numbered(directory: Path, prefix: str) -> dict[int, Path]:
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+){re.escape(SUFFIX)}")
    if not directory.is_dir():
        return {}
    found = {}
    for p in directory.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def latest_checkpoint(directory: str | Path, prefix: str = "ckpt") -> Path | None:
    """The ``{prefix}-{step}.safetensors`` file with the highest step (not the newest mtime), or None."""
    found = _numbered(Path(directory), prefix)
    return found[max(found)] if found else None


class CheckpointManager:
    """Save ``ckpt-{step:06d}.safetensors`` files; keep the last ``keep_last`` and the best by a metric.

    ``mode="max"`` keeps the highest metric (accuracy), ``"min"`` the lowest (loss). The metric is
    stored in each file's meta (key ``_metric``), so a new manager on an old directory still knows
    which one is best. Temporary files left by a killed writer are removed on start.
    """

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 3,
        keep_best: bool = True,
        mode: str = "max",
        prefix: str = "ckpt",
    ) -> None:
        if keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 so the latest checkpoint survives, got {keep_last}")
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
        self.directory = Path(directory)
        self.keep_last, self.keep_best, self.mode, self.prefix = keep_last, keep_best, mode, prefix
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f".{prefix}-*{SUFFIX}.*.tmp"):
            stale.unlink(missing_ok=True)
        self.metrics: dict[int, float | None] = {}
        for step, path in _numbered(self.directory, prefix).items():
            try:
                self.metrics[step] = read_meta(path).get("_metric")
            except CheckpointError:
                self.metrics[step] = None

    def path_for(self, step: int) -> Path:
        """The file name used for ``step``."""
        return self.directory / f"{self.prefix}-{step:06d}{SUFFIX}"

    def save(
        self,
        step: int,
        tensors: Mapping[str, Tensor],
        meta: Mapping[str, Any] | None = None,
        *,
        metric: float | None = None,
    ) -> Path:
        """Write the checkpoint for ``step`` (with its ``metric``, if any), then delete those not kept."""
        meta = dict(meta or {})
        if metric is not None:
            meta["_metric"] = float(metric)
        path = save_checkpoint(self.path_for(step), tensors, meta)
        self.metrics[step] = None if metric is None else float(metric)
        self._prune()
        return path

    @property
    def latest(self) -> Path | None:
        """Path of the checkpoint with the highest step, or None."""
        return latest_checkpoint(self.directory, self.prefix)

    @property
    def best(self) -> Path | None:
        """Path of the checkpoint with the best metric, or None if none has one."""
        step = self._best_step()
        return None if step is None else self.path_for(step)

    def _best_step(self) -> int | None:
        scored = {s: m for s, m in self.metrics.items() if m is not None and not math.isnan(m)}
        if not scored:
            return None
        sign = 1 if self.mode == "max" else -1
        return max(scored, key=lambda s: (sign * scored[s], s))

    def _prune(self) -> None:
        on_disk = _numbered(self.directory, self.prefix)
        self.metrics = {s: self.metrics.get(s) for s in on_disk}  # files may have been removed by hand
        keep = set(sorted(on_disk)[-self.keep_last :])
        best = self._best_step() if self.keep_best else None
        if best is not None:
            keep.add(best)
        for step, path in on_disk.items():
            if step not in keep:
                path.unlink(missing_ok=True)
                self.metrics.pop(step, None)
