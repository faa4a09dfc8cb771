"""The sharded checks of tests/test_sharding.py, run in a fresh process on 8 forced CPU devices
(XLA reads the device count when jax starts its backend, which pytest's process did already).

`python -m tests._sharding_worker` prints one JSON object: `{check id: result}`, each result a
dict of what the test asserts (errors, sharding specs, collectives in the compiled HLO)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAXSPARSE_CROSSOVERS"] = "builtin"

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxsparse as jsp  # noqa: E402

IN, OUT, TOKENS = 256, 512, 32  # Column parallel over 8: 64 outputs a shard (V:N:M's v, lines).


def formats():
    """`{name: weight}`: every CPU format at [IN, OUT]."""
    w = jax.random.normal(jax.random.key(0), (IN, OUT), jnp.float32)
    return {
        "nm24": jsp.fromdense(w, jsp.NM(2, 4)),
        "nm24_bf16": jsp.fromdense(w.astype(jnp.bfloat16), jsp.NM(2, 4)),
        "nm28": jsp.fromdense(w, jsp.NM(2, 8)),
        "vnm": jsp.fromdense(w, jsp.VNM(64, 2, 8)),
        "vnm_tiled": jsp.fromdense(w, jsp.VNM(64, 2, 8)).with_tiles(),
        # bf16 tiles: k steps of 8 groups (64 inputs), so row parallel over 4 devices, not 8.
        "vnm_tiled_bf16": jsp.fromdense(w.astype(jnp.bfloat16), jsp.VNM(64, 2, 8)).with_tiles(),
        "blocks": jsp.fromdense(w, jsp.Blocks(16, 0.25)),
        # Equal block counts in 8 runs of outputs: column parallel over 8 (or 4, 2) devices.
        "blocks_shards": jsp.fromdense(w, jsp.Blocks(16, 0.25, shards=8)),
        # Equal block counts in 8 runs of inputs (stacked): row parallel over 8 (or 4, 2).
        "blocks_rows": jsp.fromdense(w, jsp.Blocks(16, 0.25, shards=8, split="in")),
        "int4": jsp.fromdense(w, jsp.Int4(32)),
        # One scale per column: row shards keep all of them.
        "int4_channel": jsp.fromdense(w, jsp.Int4(None)),
        "int4_nm_lines_channel": jsp.fromdense(w, jsp.Int4(None, jsp.NM(2, 4))).with_lines(),
        "int4_lines": jsp.fromdense(w, jsp.Int4(32)).with_lines(),
        "w4a8": jsp.fromdense(w, jsp.Int4(32, activations="int8")),
        "int4_nm": jsp.fromdense(w, jsp.Int4(32, sparsity=jsp.NM(2, 4))),
        "int4_nm_lines": jsp.fromdense(w, jsp.Int4(32, sparsity=jsp.NM(2, 4))).with_lines(),
    }


def collectives(hlo: str) -> dict:
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo))
            for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")}


def spec_of(y) -> list:
    """y's PartitionSpec as strings, trailing unsplit dims dropped (jax versions differ)."""
    spec = [None if s is None else str(s) for s in y.sharding.spec]
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def product(x, w):
    return jsp.matmul(x, w, path="sparse")


def check_mode(name, w, mesh, mode, axis, x):
    """Product sharded in `mode` against the single-device one."""
    try:
        ws = jsp.shard_weight(w, mesh, mode, axis)
    except ValueError as e:
        return {"error": str(e)}
    xs = jsp.shard_x(x, mesh, mode, axis)
    fn = jax.jit(product)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A fallback warning fails the check.
        y = fn(xs, ws)
        hlo = fn.lower(xs, ws).compile().as_text()
    want = product(x, w)
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - want.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    return {"err": err, "scale": scale, "spec": spec_of(y),
            "collectives": collectives(hlo)}


def backward(x, w, ct, wrt_weight):
    """x's cotangent, and the weight arrays' where the format trains them."""
    if wrt_weight:
        return jax.vjp(product, x, w)[1](ct)
    return jax.vjp(lambda x: product(x, w), x)[1](ct)


def trains_weight(w, x, ct):
    try:
        jax.eval_shape(lambda x, w, ct: backward(x, w, ct, True), x, w, ct)
        return True
    except ValueError:  # Frozen arrays (int4, packed tiles) say so.
        return False


