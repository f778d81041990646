"""Data samples: formats, shards, batching, validation and refusals."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers import write_data
from safetensors.torch import save_file

from gmcurv.errors import DataError
from gmcurv.io.data import load_data


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "csv", "npy"])
@pytest.mark.parametrize("shards", [1, 3])
def test_formats_and_shards_give_the_same_batches(tmp_path, fmt, shards):
    if fmt == "npy" and shards == 3:
        pytest.skip("an .npy pair is one shard")
    ref = load_data(write_data(tmp_path / "ref.safetensors", n=23))
    path = tmp_path / ("d" if shards > 1 or fmt == "npy" else f"d.{fmt}")
    data = load_data(write_data(path, n=23, shards=shards, fmt=fmt))
    assert data.n == 23
    got = list(data.batches(5))
    want = list(ref.batches(5))
    assert [len(b) for b in got] == [5, 5, 5, 5, 3]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.inputs, b.inputs, rtol=1e-6, atol=1e-6)
        assert torch.equal(a.targets.long(), b.targets)
    data.validate()


def test_samples_limit_and_first(tmp_path):
    data = load_data(write_data(tmp_path / "d", n=30, shards=3), samples=12)
    assert data.n == 12
    assert sum(len(b) for b in data.batches(5)) == 12
    assert len(data.first(2)) == 2


def test_dict_inputs_when_extra_keys(tmp_path):
    p = tmp_path / "tok.safetensors"
    save_file(
        {
            "input_ids": torch.randint(0, 5, (4, 3)),
            "attention_mask": torch.ones(4, 3),
            "labels": torch.randint(0, 5, (4, 3)),
        },
        str(p),
    )
    batch = next(load_data(p).batches(4))
    assert isinstance(batch.inputs, dict) and set(batch.inputs) == {"input_ids", "attention_mask"}


def test_nan_is_reported_with_file_and_example(tmp_path):
    p = tmp_path / "bad.safetensors"
    x = torch.randn(5, 2)
    x[3, 1] = float("nan")
    save_file({"inputs": x, "targets": torch.zeros(5, dtype=torch.long)}, str(p))
    with pytest.raises(DataError, match=r"bad.safetensors.*NaN.*first at example 3"):
        load_data(p).validate()


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_data(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope")
    p = tmp_path / "zero.safetensors"
    save_file({"inputs": torch.zeros(0, 3), "targets": torch.zeros(0, dtype=torch.long)}, str(p))
    with pytest.raises(DataError, match="empty"):
        load_data(p)


def test_pickle_is_refused(tmp_path):
    p = tmp_path / "data.pkl"
    p.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(DataError, match="pickle"):
        load_data(p)
    q = tmp_path / "obj.npz"
    np.savez(q, x=np.array([{"a": 1}], dtype=object), y=np.array([1]))
    with pytest.raises(DataError, match="pickled"):
        load_data(q)


def test_truncated_safetensors_data(tmp_path):
    p = write_data(tmp_path / "d.safetensors", n=10)
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_data(p).validate()


def test_mismatched_shards(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    save_file(
        {"inputs": torch.randn(3, 4), "targets": torch.zeros(3, dtype=torch.long)},
        str(d / "a.safetensors"),
    )
    save_file(
        {"inputs": torch.randn(3, 5), "targets": torch.zeros(3, dtype=torch.long)},
        str(d / "b.safetensors"),
    )
    with pytest.raises(DataError, match="does not match the first shard"):
        load_data(d).validate()


def test_row_count_mismatch(tmp_path):
    p = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(3, 4), "targets": torch.zeros(2, dtype=torch.long)}, str(p))
    with pytest.raises(DataError, match="rows"):
        load_data(p).validate()


def test_shards_split_contiguously_and_keep_global_indices(tmp_path):
    data = load_data(write_data(tmp_path / "d", n=23, shards=3), samples=20)
    whole = torch.cat([b.inputs for b in data.batches(6)])
    parts, starts = [], []
    for rank in range(3):
        part = data.shard(rank, 3)
        assert part.n_total == 20
        batches = list(part.batches(4))
        starts.append(batches[0].start)
        parts.append(torch.cat([b.inputs for b in batches]))
        assert sum(len(b) for b in batches) == part.n
    assert [p.shape[0] for p in parts] == [6, 7, 7]
    assert starts == [0, 6, 13]
    torch.testing.assert_close(torch.cat(parts), whole)
