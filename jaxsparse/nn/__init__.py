"""Flax nnx layers with structured-sparse weights, and model surgery.

- `SparseLinear`: `nnx.Linear` plus `sparsity=`; kept values are `nnx.Param`s, their positions a
  `SparsityIndices` (a non-trainable `nnx.Variable` type).
- `sparsify(model, sparsity)` / `densify(model)`: new models with `nnx.Linear` layers swapped for
  `SparseLinear` ones and back.

The linen counterparts live in `jaxsparse.linen`.
"""

from jaxsparse.nn.linear import SparseLinear, SparsityIndices
from jaxsparse.nn.surgery import densify, sparsify

__all__ = ["SparseLinear", "SparsityIndices", "densify", "sparsify"]
