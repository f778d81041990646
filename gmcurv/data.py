"""Data samples: formats, validation and batching.

DATA is a file or a directory of shards, read in natural name order (deterministic):

- ``.safetensors`` / ``.npz`` holding ``inputs`` and ``targets`` (aliases ``x``/``y`` and
  ``input_ids``/``pixel_values``/``labels``); any further keys (e.g. ``attention_mask``)
  make the inputs a dict passed to the model as keyword arguments, Hugging Face style;
- ``.npy`` pairs in a directory (``inputs.npy`` + ``targets.npy`` or ``x.npy`` + ``y.npy``);
- ``.csv``: numeric columns, the last one the target, an optional header row.

Pickle files are refused (loading one can run arbitrary code). Shards are loaded one at a
time and served in batches, so memory holds one shard plus one batch.
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from gmcurv.errors import DataError
from gmcurv.models.mlp import natural_key

INPUT_KEYS = ("inputs", "x", "input_ids", "pixel_values")
TARGET_KEYS = ("targets", "y", "labels")
DATA_SUFFIXES = (".safetensors", ".npz", ".csv")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib")

Inputs = Tensor | dict[str, Tensor]


@dataclass(frozen=True)
class Batch:
    """A slice of the data: model inputs, targets (or None) and the first example's index."""

    inputs: Inputs
    targets: Tensor | None
    start: int

    def __len__(self) -> int:
        return batch_size_of(self.inputs)


def batch_size_of(inputs: Inputs) -> int:
    """Leading dimension of a tensor or of the first tensor in a dict."""
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def slice_inputs(inputs: Inputs, sl: slice) -> Inputs:
    """Rows `sl` of a tensor or of every tensor in a dict."""
    if isinstance(inputs, dict):
        return {k: v[sl] for k, v in inputs.items()}
    return inputs[sl]


def concat_batches(batches: list[Batch]) -> Batch:
    """Consecutive batches as one (rows in order; starts at the first batch's start)."""

    def cat(parts: list) -> Tensor:
        return torch.cat(parts)

    first = batches[0].inputs
    if isinstance(first, dict):
        inputs: Inputs = {k: cat([b.inputs[k] for b in batches]) for k in first}  # type: ignore[index]
    else:
        inputs = cat([b.inputs for b in batches])
    targets = None if batches[0].targets is None else cat([b.targets for b in batches])
    return Batch(inputs, targets, batches[0].start)


def move_inputs(inputs: Inputs, device: torch.device | str, float_dtype: torch.dtype) -> Inputs:
    """Move to device; floating tensors take the compute dtype, integer ones stay integer."""

    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=float_dtype if t.is_floating_point() else t.dtype)

    if isinstance(inputs, dict):
        return {k: move(v) for k, v in inputs.items()}
    return move(inputs)


# ------------------------------------------------------------------------------------ shards
@dataclass(frozen=True)
class Shard:
    """One file (or one .npy pair) of a data sample."""

    path: Path
    fmt: str  # 'safetensors' | 'npz' | 'npy' | 'csv'
    n: int


def _pick(keys: list[str], aliases: tuple[str, ...], what: str, source: Path) -> str | None:
    found = [k for k in aliases if k in keys]
    if len(found) > 1:
        raise DataError(
            f"{source}: several {what} keys {found}; expected exactly one",
            hint=f"keep one of {aliases} for the {what}",
        )
    return found[0] if found else None


