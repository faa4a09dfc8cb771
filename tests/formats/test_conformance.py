"""The conformance suite every weight format passes (the seam of jaxsparse/formats/_base.py).

Parametrised by format: each entry of CASES is a spec with a layer shape. A new format joins by
adding its specs here; its own test file then holds only its special cases. Covered: round
trips; products and both gradients against the dense weight; jit, vmap, grad, jvp, vmap(grad)
and grad(grad); stacked weights; bad inputs; nnx and linen layers (forward and gradients);
checkpoints (flax.serialization and orbax, bit-exact, size scaling with density).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx, serialization
from jax.test_util import check_grads

import jaxsparse as jsp
from tests._check import DTYPES, assert_close, random_array, scale_for


class Case(NamedTuple):
    spec: object
    in_features: int
    out_features: int

    def __str__(self):
        return f"{self.spec}-{self.in_features}x{self.out_features}"


# Shapes with a ragged last group (in not a multiple of m) and a partial last panel (out not a
# multiple of v), beside whole ones.
CASES = [
    Case(jsp.NM(2, 4), 16, 8),
    Case(jsp.NM(1, 4), 10, 5),
    Case(jsp.NM(3, 7), 23, 9),
    Case(jsp.VNM(16, 2, 8), 64, 48),
    Case(jsp.VNM(16, 2, 8), 70, 40),
    Case(jsp.VNM(32, 1, 5), 23, 40),
    Case(jsp.VNM(16, 2, 16), 50, 16),
    Case(jsp.VNM(32, 2, 32), 96, 33),
    Case(jsp.Blocks(16, 0.25), 64, 48),
    Case(jsp.Blocks(4, 0.5), 23, 10),
    Case(jsp.Blocks(8, 0.3), 40, 21),
    # Balanced over 4 runs of 10 inputs, stacked (row parallel), a partial last block row.
    Case(jsp.Blocks(8, 0.3, shards=4, split="in"), 40, 21),
]
# One N:M, two V:N:M and one 1xN case (a partial last block row) for the costlier checks.
FAST = [CASES[0], CASES[4], CASES[5], CASES[10]]
FAST_IDS = [str(c) for c in FAST]
# Every case, the ones beyond FAST marked `once` (tests/conftest.py): the shapes they add (ragged
# groups, partial panels) reach jax-independent code, so CI's older jax runs the FAST ones.
ALL = [pytest.param(c, id=str(c), marks=() if c in FAST else pytest.mark.once) for c in CASES]


def dense_weight(case, seed=0, dtype=jnp.float32, batch=()):
    shape = (*batch, case.in_features, case.out_features)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def sparse_weight(case, seed=0, dtype=jnp.float32, batch=()):
    return jsp.fromdense(dense_weight(case, seed, dtype, batch), case.spec)


def tokens(case, t, seed=1, dtype=jnp.float32, lead=()):
    return jnp.asarray(
        np.random.default_rng(seed).standard_normal((*lead, t, case.in_features)), dtype
    )


def static(case):
    """The constructor's static sizes: `in_features`, and `out_features` for formats that hold
    it (`STATIC_OUT`: 1xN blocks)."""
    sizes = {"in_features": case.in_features}
    if case.spec.format.STATIC_OUT:
        sizes["out_features"] = case.out_features
    return sizes


def bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 1: np.uint8}[a.dtype.itemsize])


# ====================================================================== round trips
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL)
def test_round_trips_are_bit_exact(case, dtype):
    w = dense_weight(case, dtype=dtype)
    ws = jsp.fromdense(w, case.spec)
    assert isinstance(ws, case.spec.format) and ws.spec == case.spec
    assert ws.shape == w.shape and ws.dtype == dtype and ws.batch_shape == ()
    mask = ws.mask()
    assert mask.shape == w.shape and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(bits(ws.todense()), bits(jnp.where(mask, w, 0)))
    np.testing.assert_array_equal(mask, case.spec.magnitude_mask(w))
    again = jsp.frommask(w, mask, case.spec)
    np.testing.assert_array_equal(bits(again.todense()), bits(ws.todense()))
    # The format's own constructor and the generic entry agree, and re-validate.
    direct = case.spec.format.fromdense(w, **case.spec._asdict())
    for name in ws.array_names():
        np.testing.assert_array_equal(bits(getattr(direct, name)), bits(getattr(ws, name)))
    rebuilt = case.spec.format(**ws.arrays(), **case.spec._asdict(), **static(case))
    np.testing.assert_array_equal(bits(rebuilt.todense()), bits(ws.todense()))


@pytest.mark.parametrize("case", ALL)
def test_density_nbytes_and_declared_arrays(case):
    ws = sparse_weight(case)
    kept = int(ws.mask().sum())
    if isinstance(case.spec, jsp.Blocks):
        # Every stored block is distinct; only the padding outputs of a partial last block row
        # are not in the mask.
        rows = ws.block_mask().sum(axis=-2)
        real = np.minimum(case.spec.n, case.out_features - case.spec.n * np.arange(rows.size))
        assert kept == int((rows * real).sum()) and ws.values.shape[0] == int(rows.sum())
        assert ws.density == case.spec.density
    else:
        # Every stored slot is a distinct position; only slots of a ragged last group that
        # point into the padding are not in the mask.
        n_per_group = case.spec.n
        assert ws.values.size - case.out_features * n_per_group <= kept <= ws.values.size
        if case.in_features % case.spec.m == 0:
            assert kept == ws.values.size
        assert ws.density == pytest.approx(
            ws.values.size / (case.in_features * case.out_features))
    assert ws.nbytes == sum(a.nbytes for a in ws.arrays().values())
    assert ws.arrays_with_role(jsp.formats.TRAINABLE) == ("values",)
    shapes = ws.array_shapes(case.spec, case.in_features, case.out_features)
    for name, (shape, dtype) in shapes.items():
        assert getattr(ws, name).shape == shape
        assert getattr(ws, name).dtype == (dtype or ws.dtype)
    assert repr(ws).startswith(type(ws).__name__) and str(case.spec) in repr(ws)


@pytest.mark.parametrize("case", ALL)
def test_pytree_replace_and_astype(case):
    ws = sparse_weight(case)
    leaves, tree = jax.tree.flatten(ws)
    assert len(leaves) == len(ws.array_names())
    back = jax.tree.unflatten(tree, leaves)
    np.testing.assert_array_equal(back.todense(), ws.todense())
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ws)[0]]
    assert paths == [f".{n}" for n in ws.array_names()]
    doubled = ws.replace(values=ws.values * 2)
    np.testing.assert_array_equal(doubled.todense(), ws.todense() * 2)
    jitted = jax.jit(lambda w, v: w.replace(values=v))(ws, ws.values + 1)
    assert jitted.shape == ws.shape
    half = ws.astype(jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    for name in ws.arrays_with_role(jsp.formats.FROZEN):
        assert getattr(half, name).dtype == getattr(ws, name).dtype
    with pytest.raises(ValueError, match="must keep the shape"):
        ws.replace(values=ws.values[:1])
    with pytest.raises(TypeError, match="unknown fields"):
        ws.replace(kernel=ws.values)


# ====================================================================== products and gradients
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL)
def test_product_and_both_gradients_against_dense(case, dtype):
    ws = sparse_weight(case, dtype=dtype)
    dense = ws.todense().astype(jnp.float32)
    x = tokens(case, 5, dtype=dtype)
    s = scale_for(case.in_features)
    y = x @ ws
    assert y.shape == (5, case.out_features) and y.dtype == dtype
    assert_close(y, x.astype(jnp.float32) @ dense, dtype, s)
    assert_close(jax.jit(jsp.matmul)(x, ws), y, dtype, s)

    def loss(x, values):
        return jnp.sum((x @ ws.replace(values=values)).astype(jnp.float32) ** 2)

    gx, gv = jax.grad(loss, argnums=(0, 1))(x, ws.values)
    gx_dense, gw_dense = jax.grad(
        lambda x, w: jnp.sum((x.astype(jnp.float32) @ w) ** 2), argnums=(0, 1)
    )(x, dense)
    assert gx.dtype == dtype and gv.shape == ws.values.shape
    assert_close(gx, gx_dense, dtype, s * s)
    # The values' gradient is the dense gradient at the kept positions.
    sampled = jsp.frommask(gw_dense, ws.mask(), case.spec)
    ref = jsp.frommask(dense, ws.mask(), case.spec)  # Same slot order as ws.
    np.testing.assert_array_equal(ref.values, ws.values.astype(jnp.float32))
    assert_close(gv, sampled.values, dtype, s * s)


@pytest.mark.parametrize("case", FAST, ids=FAST_IDS)
def test_both_paths_agree(case):
    ws = sparse_weight(case)
    x = tokens(case, 7)
    sparse = jsp.matmul(x, ws, path="sparse")
    dense = jsp.matmul(x, ws, path="dense")
    assert_close(sparse, dense, jnp.float32, scale_for(case.in_features))


# ====================================================================== transformations
@pytest.mark.parametrize("case", FAST, ids=FAST_IDS)
def test_jit_vmap_jvp_and_higher_order_gradients(case):
    ws = sparse_weight(case)
    x = tokens(case, 6, lead=(3,))  # [3, 6, in]
    f = lambda x, v: x @ ws.replace(values=v)  # noqa: E731
    want = jnp.stack([f(xi, ws.values) for xi in x])
    s = scale_for(case.in_features)
    assert_close(jax.jit(f)(x, ws.values), want, jnp.float32, s)
    for axis in (0, 1, 2):
        got = jax.vmap(f, in_axes=(axis, None), out_axes=axis)(jnp.moveaxis(x, 0, axis), ws.values)
        assert_close(jnp.moveaxis(got, axis, 0), want, jnp.float32, s)
    # A different value vector per example (vmap over the trainable array).
    vs = jnp.stack([ws.values, -ws.values, 2 * ws.values])
    got = jax.vmap(f)(x, vs)
    assert_close(got, jnp.stack([f(x[i], vs[i]) for i in range(3)]), jnp.float32, s)
    # jvp in both operands.
    tx, tv = jnp.ones_like(x[0]), jnp.ones_like(ws.values)
    out, tangent = jax.jvp(f, (x[0], ws.values), (tx, tv))
    assert_close(tangent, f(tx, ws.values) + f(x[0], tv), jnp.float32, s)
    # Gradients of first and second order, in both modes.
    check_grads(f, (x[0], ws.values), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)
    loss = lambda v, x: jnp.sum(jnp.tanh(f(x, v)))  # noqa: E731
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(ws.values, x)
    assert_close(per_example, jnp.stack([jax.grad(loss)(ws.values, xi) for xi in x]),
                 jnp.float32, s)
    hvp = jax.grad(lambda v: jnp.vdot(jax.grad(loss)(v, x[0]), tv))(ws.values)
    assert hvp.shape == ws.values.shape and bool(jnp.all(jnp.isfinite(hvp)))


@pytest.mark.parametrize("case", FAST, ids=FAST_IDS)
def test_stacked_weights(case):
    stack = sparse_weight(case, batch=(3,))
    assert stack.batch_shape == (3,) and stack.shape == (3, case.in_features, case.out_features)
    singles = [jsp.fromdense(w, case.spec) for w in dense_weight(case, batch=(3,))]
    for name in stack.array_names():
        np.testing.assert_array_equal(getattr(stack, name), jnp.stack(
            [getattr(w, name) for w in singles]))
    vmapped = jax.vmap(lambda w: jsp.fromdense(w, case.spec))(dense_weight(case, batch=(3,)))
    np.testing.assert_array_equal(vmapped.todense(), stack.todense())
    s = scale_for(case.in_features)
    x = tokens(case, 4, lead=(3,))
    want = jnp.stack([x[i] @ singles[i] for i in range(3)])
    assert_close(x @ stack, want, jnp.float32, s)  # A stack times a stack of inputs.
    shared = tokens(case, 4)
    assert_close(shared @ stack, jnp.stack([shared @ w for w in singles]), jnp.float32, s)
    assert_close(jax.vmap(lambda w: shared @ w)(stack), shared @ stack, jnp.float32, s)
    grads = jax.grad(lambda v: jnp.sum(x @ stack.replace(values=v)))(stack.values)
    for i in range(3):
        g = jax.grad(lambda v: jnp.sum(x[i] @ singles[i].replace(values=v)))(singles[i].values)
        assert_close(grads[i], g, jnp.float32, s)


# ====================================================================== bad inputs
@pytest.mark.parametrize("case", ALL[::2])
def test_bad_inputs_are_named(case):
    ws = sparse_weight(case)
    with pytest.raises(ValueError, match=rf"x must have last dimension {case.in_features}"):
        jnp.ones((2, case.in_features + 1)) @ ws
    with pytest.raises(TypeError, match="x must be a float array, got dtype int32"):
        jnp.ones((2, case.in_features), jnp.int32) @ ws
    with pytest.raises(TypeError, match=f"{type(ws).__name__} @ x is not supported"):
        ws @ jnp.ones((case.out_features, 2))
    with pytest.raises(TypeError, match="w must be a jaxsparse sparse format"):
        jsp.matmul(jnp.ones((2, 4)), np.ones((4, 4)))
    fmt, params = case.spec.format, case.spec._asdict()
    with pytest.raises(ValueError, match="w must have at least 2 dimensions"):
        fmt.fromdense(jnp.ones(case.in_features), **params)
    with pytest.raises(TypeError, match="w must have dtype"):
        fmt.fromdense(jnp.ones((case.in_features, 4), jnp.int32), **params)
    with pytest.raises(ValueError, match="mask must have the shape of w"):
        fmt.frommask(dense_weight(case), jnp.ones((1, 1), bool), **params)
    with pytest.raises(ValueError, match="allows at most"):
        fmt.frommask(dense_weight(case), jnp.ones((case.in_features, case.out_features), bool),
                     **params)
    arrays = ws.arrays()
    with pytest.raises(ValueError, match="must have shape|must have last dimension"):
        fmt(**{**arrays, "values": arrays["values"][:, :-1]}, **params, **static(case))
    frozen = ws.arrays_with_role(jsp.formats.FROZEN)[0]
    corrupt = np.asarray(arrays[frozen]).copy()
    corrupt.reshape(-1)[0] = 250
    with pytest.raises(ValueError, match=f"{frozen} must"):
        fmt(**{**arrays, frozen: corrupt}, **params, **static(case))
    with pytest.raises(ValueError, match="spec must be a spec"):
        jsp.fromdense(dense_weight(case), str(case.spec) + ":")


# ====================================================================== layers
@pytest.mark.parametrize("case", FAST, ids=FAST_IDS)
def test_nnx_layer_forward_and_gradients(case):
    layer = jsp.nn.SparseLinear(case.in_features, case.out_features, sparsity=case.spec,
                                rngs=nnx.Rngs(0))
    fmt = case.spec.format
    for name in fmt.array_names():
        var = getattr(layer, name)
        trainable = name in fmt.arrays_with_role(jsp.formats.TRAINABLE)
        assert isinstance(var, nnx.Param if trainable else jsp.nn.SparsityIndices), name
    x = tokens(case, 5)
    w = layer.weight
    assert isinstance(w, fmt)
    s = scale_for(case.in_features)
    assert_close(layer(x), x @ w.todense() + layer.bias[...], jnp.float32, s)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert {path for path, _ in nnx.to_flat_state(grads)} == {("values",), ("bias",)}
    want = jax.grad(lambda v: jnp.sum((x @ w.replace(values=v) + layer.bias[...]) ** 2))(w.values)
    assert_close(grads["values"][...], want, jnp.float32, s * s)
    dense = jsp.nn.densify(nnx.Sequential(layer))
    assert_close(dense(x), layer(x), jnp.float32, s)
    back = jsp.nn.sparsify(dense, case.spec)
    assert_close(back(x), layer(x), jnp.float32, s)


@pytest.mark.parametrize("case", FAST, ids=FAST_IDS)
def test_linen_layer_forward_gradients_and_surgery(case):
    layer = jsp.linen.SparseDense(case.out_features, sparsity=str(case.spec), name="fc")
    x = tokens(case, 5)
    variables = layer.init(jax.random.key(0), x)
    fmt = case.spec.format
    assert set(variables["params"]) == {*fmt.arrays_with_role(jsp.formats.TRAINABLE), "bias"}
    assert set(variables["sparsity"]) == set(fmt.arrays_with_role(jsp.formats.FROZEN))
    unboxed = linen.meta.unbox(variables)
    arrays = {**unboxed["params"], **unboxed["sparsity"]}
    w = fmt.from_arrays(case.spec, case.in_features, {n: arrays[n] for n in fmt.array_names()},
                        out_features=case.out_features)
    s = scale_for(case.in_features)
    assert_close(layer.apply(variables, x), x @ w.todense() + unboxed["params"]["bias"],
                 jnp.float32, s)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({**variables, "params": p}, x) ** 2))(
        variables["params"])
    want = jax.grad(lambda v: jnp.sum((x @ w.replace(values=v) + unboxed["params"]["bias"]) ** 2))(
        w.values)
    assert_close(grads["values"], want, jnp.float32, s * s)
    dense_vars = {"params": {"fc": {"kernel": w.todense(), "bias": unboxed["params"]["bias"]}}}
    sparse_vars = jsp.linen.sparsify(dense_vars, case.spec)
    class Wrap(linen.Module):
        @linen.compact
        def __call__(self, x):
            return jsp.linen.SparseDense(case.out_features, sparsity=case.spec, name="fc")(x)

    assert_close(Wrap().apply(sparse_vars, x), layer.apply(variables, x), jnp.float32, s)
    round_trip = jsp.linen.densify(sparse_vars)
    np.testing.assert_array_equal(round_trip["params"]["fc"]["kernel"], w.todense())


# ====================================================================== checkpoints
class _Net(nnx.Module):
    def __init__(self, case, seed=0):
        rngs = nnx.Rngs(seed)
        self.fc = jsp.nn.SparseLinear(case.in_features, case.out_features, sparsity=case.spec,
                                      rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def _assert_same_state(a, b):
    fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    for (path, va), (_, vb) in zip(fa, fb):
        assert type(va) is type(vb), path
        np.testing.assert_array_equal(bits(va[...]), bits(vb[...]), err_msg=str(path))


@pytest.mark.parametrize("case", FAST, ids=FAST_IDS)
def test_checkpoints_are_bit_exact(case, tmp_path):
    net, fresh = _Net(case, seed=0), _Net(case, seed=1)
    net.fc.values.set_value(net.fc.values[...] * 1.5)  # Not what a fresh layer holds.
    data = serialization.to_bytes(nnx.to_pure_dict(nnx.state(net)))
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), data))
    nnx.update(fresh, state)
    _assert_same_state(fresh, net)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, nnx.state(net))
    target = _Net(case, seed=2)
    abstract = nnx.state(target)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path, abstract)
    nnx.update(target, restored)
    _assert_same_state(target, net)
    x = tokens(case, 3)
    np.testing.assert_array_equal(bits(target(x)), bits(net(x)))


def test_saved_size_scales_with_density():
    sizes = {}
    for spec in (jsp.NM(2, 4), jsp.VNM(64, 2, 8), jsp.VNM(64, 2, 16), jsp.VNM(64, 2, 32)):
        layer = jsp.nn.SparseLinear(512, 256, sparsity=spec, use_bias=False, rngs=nnx.Rngs(0))
        sizes[spec] = len(serialization.to_bytes(nnx.to_pure_dict(nnx.state(layer))))
    dense = 512 * 256 * 4
    for spec, size in sizes.items():
        # values (4 bytes) + one byte per value + the panels' columns, plus msgpack framing.
        ideal = dense * spec.density * 5 / 4
        assert ideal <= size < ideal * 1.1, (spec, size, ideal)
