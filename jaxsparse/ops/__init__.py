"""Sparse products as JAX primitives, one module per op family."""

from jaxsparse.ops.dispatch import choose_path, matmul_path
from jaxsparse.ops.matmul import matmul
from jaxsparse.ops.mma_sp import pack_mma_sp_24
from jaxsparse.ops.nm import (
    JaxsparseFallbackWarning,
    nm_sddmm,
    nm_sddmm_reference,
    nm_spmm,
    nm_spmm_reference,
    nm_spmm_t,
    nm_spmm_t_reference,
)

__all__ = [
    "JaxsparseFallbackWarning",
    "choose_path",
    "matmul",
    "matmul_path",
    "nm_sddmm",
    "nm_sddmm_reference",
    "nm_spmm",
    "nm_spmm_reference",
    "nm_spmm_t",
    "nm_spmm_t_reference",
    "pack_mma_sp_24",
]
