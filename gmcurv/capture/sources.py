"""Factor builders: recorded inputs and deltas of a module -> its gradient source
(``LinearFactors``, ``EmbeddingFactors``, norm and conv variants)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmcurv.capture.dense import zero_source
from gmcurv.capture.plan import BlockPlan, is_hf_rms_norm, module_kind
from gmcurv.capture.recording import Call, Recorder
from gmcurv.factors import (
    DenseGradients,
    EmbeddingFactors,
    GradientSource,
    LinearFactors,
    SumOfSources,
)


def _stack_deltas(call: Call, columns: int) -> Tensor:
    """``[C, *output.shape]`` (zeros for columns whose gradient did not reach the module)."""
    zero = None
    out = []
    for c in range(columns):
        d = call.deltas.get(c)
        if d is None:
            zero = zero if zero is not None else call.output.new_zeros(call.shape)
            d = zero
        out.append(d)
    return out[0].unsqueeze(0) if columns == 1 else torch.stack(out)


def _tokens(x: Tensor, n: int) -> Tensor:
    """``[n, *lead, D] -> [n, T, D]``."""
    return x.reshape(n, -1, x.shape[-1])


def _linear_source(module: nn.Linear, calls: list[Call], names: dict, n: int, columns: int):
    a_parts, d_parts = [], []
    for call in calls:
        d = _stack_deltas(call, columns)  # [C, n, *lead, O]
        d_parts.append(d.reshape(columns, n, -1, d.shape[-1]).transpose(0, 1))
        a_parts.append(_tokens(call.inputs, n))
    return _with_bias(_cat(d_parts, 2), _cat(a_parts, 1), module, names)


def _conv1d_source(module: nn.Module, calls: list[Call], names: dict, n: int, columns: int):
    """Hugging Face ``Conv1D``: a linear map stored ``[I, O]`` (factors marked transposed)."""
    return replace(_linear_source(module, calls, names, n, columns), transposed=True)


def _conv2d_source(module: nn.Conv2d, calls: list[Call], names: dict, n: int, columns: int):
    a_parts, d_parts = [], []
    for call in calls:
        x = call.inputs
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        elif isinstance(module.padding, str):
            padding = _same_padding(module, x)
        else:
            padding = module.padding
        if isinstance(padding, tuple) and len(padding) == 4:  # asymmetric 'same' padding
            x, padding = F.pad(x, padding), 0
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        a_parts.append(patches.transpose(1, 2))  # [n, L, I k k]
        d = _stack_deltas(call, columns)  # [C, n, O, H', W']
        d_parts.append(d.reshape(columns, n, d.shape[2], -1).permute(1, 0, 3, 2))
    return _with_bias(_cat(d_parts, 2), _cat(a_parts, 1), module, names)


def _same_padding(module: nn.Conv2d, x: Tensor) -> tuple[int, ...] | int:
    if module.padding == "valid":
        return 0
    pads: list[int] = []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _with_bias(delta: Tensor, x: Tensor, module: nn.Module, names: dict) -> LinearFactors:
    has_w, has_b = "weight" in names, "bias" in names
    order = [names[k] for k in ("weight", "bias") if k in names]
    shapes = [tuple(getattr(module, k).shape) for k in ("weight", "bias") if k in names]
    return LinearFactors(tuple(order), tuple(shapes), delta, x, has_w, has_b)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` without the copy when there is one part (the common single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _embedding_source(
    module: nn.Embedding, calls: list[Call], names: dict, n: int, columns: int
) -> EmbeddingFactors:
    idx_parts, d_parts = [], []
    for call in calls:
        idx = call.inputs.reshape(n, -1)
        d = _stack_deltas(call, columns)
        d = d.reshape(columns, n, -1, d.shape[-1]).transpose(0, 1)
        if module.padding_idx is not None:
            d = d * (idx != module.padding_idx)[:, None, :, None].to(d.dtype)
        idx_parts.append(idx)
        d_parts.append(d)
    return EmbeddingFactors(
        (names["weight"],),
        (tuple(module.weight.shape),),
        _cat(d_parts, 2),
        _cat(idx_parts, 1),
    )


def _normalized(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x̂`` (the input before the affine map) and the dims the parameters broadcast over."""
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        xh = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return xh, tuple(range(1, x.ndim - k))
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        k = len(module.normalized_shape)
        xh = F.rms_norm(x, module.normalized_shape, eps=module.eps)
        return xh, tuple(range(1, x.ndim - k))
    if is_hf_rms_norm(module):  # the library's own x̂ (its dtype casts included): w = 1
        ones = {"weight": torch.ones_like(module.weight)}
        with torch.no_grad():
            xh = torch.func.functional_call(module, ones, (x,))
        return xh, tuple(range(1, x.ndim - 1))
    if isinstance(module, nn.GroupNorm):
        xh = F.group_norm(x, module.num_groups, eps=module.eps)
        return xh, tuple(range(2, x.ndim))
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    batch_stats = module.training or module.running_mean is None
    xh = F.batch_norm(
        x,
        None if batch_stats else module.running_mean,
        None if batch_stats else module.running_var,
        training=batch_stats,
        eps=module.eps,
    )
    return xh, tuple(range(2, x.ndim))


def _norm_source(
    module: nn.Module, calls: list[Call], names: dict, n: int, columns: int
) -> DenseGradients:
    parts: dict[str, Tensor] = {}
    for call in calls:
        xh, dims = _normalized(module, call.inputs)
        d = _stack_deltas(call, columns).transpose(0, 1)  # [n, C, *shape]
        sum_dims = tuple(k + 1 for k in dims)  # shifted by the column axis
        grads = {}
        if "weight" in names:
            grads["weight"] = (d * xh[:, None]).sum(sum_dims) if sum_dims else d * xh[:, None]
        if "bias" in names:
            grads["bias"] = d.sum(sum_dims) if sum_dims else d
        for k, v in grads.items():
            parts[k] = v if k not in parts else parts[k] + v
    order = [k for k in ("weight", "bias") if k in names]
    g = torch.cat([parts[k].reshape(n, columns, -1) for k in order], dim=-1)
    shapes = tuple(tuple(getattr(module, k).shape) for k in order)
    return DenseGradients(tuple(names[k] for k in order), shapes, g)


BUILDERS = {
    "linear": _linear_source,
    "conv1d": _conv1d_source,
    "conv2d": _conv2d_source,
    "embedding": _embedding_source,
    "norm": _norm_source,
}


def block_source(
    plan: BlockPlan,
    recorder: Recorder,
    model: nn.Module,
    params: dict[str, Tensor],
    n: int,
    columns: int,
) -> GradientSource:
    """The gradient source of a hooked block: one builder per module it spans (summed when
    a parameter is reached through several); a module never called contributes zeros."""
    sources = []
    for path in plan.modules:
        module = model.get_submodule(path)
        local = {
            k: name
            for k, p in module.named_parameters(recurse=False)
            for name in plan.params
            if params[name] is p
        }
        calls = recorder.calls[path]
        if not calls:
            sources.append(zero_source(params, module, local, n, columns))
            continue
        sources.append(BUILDERS[module_kind(module)](module, calls, local, n, columns))
    if len(sources) == 1:
        return sources[0]
    shapes = tuple(tuple(params[k].shape) for k in plan.params)
    return SumOfSources(plan.params, shapes, tuple(sources))
