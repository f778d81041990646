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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gmcurv.errors import ConfigError, DataError, UnsupportedError

IGNORE_INDEX = -100
FISHER_TYPES = ("empirical", "mc", "exact")


@dataclass(frozen=True)
class Loss:
    """A per-example loss with the output-space quantities curvature needs."""

    name: str

    # -- the loss ---------------------------------------------------------------------------
    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``L_n`` for each example, shape ``[N]``."""
        raise NotImplementedError

    def total(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``Σ_n L_n`` (sum over examples: never a 1/N inside the factors)."""
        return self.per_example(outputs, targets).sum()

    def accuracy_counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int] | None:
        """(number correct, number scored) for classification losses, else None."""
        return None

    # -- validation -------------------------------------------------------------------------
    def check(self, outputs_shape: torch.Size, targets: Tensor | None, source: str) -> None:
        """Raise `DataError` if targets do not fit outputs of this shape (shape, dtype, range)."""
        raise NotImplementedError

    def default_targets(self, inputs: object) -> Tensor | None:
        """Targets to use when the data has none (only next-token prediction has them)."""
        return None

    # -- curvature --------------------------------------------------------------------------
    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``Λ_n v_n`` per example: the Hessian of ``L_n`` w.r.t. ``f_n`` applied to ``v``."""
        raise NotImplementedError

    def output_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Cotangents ``G: [C, *outputs.shape]`` for the chosen Fisher (see module doc).

        For ``mc``, `noise` holds the per-example random draws, ``[N, *noise_shape]``
        (see `noise_spec` and `gmcurv.rng.example_noise`).
        """
        raise NotImplementedError

    def noise_spec(self, outputs_shape: torch.Size, mc_samples: int) -> tuple[tuple[int, ...], str]:
        """Shape (per example) and kind ('uniform' | 'normal') of the MC noise."""
        raise NotImplementedError

    def n_columns(self, outputs_shape: torch.Size, fisher: str, mc_samples: int) -> int:
        """How many columns `output_columns` will return (for memory preflight)."""
        if fisher == "empirical":
            return 1
        if fisher == "mc":
            return mc_samples
        return self._n_exact_columns(outputs_shape)

    def _n_exact_columns(self, outputs_shape: torch.Size) -> int:
        return math.prod(outputs_shape[1:])


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy, averaged over an example's valid tokens."""

    name: str = "cross_entropy"
    shift: bool = False  # next-token prediction: logits[:, :-1] vs targets[:, 1:]

    def _align(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.shift:
            return outputs[:, :-1], targets[:, 1:]
        return outputs, targets

    def _token_weights(self, targets: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``w[n, t] = 1 / (#valid tokens of n)`` on valid tokens, 0 on ignored ones."""
        valid = (targets != IGNORE_INDEX).to(dtype or torch.get_default_dtype())
        flat = valid.reshape(valid.shape[0], -1)
        count = flat.sum(1).clamp_min(1.0)
        return (flat / count[:, None]).reshape(valid.shape)

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits, tgt = self._align(outputs, targets)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            tgt.reshape(-1),
            reduction="none",
            ignore_index=IGNORE_INDEX,
        ).reshape(tgt.shape)
        w = self._token_weights(tgt, ce.dtype)
        return (ce * w).reshape(ce.shape[0], -1).sum(1)

    def accuracy_counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        logits, tgt = self._align(outputs, targets)
        valid = tgt != IGNORE_INDEX
        correct = ((logits.argmax(-1) == tgt) & valid).sum()
        return correct, int(valid.sum())

    def check(self, outputs_shape: torch.Size, targets: Tensor | None, source: str) -> None:
        if targets is None:
            raise DataError(
                f"{source}: no targets found, but the loss {self.name} needs them",
                hint="store class labels under 'targets' (or 'y' / 'labels')",
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise DataError(
                f"{source}: targets have dtype {targets.dtype}, but {self.name} needs integer "
                "class labels",
                hint="store labels as int64, or use --loss mse for real-valued targets",
            )
        expected = outputs_shape[:-1]
        if targets.shape != expected:
            raise DataError(
                f"{source}: targets have shape {tuple(targets.shape)}, but the model's outputs "
                f"{tuple(outputs_shape)} need targets of shape {tuple(expected)}",
                hint="one class index per example (per token for sequence outputs)",
            )
        n_classes = outputs_shape[-1]
        valid = targets[targets != IGNORE_INDEX]
        if valid.numel():
            lo, hi = int(valid.min()), int(valid.max())
            if lo < 0 or hi >= n_classes:
                raise DataError(
                    f"{source}: labels range over [{lo}, {hi}], but the model has {n_classes} "
                    f"classes (valid labels are 0..{n_classes - 1}, or {IGNORE_INDEX} to ignore)",
                    hint="check that the data belongs to this model, or remap the labels",
                )

    def default_targets(self, inputs: object) -> Tensor | None:
        """Next-token targets: the input ids, ``-100`` where an ``attention_mask`` is 0
        (padding predicts nothing, as Hugging Face's language-modelling collator sets it)."""
        if not self.shift:
            return None
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            return None
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if isinstance(mask, Tensor) and mask.shape == ids.shape:
            return ids.masked_fill(mask == 0, IGNORE_INDEX)
        return ids

    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        logits, tgt = self._align(outputs, targets)
        vv = v[:, :-1] if self.shift else v
        p = logits.softmax(-1)
        w = self._token_weights(tgt, p.dtype).unsqueeze(-1)
        hv = w * (p * vv - p * (p * vv).sum(-1, keepdim=True))
        return self._pad(hv, outputs) if self.shift else hv

    @staticmethod
    def _pad(x: Tensor, outputs: Tensor) -> Tensor:
        """Zero cotangent for the last position, which predicts nothing."""
        return torch.cat([x, x.new_zeros((*x.shape[:1], 1, *x.shape[2:]))], dim=1)

    def noise_spec(self, outputs_shape: torch.Size, mc_samples: int) -> tuple[tuple[int, ...], str]:
        tokens = tuple(outputs_shape[1:-1])
        if self.shift and tokens:
            tokens = (tokens[0] - 1, *tokens[1:])
        return (mc_samples, *tokens), "uniform"

    def output_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> Tensor:
        logits, tgt = self._align(outputs.detach(), targets)
        p = logits.softmax(-1)
        w = self._token_weights(tgt, p.dtype).unsqueeze(-1)  # [N, *tok, 1]
        n_classes = p.shape[-1]
        if fisher == "empirical":
            onehot = F.one_hot(tgt.clamp_min(0), n_classes).to(p.dtype)
            cols = (w * (p - onehot)).unsqueeze(0)
        elif fisher == "mc":
            noise = _require(noise)
            u = noise.to(p.dtype).movedim(1, 0)  # [k, N, *tok] uniforms
            cdf = p.cumsum(-1)
            # inverse-CDF sampling: the class whose cumulative probability first exceeds u
            draws = (cdf.unsqueeze(0) <= u.unsqueeze(-1)).sum(-1).clamp_max(n_classes - 1)
            onehot = F.one_hot(draws, n_classes).to(p.dtype)
            cols = w * (p - onehot) / math.sqrt(mc_samples)
        elif fisher == "exact":
            cols = self._exact_columns(p, w)
        else:
            raise ConfigError(f"unknown Fisher type {fisher!r}", hint=f"use one of {FISHER_TYPES}")
        if self.shift:
            cols = torch.stack([self._pad(c, outputs) for c in cols])
        return cols

    @staticmethod
    def _exact_columns(p: Tensor, w: Tensor) -> Tensor:
        """Columns ``w_t sqrt(p_c) (e_c - p)`` for every (token, class), zero elsewhere."""
        n = p.shape[0]
        tok_shape, n_classes = p.shape[1:-1], p.shape[-1]
        n_tok = math.prod(tok_shape)
        pf = p.reshape(n, n_tok, n_classes)
        wf = w.reshape(n, n_tok, 1)
        eye = torch.eye(n_classes, dtype=p.dtype, device=p.device)
        # s[n, t, c, :] = w_t sqrt(p_c) (e_c - p_t)
        s = wf.unsqueeze(-1) * pf.sqrt().unsqueeze(-1) * (eye - pf.unsqueeze(-2))
        cols = p.new_zeros(n_tok, n_classes, n, n_tok, n_classes)
        idx = torch.arange(n_tok, device=p.device)
        cols[idx, :, :, idx, :] = s.permute(1, 2, 0, 3)
        return cols.reshape(n_tok * n_classes, *p.shape)

    def _n_exact_columns(self, outputs_shape: torch.Size) -> int:
        n_tok = math.prod(outputs_shape[1:-1]) - (1 if self.shift else 0)
        return n_tok * outputs_shape[-1]


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeanSquaredError(Loss):
    """Squared error averaged over each example's ``E`` output elements."""

    name: str = "mse"

    @staticmethod
    def _elements(outputs: Tensor) -> int:
        return math.prod(outputs.shape[1:])

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        diff = (outputs - targets.to(outputs.dtype)).reshape(outputs.shape[0], -1)
        return diff.pow(2).mean(1)

    def check(self, outputs_shape: torch.Size, targets: Tensor | None, source: str) -> None:
        if targets is None:
            raise DataError(
                f"{source}: no targets found, but the loss mse needs them",
                hint="store regression targets under 'targets' (or 'y')",
            )
        if targets.shape != outputs_shape:
            if targets.numel() == math.prod(outputs_shape):
                return  # reshaped by the objective (e.g. [N] vs [N, 1])
            raise DataError(
                f"{source}: targets have shape {tuple(targets.shape)}, but the model's outputs "
                f"have shape {tuple(outputs_shape)}",
                hint="mse needs one target value per model output",
            )

    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        return (2.0 / self._elements(outputs)) * v

    def noise_spec(self, outputs_shape: torch.Size, mc_samples: int) -> tuple[tuple[int, ...], str]:
        return (mc_samples, *outputs_shape[1:]), "normal"

    def output_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> Tensor:
        out = outputs.detach()
        e = self._elements(out)
        if fisher == "empirical":
            return ((2.0 / e) * (out - targets.to(out.dtype))).unsqueeze(0)
        if fisher == "mc":
            # targets ~ N(f, (E/2) I), the likelihood whose NLL is the loss; the gradient is
            # (2/E)(f - y) = -sqrt(2/E) ε with ε standard normal.
            noise = _require(noise)
            eps = noise.to(out.dtype).movedim(1, 0)  # [k, N, *out]
            return -math.sqrt(2.0 / e) * eps / math.sqrt(mc_samples)
        if fisher == "exact":
            eye = torch.eye(e, dtype=out.dtype, device=out.device) * math.sqrt(2.0 / e)
            cols = eye.reshape(e, 1, *out.shape[1:]).expand(e, out.shape[0], *out.shape[1:])
            return cols.contiguous()
        raise ConfigError(f"unknown Fisher type {fisher!r}", hint=f"use one of {FISHER_TYPES}")


@dataclass(frozen=True)
class CallableLoss(Loss):
    """A user loss: ``fn(outputs, targets) -> [N]`` per-example losses (PINNs, custom NLLs).

    ``L_n`` must depend on example ``n``'s outputs only (no batch statistics), so that the
    gradient and Hessian of ``Σ_n L_n`` with respect to the outputs are per-example:
    ``∂L_n/∂f_n`` gives the empirical Fisher column, and ``Λ_n v_n`` is one forward-over-
    reverse product (`torch.func.jvp` of `torch.func.grad`; reverse-over-reverse for ops
    without forward-mode AD, such as ``huber_loss``). The model's Fisher under its
    own predictive distribution is not defined by a bare loss, so ``--fisher mc|exact`` are
    refused; the GGN uses ``Λ_n`` and the Hessian is exact as always.
    """

    fn: object = None  # Callable[[Tensor, Tensor | None], Tensor]

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        value = self.fn(outputs, targets)  # type: ignore[operator]
        if not isinstance(value, Tensor) or value.shape != outputs.shape[:1]:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(
                f"--loss {self.name}: returned {shape}, expected one loss per example "
                f"(shape [{outputs.shape[0]}])",
                hint="return the per-example losses, not their mean (reduction='none')",
            )
        return value

    def check(self, outputs_shape: torch.Size, targets: Tensor | None, source: str) -> None:
        return None  # the user's function sees the targets as stored

    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        from torch.func import grad, jvp

        f, v = outputs.detach(), v.to(outputs.dtype)
        try:
            return jvp(grad(lambda o: self.total(o, targets)), (f,), (v,))[1]
        except NotImplementedError:  # an op without forward-mode AD (e.g. huber_loss)
            with torch.enable_grad():
                f = f.requires_grad_(True)
                (g,) = torch.autograd.grad(self.total(f, targets), f, create_graph=True)
                return torch.autograd.grad(g, f, v)[0]

    def output_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> Tensor:
        if fisher != "empirical":
            self._refuse(fisher)
        from torch.func import grad

        return grad(lambda o: self.total(o, targets))(outputs.detach()).unsqueeze(0)

    def noise_spec(self, outputs_shape: torch.Size, mc_samples: int) -> tuple[tuple[int, ...], str]:
        self._refuse("mc")

    def _n_exact_columns(self, outputs_shape: torch.Size) -> int:
        return 1 << 62  # no closed-form square root: the GGN trace is estimated, not exact

    def _refuse(self, fisher: str):
        raise UnsupportedError(
            f"--fisher {fisher} needs the model's predictive distribution, which a custom "
            f"loss ({self.name}) does not define",
            hint="use --fisher empirical, or --curvature ggn for the curvature of the loss",
        )


def _require(noise: Tensor | None) -> Tensor:
    if noise is None:
        raise ConfigError(
            "Monte Carlo Fisher columns need per-example noise",
            hint="draw it with gmcurv.rng.example_noise (Capturer does this for you)",
        )
    return noise


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
