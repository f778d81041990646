"""Loss and accuracy per grid point, summed over the data batches (all-reduced over ranks).

The loss is the mean of `gmcurv.losses` per-example losses over the data (the objective every
other command uses); the accuracy is reported for classification losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vmap

from gmcurv.batch import Batch
from gmcurv.distributed import current
from gmcurv.losses import CrossEntropy
from gmcurv.objective import Objective


def point_losses(objective: Objective, outs: Tensor, targets: Tensor) -> Tensor:
    """``Σ_n L_n`` per point from outputs ``[C, B, ...]``: one loss call on the flattened
    ``[C·B, ...]`` outputs (``L_n`` is per example, so this is exact).

    Classification with one prediction per example (logits ``[B, classes]``, labels ``[B]``,
    none ignored) takes ``L_n = logsumexp(f_n) - f_n[y_n]`` directly: the same number as
    `gmcurv.losses.CrossEntropy`, without materialising the log-softmax (5x cheaper)."""
    C, B = outs.shape[0], outs.shape[1]
    loss = objective.loss
    if (
        isinstance(loss, CrossEntropy)
        and not loss.shift
        and outs.ndim == 3
        and targets.ndim == 1
        and bool((targets >= 0).all())
    ):
        picked = outs.gather(2, targets.reshape(1, B, 1).expand(C, B, 1)).squeeze(2)
        return (torch.logsumexp(outs, dim=2) - picked).double().sum(1)
    flat_t = targets.unsqueeze(0).expand(C, *targets.shape).reshape(C * B, *targets.shape[1:])
    per = objective.loss.per_example(outs.reshape(C * B, *outs.shape[2:]), flat_t)
    return per.double().reshape(C, B).sum(1)


def per_point(fn: Callable[[Tensor], Tensor], outs: Tensor) -> Tensor:
    """``fn`` on each point's outputs ``outs[c]``: one vmapped call, else a loop."""
    try:
        return vmap(fn)(outs)
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([fn(o) for o in outs])


class PointTotals:
    """Running ``Σ_n L_n`` and number correct per point; examples are counted on the first
    pass over the data (every chunk sees the same batches)."""

    def __init__(self, objective: Objective, n_points: int, device: torch.device) -> None:
        self.objective = objective
        self.sums = torch.zeros(n_points, dtype=torch.float64, device=device)
        self.correct = torch.zeros(n_points, dtype=torch.float64, device=device)
        self.n_seen = 0
        self.scored = 0
        self.accuracy_ok = True

    def add(self, start: int, outs: Tensor, batch: Batch, first_pass: bool) -> None:
        """Outputs ``[C, B, ...]`` of points ``start .. start + C`` on `batch`."""
        loss = self.objective.loss
        targets = self.objective.targets(batch, outs[0])
        if first_pass:
            self.n_seen += len(batch)
            if self.accuracy_ok:
                counts = loss.accuracy_counts(outs[0], targets)
                self.accuracy_ok = counts is not None
                self.scored += counts[1] if counts is not None else 0
        end = start + outs.shape[0]
        self.sums[start:end] += point_losses(self.objective, outs, targets)
        if self.accuracy_ok:
            self.correct[start:end] += per_point(
                lambda o: loss.accuracy_counts(o, targets)[0].double(), outs
            )

    def means(self) -> tuple[Tensor, Tensor | None, int]:
        """(mean loss, accuracy or None, number of examples), summed over ranks first."""
        comm = current()
        sums, correct, n_total, scored = self.sums, self.correct, self.n_seen, self.scored
        if comm.active:
            sums = comm.all_reduce(sums)
            correct = comm.all_reduce(correct)
            counts = torch.tensor([float(n_total), float(scored)], device=sums.device)
            totals = comm.all_reduce(counts)
            n_total, scored = int(totals[0]), int(totals[1])
        mean = (sums / max(n_total, 1)).cpu()
        acc = (correct / scored).cpu() if self.accuracy_ok and scored > 0 else None
        return mean, acc, n_total
