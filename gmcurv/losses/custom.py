"""A user's loss ``fn(outputs, targets) -> [N]`` (named by ``--loss file.py:fn``, imported
by `gmcurv.io.factories`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.errors import ConfigError, UnsupportedError
from gmcurv.losses.base import Loss


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

    def n_exact_columns(self, outputs_shape: torch.Size) -> int:
        return 1 << 62  # no closed-form square root: the GGN trace is estimated, not exact

    def _refuse(self, fisher: str):
        raise UnsupportedError(
            f"--fisher {fisher} needs the model's predictive distribution, which a custom "
            f"loss ({self.name}) does not define",
            hint="use --fisher empirical, or --curvature ggn for the curvature of the loss",
        )
