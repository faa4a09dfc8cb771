"""Flax linen layers with structured-sparse weights, and variable-tree surgery.

- `SparseDense`: `nn.Dense` plus `sparsity=`; `params` holds `values` and `bias`, the
  `"sparsity"` collection holds `indices` (boxed in `SparsityIndices`).
- `sparsify(variables, sparsity)` / `densify(variables)`: the variables of a model's Dense version
  turned into those of its SparseDense version (same module names) and back.

The nnx counterparts live in `jaxsparse.nn`.
"""

from jaxsparse.linen.dense import SPARSITY_COLLECTION, SparseDense, SparsityIndices
from jaxsparse.linen.surgery import densify, sparsify

__all__ = ["SPARSITY_COLLECTION", "SparseDense", "SparsityIndices", "densify", "sparsify"]
