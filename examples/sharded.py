"""Sharded sparse products on 8 (forced) CPU devices: data, column and row parallel.

    python examples/sharded.py

Every jaxsparse format partitions under `jax.jit` by the `NamedSharding`s of its operands
(jaxsparse/sharding.py): tokens split (data parallel), the weight split over its outputs (column
parallel) or over its inputs (row parallel, the partial products summed with a psum). No mode
gathers a weight, and neither do the backward kernels of `jax.grad`. `jsp.shard_weight(w, mesh,
mode, axis)` places a weight's arrays for a mode; `jsp.shard_x(x, mesh, mode, axis)` places the
activations. A data-parallel training step runs under `jax.shard_map`, each device's kernels on
its tokens; a tensor-parallel one under plain `jax.jit`.

On real hardware leave out the XLA_FLAGS line: the mesh is then made of the machine's devices
(GPUs, or the processes of `jax.distributed.initialize`).
"""

import os

# Before jax starts its backend: pretend the CPU is 8 devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxsparse as jsp  # noqa: E402


def main():
    mesh = Mesh(np.array(jax.devices()), ("d",))
    print(f"mesh: {dict(mesh.shape)} over {jax.devices()[0].platform}")
    w = jax.random.normal(jax.random.key(0), (1024, 1024))
    x = jax.random.normal(jax.random.key(1), (64, 1024))
    weights = {"2:4": jsp.fromdense(w, jsp.NM(2, 4)),
               "64:2:8": jsp.fromdense(w, jsp.VNM(64, 2, 8)),
               "int4 g128": jsp.fromdense(w, jsp.Int4(128)),
               # 1xN: equal block counts in 8 runs of outputs, so it splits column-parallel,
               # or in 8 runs of inputs (stored run after run), so it splits row-parallel.
               "1x16": jsp.fromdense(w, jsp.Blocks(16, 0.25, shards=8)),
               "1x16 in": jsp.fromdense(w, jsp.Blocks(16, 0.25, shards=8, split="in"))}
    product = jax.jit(lambda x, w: jsp.matmul(x, w, path="sparse"))
    for name, ws in weights.items():
        want = product(x, ws)  # One device.
        modes = {"1x16": ("data", "column"), "1x16 in": ("data", "row")}
        for mode in modes.get(name, ("data", "column", "row")):
            wsh = jsp.shard_weight(ws, mesh, mode, "d")
            xsh = jsp.shard_x(x, mesh, mode, "d")
            y = product(xsh, wsh)
            hlo = product.lower(xsh, wsh).compile().as_text()
            err = float(jnp.max(jnp.abs(y - want)))
            print(f"{name:9s} {mode:6s} out {str(y.sharding.spec):16s} max |diff| {err:.1e}  "
                  f"all-gather: {'all-gather' in hlo}  all-reduce: {'all-reduce' in hlo}")
            assert err < 1e-3 and "all-gather" not in hlo

    # Data-parallel training of the kept values: each device its 8 tokens, the gradient of the
    # replicated values summed over the devices by jax (its transpose of the broadcast).
    ws = weights["2:4"]
    target = jnp.tanh(x @ w)

    def loss(values, x, t):  # This device's share of the mean over the whole batch.
        return jnp.sum((jnp.tanh(x @ ws.replace(values=values)) - t) ** 2) / target.size

    step = jax.jit(jax.shard_map(lambda v, x, t: v - 0.5 * jax.grad(loss)(v, x, t), mesh=mesh,
                                 in_specs=(P(), P("d"), P("d")), out_specs=P()))
    rows = NamedSharding(mesh, P("d"))
    values = alone = ws.values
    for _ in range(5):
        values = step(values, jax.device_put(x, rows), jax.device_put(target, rows))
        alone = alone - 0.5 * jax.jit(jax.grad(loss))(alone, x, target)
    print(f"5 SGD steps, 8 devices vs one: max |diff| of the values "
          f"{float(jnp.max(jnp.abs(values - alone))):.1e}")

    # Tensor-parallel training under plain jit: the weight split over its outputs, the backward
    # kernels run on each shard too (x's cotangent summed over the shards, no weight gathered).
    def mean_loss(values, w, x, t):
        return jnp.mean((jnp.tanh(x @ w.replace(values=values)) - t) ** 2)

    grad = jax.jit(jax.grad(mean_loss))
    split = jsp.shard_weight(ws, mesh, "column", "d")
    g = grad(split.values, split, jsp.shard_x(x, mesh, "column", "d"), target)
    hlo = grad.lower(split.values, split, x, target).compile().as_text()
    err = float(jnp.max(jnp.abs(g - grad(ws.values, ws, x, target))))
    print(f"gradient over a column-split weight: values' gradient {str(g.sharding.spec):16s} "
          f"max |diff| {err:.1e}  all-gather: {'all-gather' in hlo}")
    assert err < 1e-5 and "all-gather" not in hlo


if __name__ == "__main__":
    main()
