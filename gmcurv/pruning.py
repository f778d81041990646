"""Pruning mechanics: which weights may go, masks with exact counts, evaluation.

Masks here are *removal* masks (True = pruned); pruned checkpoints (`gmcurv.io.pruned`)
store the complement (1 = kept, as in ``torch.nn.utils.prune``) in a sidecar, so the
fraction of zeros of a stored mask is the layer's sparsity.

Counting: pruning a fraction ``f`` removes exactly ``round(f * n_prunable)`` weights
(Python's ``round``). With ``scope='layer'`` every prunable tensor loses ``floor(f n_l)`` or
``ceil(f n_l)`` of its ``n_l`` weights, the extra ones going to the largest remainders, so the
total is still exact. Ties in saliency are broken by position (stable sort), so masks are
deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv import distributed
from gmcurv.capture import plan_capture
from gmcurv.data import DataSample
from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.objective import Objective

SCOPES = ("global", "layer")


# ------------------------------------------------------------------------------ what may go
def prunable_params(objective: Objective, include_bias: bool = False) -> list[str]:
    """Names of the parameters pruning may touch, in the objective's order.

    By default weights only: tensors with at least two dimensions outside normalisation
    layers (biases, norm scales and other vectors stay). `include_bias` allows every
    selected parameter.
    """
    if include_bias:
        return list(objective.params)
    norm = {
        p for plan in plan_capture(objective.model, objective.params) if plan.kind == "norm"
        for p in plan.params
    }  # fmt: skip
    return [k for k, v in objective.params.items() if v.ndim >= 2 and k not in norm]


def check_fraction(fraction: float) -> float:
    """A pruning fraction must lie in ``[0, 1)``."""
    if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0 <= fraction < 1):
        raise ConfigError(
            f"--prune {fraction} is not a fraction in [0, 1)",
            hint="give the share of prunable weights to remove, e.g. --prune 0.5",
        )
    return float(fraction)


def layer_quotas(sizes: Mapping[str, int], fraction: float) -> dict[str, int]:
    """Per-tensor removal counts summing to ``round(f Σ n_l)`` (largest remainders)."""
    total = round(fraction * sum(sizes.values()))
    exact = {k: fraction * n for k, n in sizes.items()}
    quota = {k: min(sizes[k], math.floor(v)) for k, v in exact.items()}
    order = sorted(sizes, key=lambda k: (-(exact[k] - quota[k]), list(sizes).index(k)))
    short = total - sum(quota.values())
    for k in order:
        if short <= 0:
            break
        if quota[k] < sizes[k]:
            quota[k] += 1
            short -= 1
    return quota


def target_counts(sizes: Mapping[str, int], fraction: float, scope: str) -> int | dict[str, int]:
    """How many weights pruning `fraction` removes: a total (global) or one count per tensor."""
    if scope == "global":
        return round(fraction * sum(sizes.values()))
    if scope == "layer":
        return layer_quotas(sizes, fraction)
    raise ConfigError(f"unknown --scope {scope!r}", hint=f"use one of {SCOPES}")


def round_target(
    final: int | Mapping[str, int],
    removed: Mapping[str, Tensor],
    step: int,
    steps: int,
) -> int | dict[str, int]:
    """The target after `step` of `steps` rounds: from what is already `removed` to `final`
    in equal integer steps (monotone; the last step is exactly `final`)."""
    if isinstance(final, int):
        start = count_removed(removed)
        return start + (final - start) * step // steps
    out = {}
    for k, t in final.items():
        start = int(removed[k].sum()) if k in removed else 0
        out[k] = start + (t - start) * step // steps
    return out


def select_masks(
    saliency: Mapping[str, Tensor],
    target: int | Mapping[str, int],
    removed: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Removal masks: the weights already `removed` plus the least salient others.

    `target` is the total number removed afterwards (global scope) or one count per tensor
    (layer scope). Raises `ConfigError` when more weights are already removed than asked.
    """
    removed = {k: removed[k].bool() for k in saliency if removed and k in removed}
    if isinstance(target, int):
        names = list(saliency)
        groups = [(names, target)]
    else:
        groups = [([k], int(target[k])) for k in saliency]
    out: dict[str, Tensor] = {}
    for names, count in groups:
        flat_sal = torch.cat([saliency[k].reshape(-1).double() for k in names])
        flat_old = torch.cat(
            [
                removed[k].reshape(-1)
                if k in removed
                else torch.zeros_like(saliency[k], dtype=torch.bool).reshape(-1)
                for k in names
            ]
        )
        have = int(flat_old.sum())
        if have > count:
            where = names[0] if len(names) == 1 else "the prunable weights"
            raise ConfigError(
                f"{have} weights of {where} are already pruned, more than the {count} requested",
                hint="ask for a larger --prune fraction than the checkpoint's current sparsity",
            )
        key = flat_sal.masked_fill(flat_old, -math.inf)
        order = torch.argsort(key, stable=True)[:count]
        flat = torch.zeros_like(flat_old)
        flat[order] = True
        pos = 0
        for k in names:
            n = saliency[k].numel()
            out[k] = flat[pos : pos + n].reshape(saliency[k].shape)
            pos += n
    return out


def apply_masks(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weights with the removed entries set to exactly zero."""
    return {k: v.masked_fill(masks[k], 0.0) if k in masks else v for k, v in weights.items()}


def count_removed(masks: Mapping[str, Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


# -------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Evaluation:
    """Mean loss and accuracy of a model on data (accuracy None for regression losses)."""

    loss: Estimate
    accuracy: Estimate | None


def evaluate(
    objective: Objective,
    data: DataSample,
    batch_size: int = 256,
    params: Mapping[str, Tensor] | None = None,
) -> Evaluation:
    """Loss and accuracy with `params` substituted (e.g. a masked model), streamed in batches.

    Both are exact on the sample; ``data_stderr`` is their sampling error over examples.
    """
    total = torch.zeros(5, dtype=torch.float64)  # Σ L, Σ L², n, correct, scored
    has_acc = True
    with torch.no_grad():
        for batch in data.batches(batch_size, objective.device, objective.dtype):
            out = objective.outputs(batch.inputs, params)
            targets = objective.targets(batch, out)
            loss = objective.loss.per_example(out, targets).double().cpu()
            total[:3] += torch.stack([loss.sum(), loss.pow(2).sum(), torch.tensor(loss.numel())])
            counts = objective.loss.accuracy_counts(out, targets)
            if counts is None:
                has_acc = False
            else:
                total[3] += float(counts[0])
                total[4] += counts[1]
    total = distributed.current().all_reduce(total)  # under torchrun: every rank's shard
    s1, s2, n_f, correct, scored_f = (float(v) for v in total)
    n, scored = int(n_f), int(scored_f)
    mean = s1 / n
    var = max(0.0, (s2 - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    se = math.sqrt(var / n) if n > 1 else None
    acc = None
    if has_acc and scored:
        p = correct / scored
        acc = Estimate.exact_value(
            p, scored, "fraction correct", data_stderr=math.sqrt(p * (1 - p) / scored)
        )
    return Evaluation(Estimate.exact_value(mean, n, "mean loss", data_stderr=se), acc)


def mask_sparsity(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Fraction of zeros in each (keep-)mask: the layer's sparsity."""
    return {k: 1.0 - float(m.float().mean()) for k, m in masks.items()}
