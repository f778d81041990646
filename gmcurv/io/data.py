"""Data on disk: formats, discovery and reading shards into tensors.

DATA is a file or a directory of shards, read in natural name order (deterministic):

- ``.safetensors`` / ``.npz`` holding ``inputs`` and ``targets`` (aliases ``x``/``y`` and
  ``input_ids``/``pixel_values``/``labels``); any further keys (e.g. ``attention_mask``)
  make the inputs a dict passed to the model as keyword arguments, Hugging Face style;
- ``.npy`` pairs in a directory (``inputs.npy`` + ``targets.npy`` or ``x.npy`` + ``y.npy``);
- ``.csv``: numeric columns, the last one the target, an optional header row.

Pickle files are refused (loading one can run arbitrary code). `load_data` reads only shard
lengths; the `DataSample` it returns loads one shard at a time (`read_shard`) when batched.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from gmcurv.batch import Inputs, batch_size_of
from gmcurv.data import DataSample, Shard
from gmcurv.errors import DataError
from gmcurv.models.mlp import natural_key

INPUT_KEYS = ("inputs", "x", "input_ids", "pixel_values")
TARGET_KEYS = ("targets", "y", "labels")
DATA_SUFFIXES = (".safetensors", ".npz", ".csv")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib")


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
            raise DataError(f"{path}: unsupported data format {path.suffix!r}", hint=_hint(path))
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


def read_shard(shard: Shard) -> tuple[Inputs, Tensor | None]:
    """A shard's inputs and targets (None when the file has none)."""
    return _split(_read_shard(shard), shard.path)


def load_data(path: str | Path, samples: int | None = None) -> DataSample:
    """Open DATA (file or directory of shards) and read shard lengths; no tensor data yet."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory", hint="pass a data file or directory")
    shards = [Shard(sp, fmt, _shard_length(sp, fmt)) for sp, fmt in _discover(p)]
    sample = DataSample(p, [s for s in shards if s.n > 0], read_shard)
    if sample.n == 0:
        raise DataError(f"{p}: the data sample is empty (0 examples)", hint="add examples")
    return sample.take(samples) if samples is not None else sample


TEXT_SUFFIXES = {".txt", ".json", ".jsonl", ".parquet", ".arrow", ".tsv", ".md"}


def _hint(path: Path) -> str:
    """How to turn an unsupported data file into one gmcurv reads."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:  # text: gmcurv never tokenizes (no guess of the tokenizer)
        return (
            "gmcurv reads token ids, not text: tokenize with the model's tokenizer and save "
            "the ids, e.g. save_file({'input_ids': ids, 'attention_mask': mask}, "
            "'data.safetensors') (safetensors.torch; equal-length rows, padding masked)"
        )
    if suffix == ".npy":
        return (
            "a lone .npy holds one array: put it in a directory as inputs.npy (+ targets.npy), "
            "or save {'input_ids': ...} to a .safetensors or .npz file"
        )
    return "use .safetensors, .npz or .csv files, or a directory of .npy pairs"