def check_backward(name, w, mesh, mode, axis, x):
    """The backward kernels (x's cotangent, the weight's) of a jit over operands sharded in
    `mode`, against one device's."""
    try:
        ws = jsp.shard_weight(w, mesh, mode, axis)
    except ValueError as e:
        return {"error": str(e)}
    xs = jsp.shard_x(x, mesh, mode, axis)
    ct = jax.random.normal(jax.random.key(2), (x.shape[0], OUT), jnp.float32).astype(x.dtype)
    cts = jax.device_put(ct, NamedSharding(mesh, {"data": P(axis), "column": P(None, axis),
                                                  "row": P()}[mode]))
    wrt_weight = trains_weight(w, x, ct)
    fn = jax.jit(backward, static_argnums=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fn(xs, ws, cts, wrt_weight)
        hlo = fn.lower(xs, ws, cts, wrt_weight).compile().as_text()
    want = backward(x, w, ct, wrt_weight)
    pairs = [(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
             if jnp.issubdtype(b.dtype, jnp.floating)]
    err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
              for a, b in pairs)
    scale = max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))) for _, b in pairs)
    # Forward mode: the tangent in x (along x itself) against one device's.
    tangent = jax.jit(lambda x, w: jax.jvp(lambda x: product(x, w), (x,), (x,))[1])
    jvp_err = float(jnp.max(jnp.abs(tangent(xs, ws).astype(jnp.float32) -
                                    tangent(x, w).astype(jnp.float32))))
    return {"err": err, "scale": scale, "weight": wrt_weight, "grads": len(pairs),
            "x_spec": spec_of(got[0]), "collectives": collectives(hlo), "jvp_err": jvp_err,
            "jvp_collectives": collectives(tangent.lower(xs, ws).compile().as_text())}


