"""Second-order-safe attention: fused ``scaled_dot_product_attention`` kernels have no
double backward, so Hessian-vector products and per-example Jacobians run under the math
kernel."""

from __future__ import annotations

import contextlib


def twice_differentiable_attention() -> contextlib.AbstractContextManager:
    """Route ``scaled_dot_product_attention`` to the math kernel (second-order safe)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])
