"""`keep_freed_memory(large=True)` (no mmapped blocks, for repeated products) and the
CLI's choice of it (`cli.session.runs_products`)."""

import os
import subprocess
import sys

import pytest

from cli.session import runs_products
from gmcurv.memory import _glibc


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_large_setting_applies_in_a_fresh_process():
    """``large=True`` is applied (mallopt accepted every parameter) and the process still
    computes; the setting only moves where malloc takes memory from."""
    code = (
        "import torch\n"
        "from gmcurv.memory import keep_freed_memory\n"
        "ok = keep_freed_memory(large=True)\n"
        "x = torch.ones(1 << 24); del x\n"
        "print(ok, float(torch.ones(1 << 24).sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(float(1 << 24))]


def test_products_only_for_non_fisher_curvature():
    from enum import Enum

    class C(Enum):
        fisher = "fisher"
        hessian = "hessian"

    assert not runs_products({})  # no --curvature (e.g. saliency)
    assert not runs_products({"curvature": C.fisher})
    assert runs_products({"curvature": C.hessian})
    assert runs_products({"curvature": "ggn"})
