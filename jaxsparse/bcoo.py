"""Interchange with `jax.experimental.sparse.BCOO`, for every format.

`to_bcoo(w)` lists every stored entry of a weight, its stored zeros too, so the BCOO carries the
weight's whole structure; `from_bcoo(m, spec)` builds the format of `spec` from a BCOO whose
stored entries respect the spec. For the sparse formats the round trip loses nothing: the same
arrays come back.

int4 weights hold codes and a scale per group, which a BCOO has no place for. `to_bcoo` gives
the dequantised values in float32, exactly (`code * scale`: a 4-bit integer times a 16-bit
float fits f32's mantissa); `from_bcoo` quantises them again, as `fromdense` does
(round-to-nearest from each group's largest magnitude). A weight made by `fromdense` comes back
with the same codes, and scales recomputed from the dequantised group maxima (equal to within a
rounding); one whose codes a solver chose (GPTQ) may not, since its group maximum need not land
on a code's end.

    >>> import jax.numpy as jnp, jaxsparse as jsp
    >>> w = jsp.fromdense(jnp.arange(32.0).reshape(8, 4), "2:4")
    >>> m = jsp.to_bcoo(w)
    >>> m.shape, m.nse
    ((8, 4), 16)
    >>> jsp.from_bcoo(m, "2:4").todense().tolist() == w.todense().tolist()
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from jaxsparse import _validate as V
from jaxsparse.formats._base import SparseFormat
from jaxsparse.formats._spec import as_spec
from jaxsparse.formats.int4 import Int4


def to_bcoo(w: SparseFormat) -> jsparse.BCOO:
    """The stored entries of `w` as a BCOO of its logical shape `[..., in, out]`.

    Args:
        w: a weight of any jaxsparse format (concrete arrays, not tracers: the number of stored
            entries sizes the result).

    Returns:
        A `BCOO` with sorted, unique indices (`n_batch = 0`, int32 indices of every dim) and
        one entry per stored position, stored zeros included, so that `from_bcoo(m, w.spec)`
        rebuilds `w`. Data in `w.dtype` for the sparse formats, float32 for int4 (exact).
    """
    where = "jaxsparse.to_bcoo"
    if not isinstance(w, SparseFormat):
        raise TypeError(f"{where}: w must be a jaxsparse weight (a format instance), got "
                        f"{type(w).__name__}")
    if any(isinstance(a, jax.core.Tracer) for a in w.arrays().values()):
        raise TypeError(f"{where}: w must hold concrete arrays (the stored entries' count sizes "
                        f"the BCOO); got tracers: call it outside jit")
    dense = _exact_dense(w)
    positions = np.argwhere(np.asarray(w.mask()))  # row-major: sorted and unique
    indices = jnp.asarray(positions, jnp.int32)
    data = dense[tuple(indices.T)] if positions.size else jnp.zeros((0,), dense.dtype)
    return jsparse.BCOO((data, indices), shape=w.shape, indices_sorted=True, unique_indices=True)


def _exact_dense(w: SparseFormat) -> jax.Array:
    if not isinstance(w.spec, Int4):
        return w.todense()
    # Dequantised in f32 from the canonical layout: bf16 scales would round code * scale.
    return w.packed_for("cpu").astype(jnp.float32).todense()


def from_bcoo(m: jsparse.BCOO, spec) -> SparseFormat:
    """The format of `spec` holding the stored entries of the BCOO `m`.

    Args:
        m: a `BCOO` of shape `[..., in, out]`, float data (f32, bf16 or f16), no dense dims;
            duplicate indices are summed (BCOO's meaning). Its stored entries must respect the
            spec (at most n per group of m for N:M, whole 1xN blocks, ...); an entry stored
            with value 0 counts as stored.
        spec: a spec or its string (`"2:4"`, `jsp.VNM(64, 2, 8)`, `jsp.Blocks(16, 0.25)`,
            `jsp.Int4(128)`, ...).

    Returns:
        The canonical format of `spec` (`NMSparse`, `VNMSparse`, `BlocksSparse`, `Int4Weight`,
        `Int4NMWeight`): the sparse formats keep exactly `m`'s entries; int4 quantises `m`'s
        values (module docstring) in the data's dtype.
    """
    where = "jaxsparse.from_bcoo"
    spec = as_spec(spec, name="spec", where=where)
    if not isinstance(m, jsparse.BCOO):
        raise TypeError(f"{where}: m must be a jax.experimental.sparse.BCOO, got "
                        f"{type(m).__name__}")
    if m.n_dense != 0 or m.ndim < 2:
        raise ValueError(f"{where}: m must be [..., in, out] with no dense dims; got shape "
                         f"{m.shape} with n_dense={m.n_dense}")
    V.check_float_dtype("m's data", m.dtype, where=where)
    dense = m.todense()
    stored = jsparse.BCOO((jnp.ones_like(m.data, jnp.int32), m.indices),
                          shape=m.shape).todense() > 0
    if isinstance(spec, Int4) and spec.sparsity is None:
        return spec.format.fromdense(dense, **spec._asdict())  # Dense int4: nothing to mask.
    return spec.format.frommask(dense, stored, **spec._asdict())
