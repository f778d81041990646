"""Capture per-example gradients in decomposed form with one backward pass per Fisher column.

Forward hooks record each supported module's input (``a``, or token indices); tensor hooks on
its output record ``delta = ∂(Σ_n <G[c,n], f_n>)/∂y`` for every column ``c`` of the chosen
Fisher (`gmcurv.losses`), so that with sum-over-examples semantics ``delta[n]`` belongs to
example ``n`` alone. Supported modules:

==============  ==============================================================
``linear``      ``nn.Linear``: leading dimensions become tokens, bias folded into ``a``;
                an input flattened to ``[N*T, I]`` (OPT's fc1/fc2) is mapped back to
                ``[N, T, I]`` (rows example-major, verified by the self-check)
``conv1d``      Hugging Face ``Conv1D`` (GPT-2; weight ``[I, O]``, ``y = x W + b``): as
                ``linear``, with the weight gradient transposed
``conv2d``      ``nn.Conv2d`` (groups = 1): unfolded patches, positions become tokens
``embedding``   ``nn.Embedding``: one-hot inputs kept as indices
``norm``        LayerNorm / GroupNorm / BatchNorm / RMSNorm affine parameters:
                ``g = Σ_positions delta ⊙ x̂`` (and ``Σ delta`` for the bias), exact and cheap;
                Hugging Face RMSNorms (``LlamaRMSNorm`` etc., ``y = w ⊙ x / rms(x)``) too
``tied``        a parameter reached through several of the above (sum of sources)
``dense``       anything else: per-example gradients from ``torch.func`` (``vmap`` of ``vjp``)
==============  ==============================================================

On the first examples the summed factors are checked against autograd's gradient; a block
that disagrees (a weight also used outside its module's forward) falls back to ``dense``
with a warning, so every parameter is always covered, correctly. A module whose inputs
cannot be mapped to examples (a leading dimension that is not a multiple of ``N``) falls
back to ``dense`` the same way, on any batch. Subclasses that override ``forward`` (e.g.
OPT's positional embedding, called with the attention mask) are ``dense``.
"""

from gmcurv.capture.capturer import Capturer, CaptureSteps
from gmcurv.capture.gradients import Block, DecomposedGradients, GradientRows
from gmcurv.capture.plan import (
    BlockPlan,
    LayerInfo,
    describe_layers,
    is_hf_conv1d,
    is_hf_rms_norm,
    module_kind,
    plan_capture,
)
from gmcurv.capture.stream import capture, capture_all, capture_stream

__all__ = [
    "Block",
    "BlockPlan",
    "CaptureSteps",
    "Capturer",
    "DecomposedGradients",
    "GradientRows",
    "LayerInfo",
    "capture",
    "capture_all",
    "capture_stream",
    "describe_layers",
    "is_hf_conv1d",
    "is_hf_rms_norm",
    "module_kind",
    "plan_capture",
]
