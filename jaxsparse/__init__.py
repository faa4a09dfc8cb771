"""jaxsparse: structured sparsity and low-bit weights for JAX, as XLA FFI custom calls.

    >>> import jax, jaxsparse as jsp
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> ws = jsp.NMSparse.fromdense(w, n=2, m=4)
    >>> y = jax.numpy.ones((8, 64)) @ ws        # [8, 32]
    >>> wv = jsp.fromdense(w, jsp.VNM(16, 2, 8))  # V:N:M, 75% sparse
    >>> y = jax.numpy.ones((8, 64)) @ wv
    >>> wb = jsp.fromdense(w, jsp.Blocks(16, density=0.25))  # 1x16 blocks, 75% sparse
    >>> y = jax.numpy.ones((8, 64)) @ wb
    >>> wq = jsp.fromdense(w, jsp.Int4(32))        # int4, a scale per 32 inputs
    >>> y = jax.numpy.ones((8, 64)) @ wq
"""

from jaxsparse import _ffi
from jaxsparse._ffi import cpu_isa, has_cpu_kernels, has_cuda_kernels, set_cpu_isa, supported_cpu_isas
from jaxsparse.formats import (
    NM,
    Blocks,
    BlocksSparse,
    Int4,
    Int4LinesWeight,
    Int4NMLinesWeight,
    Int4MarlinWeight,
    Int4NMMarlinWeight,
    Int4NMWeight,
    Int4Weight,
    VNM,
    NMSparse,
    SparseFormat,
    VNMSparse,
    VNMSparseTiled,
    as_spec,
    fromdense,
    frommask,
)
from jaxsparse.ops import JaxsparseFallbackWarning, choose_path, matmul, matmul_path
from jaxsparse.sharding import JaxsparseShardingWarning, shard_weight, shard_x, weight_specs, x_spec
from jaxsparse.io import load_safetensors, save_safetensors
from jaxsparse.bcoo import from_bcoo, to_bcoo
from jaxsparse._export import FFI_ABI_VERSION, custom_call_checks, deserialize, export
from jaxsparse import prune  # noqa: E402  (after formats: prune builds on NM)
from jaxsparse import linen, mixed_precision, nn  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Blocks",
    "BlocksSparse",
    "Int4",
    "Int4LinesWeight",
    "Int4NMLinesWeight",
    "Int4MarlinWeight",
    "Int4NMMarlinWeight",
    "Int4NMWeight",
    "Int4Weight",
    "NM",
    "NMSparse",
    "SparseFormat",
    "VNM",
    "VNMSparse",
    "VNMSparseTiled",
    "as_spec",
    "fromdense",
    "frommask",
    "from_bcoo",
    "to_bcoo",
    "JaxsparseFallbackWarning",
    "JaxsparseShardingWarning",
    "FFI_ABI_VERSION",
    "choose_path",
    "cpu_isa",
    "custom_call_checks",
    "deserialize",
    "export",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "linen",
    "load_safetensors",
    "matmul",
    "matmul_path",
    "mixed_precision",
    "nn",
    "prune",
    "save_safetensors",
    "set_cpu_isa",
    "shard_weight",
    "shard_x",
    "supported_cpu_isas",
    "weight_specs",
    "x_spec",
]