def _check_array(name: str, arr: np.ndarray, source: Path) -> Tensor:
    if arr.dtype.kind not in "biuf":
        raise DataError(
            f"{source}: array {name!r} has dtype {arr.dtype}; only numeric data is supported",
            hint="store numbers (float or integer arrays), not strings or objects",
        )
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_npz(path: Path) -> dict[str, Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: _check_array(k, z[k], path) for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(
                f"{path}: contains pickled objects, which are refused",
                hint="save plain numeric arrays with np.savez(inputs=..., targets=...)",
            ) from None
        raise DataError(
            f"{path}: cannot read .npz file: {e}",
            hint="re-create it with np.savez(path, inputs=x, targets=y)",
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{path}: cannot read .npz file (corrupt or truncated): {e}",
            hint="re-create it with np.savez(path, inputs=x, targets=y)",
        ) from None


def _read_npy(path: Path) -> Tensor:
    try:
        return _check_array(path.stem, np.load(path, allow_pickle=False), path)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(
                f"{path}: contains pickled objects, which are refused",
                hint="save a plain numeric array with np.save",
            ) from None
        raise DataError(
            f"{path}: cannot read .npy file: {e}", hint="re-create it with np.save"
        ) from None
    except (OSError, EOFError) as e:
        raise DataError(
            f"{path}: cannot read .npy file (corrupt or truncated): {e}",
            hint="re-create it with np.save",
        ) from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:
        raise DataError(
            f"{path}: cannot read safetensors data (corrupt or truncated): {e}",
            hint="re-create the file with safetensors.torch.save_file({'inputs': x, 'targets': y})",
        ) from None


def _read_csv(path: Path) -> dict[str, Tensor]:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path}: cannot read CSV file: {e}", hint="save the data as UTF-8 text with commas"
        ) from None
    if rows:
        try:
            [float(c) for c in rows[0]]
        except ValueError:
            rows = rows[1:]  # header row
    if not rows:
        raise DataError(f"{path}: CSV file has no data rows", hint="add rows: features..., target")
    width = len(rows[0])
    if width < 2:
        raise DataError(
            f"{path}: CSV needs at least two columns (features..., target)",
            hint="write plain numbers: one row per example, features..., then the target",
        )
    try:
        values = np.array([[float(c) for c in r] for r in rows if len(r) == width])
    except ValueError as e:
        raise DataError(
            f"{path}: CSV holds a non-numeric value ({e})",
            hint="write plain numbers: one row per example, features..., then the target",
        ) from None
    if len(values) != len(rows):
        raise DataError(
            f"{path}: CSV rows have different numbers of columns",
            hint="write plain numbers: one row per example, features..., then the target",
        )
    x, y = values[:, :-1], values[:, -1]
    yt = torch.from_numpy(y.astype(np.int64)) if np.all(y == np.round(y)) else torch.from_numpy(y)
    # float64 as parsed: batches take the compute dtype, so --dtype float64 loses nothing
    return {"inputs": torch.from_numpy(np.ascontiguousarray(x)), "targets": yt}


def _read_shard(shard: Shard) -> dict[str, Tensor]:
    if shard.fmt == "safetensors":
        return _read_safetensors(shard.path)
    if shard.fmt == "npz":
        return _read_npz(shard.path)
    if shard.fmt == "csv":
        return _read_csv(shard.path)
    x_name, y_name = _npy_pair_names(shard.path)
    out = {"inputs": _read_npy(shard.path / x_name)}
    if y_name:
        out["targets"] = _read_npy(shard.path / y_name)
    return out


def _npy_pair_names(folder: Path) -> tuple[str, str | None]:
    for x_name, y_name in (("inputs.npy", "targets.npy"), ("x.npy", "y.npy")):
        if (folder / x_name).is_file():
            return x_name, (y_name if (folder / y_name).is_file() else None)
    raise DataError(f"{folder}: no inputs.npy/x.npy file")


def _split(tensors: dict[str, Tensor], source: Path) -> tuple[Inputs, Tensor | None]:
    """Inputs (tensor, or dict when extra keys are present) and targets of a shard."""
    keys = list(tensors)
    x_key = _pick(keys, INPUT_KEYS, "input", source)
    y_key = _pick(keys, TARGET_KEYS, "target", source)
    if x_key is None:
        raise DataError(
            f"{source}: no inputs found (keys: {keys})",
            hint=f"store the inputs under one of {INPUT_KEYS}",
        )
    rest = [k for k in keys if k not in (x_key, y_key)]
    inputs: Inputs = tensors[x_key] if not rest else {k: tensors[k] for k in [x_key, *rest]}
    return inputs, (tensors[y_key] if y_key else None)


