"""Per-example gradients kept as factors, and their algebra.

Index letters, used in every einsum: ``n`` example, ``c`` Fisher column (one for the
empirical Fisher, ``k`` for Monte Carlo, one per class for the exact one), ``t``/``s``
token or position, ``o`` output unit, ``i`` input unit, ``v`` vocabulary row.

Every source represents the gradients ``g[n, c] ∈ R^D`` of one block of parameters
(``D`` scalars), with ``F_block = (1/N) Σ_{n,c} g[n,c] g[n,c]^T``:

- `LinearFactors`: ``g[n,c] = Σ_t delta[n,c,t,:] a[n,t,:]^T`` (``nn.Linear``, ``nn.Conv2d``
  after unfolding; a bias is the trailing column of ones in ``a``);
- `EmbeddingFactors`: ``g[n,c] = Σ_t e_{index[n,t]} delta[n,c,t,:]^T`` (one-hot inputs kept as
  indices, never materialised);
- `DenseGradients`: ``g`` stored as is (norm layers, parameters of other modules);
- `SumOfSources`: the gradient of a parameter reached by several modules (tied weights).

Each source answers the same questions — squared norms, Gram kernel, diagonal, ``J v``,
``J^T u`` and dense materialisation — with a closed form on its factors where one exists
and, in the base class (`gmcurv.factors.source`), by materialising ``g`` a chunk of
examples at a time.
"""

from gmcurv.factors.dense import DenseGradients
from gmcurv.factors.embedding import EmbeddingFactors
from gmcurv.factors.linear import LinearFactors
from gmcurv.factors.source import CHUNK_ELEMENTS, GradientSource
from gmcurv.factors.tied import SumOfSources

__all__ = [
    "CHUNK_ELEMENTS",
    "DenseGradients",
    "EmbeddingFactors",
    "GradientSource",
    "LinearFactors",
    "SumOfSources",
]
