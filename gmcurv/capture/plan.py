"""Capture plans: which modules of a model carry which parameters, and how each kind
(linear, conv1d, conv2d, embedding, norm, tied, dense) is captured."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from gmcurv.objective import select_params

_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_NORM_FORWARDS = {c.forward for c in _NORMS}


@dataclass(frozen=True)
class BlockPlan:
    """A set of parameters whose per-example gradients are captured together."""

    name: str  # module path (or parameter name for dense blocks)
    kind: str  # linear | conv2d | embedding | norm | tied | dense
    params: tuple[str, ...]  # parameter names, in flat order
    modules: tuple[str, ...]  # module paths whose forward calls produce the gradient


def _own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Does `module` compute `base`'s forward (not a subclass that overrides it)?"""
    return type(module).forward is base.forward


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``y = x W + b``, weight ``[I, O]``), without importing it."""
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and isinstance(w, Tensor)
        and w.ndim == 2
        and w.shape[1] == getattr(module, "nf", None)
    )


def is_hf_rms_norm(module: nn.Module) -> bool:
    """A Hugging Face RMSNorm (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ...): ``w ⊙ x / rms(x)``.

    Recognised by name and shape; a variant computing something else (e.g. ``(1 + w)``)
    fails the first-batch self-check and falls back to dense, with a warning.
    """
    w = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and type(module).__module__.startswith("transformers.")
        and isinstance(w, Tensor)
        and w.ndim == 1
        and getattr(module, "bias", None) is None
        and isinstance(_rms_eps(module), float)
    )


def _rms_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def module_kind(module: nn.Module) -> str:
    """How a module's own parameters are captured (see module doc)."""
    if isinstance(module, nn.Linear) and _own_forward(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and _own_forward(module, nn.Conv2d):
        return "conv2d"
    if (
        isinstance(module, nn.Embedding)
        and _own_forward(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return "embedding"
    if isinstance(module, _NORMS) and type(module).forward in _NORM_FORWARDS:
        return "norm"
    if is_hf_rms_norm(module):
        return "norm"
    return "dense"


def plan_capture(model: nn.Module, params: dict[str, Tensor]) -> list[BlockPlan]:
    """Group the selected parameters into capture blocks (one per module; tied ones merged)."""
    name_of = {id(p): n for n, p in params.items()}
    users: dict[int, list[str]] = {}  # param id -> module paths using it directly
    kinds: dict[str, str] = {}
    owned: dict[str, list[str]] = {}  # module path -> its selected parameter names
    for path, module in model.named_modules():
        mine = [name_of[id(p)] for p in module.parameters(recurse=False) if id(p) in name_of]
        if not mine:
            continue
        kinds[path], owned[path] = module_kind(module), mine
        for p in module.parameters(recurse=False):
            if id(p) in name_of:
                users.setdefault(id(p), []).append(path)
    _drop_registrations(model, owned, kinds, users)
    # connected components of modules that share parameters
    parent = {m: m for m in owned}

    def find(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for paths in users.values():
        for other in paths[1:]:
            parent[find(other)] = find(paths[0])
    groups: dict[str, list[str]] = {}
    for m in owned:
        groups.setdefault(find(m), []).append(m)
    order = {n: i for i, n in enumerate(params)}
    plans = []
    for members in groups.values():
        names = sorted({n for m in members for n in owned[m]}, key=order.__getitem__)
        member_kinds = {kinds[m] for m in members}
        if len(members) == 1:
            kind = kinds[members[0]]
        else:
            kind = "dense" if "dense" in member_kinds or "norm" in member_kinds else "tied"
        plans.append(BlockPlan(members[0] or names[0], kind, tuple(names), tuple(members)))
    return sorted(plans, key=lambda b: order[b.params[0]])


def _drop_registrations(
    model: nn.Module,
    owned: dict[str, list[str]],
    kinds: dict[str, str],
    users: dict[int, list[str]],
) -> None:
    """Forget a generic module that merely re-registers a parameter a capturable child
    computes with: BERT's MLM head registers ``cls.predictions.bias``, which is
    ``cls.predictions.decoder.bias``. Keeping it would merge the tied embedding/decoder
    group into a dense block. If the parent also used the parameter itself, the
    first-batch self-check would catch it (and fall back to dense)."""
    for path in [m for m, k in kinds.items() if k == "dense"]:
        module = model.get_submodule(path)
        ids = [id(p) for p in module.parameters(recurse=False) if id(p) in users]
        children = {
            c
            for i in ids
            for c in users[i]
            if c != path and (not path or c.startswith(f"{path}.")) and kinds[c] != "dense"
        }
        if ids and all(any(c in children for c in users[i]) for i in ids):
            del owned[path], kinds[path]
            for i in ids:
                users[i].remove(path)


@dataclass(frozen=True)
class LayerInfo:
    """One capture block of a model, for ``gmcurv info``."""

    name: str
    kind: str
    params: dict[str, tuple[int, ...]]
    n_params: int


def describe_layers(model: nn.Module) -> list[LayerInfo]:
    """The model's parameter blocks and how gmcurv captures each (see `module_kind`)."""
    params = select_params(model)
    return [
        LayerInfo(
            plan.name,
            plan.kind,
            {p: tuple(params[p].shape) for p in plan.params},
            sum(params[p].numel() for p in plan.params),
        )
        for plan in plan_capture(model, params)
    ]
