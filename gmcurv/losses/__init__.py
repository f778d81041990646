"""Per-example losses and their output-space curvature.

The objective is always the mean over examples, ``L(θ) = (1/N) Σ_n L_n(θ)``, and each
``L_n`` is chosen so that this mean equals PyTorch's default-reduction loss on a batch:

- ``cross_entropy``: logits ``[N, *tok, C]``, integer targets ``[N, *tok]`` (``-100`` ignored);
  ``L_n`` = mean over the example's valid tokens of the cross-entropy.
- ``next_token``: cross-entropy of ``logits[:, :-1]`` against ``targets[:, 1:]`` (Hugging Face
  causal-LM convention: targets default to the input ids, ``-100`` where an
  ``attention_mask`` marks padding, and are shifted here). ``L_n`` is the mean over example
  ``n``'s valid tokens: the library's ``outputs.loss`` (a mean over all valid tokens of the
  batch) when every example has as many valid tokens, examples weighted equally otherwise.
- ``mse``: outputs and targets of the same shape; ``L_n`` = mean over the example's elements of
  ``(f - y)^2``.
- ``path/to/file.py:fn`` or ``package.module:fn``: a user loss ``fn(outputs, targets) -> [N]``
  returning each example's loss (`CallableLoss`; empirical Fisher, GGN and Hessian).

For every loss, ``output_columns`` returns cotangents ``G[c, n] ∈ R^{shape of f_n}`` whose
back-propagation gives the Fisher columns ``g_{n,c} = J_n^T G[c, n]`` so that
``F = (1/N) Σ_n Σ_c g_{n,c} g_{n,c}^T``:

- ``empirical``: one column, ``∂L_n/∂f_n`` at the observed targets;
- ``mc``: ``k`` columns, ``∂L_n/∂f_n`` at targets sampled from the model, scaled by ``1/sqrt(k)``;
- ``exact``: the expectation of the MC Fisher in closed form, from a square root of the
  output-space curvature: for softmax ``Λ = diag(p) - p p^T = Σ_c s_c s_c^T`` with
  ``s_c = sqrt(p_c) (e_c - p)``; for MSE ``Λ = (2/E) I``. One column per (token, class).

With one prediction per example (classification, regression) the exact Fisher equals the
GGN. For per-token losses averaged over ``T`` tokens it is ``Σ_t w_t^2 J_t^T Λ_t J_t`` with
``w_t = 1/T`` (the Fisher of the tempered likelihood the mean defines), i.e. the GGN over ``T``.
"""

from __future__ import annotations

from gmcurv.errors import UnsupportedError
from gmcurv.losses.base import FISHER_TYPES, IGNORE_INDEX, Loss
from gmcurv.losses.cross_entropy import CrossEntropy
from gmcurv.losses.custom import CallableLoss
from gmcurv.losses.mse import MeanSquaredError

LOSSES: dict[str, Loss] = {
    "cross_entropy": CrossEntropy(),
    "next_token": CrossEntropy(name="next_token", shift=True),
    "mse": MeanSquaredError(),
}


def get_loss(name: str) -> Loss:
    """A built-in loss by name (a user's ``path/to/file.py:fn`` is imported by
    `gmcurv.io.factories.load_loss`)."""
    if name in LOSSES:
        return LOSSES[name]
    raise UnsupportedError(
        f"unknown loss {name!r}",
        hint=f"use one of: {', '.join(LOSSES)}, or path/to/file.py:fn returning [N] losses",
    )


__all__ = [
    "FISHER_TYPES",
    "IGNORE_INDEX",
    "LOSSES",
    "CallableLoss",
    "CrossEntropy",
    "Loss",
    "MeanSquaredError",
    "get_loss",
]
