"""The trace-time choice between the sparse kernel, the engine and the dense path, and every path's
results."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxsparse as jsp
from jaxsparse.ops import dispatch
from tests._check import DTYPES, assert_close, keys, random_array, random_nm, scale_for

# The dense path is XLA's dot: no CUDA kernel for the emulated pass to run.
PATH_PARAMS = ("sparse", "engine", pytest.param("dense", marks=pytest.mark.cpu_only))


def _uses_kernel(fn, *args) -> bool:
    """Whether the jaxpr of fn(*args) holds the N:M forward primitive."""
    return "jaxsparse_nm_spmm" in str(jax.make_jaxpr(fn)(*args))


def _uses_engine(fn, *args) -> bool:
    """Whether the jaxpr of fn(*args) holds the engine's (V:N:M's) forward primitive."""
    return "jaxsparse_vnm_spmm" in str(jax.make_jaxpr(fn)(*args))


def _path_of(fn, *args) -> str:
    if _uses_kernel(fn, *args):
        return "sparse"
    return "engine" if _uses_engine(fn, *args) else "dense"


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.cpu_only
def test_rule_follows_its_table(isa, dtype):
    def limit_in(tables, density):
        table = tables.get((isa, dtype)) or tables[("avx512", dtype)]
        return next(t for bound, t in table if density <= bound + 1e-9)

    beyond = "engine" if (isa, dtype) in dispatch.ENGINE_ROWS else "dense"
    for (n, m) in [(1, 4), (2, 8), (2, 4), (4, 8), (3, 4)]:
        spec = jsp.NM(n, m)
        engine = beyond if spec.has_engine else "dense"
        # 2:4 and 1:4 have their own table (2-bit positions, the AMX few-token kernel).
        own = dispatch.N4_MAX_TOKENS if spec.crossover_table == "NM4" else dispatch.SPARSE_MAX_TOKENS
        for tokens in (1, 16, 17, 31, 32, 64, 65, 128, 255, 256, 511, 512, 1023, 1024, 2048):
            got = jsp.choose_path(tokens, dtype, n / m, platform="cpu", isa=isa)
            limit = limit_in(dispatch.SPARSE_MAX_TOKENS, n / m)
            assert got == ("sparse" if tokens <= limit else beyond), (isa, dtype, n, m, tokens)
            got = jsp.choose_path(tokens, dtype, spec, platform="cpu", isa=isa)
            limit = limit_in(own, n / m)
            assert got == ("sparse" if tokens <= limit else engine), (isa, dtype, n, m, tokens)


@pytest.mark.cpu_only
def test_backward_on_the_engine_where_measured():
    rule = functools.partial(dispatch.backward_on_engine, platform="cpu", isa="amx")
    assert not rule(31, jnp.bfloat16, jsp.NM(2, 4)) and rule(32, jnp.bfloat16, jsp.NM(2, 4))
    assert not rule(127, jnp.float32, jsp.NM(1, 4)) and rule(128, jnp.float32, jsp.NM(1, 4))
    assert not rule(4096, jnp.float16, jsp.NM(2, 4))  # No row: N:M's kernels.
    assert not rule(4096, jnp.bfloat16, jsp.NM(2, 8))  # No engine for the spec.
    assert not dispatch.backward_on_engine(4096, jnp.bfloat16, jsp.NM(2, 4), platform="cpu",
                                           isa="avx512")
    assert not dispatch.backward_on_engine(4096, jnp.bfloat16, jsp.NM(2, 4), platform="cuda")


@pytest.mark.cpu_only
def test_int4_backward_on_the_dense_path_where_measured():
    rule = functools.partial(dispatch.int4_dense_backward, platform="cpu", isa="avx2")
    sparse, dense = jsp.Int4(128, sparsity=jsp.NM(2, 4)), jsp.Int4(128)
    assert not rule(31, jnp.float32, sparse) and rule(32, jnp.float32, sparse)
    assert not rule(127, jnp.float32, dense) and rule(128, jnp.float32, dense)
    assert not rule(191, jnp.bfloat16, dense) and rule(192, jnp.bfloat16, dense)
    assert not dispatch.int4_dense_backward(4096, jnp.float32, sparse, platform="cpu",
                                            isa="avx512")  # No row: the kernels.
    assert not dispatch.int4_dense_backward(4096, jnp.float32, sparse, platform="cuda")
    with jsp.matmul_path("sparse"):  # Forcing the kernel forces its backward too.
        assert not rule(4096, jnp.float32, sparse)


@pytest.mark.cpu_only
def test_two_to_four_and_one_to_four_read_their_own_table():
    assert jsp.NM(2, 4).crossover_table == jsp.NM(1, 4).crossover_table == "NM4"
    for spec in (jsp.NM(3, 4), jsp.NM(2, 8), jsp.NM(4, 8)):
        assert spec.crossover_table == "NM"
    # The only differences today: bf16 where the packed kernel runs on the tiles (AMX, or
    # vdpbf16ps on avx512bf16).
    differ = {key for key in dispatch.N4_MAX_TOKENS
              if dispatch.N4_MAX_TOKENS[key] != dispatch.SPARSE_MAX_TOKENS.get(key)}
    assert differ == {("amx", "bfloat16"), ("avx512bf16", "bfloat16")}


@pytest.mark.cpu_only
def test_avx512bf16_runs_two_to_four_bf16_on_the_engine_past_256_tokens():
    rule = functools.partial(jsp.choose_path, platform="cpu", isa="avx512bf16")
    # The packed kernel's tiles (vdpbf16ps) up to 255 tokens, then the engine (Zen 4: at 512
    # tokens 0.97x of XLA's bf16 dot against the kernel's 0.70x); 1:4 keeps its kernel.
    assert rule(255, jnp.bfloat16, jsp.NM(2, 4)) == "sparse"
    assert rule(256, jnp.bfloat16, jsp.NM(2, 4)) == "engine"
    assert rule(4096, jnp.bfloat16, jsp.NM(1, 4)) == "sparse"
    # f32 reads the AVX-512 row (the same kernels).
    assert rule(4096, jnp.float32, jsp.NM(2, 4)) == "sparse"
    backward = functools.partial(dispatch.backward_on_engine, platform="cpu", isa="avx512bf16")
    assert not backward(31, jnp.bfloat16, jsp.NM(2, 4)) and backward(32, jnp.bfloat16, jsp.NM(2, 4))
    assert not backward(4096, jnp.float32, jsp.NM(2, 4))


@pytest.mark.cpu_only
def test_rule_keeps_the_kernel_where_it_was_measured_faster():
    # The crossovers of docs/cpu_speed_notes.md: f32 and f16 always sparse on AVX-512; bf16 2:4
    # goes dense at large token counts, where XLA's AVX512-BF16 dot outruns f32 arithmetic and
    # amortizes the decompression.
    for tokens in (1, 16, 128, 2048):
        assert jsp.choose_path(tokens, jnp.float32, 0.5, platform="cpu", isa="avx512") == "sparse"
        assert jsp.choose_path(tokens, jnp.float16, 0.5, platform="cpu", isa="avx512") == "sparse"
    assert jsp.choose_path(1, jnp.bfloat16, 0.5, platform="cpu", isa="avx512") == "sparse"
    assert jsp.choose_path(2048, jnp.bfloat16, 0.5, platform="cpu", isa="avx512") == "dense"


@pytest.mark.cpu_only
def test_amx_runs_n_m_on_the_engine_past_its_crossovers():
    rule = functools.partial(jsp.choose_path, platform="cpu", isa="amx")
    # bf16: XLA's dot runs on the tiles; 2:4 and 1:4 run their packed kernel (on the tiles from
    # 12 tokens) up to 255 tokens, then the engine.
    for spec in (jsp.NM(2, 4), jsp.NM(1, 4)):
        assert rule(255, jnp.bfloat16, spec) == "sparse"
        assert rule(256, jnp.bfloat16, spec) == "engine"
        assert rule(2048, jnp.bfloat16, spec) == "engine"
    # A pattern the engine cannot take goes dense there, past the N:M kernel's 31 tokens.
    assert rule(31, jnp.bfloat16, jsp.NM(2, 8)) == "sparse"
    assert rule(32, jnp.bfloat16, jsp.NM(2, 8)) == "dense"
    # f32: 2:4 on the engine past 511 tokens; 1:4 always the kernel.
    assert rule(511, jnp.float32, jsp.NM(2, 4)) == "sparse"
    assert rule(512, jnp.float32, jsp.NM(2, 4)) == "engine"
    assert rule(4096, jnp.float32, jsp.NM(1, 4)) == "sparse"
    # f16 reads the AVX-512 row.
    for tokens in (1, 128, 2048):
        assert (rule(tokens, jnp.float16, 0.5)
                == jsp.choose_path(tokens, jnp.float16, 0.5, platform="cpu", isa="avx512"))
    # V:N:M has no table: its kernels (bf16 on the tiles) win at every measured shape.
    assert jsp.choose_path(2048, jnp.bfloat16, jsp.VNM(64, 2, 8), platform="cpu",
                           isa="amx") == "sparse"


@pytest.mark.cpu_only
def test_rule_off_the_cpu_is_the_kernel():
    assert jsp.choose_path(4096, jnp.bfloat16, 0.5, platform="gpu") == "sparse"


@pytest.mark.parametrize("kwargs,match", [
    (dict(tokens=-1, dtype="float32", density=0.5), r"tokens must be an int >= 0; got -1"),
    (dict(tokens=2.5, dtype="float32", density=0.5), r"tokens must be an int >= 0; got 2.5"),
    (dict(tokens=4, dtype="float32", density=0.0), r"density must be a number in \(0, 1\]; got 0.0"),
    (dict(tokens=4, dtype="float32", density="half"), r"density must be a number in \(0, 1\]"),
])
@pytest.mark.cpu_only
def test_rule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jsp.choose_path(**kwargs)


@pytest.mark.cpu_only
def test_every_table_row_is_well_formed():
    for key, table in dispatch.SPARSE_MAX_TOKENS.items():
        bounds = [b for b, _ in table]
        assert bounds == sorted(bounds) and bounds[-1] >= 1.0, key
        assert all(t >= 1 for _, t in table), key


# ------------------------------------------------------------------ forcing a path


@pytest.mark.cpu_only
def test_forcing_per_call_and_per_region():
    ws = random_nm(keys(70, 1)[0], 16, 8, 2, 4)
    x = jnp.ones((4, 16))
    assert _path_of(lambda x: jsp.matmul(x, ws, path="sparse"), x) == "sparse"
    assert _path_of(lambda x: jsp.matmul(x, ws, path="engine"), x) == "engine"
    assert _path_of(lambda x: jsp.matmul(x, ws, path="dense"), x) == "dense"
    with jsp.matmul_path("engine"):
        assert _path_of(lambda x: x @ ws, x) == "engine"
    with jsp.matmul_path("dense"):
        assert not _uses_kernel(lambda x: x @ ws, x)
        with jsp.matmul_path("sparse"):
            assert _uses_kernel(lambda x: x @ ws, x)
        assert not _uses_kernel(lambda x: x @ ws, x)
        assert _uses_kernel(lambda x: jsp.matmul(x, ws, path="sparse"), x)  # The call wins.
    assert dispatch.current_path() == "auto"


@pytest.mark.cpu_only
def test_region_is_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with jsp.matmul_path("dense"):
            raise RuntimeError("boom")
    assert dispatch.current_path() == "auto"


@pytest.mark.cpu_only
def test_layers_follow_the_region():
    from flax import nnx

    layer = jsp.nn.SparseLinear(16, 8, sparsity=jsp.NM(2, 4), rngs=nnx.Rngs(0))
    x = jnp.ones((3, 16))
    with jsp.matmul_path("dense"):
        assert not _uses_kernel(lambda x: layer(x), x)
    with jsp.matmul_path("sparse"):
        assert _uses_kernel(lambda x: layer(x), x)


@pytest.mark.parametrize("bad", ["fast", "", 3, "Dense"])
@pytest.mark.cpu_only
def test_bad_path_names_the_argument(bad):
    ws = random_nm(keys(71, 1)[0], 8, 4, 2, 4)
    with pytest.raises(ValueError, match=r"jaxsparse.matmul: path must be one of 'auto', 'sparse'"):
        jsp.matmul(jnp.ones((2, 8)), ws, path=bad)
    with pytest.raises(ValueError, match=r"jaxsparse.matmul_path: path must be one of"):
        jsp.matmul_path(bad)  # At the call, not only on entering the block.


@pytest.mark.cpu_only
def test_engine_path_of_a_pattern_without_an_engine_is_the_dense_path():
    ws = random_nm(keys(69, 1)[0], 16, 8, 2, 8)
    assert not ws.spec.has_engine
    assert _path_of(lambda x: jsp.matmul(x, ws, path="engine"), jnp.ones((4, 16))) == "dense"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.cpu_only
def test_auto_takes_the_path_the_rule_says(dtype):
    if not jsp.has_cpu_kernels() or jax.default_backend() != "cpu":
        pytest.skip("the rule's CPU table needs the CPU kernels")
    for spec in (jsp.NM(2, 4), jsp.NM(2, 8)):
        ws = jsp.fromdense(random_array(keys(72, 1)[0], (64, 32), dtype), spec)
        for tokens in (1, 16, 32, 600, 2048):
            x = jnp.ones((tokens, 64), dtype)
            want = jsp.choose_path(tokens, dtype, ws.spec)
            assert _path_of(lambda x: x @ ws, x) == want, (spec, tokens)


# ------------------------------------------------------------------ both paths compute the product


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,out,n,m", [((1,), 8, 4, 2, 4), ((3, 5), 37, 19, 2, 4),
                                            ((17,), 64, 33, 1, 4), ((2, 65), 40, 16, 4, 8),
                                            ((), 21, 6, 3, 7)])
def test_each_path_matches_the_dense_product(path, dtype, lead, k, out, n, m):
    kx, kw = keys(73, 2)
    x = random_array(kx, (*lead, k), dtype)
    ws = random_nm(kw, k, out, n, m, dtype)
    want = jnp.matmul(x.astype(jnp.float32), ws.todense().astype(jnp.float32))
    for fn in (jsp.matmul, jax.jit(jsp.matmul, static_argnames="path")):
        got = fn(x, ws, path=path)
        assert got.shape == (*lead, out) and got.dtype == dtype
        assert_close(got, want, dtype, scale_for(k))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_each_path_with_a_stack_of_weights(path):
    kx, kw = keys(74, 2)
    x = random_array(kx, (3, 5, 24))
    ws = random_nm(kw, 24, 10, 2, 4, batch=(3,))
    want = jnp.matmul(x, ws.todense())
    assert_close(jsp.matmul(x, ws, path=path), want, jnp.float32, scale_for(24))
    assert_close(jsp.matmul(x[0, 0], ws, path=path), jnp.matmul(x[0, 0], ws.todense()), jnp.float32,
                 scale_for(24))


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_each_path_differentiates_like_the_other(path):
    kx, kw = keys(75, 2)
    x = random_array(kx, (6, 32))
    ws = random_nm(kw, 32, 12, 2, 4)

    def loss(v, x):
        return jnp.sum(jnp.sin(jsp.matmul(x, ws.replace(values=v), path=path)))

    def dense_loss(v, x):
        return jnp.sum(jnp.sin(x @ ws.replace(values=v).todense()))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(ws.values, x)
    want = jax.grad(dense_loss, argnums=(0, 1))(ws.values, x)
    for g, w in zip(got, want):
        assert_close(g, w, jnp.float32, scale_for(32))
    check_grads(loss, (ws.values, x), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-3)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_each_path_under_vmap(path):
    kx, kw = keys(76, 2)
    x = random_array(kx, (4, 3, 16))
    ws = random_nm(kw, 16, 8, 2, 4)
    got = jax.vmap(lambda x: jsp.matmul(x, ws, path=path), in_axes=1)(x)
    want = jnp.stack([x[:, i] @ ws.todense() for i in range(3)])
    assert_close(got, want, jnp.float32, scale_for(16))


@pytest.mark.cpu_only
def test_tokens_count_every_leading_dim():
    from jaxsparse.ops.matmul import _tokens

    ws = random_nm(keys(77, 1)[0], 8, 4, 2, 4)
    assert _tokens(jnp.ones((3, 5, 8)), ws) == 15
    assert _tokens(jnp.ones((8,)), ws) == 1
    stack = random_nm(keys(78, 1)[0], 8, 4, 2, 4, batch=(2,))
    assert _tokens(jnp.ones((2, 7, 8)), stack) == 7
    assert math.isinf(dispatch.SPARSE_MAX_TOKENS[("avx512", "float32")][-1][1])
    assert np.dtype(jnp.bfloat16).name == "bfloat16"


@pytest.mark.cpu_only
def test_rule_reads_the_table_of_the_spec_format():
    rule = functools.partial(jsp.choose_path, platform="cpu", isa="avx512")
    # V:N:M has no table (its kernels won at every measured shape): always the kernel, even
    # where the N:M table at the same density picks the dense path.
    assert rule(2048, jnp.bfloat16, 0.25) == rule(2048, jnp.bfloat16, jsp.NM(1, 4))
    assert rule(4096, jnp.bfloat16, 0.5) == "dense"
    assert rule(4096, jnp.bfloat16, jsp.VNM(16, 2, 4)) == "sparse"  # density 1/2, V:N:M's table
    assert rule(2048, jnp.float32, jsp.VNM(64, 2, 8)) == "sparse"
    # An N:M spec reads the N:M table by its density, as a number does.
    for t in (1, 1024, 4096):
        assert rule(t, jnp.bfloat16, jsp.NM(2, 4)) == rule(t, jnp.bfloat16, 0.5)
    assert rule(1, jnp.float32, jsp.VNM(64, 2, 8)) == "sparse"