def _shard_length(shard_path: Path, fmt: str) -> int:
    """Number of examples, from headers where the format allows."""
    if fmt == "safetensors":
        try:
            with safe_open(str(shard_path), framework="pt") as f:
                keys = list(f.keys())
                key = _pick(keys, INPUT_KEYS, "input", shard_path)
                if key is None:
                    raise DataError(
                        f"{shard_path}: no inputs found (keys: {keys})",
                        hint=f"store the inputs under one of {INPUT_KEYS}",
                    )
                shape = f.get_slice(key).get_shape()
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"{shard_path}: cannot read safetensors data (corrupt or truncated): {e}",
                hint="re-create the file with safetensors.torch.save_file(...)",
            ) from None
        return int(shape[0]) if shape else 0
    inputs, _ = _split(_read_shard(Shard(shard_path, fmt, 0)), shard_path)
    return batch_size_of(inputs)


def _discover(path: Path) -> list[tuple[Path, str]]:
    """(path, format) of every shard under DATA, in natural order."""

    def fmt_of(p: Path) -> str | None:
        suffix = p.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise DataError(
                f"{p}: pickle files are refused (loading one can run arbitrary code)",
                hint="convert the data to .safetensors, .npz, .npy or .csv",
            )
        return {".safetensors": "safetensors", ".npz": "npz", ".csv": "csv"}.get(suffix)

    if path.is_file():
        fmt = fmt_of(path)
        if fmt is None:
            raise DataError(
                f"{path}: unsupported data format {path.suffix!r}",
                hint="use .safetensors, .npz or .csv files, or a directory of .npy pairs",
            )
        return [(path, fmt)]
    files = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    if any(p.name in ("inputs.npy", "x.npy") for p in files):
        return [(path, "npy")]
    shards = [(p, f) for p in files if (f := fmt_of(p)) is not None]
    if not shards:
        raise DataError(
            f"{path}: directory holds no data files",
            hint="add .safetensors/.npz/.csv shards or an inputs.npy + targets.npy pair",
        )
    return shards