def check_2d(w, x, modes=("column", "row")):
    """A (2, 4) mesh: tokens over "data" and the weight over "model" in each of `modes`."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    out = {}
    for mode in modes:
        ws = jsp.shard_weight(w, mesh, mode, "model")
        xspec = P("data", "model" if mode == "row" else None)
        xs = jax.device_put(x, NamedSharding(mesh, xspec))
        fn = jax.jit(product)
        y = fn(xs, ws)
        hlo = fn.lower(xs, ws).compile().as_text()
        want = product(x, w).astype(jnp.float32)
        out[mode] = {"err": float(jnp.max(jnp.abs(y.astype(jnp.float32) - want))),
                     "scale": float(jnp.max(jnp.abs(want))),
                     "spec": spec_of(y),
                     "collectives": collectives(hlo)}
    return out


def check_fallback(w, mesh, x):
    """A 1xN weight split by hand over its blocks (no mode it declares): correct, warned."""
    arrays = {n: jax.device_put(a, NamedSharding(mesh, P("d") if n == "values" else P()))
              for n, a in w.arrays().items()}
    ws = type(w)._unflatten(w._aux, tuple(arrays[n] for n in type(w).array_names()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = jax.jit(product)(x, ws)
    return {"err": float(jnp.max(jnp.abs(y - product(x, w)))),
            "warned": [str(c.message) for c in caught
                       if issubclass(c.category, jsp.JaxsparseShardingWarning)]}


def check_layer(mesh, x, mode="column"):
    """An nnx SparseLinear of a 1xN spec with shards, its arrays split in `mode` in place (x
    split by its inputs in row mode): the layer's own call (bias included) under jit, against
    the unsplit layer."""
    from flax import nnx

    split = "in" if mode == "row" else "out"
    layer = jsp.nn.SparseLinear(IN, OUT, sparsity=jsp.Blocks(16, 0.25, shards=8, split=split),
                                rngs=nnx.Rngs(0))
    want = layer(x)
    sharded = jsp.shard_weight(layer.weight, mesh, mode, "d")
    for name, array in sharded.arrays().items():
        getattr(layer, name).value = array
    graphdef, state = nnx.split(layer)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    xs = jsp.shard_x(x, mesh, mode, "d")
    with jsp.matmul_path("sparse"):
        y = fn(state, xs)
        hlo = fn.lower(state, xs).compile().as_text()
    return {"err": float(jnp.max(jnp.abs(y - want))), "shards": layer.weight.shards,
            "split": layer.weight.split, "spec": spec_of(y), "collectives": collectives(hlo)}


MARLIN_SPECS = {"int4_marlin": jsp.Int4(128), "int4_marlin_g32": jsp.Int4(32),
                "int4_marlin_channel": jsp.Int4(None),
                "int4_nm_marlin": jsp.Int4(128, sparsity=jsp.NM(2, 4)),
                "int4_nm_marlin_channel": jsp.Int4(None, sparsity=jsp.NM(2, 4))}


def marlin_dense():
    """[1024, 512] bf16: a row shard of 8 holds 128 inputs (2:4's K tile), a column one 64."""
    return jax.random.normal(jax.random.key(2), (1024, 512), jnp.float32).astype(jnp.bfloat16)


def check_marlin_layout(mesh, name, mode):
    """Every device's share of a MARLIN weight split in `mode` is, array by array, the MARLIN
    layout of its own columns of the dense weight, packed on their own, or of its own inputs of
    the canonical weight (its rows of codes; its groups of scales, or all of a column's one)."""
    w, spec = marlin_dense(), MARLIN_SPECS[name]
    wq = jsp.fromdense(w, spec)
    try:
        ws = jsp.shard_weight(wq.packed_for("cuda"), mesh, mode, "d")
    except ValueError as e:
        return {"error": str(e)}
    devices = list(mesh.devices.flat)
    if mode == "column":
        size = w.shape[1] // len(devices)
        pack = jax.jit(lambda part: jsp.fromdense(part, spec).packed_for("cuda").arrays())
        wants = [pack(w[:, d * size:(d + 1) * size]) for d in range(len(devices))]
    else:
        wants = [canonical_rows(wq, d, len(devices)).packed_for("cuda").arrays()
                 for d in range(len(devices))]
    mismatched = []
    for array_name, array in ws.arrays().items():
        for shard in array.addressable_shards:
            d = devices.index(shard.device)
            if not np.array_equal(np.asarray(shard.data), np.asarray(wants[d][array_name])):
                mismatched.append(f"{array_name}@{d}")
    return {"mismatched": mismatched, "split": [str(a.sharding.spec) for a in ws.arrays().values()]}


def check_tiles_layout(w, devices):
    """A V:N:M weight's tiles split row-parallel over `devices`: every device's tiles are the
    packing of its own values and indices (what its kernel multiplies)."""
    mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))
    ws = jsp.shard_weight(w, mesh, "row", "d")
    held = {a: {s.device: np.asarray(s.data) for s in getattr(ws, a).addressable_shards}
            for a in ("values", "indices", "tiles")}
    mismatched, split = [], w.columns.shape[-1] // devices  # Columns: each shard's groups'.
    for index, device in enumerate(mesh.devices.flat):
        columns = np.asarray(w.columns)[..., index * split:(index + 1) * split]
        local = jsp.VNMSparse(held["values"][device], held["indices"][device], columns, v=w.v,
                              n=w.n, m=w.m, in_features=w.in_features // devices)
        if not np.array_equal(np.asarray(local.with_tiles().tiles, np.float32),
                              held["tiles"][device].astype(np.float32)):
            mismatched.append(index)
    return {"mismatched": mismatched, "tiles": str(ws.tiles.sharding.spec),
            "local": list(held["tiles"][mesh.devices.flat[0]].shape)}


def canonical_rows(wq, d, devices):
    """Device `d`'s inputs of a canonical int4 weight, by the format's own row splits (an
    array it keeps whole, one scale per column, whole)."""
    splits, arrays = wq._shard_splits("row"), {}
    for array_name, a in wq.arrays().items():
        split = splits.get(array_name)
        size = a.shape[split.axis] // devices if split else None
        arrays[array_name] = a if split is None else jax.lax.slice_in_dim(
            a, d * size, (d + 1) * size, axis=split.axis)
    return type(wq).from_arrays(wq.spec, wq.in_features // devices, arrays)


def check_marlin_product(mesh, name, mode):
    """The MARLIN kernel (on the SIMT emulator: JAXSPARSE_EMULATE_CUDA=1) on each device's
    share, against one device's: output spec, collectives, and x's gradient."""
    w = marlin_dense()
    wp = jsp.fromdense(w, MARLIN_SPECS[name]).packed_for("cuda")
    x = jax.random.normal(jax.random.key(3), (16, w.shape[0]), jnp.float32).astype(w.dtype)
    out = check_mode(name, wp, mesh, mode, "d", x)
    if "error" in out:
        return out
    ws, xs = jsp.shard_weight(wp, mesh, mode, "d"), jsp.shard_x(x, mesh, mode, "d")
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(product(x, w).astype(jnp.float32) ** 2)))
    got, want = grad(xs, ws), grad(x, wp)
    out["grad_err"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    out["grad_scale"] = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    out["grad_collectives"] = collectives(grad.lower(xs, ws).compile().as_text())
    return out


def check_unbalanced(balanced, whole, mesh, x):
    """A 1xN weight whose static field claims a balance its arrays lack (the constructor's
    check bypassed), split by hand as the balance would be (column parallel, or row parallel
    for a stacked one): its product is NaN, not silently wrong."""
    if balanced.stacked:  # The whole matrix's indptr, read as stacked rows: pad it to length.
        indptr = jnp.concatenate([whole.indptr, jnp.full(
            (balanced.indptr.shape[-1] - whole.indptr.shape[-1],), whole.indptr[-1])])
        whole = type(whole)._unflatten(whole._aux, (whole.values, whole.indices, indptr))
        x = jsp.shard_x(x, mesh, "row", "d")
    arrays = {n: jax.device_put(a, NamedSharding(mesh, spec)) for (n, a), spec in
              zip(whole.arrays().items(), (P("d", None), P("d"), P()))}
    ws = type(whole)._unflatten(balanced._aux, tuple(arrays.values()))
    y = jax.jit(product)(x, ws)
    return {"nan_columns": int(jnp.sum(jnp.any(jnp.isnan(y), axis=0))),
            "balanced_nan": bool(jnp.any(jnp.isnan(product(x, balanced))))}


def check_training(w, mesh):
    """Data-parallel SGD on a 2:4 layer under shard_map (local kernels, gradients summed over
    the devices) against the same steps on one device, and the gradient of a jit over sharded
    operands."""
    x = jax.random.normal(jax.random.key(3), (64, IN))
    target = jax.random.normal(jax.random.key(4), (64, OUT))

    def loss(values, x, t):
        return jnp.mean((x @ w.replace(values=values) - t) ** 2)

    def step(values, x, t):
        return values - 0.1 * jax.grad(loss)(values, x, t)

    def local_loss(values, x, t):  # This device's share of the global mean.
        return jnp.sum((x @ w.replace(values=values) - t) ** 2) / (64 * OUT)

    def sharded_step(values, x, t):
        # values enters replicated (P()): its gradient comes out summed over the devices.
        return values - 0.1 * jax.grad(local_loss)(values, x, t)

    dp = jax.jit(jax.shard_map(sharded_step, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                               out_specs=P()))
    one, many = w.values, w.values
    for _ in range(3):
        one = jax.jit(step)(one, x, target)
        many = dp(many, jax.device_put(x, NamedSharding(mesh, P("d"))),
                  jax.device_put(target, NamedSharding(mesh, P("d"))))
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    g_sharded = jax.jit(jax.grad(loss))(w.values, xs, target)
    # The gradients of a jit over a column- and a row-split weight (the backward kernels run on
    # the shards: check_backward counts the collectives).
    split_err = 0.0
    for mode in ("column", "row"):
        ws = jsp.shard_weight(w, mesh, mode, "d")
        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(ws.values, jsp.shard_x(x, mesh, mode, "d"),
                                                      target)
        want = jax.grad(loss, argnums=(0, 1))(w.values, x, target)
        split_err = max(split_err, *(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want)))
    return {"step_err": float(jnp.max(jnp.abs(one - many))),
            "grad_err": float(jnp.max(jnp.abs(g_sharded - jax.grad(loss)(w.values, x, target)))),
            "split_grad_err": split_err}


