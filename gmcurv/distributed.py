"""Data-parallel curvature on PyTorch's own distributed engine (``torchrun``).

Every rank takes a contiguous shard of the examples (`DataSample.shard`), captures and
computes on it, and partial results are combined so that K ranks give the same answer as
one process on the same data:

- sums over examples (Fisher diagonals, Hessian/GGN-vector products, losses) are
  all-reduced;
- per-example quantities (squared gradient norms, losses) and decomposed factors (for the
  ``N x N`` Gram kernel and Woodbury inverses) are all-gathered in rank order, which is
  example order;
- random probes and Monte Carlo labels are seeded identically on every rank (per example,
  see `gmcurv.rng`), so stochastic estimators agree too.

Backend: gloo on CPU, nccl on GPU (``--device cuda`` maps ranks to ``cuda:LOCAL_RANK``).
Outside ``torchrun`` (no ``WORLD_SIZE``) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from gmcurv.errors import ConfigError, GmcurvError

T = TypeVar("T")


class DistributedError(GmcurvError):
    """Another rank failed; this rank stops too (with that rank's message)."""


@dataclass(frozen=True)
class Comm:
    """This process's place in the job: rank, world size, the device collectives use."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks (a new tensor; the input is untouched)."""
        if not self.active:
            return t
        buf = t.detach().to(self.device).clone()
        dist.all_reduce(buf)
        return buf.to(t.device)

    def sum(self, x: float) -> float:
        return float(self.all_reduce(torch.tensor(x, dtype=torch.float64)))

    def all_gather_rows(self, t: Tensor) -> Tensor:
        """Concatenate each rank's ``[n_r, ...]`` tensor along dim 0, in rank order."""
        if not self.active:
            return t
        size = torch.tensor([t.shape[0]], device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        longest = max(counts)
        buf = t.detach().to(self.device).contiguous()
        if buf.shape[0] < longest:
            pad = buf.new_zeros((longest - buf.shape[0], *buf.shape[1:]))
            buf = torch.cat([buf, pad])
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf)
        return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)]).to(t.device)

    def all_gather_object(self, obj: object) -> list[object]:
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


_current = Comm()


def current() -> Comm:
    """The communicator of this process (a single-process one outside torchrun)."""
    return _current


@contextlib.contextmanager
def using(comm: Comm) -> Iterator[Comm]:
    """Temporarily make `comm` current (tests, embedding gmcurv in one's own job)."""
    global _current
    previous, _current = _current, comm
    try:
        yield comm
    finally:
        _current = previous


def launched() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device, timeout_s: float | None = None) -> Comm:
    """Join the torchrun job described by the environment; returns the communicator."""
    global _current
    if not launched():
        return _current
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise ConfigError(
                f"rank {rank} has LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs",
                hint="use --nproc-per-node no larger than the number of GPUs, or --device cpu",
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s or float(os.environ.get("GMCURV_DIST_TIMEOUT", 600)))
        dist.init_process_group(backend=backend, timeout=timeout)
    _current = Comm(rank, world, device if backend == "nccl" else torch.device("cpu"))
    return _current


def shutdown(linger_s: float = 30.0) -> None:
    """Leave the process group (end of a command), together.

    Ranks first meet at a barrier (gloo's monitored barrier, bounded by `linger_s`), so no
    rank tears its connections down while another is still finishing its last collective:
    without it, under load, gloo can abort the slower rank at exit ("terminate called
    without an active exception"). A rank that already failed makes the barrier time out
    quickly instead of hanging.
    """
    global _current
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=linger_s))
            else:
                dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _current = Comm()


def agreed(fn: Callable[[], T], comm: Comm | None = None) -> T:
    """Run `fn` on every rank; if it raised a gmcurv error on any rank, raise on all.

    Used around input loading and validation so that a bad shard seen by one rank stops
    the whole job with that rank's message instead of leaving the others waiting.
    """
    comm = comm or current()
    error: GmcurvError | None = None
    result = None
    try:
        result = fn()
    except GmcurvError as e:
        if not comm.active:
            raise
        error = e
    if not comm.active:
        return result  # type: ignore[return-value]
    reports = comm.all_gather_object(
        None if error is None else (comm.rank, error.message, error.hint)
    )
    failed = [r for r in reports if r is not None]
    if error is not None:
        raise error
    if failed:
        rank, message, hint = failed[0]  # type: ignore[misc]
        raise DistributedError(f"rank {rank} failed: {message}", hint)
    return result  # type: ignore[return-value]


def gather_source(source, comm: Comm):
    """A gradient source with every per-example tensor gathered across ranks."""
    changes = {}
    for f in dataclasses.fields(source):
        value = getattr(source, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = comm.all_gather_rows(value)
        elif isinstance(value, tuple) and value and hasattr(value[0], "materialize"):
            changes[f.name] = tuple(gather_source(part, comm) for part in value)
    return dataclasses.replace(source, **changes)


def gather_decomposed(dg, comm: Comm | None = None):
    """All ranks' decomposed gradients, concatenated in example order."""
    comm = comm or current()
    if not comm.active:
        return dg
    blocks = tuple(dataclasses.replace(b, source=gather_source(b.source, comm)) for b in dg.blocks)
    return dataclasses.replace(dg, blocks=blocks, losses=comm.all_gather_rows(dg.losses))