# -------------------------------------------------------------------------------- the sample
@dataclass
class DataSample:
    """A data sample across shards, served in deterministic batches.

    `limit` keeps the first examples (``--samples``); `window` restricts to examples
    ``[start, stop)`` of those (a distributed rank's share). Batches carry the global index
    of their first example.
    """

    path: Path
    shards: list[Shard]
    limit: int | None = None
    window: tuple[int, int] | None = None
    _cache: dict[Path, tuple[Inputs, Tensor | None]] = field(default_factory=dict, repr=False)

    @property
    def n_total(self) -> int:
        """Examples in the (limited) sample before any sharding."""
        total = sum(s.n for s in self.shards)
        return total if self.limit is None else min(total, self.limit)

    @property
    def span(self) -> tuple[int, int]:
        """Global indices ``[start, stop)`` this sample serves."""
        return self.window if self.window is not None else (0, self.n_total)

    @property
    def n(self) -> int:
        start, stop = self.span
        return stop - start

    def take(self, n: int | None) -> DataSample:
        """The first `n` examples (all when None)."""
        if n is not None and n <= 0:
            raise DataError(f"--samples must be positive, got {n}")
        return replace(self, limit=n, window=None, _cache={})

    def shard(self, rank: int, world: int) -> DataSample:
        """Rank `rank`'s contiguous share of ``world`` (sizes differ by at most one)."""
        total = self.n_total
        start, stop = rank * total // world, (rank + 1) * total // world
        return replace(self, window=(start, stop), _cache={})

    def _load(self, shard: Shard) -> tuple[Inputs, Tensor | None]:
        if shard.path not in self._cache:
            self._cache.clear()  # hold one shard at a time
            inputs, targets = _split(_read_shard(shard), shard.path)
            self._cache[shard.path] = (inputs, targets)
        return self._cache[shard.path]

    def shard_arrays(self) -> Iterator[tuple[Shard, Inputs, Tensor | None]]:
        """The full arrays of each file overlapping the span (used by validation)."""
        start, stop = self.span
        lo = 0
        for shard in self.shards:
            hi = lo + shard.n
            if lo < stop and hi > start:
                yield (shard, *self._load(shard))
            lo = hi

    def batches(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        float_dtype: torch.dtype = torch.float32,
    ) -> Iterator[Batch]:
        """Batches of at most `batch_size` examples, in shard order, within the span."""
        if batch_size <= 0:
            raise DataError(f"--batch-size must be positive, got {batch_size}")
        start, stop = self.span
        first = start  # global index of the pending batch's first example
        pending: list[tuple[Inputs, Tensor | None]] = []
        pending_n = 0
        lo = 0
        for shard in self.shards:
            hi = lo + shard.n
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            lo = hi
            if b <= a:
                if lo >= stop:
                    break
                continue
            inputs, targets = self._load(shard)
            pos = a
            while pos < b:
                step = min(batch_size - pending_n, b - pos)
                sl = slice(pos, pos + step)
                pending.append((slice_inputs(inputs, sl), None if targets is None else targets[sl]))
                pending_n += step
                pos += step
                if pending_n == batch_size:
                    yield self._emit(pending, first, device, float_dtype)
                    first += pending_n
                    pending, pending_n = [], 0
        if pending:
            yield self._emit(pending, first, device, float_dtype)

    @staticmethod
    def _emit(parts, start, device, float_dtype) -> Batch:
        xs = [p[0] for p in parts]
        if isinstance(xs[0], dict):
            inputs: Inputs = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
        else:
            inputs = torch.cat(xs)
        ys = [p[1] for p in parts]
        targets = None if ys[0] is None else torch.cat(ys).to(device)
        return Batch(move_inputs(inputs, device, float_dtype), targets, start)

    def first(
        self,
        k: int = 2,
        device: torch.device | str = "cpu",
        float_dtype: torch.dtype = torch.float32,
    ) -> Batch:
        """The first `k` examples (for shape probing)."""
        return next(self.batches(min(k, self.n), device, float_dtype))

    def validate(self) -> None:
        """Check shards agree on keys, shapes and dtypes and hold only finite numbers."""
        ref: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        for shard, inputs, targets in self.shard_arrays():
            arrays = dict(inputs) if isinstance(inputs, dict) else {"inputs": inputs}
            if targets is not None:
                arrays["targets"] = targets
            n = batch_size_of(inputs)
            sig = {}
            for name, arr in arrays.items():
                if arr.ndim == 0 or arr.shape[0] != n:
                    raise DataError(
                        f"{shard.path}: {name!r} has {arr.shape[0] if arr.ndim else 0} rows but "
                        f"the inputs have {n}",
                        hint="every array in a shard needs one row per example",
                    )
                if arr.is_complex():
                    raise DataError(f"{shard.path}: {name!r} is complex; only real data works")
                if arr.is_floating_point() and not torch.isfinite(arr).all():
                    bad = (~torch.isfinite(arr)).reshape(n, -1).any(1).nonzero()[0, 0]
                    count = int((~torch.isfinite(arr)).reshape(n, -1).any(1).sum())
                    raise DataError(
                        f"{shard.path}: {name!r} contains NaN or Inf in {count} example(s), "
                        f"first at example {int(bad)}",
                        hint="clean or drop those examples before analysing curvature",
                    )
                sig[name] = (tuple(arr.shape[1:]), arr.dtype)
            if ref is None:
                ref = sig
            elif sig.keys() != ref.keys() or any(
                sig[k][0] != ref[k][0] or sig[k][1].is_floating_point != ref[k][1].is_floating_point
                for k in sig
            ):
                got = {k: v[0] for k, v in sig.items()}
                want = {k: v[0] for k, v in ref.items()}
                raise DataError(
                    f"{shard.path}: shard does not match the first shard ({got} vs {want})",
                    hint="all shards need the same keys, trailing shapes and dtypes",
                )


def load_data(path: str | Path, samples: int | None = None) -> DataSample:
    """Open DATA (file or directory of shards) and read shard lengths; no tensor data yet."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory", hint="pass a data file or directory")
    shards = [Shard(sp, fmt, _shard_length(sp, fmt)) for sp, fmt in _discover(p)]
    sample = DataSample(p, [s for s in shards if s.n > 0])
    if sample.n == 0:
        raise DataError(f"{p}: the data sample is empty (0 examples)", hint="add examples")
    return sample.take(samples) if samples is not None else sample


def n_batches(n: int, batch_size: int) -> int:
    """How many batches `DataSample.batches` yields."""
    return math.ceil(n / batch_size)
