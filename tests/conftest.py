"""Shared fixtures: float64 tiny problems, a CLI runner, sample paths."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GMCURV_NO_CONFIG", "1")  # tests never read a developer's gmcurv.toml
torch.set_num_threads(1)


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
