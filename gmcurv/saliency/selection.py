"""Which weights pruning ranks, given the masks a pruned checkpoint already carries.

A checkpoint's keep-masks (1 = kept, `gmcurv.io.pruned`) become removal masks ``R``
(True = pruned). The prunable set is `gmcurv.pruning.prunable_params` plus every tensor
that already has a mask. A fraction ``f`` is reachable only when its target count
(`gmcurv.pruning.target_counts`: ``round(f Σ n_l)`` globally, or per tensor) is at least
the number of weights already removed (in total, or in each tensor): pruning never
restores a weight.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from gmcurv.errors import ConfigError
from gmcurv.objective import Objective
from gmcurv.pruning import count_removed, prunable_params, target_counts


def prunable_names(
    objective: Objective, include_bias: bool, masks: Mapping[str, Tensor] | None
) -> list[str]:
    """The parameters to rank, in the objective's order: the prunable ones and every masked
    one. Raises `ConfigError` when there are none."""
    names = prunable_params(objective, include_bias)
    extra = [k for k in (masks or {}) if k in objective.params and k not in names]
    order = list(objective.params)
    names = sorted([*names, *extra], key=order.index)
    if not names:
        raise ConfigError(
            "no prunable parameters: the selected parameters are all biases or norm scales",
            hint="add --include-bias, or widen --layers",
        )
    return names


def removed_from_masks(
    masks: Mapping[str, Tensor] | None, objective: Objective
) -> dict[str, Tensor]:
    """Removal masks (True = pruned) from a checkpoint's keep-masks (1 = kept)."""
    out = {}
    for k, m in (masks or {}).items():
        if k in objective.params:
            out[k] = (m == 0).to(objective.device)
    return out


def fits(sizes: Mapping[str, int], f: float, scope: str, removed: Mapping[str, Tensor]) -> bool:
    """Whether pruning `f` keeps at least the already-removed weights removed."""
    target = target_counts(sizes, f, scope)
    if isinstance(target, int):
        return target >= count_removed({k: v for k, v in removed.items() if k in sizes})
    return all(target[k] >= int(removed[k].sum()) for k in sizes if k in removed)


def check_below_target(
    sizes: Mapping[str, int], fraction: float, scope: str, removed: Mapping[str, Tensor]
) -> None:
    """Raise `ConfigError` when the checkpoint is already sparser than `fraction` asks."""
    if not fits(sizes, fraction, scope, removed):
        target = target_counts(sizes, fraction, scope)
        raise ConfigError(
            f"the checkpoint already has {count_removed(removed):,} of {sum(sizes.values()):,} "
            f"prunable weights pruned, more than --prune {fraction:g} asks for ({target})",
            hint="ask for a larger fraction than the current sparsity",
        )
