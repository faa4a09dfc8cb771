"""pack_mma_sp_24 against a NumPy model of the mma.sp metadata layout (KERNELS.md 1.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse.ops import pack_mma_sp_24

# No CUDA kernel reads these (CPU layouts, or the layout model): the emulated pass skips them.
pytestmark = pytest.mark.cpu_only


def metadata_model(indices):
    """Loops straight from the layout: lane 4g + 2s + h of (m-tile i, k-tile p) holds rows 16i + g
    (bits 0-15) and 16i + g + 8 (bits 16-31), groups 16p + 8s + 4h + c at bits 4c (+16)."""
    n_out, kept = indices.shape
    groups = kept // 2
    m_tiles, k_tiles = -(-n_out // 16), -(-groups // 16)
    out = np.zeros((m_tiles, k_tiles, 32), np.uint32)
    for i in range(m_tiles):
        for p in range(k_tiles):
            for lane in range(32):
                g, s, h = lane >> 2, (lane >> 1) & 1, lane & 1
                word = 0
                for r in range(2):
                    for c in range(4):
                        row, grp = 16 * i + g + 8 * r, 16 * p + 8 * s + 4 * h + c
                        if row < n_out and grp < groups:
                            code = int(indices[row, 2 * grp]) | (int(indices[row, 2 * grp + 1]) << 2)
                        else:
                            code = 0b0100
                        word |= code << (16 * r + 4 * c)
                out[i, p, lane] = word
    return out


def dense_of(values, indices):
    """[N, K] f64 the entries describe (entries at positions >= 4 contribute nothing)."""
    n_out, kept = values.shape
    dense = np.zeros((n_out, kept * 2))
    v = np.asarray(values.astype(jnp.float32), np.float64)
    for j in range(n_out):
        for e in range(kept):
            if indices[j, e] < 4:
                dense[j, (e // 2) * 4 + indices[j, e]] += v[j, e]
    return dense


def decode(packed, metadata, n_out, k):
    """The dense matrix the kernel sees: packed values placed by the metadata codes."""
    dense = np.zeros((n_out, k))
    v = np.asarray(packed.astype(jnp.float32), np.float64)
    meta = np.asarray(metadata)
    for j in range(n_out):
        i, g, r = j // 16, j % 8, (j % 16) // 8
        for grp in range(k // 4):
            p, s, h, c = grp // 16, (grp % 16) // 8, (grp % 8) // 4, grp % 4
            code = (int(meta[i, p, 4 * g + 2 * s + h]) >> (16 * r + 4 * c)) & 0xF
            p0, p1 = code & 3, code >> 2
            assert p0 < p1, "ordered_metadata needs increasing positions"
            dense[j, 4 * grp + p0] += v[j, 2 * grp]
            dense[j, 4 * grp + p1] += v[j, 2 * grp + 1]
    return dense


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n_out,k", [(16, 64), (37, 80), (5, 16), (64, 192)])
def test_metadata_matches_the_model(dtype, n_out, k):
    w = jax.random.normal(jax.random.key(n_out + k), (k, n_out), jnp.float32).astype(dtype)
    ws = jsp.NMSparse.fromdense(w, n=2, m=4)
    values, indices = ws.values, ws.indices
    packed, metadata = jax.jit(pack_mma_sp_24)(values, indices)
    np.testing.assert_array_equal(np.asarray(packed.view(jnp.uint16)),
                                  np.asarray(values.view(jnp.uint16)))
    assert metadata.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(metadata), metadata_model(np.asarray(indices)))


def test_malformed_groups_become_valid_and_keep_their_meaning():
    rng = np.random.default_rng(0)
    n_out, k = 20, 64
    indices = rng.integers(0, 6, size=(n_out, k // 2)).astype(np.uint8)  # >= 4, unordered, equal.
    values = jnp.asarray(rng.integers(-8, 8, size=(n_out, k // 2)), jnp.bfloat16)
    packed, metadata = pack_mma_sp_24(values, jnp.asarray(indices))
    np.testing.assert_array_equal(decode(packed, metadata, n_out, k), dense_of(values, indices))


def test_batched_and_bad_shapes():
    w = jax.random.normal(jax.random.key(1), (3, 32, 24), jnp.float32).astype(jnp.bfloat16)
    ws = jsp.NMSparse.fromdense(w, n=2, m=4)
    packed, metadata = pack_mma_sp_24(ws.values, ws.indices)
    assert metadata.shape == (3, 2, 1, 32)
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(metadata[b]),
                                      metadata_model(np.asarray(ws.indices[b])))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_mma_sp_24(ws.values[..., :4], ws.indices[..., :4])
    with pytest.raises(ValueError, match="indices must have the shape of values"):
        pack_mma_sp_24(ws.values, ws.indices[..., :8])
