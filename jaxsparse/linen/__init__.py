"""Flax linen layers with structured-sparse weights, and variable-tree surgery.

- `SparseDense`: `nn.Dense` plus `sparsity=`; `params` holds `values` and `bias`, the
  `"sparsity"` collection holds `indices` (boxed in `SparsityIndices`).
- `SparseConv`: `nn.Conv` plus `sparsity=`; `params` holds the format's trainable arrays and
  `bias`, the `"sparsity"` collection its frozen ones (boxed in `ConvSparsityIndices`).
- `sparsify(variables, sparsity)` / `densify(variables)`: the variables of a model's Dense (and,
  with `convs=`, Conv) version turned into those of its SparseDense (SparseConv) version (same
  module names) and back.

The nnx counterparts live in `jaxsparse.nn`.
"""

from jaxsparse.linen.conv import ConvSparsityIndices, SparseConv
from jaxsparse.linen.dense import SPARSITY_COLLECTION, SparseDense, SparsityIndices
from jaxsparse.linen.surgery import densify, sparsify

__all__ = [
    "SPARSITY_COLLECTION",
    "ConvSparsityIndices",
    "SparseConv",
    "SparseDense",
    "SparsityIndices",
    "densify",
    "sparsify",
]
