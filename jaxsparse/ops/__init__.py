"""Sparse products as JAX primitives, one module per op family."""

from jaxsparse.ops.dispatch import choose_path, matmul_path
from jaxsparse.ops.engine import int8_matmul, int8_matmul_reference
from jaxsparse.ops.matmul import matmul
from jaxsparse.ops.int4 import (
    int4_dequantize,
    int4_matmul,
    int4_matmul_reference,
    int4_matmul_t,
    int4_matmul_t_reference,
    int4_nm_dequantize,
    int4_nm_matmul,
    int4_nm_matmul_reference,
    int4_nm_matmul_t,
    int4_nm_matmul_t_reference,
)
from jaxsparse.ops.mma_sp import pack_mma_sp_24
from jaxsparse.ops._primitive import JaxsparseFallbackWarning
from jaxsparse.ops.nm import (
    nm_sddmm,
    nm_sddmm_reference,
    nm_spmm,
    nm_spmm_engine,
    nm_spmm_packed,
    nm_spmm_packed_reference,
    nm_spmm_reference,
    nm_spmm_t,
    nm_spmm_t_reference,
    pack_indices_2bit,
    unpack_indices_2bit,
)
from jaxsparse.ops.vnm import (
    vnm_pack_tiles,
    vnm_sddmm,
    vnm_sddmm_reference,
    vnm_spmm,
    vnm_spmm_reference,
    vnm_spmm_t,
    vnm_spmm_t_reference,
    vnm_spmm_tiled,
    vnm_spmm_tiled_reference,
)

__all__ = [
    "JaxsparseFallbackWarning",
    "choose_path",
    "int4_dequantize",
    "int4_matmul",
    "int4_matmul_reference",
    "int4_matmul_t",
    "int4_matmul_t_reference",
    "int4_nm_dequantize",
    "int4_nm_matmul",
    "int4_nm_matmul_reference",
    "int4_nm_matmul_t",
    "int4_nm_matmul_t_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "matmul",
    "matmul_path",
    "nm_sddmm",
    "nm_sddmm_reference",
    "nm_spmm",
    "nm_spmm_engine",
    "nm_spmm_packed",
    "nm_spmm_packed_reference",
    "nm_spmm_reference",
    "nm_spmm_t",
    "nm_spmm_t_reference",
    "pack_indices_2bit",
    "pack_mma_sp_24",
    "vnm_pack_tiles",
    "vnm_sddmm",
    "vnm_sddmm_reference",
    "vnm_spmm",
    "vnm_spmm_reference",
    "vnm_spmm_t",
    "vnm_spmm_t_reference",
    "vnm_spmm_tiled",
    "vnm_spmm_tiled_reference",
    "unpack_indices_2bit",
]