def main():
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    results = {}

    def run(key, fn, *args):
        try:
            results[key] = fn(*args)
        except Exception:  # Reported to the test, which names the check.
            results[key] = {"exception": traceback.format_exc()}

    if sys.argv[1:] == ["marlin"]:  # Run by tests/test_sharding.py with JAXSPARSE_EMULATE_CUDA=1.
        for name in MARLIN_SPECS:
            for mode in ("data", "column", "row"):
                run(f"{name}/{mode}", check_marlin_product, mesh, name, mode)
        json.dump(results, sys.stdout)
        return

    x = jax.random.normal(jax.random.key(1), (TOKENS, IN), jnp.float32)
    for name, w in formats().items():
        xw = x.astype(w.dtype)
        for mode in ("data", "column", "row"):
            run(f"{name}/{mode}", check_mode, name, w, mesh, mode, "d", xw)
            run(f"{name}/{mode}/backward", check_backward, name, w, mesh, mode, "d", xw)
    ws = formats()
    run("nm24/2d", check_2d, ws["nm24"], x)
    run("int4/2d", check_2d, ws["int4"], x)
    run("vnm_tiled_bf16/2d", check_2d, ws["vnm_tiled_bf16"], x.astype(jnp.bfloat16))
    run("vnm_tiled/row/layout", check_tiles_layout, ws["vnm_tiled"], 8)
    run("vnm_tiled_bf16/row/layout", check_tiles_layout, ws["vnm_tiled_bf16"], 4)
    run("blocks_shards/2d", check_2d, ws["blocks_shards"], x, ("column",))
    run("blocks_rows/2d", check_2d, ws["blocks_rows"], x, ("row",))
    run("blocks/fallback", check_fallback, ws["blocks"], mesh, x)
    run("blocks_shards/layer", check_layer, mesh, x)
    run("blocks_rows/layer", check_layer, mesh, x, "row")
    run("blocks_shards/unbalanced", check_unbalanced, ws["blocks_shards"], ws["blocks"], mesh, x)
    run("blocks_rows/unbalanced", check_unbalanced, ws["blocks_rows"], ws["blocks"], mesh, x)
    run("nm24/training", check_training, ws["nm24"], mesh)
    for name in MARLIN_SPECS:
        for mode in ("column", "row"):
            run(f"{name}/{mode}/layout", check_marlin_layout, mesh, name, mode)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
