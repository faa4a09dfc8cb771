"""Flax nnx layers with structured-sparse weights, and model surgery.

- `SparseLinear`: `nnx.Linear` plus `sparsity=`; kept values are `nnx.Param`s, their positions a
  `SparsityIndices` (a non-trainable `nnx.Variable` type).
- `SparseConv`: `nnx.Conv` plus `sparsity=`; the kernel is held as a format of its flattened
  `[prod(kernel_size) * in, out]` matrix (sparse along each kernel position's input channels).
- `sparsify(model, sparsity)` / `densify(model)`: new models with `nnx.Linear` and `nnx.Conv`
  layers swapped for `SparseLinear` and `SparseConv` ones and back.

The linen counterparts live in `jaxsparse.linen`.
"""

from jaxsparse.nn.conv import SparseConv
from jaxsparse.nn.linear import SparseLinear, SparsityIndices
from jaxsparse.nn.surgery import densify, sparsify

__all__ = ["SparseConv", "SparseLinear", "SparsityIndices", "densify", "sparsify"]
